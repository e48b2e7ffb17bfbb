//! A bounded history of recent events, from which watches resume.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::event::Event;
use crate::types::Revision;

/// The last `capacity` events, oldest first.
///
/// A watch that asks to start at a revision still inside the history is replayed from
/// it; one that asks for an older revision is told so and gets a `Reset` instead.
#[derive(Debug)]
pub struct WatchHistory {
    events: VecDeque<Arc<Event>>,
    capacity: usize,
    /// Revision of the newest event ever pushed (kept even when the buffer is empty).
    last_revision: Revision,
}

/// What the history can replay from a revision.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// Every event with revision >= the start, oldest first (possibly none).
    Events(Vec<Arc<Event>>),
    /// The start is older than the oldest event kept: the caller needs a full state.
    Compacted {
        /// Oldest revision still replayable.
        oldest: Revision,
    },
}

impl WatchHistory {
    /// An empty history holding at most `capacity` events, resuming after `revision`.
    pub fn new(capacity: usize, revision: Revision) -> Self {
        WatchHistory {
            events: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity: capacity.max(1),
            last_revision: revision,
        }
    }

    /// Appends an event, dropping the oldest when full. Revisions must increase.
    pub fn push(&mut self, event: Arc<Event>) {
        debug_assert!(event.revision > self.last_revision);
        self.last_revision = event.revision;
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Forgets everything (after a snapshot install) and resumes after `revision`.
    pub fn reset(&mut self, revision: Revision) {
        self.events.clear();
        self.last_revision = revision;
    }

    /// The revision of the newest event seen.
    pub fn last_revision(&self) -> Revision {
        self.last_revision
    }

    /// The oldest revision a watch can start from and still get every event.
    pub fn oldest_replayable(&self) -> Revision {
        match self.events.front() {
            Some(e) => e.revision,
            None => self.last_revision + 1,
        }
    }

    /// Events with revision >= `start`, or `Compacted` when some were dropped.
    pub fn replay_from(&self, start: Revision) -> Replay {
        let oldest = self.oldest_replayable();
        if start < oldest {
            return Replay::Compacted { oldest };
        }
        let skip = self.events.partition_point(|e| e.revision < start);
        Replay::Events(self.events.iter().skip(skip).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DeleteReason, EventKind};
    use crate::types::InstanceKey;

    fn ev(revision: Revision) -> Arc<Event> {
        Arc::new(Event {
            revision,
            kind: EventKind::Delete {
                key: InstanceKey::new("", "s", "i"),
                reason: DeleteReason::Deregistered,
            },
        })
    }

    #[test]
    fn replays_exactly_the_events_from_the_start_revision() {
        let mut h = WatchHistory::new(10, 0);
        for r in 1..=5 {
            h.push(ev(r));
        }
        let Replay::Events(events) = h.replay_from(3) else {
            panic!("expected events")
        };
        assert_eq!(events.iter().map(|e| e.revision).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(h.replay_from(6), Replay::Events(vec![]));
    }

    #[test]
    fn a_start_older_than_the_history_is_compacted() {
        let mut h = WatchHistory::new(3, 0);
        for r in 1..=5 {
            h.push(ev(r));
        }
        assert_eq!(h.replay_from(2), Replay::Compacted { oldest: 3 });
        assert!(matches!(h.replay_from(3), Replay::Events(e) if e.len() == 3));
    }

    #[test]
    fn an_empty_history_after_a_snapshot_replays_only_the_future() {
        let h = WatchHistory::new(3, 100);
        assert_eq!(h.replay_from(101), Replay::Events(vec![]));
        assert_eq!(h.replay_from(50), Replay::Compacted { oldest: 101 });
    }
}
