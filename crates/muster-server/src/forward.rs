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
    /// Grant the node with this id a read lease (`crate::read_lease`).
    ReadLease(u64),
    /// Change the membership.
    Membership(MembershipChange),
    /// Report on a TTL check: renews its TTL, and records its status and output when
    /// they changed. Answered with `Written`.
    ReportCheck(CheckReport),
    /// Would the receiver take part in an election a node starts now? Answered
    /// with `PreVote` (see `crate::pre_vote`).
    PreVote {
        /// The node asking.
        candidate: u64,
        /// The id of the last entry in its log (its snapshot's when it holds none).
        last_log: Option<openraft::LogId<u64>>,
    },
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
    /// A read lease granted.
    ReadLease(crate::read_lease::ReadLeaseGrant),
    /// The membership change's log index.
    MembershipChanged(u64),
    /// This node is not the leader (any more).
    NotLeader,
    /// The request failed.
    Failed(ApiError),
    /// Whether the receiver would take part in an election now.
    PreVote(bool),
}

/// Numbers the writes this node forwards to the leader, in a session of its own, so
/// that an attempt the leader never answered can be sent again without being
/// applied twice (see [`muster_core::sessions`]).
pub struct ForwardedWrites {
    session: u64,
    numbers: std::sync::Mutex<Numbers>,
}

#[derive(Default)]
struct Numbers {
    next: u64,
    in_flight: std::collections::BTreeSet<u64>,
}

/// A numbered write in flight: dropping it (answered, or given up) lets later writes
/// tell the state machine to forget its result.
pub struct InFlightWrite<'a> {
    writes: &'a ForwardedWrites,
    seq: u64,
}

impl ForwardedWrites {
    /// A new session with a random id (a node starts a new one at each start).
    pub fn new() -> Self {
        ForwardedWrites {
            session: rand::random(),
            numbers: Default::default(),
        }
    }

    /// `command` numbered as this session's next write, with the number below which
    /// every write of the session was answered.
    pub fn number(&self, command: Command) -> (Command, InFlightWrite<'_>) {
        let mut numbers = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
        let seq = numbers.next;
        numbers.next += 1;
        numbers.in_flight.insert(seq);
        let answered_below = numbers.in_flight.first().copied().unwrap_or(seq);
        let numbered = Command::Forwarded {
            session: self.session,
            seq,
            answered_below,
            command: Box::new(command),
        };
        (numbered, InFlightWrite { writes: self, seq })
    }
}

impl Default for ForwardedWrites {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InFlightWrite<'_> {
    fn drop(&mut self) {
        let mut numbers = self.writes.numbers.lock().unwrap_or_else(|p| p.into_inner());
        numbers.in_flight.remove(&self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered_below(command: &Command) -> u64 {
        match command {
            Command::Forwarded { answered_below, .. } => *answered_below,
            other => panic!("not numbered: {other:?}"),
        }
    }

    #[test]
    fn a_write_still_in_flight_keeps_its_result_remembered() {
        let writes = ForwardedWrites::new();
        let (first, first_in_flight) = writes.number(Command::Barrier);
        let (second, second_in_flight) = writes.number(Command::Barrier);
        assert_eq!(answered_below(&first), 0);
        assert_eq!(answered_below(&second), 0);
        // The second is answered; the first is still in flight.
        drop(second_in_flight);
        let (third, _third_in_flight) = writes.number(Command::Barrier);
        assert_eq!(answered_below(&third), 0);
        drop(first_in_flight);
        let (fourth, _) = writes.number(Command::Barrier);
        assert_eq!(answered_below(&fourth), 2, "0 and 1 answered, 2 in flight");
    }
}
