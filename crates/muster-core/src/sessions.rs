//! Forwarding sessions: the replicated memory that makes a forwarded write apply at
//! most once.
//!
//! A node that is not the leader forwards each write to the leader. When the leader
//! fails after appending the write but before answering, the forwarding node cannot
//! tell whether the write will be committed, and it must try again on the next
//! leader, or a write in flight at a failover would fail. Both attempts may then
//! reach the log. So the forwarding node numbers its writes within a session of its
//! own ([`crate::Command::Forwarded`]), and the state machine keeps, per session, the
//! result of every numbered write that may still be unanswered. A second attempt of
//! a write finds its result and answers it without applying anything.
//!
//! Memory stays bounded: each forwarded write says below which number all of its
//! session's writes were answered, and those results are dropped; and at most
//! [`MAX_FORWARD_SESSIONS`] sessions are kept (a node starts a new one at each
//! start), the least recently written dropped first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::ApplyResult;
use crate::types::Revision;

/// The most forwarding sessions the state machine remembers.
pub const MAX_FORWARD_SESSIONS: usize = 1024;

/// One forwarding node's session, as the state machine knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSession {
    /// The session id.
    pub id: u64,
    /// Every write of this session numbered below this was answered.
    pub answered_below: u64,
    /// The registry's revision after this session's last applied write (the least
    /// recently written session is dropped first).
    pub last_revision: Revision,
    /// Results of the writes that may still be unanswered, by number.
    pub results: BTreeMap<u64, ApplyResult>,
}

/// What a forwarded write is, for the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Not seen before: apply it and record its result.
    First,
    /// Applied before: this is its result.
    Repeat(ApplyResult),
    /// A write its session already had answered: it was applied then, or its sender
    /// gave up on it; either way nobody waits for this attempt.
    Stale,
}

/// Every session, with the changes of one apply for the storage layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardSessions {
    sessions: BTreeMap<u64, ForwardSession>,
}

/// What one apply changed in the sessions, so storage can rewrite or delete it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionChanges {
    /// Sessions created, changed or dropped.
    pub sessions: Vec<u64>,
    /// `(session, number)` of results recorded or dropped.
    pub results: Vec<(u64, u64)>,
}

impl SessionChanges {
    /// Adds `other`'s changes.
    pub fn extend(&mut self, other: SessionChanges) {
        self.sessions.extend(other.sessions);
        self.results.extend(other.results);
    }
}

impl ForwardSessions {
    /// A session, if it is remembered.
    pub fn get(&self, id: u64) -> Option<&ForwardSession> {
        self.sessions.get(&id)
    }

    /// The result recorded for write `seq` of `session`.
    pub fn result(&self, session: u64, seq: u64) -> Option<&ApplyResult> {
        self.sessions.get(&session)?.results.get(&seq)
    }

    /// Every session, by id.
    pub fn iter(&self) -> impl Iterator<Item = &ForwardSession> {
        self.sessions.values()
    }

    /// Number of sessions remembered.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is remembered.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Classifies write `seq` of `session`, first forgetting the results its
    /// session says were answered and making room for a new session.
    pub fn begin(&mut self, session: u64, seq: u64, answered_below: u64, changes: &mut SessionChanges) -> Attempt {
        if !self.sessions.contains_key(&session) {
            self.make_room(changes);
            changes.sessions.push(session);
        }
        let state = self.session_mut(session);
        if answered_below > state.answered_below {
            state.answered_below = answered_below;
            let kept = state.results.split_off(&answered_below);
            let answered = std::mem::replace(&mut state.results, kept);
            changes.results.extend(answered.into_keys().map(|s| (session, s)));
            changes.sessions.push(session);
        }
        if seq < state.answered_below {
            return Attempt::Stale;
        }
        match state.results.get(&seq) {
            Some(result) => Attempt::Repeat(result.clone()),
            None => Attempt::First,
        }
    }

    /// Records the result of the first attempt of write `seq` of `session`.
    pub fn record(&mut self, session: u64, seq: u64, result: ApplyResult, changes: &mut SessionChanges) {
        if let Some(state) = self.sessions.get_mut(&session) {
            state.last_revision = result.revision;
            state.results.insert(seq, result);
            changes.results.push((session, seq));
            changes.sessions.push(session);
        }
    }

    /// Drops the least recently written session while there are too many.
    fn make_room(&mut self, changes: &mut SessionChanges) {
        while self.sessions.len() >= MAX_FORWARD_SESSIONS {
            let Some(oldest) = self
                .sessions
                .values()
                .min_by_key(|s| (s.last_revision, s.id))
                .map(|s| s.id)
            else {
                return;
            };
            if let Some(dropped) = self.sessions.remove(&oldest) {
                changes.results.extend(dropped.results.into_keys().map(|s| (oldest, s)));
                changes.sessions.push(oldest);
            }
        }
    }

    /// The session `id`, created empty if it is not remembered.
    fn session_mut(&mut self, id: u64) -> &mut ForwardSession {
        self.sessions.entry(id).or_insert_with(|| ForwardSession {
            id,
            ..Default::default()
        })
    }

    /// Inserts a stored session as is (loading a snapshot).
    pub fn load(&mut self, session: ForwardSession) {
        self.sessions.insert(session.id, session);
    }

    /// Sets a stored session's bounds, keeping results already loaded (loading
    /// state from disk, where results are stored apart).
    pub fn load_bounds(&mut self, id: u64, answered_below: u64, last_revision: Revision) {
        let session = self.session_mut(id);
        session.answered_below = answered_below;
        session.last_revision = last_revision;
    }

    /// Inserts a stored result as is (loading state from disk).
    pub fn load_result(&mut self, session: u64, seq: u64, result: ApplyResult) {
        self.session_mut(session).results.insert(seq, result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Outcome;

    fn result(revision: Revision) -> ApplyResult {
        ApplyResult {
            revision,
            outcome: Outcome::Deregistered,
        }
    }

    #[test]
    fn a_repeat_finds_the_first_result_until_its_session_says_it_was_answered() {
        let mut sessions = ForwardSessions::default();
        let mut changes = SessionChanges::default();
        assert_eq!(sessions.begin(7, 3, 3, &mut changes), Attempt::First);
        sessions.record(7, 3, result(10), &mut changes);
        assert_eq!(sessions.begin(7, 3, 3, &mut changes), Attempt::Repeat(result(10)));
        // A later write says 3 was answered: its result goes, and an attempt of 3
        // arriving late is stale.
        assert_eq!(sessions.begin(7, 5, 4, &mut changes), Attempt::First);
        assert_eq!(sessions.result(7, 3), None);
        assert!(changes.results.contains(&(7, 3)));
        assert_eq!(sessions.begin(7, 3, 3, &mut changes), Attempt::Stale);
        // An older bound never lowers the session's.
        assert_eq!(sessions.get(7).map(|s| s.answered_below), Some(4));
    }

    #[test]
    fn the_least_recently_written_session_is_dropped_when_there_are_too_many() {
        let mut sessions = ForwardSessions::default();
        let mut changes = SessionChanges::default();
        for id in 0..MAX_FORWARD_SESSIONS as u64 {
            sessions.begin(id, 0, 0, &mut changes);
            // Session 0 writes last, so session 1 is the least recent.
            let revision = if id == 0 { 10_000 } else { id };
            sessions.record(id, 0, result(revision), &mut changes);
        }
        let mut changes = SessionChanges::default();
        sessions.begin(99_999, 0, 0, &mut changes);
        assert_eq!(sessions.len(), MAX_FORWARD_SESSIONS);
        assert!(sessions.get(1).is_none());
        assert!(sessions.get(0).is_some());
        assert!(changes.sessions.contains(&1) && changes.results.contains(&(1, 0)));
    }
}
