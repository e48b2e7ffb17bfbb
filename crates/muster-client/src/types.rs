//! What the client's calls take and return, in `muster-core` types where one exists.

use std::time::Duration;

use muster_core::{Health, Instance, LeaseId, Revision};
use muster_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// Where the answering node stood when it answered (every read carries one).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHeader {
    /// The node's applied revision.
    pub revision: Revision,
    /// The node that answered.
    pub node_id: u64,
    /// The leader the node knows of, if any.
    pub leader_id: Option<u64>,
    /// Milliseconds since the node last heard from the leader (0 on the leader).
    pub ms_since_leader_contact: u64,
}

impl From<Option<pb::ResponseHeader>> for ResponseHeader {
    fn from(h: Option<pb::ResponseHeader>) -> Self {
        let h = h.unwrap_or_default();
        ResponseHeader {
            revision: h.revision,
            node_id: h.node_id,
            leader_id: h.leader_known.then_some(h.leader_id),
            ms_since_leader_contact: h.ms_since_leader_contact,
        }
    }
}

/// The answer to a registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The instance as stored.
    pub instance: Instance,
    /// The lease keeping it alive, if any (granted with it when a TTL was given).
    pub lease_id: Option<LeaseId>,
    /// The revision the registration created.
    pub revision: Revision,
    /// The answering node.
    pub header: ResponseHeader,
}

/// A granted lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The lease id.
    pub id: LeaseId,
    /// Its time to live.
    pub ttl: Duration,
    /// The revision of the grant.
    pub revision: Revision,
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// Whatever the answering node has applied (the fast path).
    #[default]
    Local,
    /// Wait until the answering node has applied this revision (read-your-writes on
    /// any node).
    MinRevision(Revision),
    /// Confirm leadership through a quorum first.
    Linearizable,
}

impl ReadMode {
    pub(crate) fn to_pb(self) -> (pb::ReadMode, Revision) {
        match self {
            ReadMode::Local => (pb::ReadMode::Local, 0),
            ReadMode::MinRevision(r) => (pb::ReadMode::MinRevision, r),
            ReadMode::Linearizable => (pb::ReadMode::Linearizable, 0),
        }
    }
}

/// Filters and freshness for [`Client::discover`](crate::Client::discover).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoverOptions {
    /// Namespace; empty means `default`.
    pub namespace: String,
    /// Every tag must be present on an instance.
    pub tags: Vec<String>,
    /// Only this zone.
    pub zone: Option<String>,
    /// Only these health states; empty means all.
    pub health: Vec<Health>,
    /// How fresh the answer must be.
    pub mode: ReadMode,
    /// Also wait for this revision (combines with `mode`); 0 means none.
    pub min_revision: Revision,
}

/// A node's view of itself and of the cluster (`Cluster.Status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id.
    pub node_id: u64,
    /// leader, follower, candidate, learner or shutdown.
    pub role: String,
    /// Current Raft term.
    pub term: u64,
    /// The leader it knows of, if any.
    pub leader_id: Option<u64>,
    /// Last Raft log index it holds.
    pub last_log_index: u64,
    /// Last Raft log index it applied.
    pub applied_index: u64,
    /// Its applied registry revision.
    pub revision: Revision,
    /// SHA-256 of its registry state: equal on nodes with the same state.
    pub digest: String,
    /// Milliseconds since it last heard from the leader.
    pub ms_since_leader_contact: u64,
    /// Instances registered.
    pub instances: u64,
    /// Leases held.
    pub leases: u64,
    /// Index of its last snapshot.
    pub snapshot_index: u64,
    /// Its cluster's id (16 hex digits), unless it joined and has not learned it yet.
    pub cluster_id: Option<String>,
    /// The command level it states to its peers (1 for builds before levels).
    pub command_level: u32,
}

impl From<pb::StatusResponse> for NodeStatus {
    fn from(s: pb::StatusResponse) -> Self {
        NodeStatus {
            node_id: s.node_id,
            role: s.role,
            term: s.term,
            leader_id: s.leader_known.then_some(s.leader_id),
            last_log_index: s.last_log_index,
            applied_index: s.applied_index,
            revision: s.revision,
            digest: s.digest,
            ms_since_leader_contact: s.ms_since_leader_contact,
            instances: s.instances,
            leases: s.leases,
            snapshot_index: s.snapshot_index,
            cluster_id: (!s.cluster_id.is_empty()).then_some(s.cluster_id),
            command_level: s.command_level.max(1),
        }
    }
}

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node id.
    pub node_id: u64,
    /// Its peer (Raft) address.
    pub peer_addr: String,
    /// A voter, or a learner when false.
    pub voter: bool,
    /// Whether it is the leader.
    pub leader: bool,
    /// Log index the leader last saw it hold (known on the leader only).
    pub matched_index: u64,
}

impl From<pb::Member> for Member {
    fn from(m: pb::Member) -> Self {
        Member {
            node_id: m.node_id,
            peer_addr: m.peer_addr,
            voter: m.voter,
            leader: m.leader,
            matched_index: m.matched_index,
        }
    }
}

/// The cluster's membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// Every member, voters and learners.
    pub members: Vec<Member>,
    /// The leader, if the answering node knows one.
    pub leader_id: Option<u64>,
}

/// The outcome of a membership change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    /// The membership after the change.
    pub members: Vec<Member>,
    /// The Raft log index of the change.
    pub log_index: u64,
}

impl From<pb::MembershipResponse> for MembershipChange {
    fn from(m: pb::MembershipResponse) -> Self {
        MembershipChange {
            members: m.members.into_iter().map(Member::from).collect(),
            log_index: m.log_index,
        }
    }
}
