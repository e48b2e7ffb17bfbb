//! Requests a follower hands to the leader over the peer port.

use muster_core::{ApplyResult, Command, LeaseId};
use serde::{Deserialize, Serialize};

use crate::checks::CheckReport;
use crate::error::ApiError;

/// A membership change, run on the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add a learner at a peer address.
    AddLearner {
        /// Node id.
        id: u64,
        /// Its peer address.
        addr: String,
    },
    /// Make a learner a voter.
    Promote(u64),
    /// Remove a node (voter or learner).
    Remove(u64),
}

/// What a follower asks of the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// Propose a command.
    Write(Box<Command>),
    /// Renew leases; answers their TTLs (0 for unknown leases).
    KeepAlive(Vec<LeaseId>),
    /// Confirm leadership and answer the log index a linearizable read must wait for.
    ReadIndex,
    /// Change the membership.
    Membership(MembershipChange),
    /// Report on a TTL check: renews its TTL, and records its status and output when
    /// they changed. Answered with `Written`.
    ReportCheck(CheckReport),
}

/// The leader's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardResponse {
    /// The applied result of a write.
    Written(ApplyResult),
    /// `(lease, ttl ms or 0)` per lease asked for.
    KeptAlive(Vec<(LeaseId, u64)>),
    /// Wait until the local applied index reaches this.
    ReadIndex(u64),
    /// The membership change's log index.
    MembershipChanged(u64),
    /// This node is not the leader (any more).
    NotLeader,
    /// The request failed.
    Failed(ApiError),
}
