//! The leader's lease: how recently a quorum accepted this leader, measured from when
//! the leader sent the messages they accepted.
//!
//! A follower that accepts an append from the leader refuses to vote for anyone else
//! for openraft's leader lease (the maximum election timeout) counted from when it
//! received it, and a node that has just started refuses votes for that long too
//! (`crate::peer`), since it forgot when it last heard from a leader. So once a
//! quorum has accepted appends the leader sent at time `t`, no other leader can be
//! elected before `t` plus the election timeout. The leader uses a fraction of that
//! window (half the minimum election timeout) to answer linearizable reads without a
//! heartbeat round and to renew leases; the rest is margin for clocks that run at
//! different rates on different nodes.
//!
//! Acknowledgements are recorded by the peer network with the instant each append
//! was sent, and the quorum's time is read at the moment of use. (openraft's
//! `millis_since_quorum_ack` metric is computed when the metrics are published, so a
//! process paused after publishing would read a stale, too fresh value.)

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use muster_store::NodeId;
use openraft::Vote;

/// The latest accepted append per follower, with the vote (leader and term) it
/// carried.
#[derive(Default)]
pub struct QuorumClock {
    acks: Mutex<HashMap<NodeId, (Vote<NodeId>, Instant)>>,
}

impl QuorumClock {
    /// Records that `follower` accepted an append carrying `vote` that was sent at
    /// `sent`.
    pub fn record(&self, follower: NodeId, vote: &Vote<NodeId>, sent: Instant) {
        let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        match acks.get_mut(&follower) {
            Some((known, at)) if known == vote => *at = (*at).max(sent),
            _ => {
                acks.insert(follower, (*vote, sent));
            }
        }
    }

    /// The latest send time a quorum of `voters` accepted from the leader `me` with
    /// `vote` (the leader counts itself at `now`); `None` when no quorum has.
    pub fn quorum_accepted_at(
        &self,
        me: NodeId,
        vote: &Vote<NodeId>,
        voters: impl IntoIterator<Item = NodeId>,
        now: Instant,
    ) -> Option<Instant> {
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let mut voter_count = 0;
        let mut times: Vec<Instant> = voters
            .into_iter()
            .inspect(|_| voter_count += 1)
            .filter_map(|id| {
                if id == me {
                    return Some(now);
                }
                acks.get(&id).filter(|(v, _)| v == vote).map(|(_, at)| *at)
            })
            .collect();
        let quorum = voter_count / 2 + 1;
        if times.len() < quorum {
            return None;
        }
        times.sort_unstable_by(|a, b| b.cmp(a));
        Some(times[quorum - 1])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;

    fn vote(term: u64, leader: NodeId) -> Vote<NodeId> {
        Vote::new_committed(term, leader)
    }

    #[test]
    fn a_leader_of_three_needs_one_follower_and_takes_the_latest_acceptance() {
        let clock = QuorumClock::default();
        let voters = BTreeSet::from([1, 2, 3]);
        let now = Instant::now();
        let v = vote(4, 1);
        assert_eq!(clock.quorum_accepted_at(1, &v, voters.iter().copied(), now), None);
        clock.record(2, &v, now - Duration::from_millis(80));
        assert_eq!(
            clock.quorum_accepted_at(1, &v, voters.iter().copied(), now),
            Some(now - Duration::from_millis(80))
        );
        clock.record(3, &v, now - Duration::from_millis(20));
        assert_eq!(
            clock.quorum_accepted_at(1, &v, voters.iter().copied(), now),
            Some(now - Duration::from_millis(20))
        );
        // An older acceptance arriving late does not move a follower's time back.
        clock.record(3, &v, now - Duration::from_millis(90));
        assert_eq!(
            clock.quorum_accepted_at(1, &v, voters.iter().copied(), now),
            Some(now - Duration::from_millis(20))
        );
    }

    #[test]
    fn a_leader_of_five_needs_two_followers_and_takes_the_second_latest() {
        let clock = QuorumClock::default();
        let voters = BTreeSet::from([1, 2, 3, 4, 5]);
        let now = Instant::now();
        let v = vote(2, 1);
        clock.record(2, &v, now - Duration::from_millis(10));
        assert_eq!(clock.quorum_accepted_at(1, &v, voters.iter().copied(), now), None);
        clock.record(3, &v, now - Duration::from_millis(30));
        clock.record(4, &v, now - Duration::from_millis(50));
        assert_eq!(
            clock.quorum_accepted_at(1, &v, voters.iter().copied(), now),
            Some(now - Duration::from_millis(30))
        );
    }

    #[test]
    fn acceptances_of_another_term_or_leader_do_not_count() {
        let clock = QuorumClock::default();
        let voters = BTreeSet::from([1, 2, 3]);
        let now = Instant::now();
        clock.record(2, &vote(3, 1), now);
        clock.record(3, &vote(4, 2), now);
        assert_eq!(
            clock.quorum_accepted_at(1, &vote(4, 1), voters.iter().copied(), now),
            None
        );
        // A node that is not a voter does not count, even when it accepted.
        clock.record(9, &vote(4, 1), now);
        assert_eq!(
            clock.quorum_accepted_at(1, &vote(4, 1), voters.iter().copied(), now),
            None
        );
    }

    #[test]
    fn a_single_voter_is_its_own_quorum() {
        let clock = QuorumClock::default();
        let now = Instant::now();
        assert_eq!(clock.quorum_accepted_at(1, &vote(1, 1), [1], now), Some(now));
    }
}
