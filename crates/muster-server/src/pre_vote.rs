//! Elections only a quorum would join (pre-vote, Raft dissertation §9.6).
//!
//! openraft 0.9 starts an election whenever its election timer runs out, and each
//! election raises the node's term. A node cut off from the others therefore keeps
//! raising its term while it cannot win, and when it is reachable again its answer
//! to the leader's next append states the higher term: the leader steps down and
//! the cluster elects again for nothing (the fault suite measured 0.7 s without a
//! leader after every healed minority partition).
//!
//! So a voter that has not heard from a leader for the shortest election timeout
//! asks the other voters, every heartbeat, whether they would take part in an
//! election ([`ForwardRequest::PreVote`]). A voter agrees when it is not the leader,
//! has not heard from one for that long itself, and its log is not ahead of the
//! asking node's ([`grants`]). Only while a quorum
//! (this node included, every half of a joint membership) agrees does this node let
//! openraft's timer start elections; an unreachable or silent voter never counts as
//! agreeing. A voter of an older build cannot read the question and refuses it as
//! undecodable: it counts as agreeing, as it would vote, so a rolling upgrade keeps
//! its elections. Nothing here touches a real vote, so safety stays openraft's. While
//! the node leads or follows a live leader the timer is off, so a node that took
//! part in an election and is then paused or cut off cannot campaign before a round
//! has found a quorum again.
//!
//! Once a round has found a quorum, the node also starts the election itself when
//! openraft's timer is overdue: not run out by the latest it normally would (the
//! leader lease of one longest election timeout, then an election timeout of at
//! most the longest), counted from the last leader contact or change of vote.
//! openraft adds twice the longest election timeout to its timer for good once the
//! node has seen a longer log in an election it lost, until it campaigns again, so
//! that the node ahead elects first; the quorum's agreement already says no voter
//! is ahead, so here that only delayed failover: the benchmark measured 1.5-1.6 s
//! from killing the leader to the next write in about one run in eight, when the
//! node ahead was one that had lost the first election at startup, against 0.7 s
//! otherwise. Only an overdue timer is overtaken, so the usual election is still
//! openraft's, with its randomized timeout, and two nodes do not campaign at once
//! more often than before.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{LogId, ServerState};

use crate::forward::{ForwardRequest, ForwardResponse};
use crate::network::PeerError;
use crate::node::NodeCore;

/// Whether this node would take part in an election a node whose log ends at
/// `candidate_last_log` starts now: it does not lead, no leader has reached it for
/// the shortest election timeout, and its own log is not more up to date (Raft's
/// voting rule, so that a node behind the others holds back and the one ahead,
/// which can win, elects first).
pub fn grants(core: &NodeCore, candidate_last_log: Option<&LogId<u64>>) -> bool {
    if core.raft.metrics().borrow().state == ServerState::Leader {
        return false;
    }
    !core.heard_from_leader_within(core.config.raft.election_min) && last_log_id(core).as_ref() <= candidate_last_log
}

/// The id of the last entry in this node's log, or of its snapshot's last entry
/// when the log holds none after it.
fn last_log_id(core: &NodeCore) -> Option<LogId<u64>> {
    let snapshot = core.raft.metrics().borrow().snapshot;
    core.log_durability.last_log_id().max(snapshot)
}

/// Whether `agreed` holds a majority of every configuration of a (joint) membership.
pub fn is_quorum(configs: &[BTreeSet<u64>], agreed: &BTreeSet<u64>) -> bool {
    !configs.is_empty()
        && configs
            .iter()
            .all(|voters| voters.iter().filter(|v| agreed.contains(v)).count() * 2 > voters.len())
}

/// Runs pre-vote rounds until the node stops.
pub async fn run(core: Arc<NodeCore>) {
    let every = core.config.raft.heartbeat;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Elections start switched off (`enable_elect: false` in the Raft config).
    let mut allowed = false;
    let mut timer = ElectionTimer::new(&core);
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        timer.observe(&core);
        // Following a live leader: no election is near, and none may start before a
        // round has found a quorum again (a node paused past its election timeout
        // would otherwise campaign the moment it resumes).
        if core.heard_from_leader_within(core.config.raft.election_min) {
            switch_elections(&core, &mut allowed, false, None);
            continue;
        }
        let (configs, others) = {
            let metrics = core.raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            let configs: Vec<BTreeSet<u64>> = membership.get_joint_config().clone();
            let is_voter = configs.iter().any(|c| c.contains(&core.id));
            if !is_voter || m.state == ServerState::Leader {
                drop(m);
                switch_elections(&core, &mut allowed, false, None);
                continue;
            }
            let others: Vec<(u64, String)> = membership
                .nodes()
                .filter(|(id, _)| **id != core.id && configs.iter().any(|c| c.contains(id)))
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect();
            (configs, others)
        };
        let mut agreed = BTreeSet::from([core.id]);
        let question = ForwardRequest::PreVote {
            candidate: core.id,
            last_log: last_log_id(&core),
        };
        let asked = others.iter().map(|(id, addr)| {
            let core = &core;
            let question = &question;
            async move {
                let answer = core.channels.forward(addr, question, every * 2).await;
                let agrees = match answer {
                    Ok(ForwardResponse::PreVote(agrees)) => agrees,
                    // An older build, which cannot read the question, votes.
                    Err(PeerError::Refused { ref message, .. }) => message.contains("undecodable"),
                    _ => false,
                };
                (*id, agrees)
            }
        });
        for (id, agrees) in futures::future::join_all(asked).await {
            if agrees {
                agreed.insert(id);
            }
        }
        let quorum = is_quorum(&configs, &agreed);
        if !quorum {
            core.metrics.elections_held_back.inc();
        }
        switch_elections(&core, &mut allowed, quorum, Some(&agreed));
        if quorum && timer.overdue(&core) {
            tracing::info!(
                since_leader_ms = core.since_leader_contact().as_millis() as u64,
                "openraft's election timer is overdue: campaigning"
            );
            core.metrics.elections_started_here.inc();
            if let Err(e) = core.raft.trigger().elect().await {
                tracing::warn!(error = %e, "starting an election failed");
            }
        }
    }
}

/// When this node starts an election itself: once openraft's timer is overdue,
/// counted from the last leader contact or change of vote.
struct ElectionTimer {
    /// The vote last seen, and when it was first seen.
    vote: openraft::Vote<u64>,
    vote_seen_at: Instant,
}

impl ElectionTimer {
    fn new(core: &NodeCore) -> Self {
        ElectionTimer {
            vote: core.raft.metrics().borrow().vote,
            vote_seen_at: Instant::now(),
        }
    }

    /// Notes a change of vote (an election here or elsewhere).
    fn observe(&mut self, core: &NodeCore) {
        let vote = core.raft.metrics().borrow().vote;
        if vote != self.vote {
            self.vote = vote;
            self.vote_seen_at = Instant::now();
        }
    }

    /// Whether this node follows and openraft's timer is overdue.
    fn overdue(&self, core: &NodeCore) -> bool {
        timer_overdue(
            core.raft.metrics().borrow().state,
            core.since_leader_contact(),
            self.vote_seen_at.elapsed(),
            core.config.raft.election_max,
        )
    }
}

/// Whether openraft's election timer is overdue on a node in `state`, `since_leader`
/// after a leader last reached it and `since_vote` after its vote last changed: a
/// follower's timer runs for its leader lease (the longest election timeout) and
/// then an election timeout of at most `longest`. A candidate's timer is its own
/// business (it re-elects after an election timeout), and a leader has none.
fn timer_overdue(state: ServerState, since_leader: Duration, since_vote: Duration, longest: Duration) -> bool {
    state == ServerState::Follower && since_leader.min(since_vote) >= longest * 2
}

/// Switches openraft's elections on or off (`open`) when they are not already:
/// after a round, which found `agreed` (`Some`), or because a leader leads (`None`).
fn switch_elections(core: &NodeCore, allowed: &mut bool, open: bool, agreed: Option<&BTreeSet<u64>>) {
    if *allowed != open {
        *allowed = open;
        core.raft.runtime_config().elect(open);
        core.metrics.elections_allowed.set(i64::from(open));
        match agreed {
            None => tracing::debug!("a leader leads: elections off"),
            Some(agreed) if open => tracing::info!(?agreed, "a quorum would elect: elections allowed"),
            Some(agreed) => tracing::info!(?agreed, "no quorum would elect: elections held back"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_followers_timer_is_overdue_after_the_leader_lease_and_the_longest_election_timeout() {
        let ms = Duration::from_millis;
        let longest = ms(400);
        // openraft's timer may still run out on its own up to 800 ms.
        assert!(!timer_overdue(ServerState::Follower, ms(799), ms(5_000), longest));
        assert!(timer_overdue(ServerState::Follower, ms(800), ms(5_000), longest));
        // A vote given or taken since starts the count again (another node campaigns).
        assert!(!timer_overdue(ServerState::Follower, ms(5_000), ms(100), longest));
        // Candidates and leaders are left to openraft.
        assert!(!timer_overdue(ServerState::Candidate, ms(5_000), ms(5_000), longest));
        assert!(!timer_overdue(ServerState::Leader, ms(5_000), ms(5_000), longest));
    }

    #[test]
    fn a_quorum_is_a_majority_of_every_configuration() {
        let three = [set(&[1, 2, 3])];
        assert!(!is_quorum(&three, &set(&[1])));
        assert!(is_quorum(&three, &set(&[1, 2])));
        assert!(is_quorum(&[set(&[1])], &set(&[1])), "a single voter elects alone");
        assert!(
            !is_quorum(&[set(&[1, 2, 3, 4])], &set(&[1, 2])),
            "half is not a majority"
        );
        // Joint: the old and the new configuration each need their majority.
        let joint = [set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(!is_quorum(&joint, &set(&[1, 2, 3])));
        assert!(is_quorum(&joint, &set(&[1, 3, 4])));
        // Agreement of nodes outside the membership counts for nothing.
        assert!(!is_quorum(&three, &set(&[1, 7, 8])));
        assert!(!is_quorum(&[], &set(&[1])));
    }
}
