//! Where a node stands in its cluster — role, term, indexes, lag, readiness and the
//! members — computed once here for every frontend (gRPC `Cluster`, `/health`,
//! `/readyz`, REST `/v1/cluster/*`, metrics).

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::ServerState;
use serde::Serialize;

use crate::node::NodeCore;

/// A node whose applied index is further than this behind the commit index it knows
/// is not ready: it would serve reads that are visibly stale.
pub const READY_MAX_LAG: u64 = 1000;

/// Shortest leader silence after which a node calls itself not ready.
const MIN_CONTACT_GRACE: Duration = Duration::from_secs(1);

/// The lowercase name of a Raft role.
pub fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// A snapshot of one node's Raft and registry state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    /// This node.
    pub node: u64,
    /// leader, follower, candidate, learner or shutdown.
    pub role: &'static str,
    /// The leader, if known.
    pub leader: Option<u64>,
    /// Whether a leader is known.
    pub leader_known: bool,
    /// Raft term.
    pub term: u64,
    /// Last log index on this node.
    pub last_log_index: u64,
    /// Highest commit index this node knows of (its own as leader, the leader's as
    /// last reported in an append otherwise; 0 before the first contact).
    pub commit_index: u64,
    /// Applied log index.
    pub applied_index: u64,
    /// Log index of the last snapshot.
    pub snapshot_index: u64,
    /// Entries known committed but not yet applied here.
    pub lag: u64,
    /// Applied registry revision.
    pub revision: u64,
    /// Milliseconds since this node last heard from the leader (as leader: since a
    /// quorum last acknowledged it).
    pub ms_since_leader_contact: u64,
    /// Whether this node has heard from a leader since it started (always true on
    /// the leader itself).
    pub leader_contacted: bool,
    /// Whether this node should receive traffic (see [`NodeStatus::not_ready_reason`]).
    pub ready: bool,
    /// The cluster's id (16 hex digits), unless this node joined and has not learned
    /// it yet.
    pub cluster_id: Option<String>,
    /// The command level this node states to its peers (see
    /// [`crate::member_levels`]).
    pub command_level: u32,
}

impl NodeStatus {
    /// Why the node is not ready, or `None` when it is: it must know a leader, have
    /// heard from it (or, as leader, from a quorum) recently, and have applied all but
    /// [`READY_MAX_LAG`] of the entries it knows are committed.
    pub fn not_ready_reason(&self, contact_grace: Duration) -> Option<String> {
        if self.leader.is_none() {
            return Some("no leader known".into());
        }
        if !self.leader_contacted {
            // A restarted follower may know a leader from its stored vote and have
            // applied entries from disk, but until the leader reaches it, it cannot
            // know how far behind it is.
            return Some("not yet contacted by the leader".into());
        }
        if self.ms_since_leader_contact > contact_grace.as_millis() as u64 {
            return Some(format!("leader not heard from for {} ms", self.ms_since_leader_contact));
        }
        if self.lag > READY_MAX_LAG {
            return Some(format!("{} committed entries not applied yet", self.lag));
        }
        None
    }
}

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberInfo {
    /// Node id.
    pub node: u64,
    /// Peer (Raft) address.
    pub peer_addr: String,
    /// Whether it votes (otherwise a learner).
    pub voter: bool,
    /// Whether it is the leader this node knows.
    pub leader: bool,
    /// Highest log index known replicated to it (known on the leader only; 0
    /// elsewhere).
    pub matched_index: u64,
}

impl NodeCore {
    /// How long the leader may stay silent before this node calls itself not ready.
    pub fn contact_grace(&self) -> Duration {
        (self.config.raft.election_max * 2).max(MIN_CONTACT_GRACE)
    }

    /// Where this node stands now.
    pub fn status(&self) -> NodeStatus {
        let view = self.view();
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let last_log_index = m.last_log_index.unwrap_or(0);
        let applied_index = m.last_applied.map_or(0, |l| l.index);
        let commit_index = if m.state == ServerState::Leader {
            leader_commit_index(&m, last_log_index)
        } else {
            self.leader_commit()
        }
        .max(applied_index);
        let mut status = NodeStatus {
            node: self.id,
            role: role_name(m.state),
            leader: m.current_leader,
            leader_known: m.current_leader.is_some(),
            term: m.current_term,
            last_log_index,
            commit_index,
            applied_index,
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            lag: commit_index.saturating_sub(applied_index),
            revision: view.revision,
            ms_since_leader_contact: view.ms_since_leader_contact,
            leader_contacted: m.state == ServerState::Leader || self.leader_contacted(),
            ready: false,
            cluster_id: self.cluster.id().map(crate::identity::format_cluster_id),
            command_level: self.member_levels.own(),
        };
        status.ready = status.not_ready_reason(self.contact_grace()).is_none();
        status
    }

    /// The cluster's members as this node knows them, in id order.
    pub fn members(&self) -> Vec<MemberInfo> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let matched = m.replication.clone().unwrap_or_default();
        membership
            .nodes()
            .map(|(id, node)| MemberInfo {
                node: *id,
                peer_addr: node.addr.clone(),
                voter: voters.contains(id),
                leader: m.current_leader == Some(*id),
                matched_index: matched.get(id).and_then(|l| l.map(|l| l.index)).unwrap_or(0),
            })
            .collect()
    }
}

/// The leader's commit index: the highest index a quorum of voters has (the leader
/// counts with its own last log index). openraft 0.9 does not publish it directly.
fn leader_commit_index(m: &openraft::RaftMetrics<u64, openraft::BasicNode>, last_log_index: u64) -> u64 {
    let membership = m.membership_config.membership();
    let replication = m.replication.clone().unwrap_or_default();
    let mut matched: Vec<u64> = membership
        .voter_ids()
        .map(|id| {
            if id == m.id {
                last_log_index
            } else {
                replication.get(&id).and_then(|l| l.map(|l| l.index)).unwrap_or(0)
            }
        })
        .collect();
    if matched.is_empty() {
        return 0;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched[matched.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> NodeStatus {
        NodeStatus {
            node: 2,
            role: "follower",
            leader: Some(1),
            leader_known: true,
            term: 3,
            last_log_index: 10,
            commit_index: 10,
            applied_index: 10,
            snapshot_index: 0,
            lag: 0,
            revision: 5,
            ms_since_leader_contact: 40,
            leader_contacted: true,
            ready: true,
            cluster_id: Some("00000000000000aa".into()),
            command_level: 2,
        }
    }

    #[test]
    fn a_caught_up_follower_in_touch_with_its_leader_is_ready() {
        assert_eq!(status().not_ready_reason(Duration::from_secs(1)), None);
    }

    #[test]
    fn no_leader_or_a_silent_leader_or_a_large_lag_is_not_ready() {
        let grace = Duration::from_secs(1);
        let mut s = status();
        s.leader = None;
        assert!(s.not_ready_reason(grace).unwrap().contains("no leader"));
        let mut s = status();
        s.ms_since_leader_contact = 5_000;
        assert!(s.not_ready_reason(grace).unwrap().contains("not heard"));
        let mut s = status();
        s.lag = READY_MAX_LAG + 1;
        assert!(s.not_ready_reason(grace).unwrap().contains("not applied"));
    }

    #[test]
    fn a_follower_never_contacted_is_not_ready() {
        let mut s = status();
        s.leader_contacted = false;
        assert!(s.not_ready_reason(Duration::from_secs(1)).is_some());
    }
}
