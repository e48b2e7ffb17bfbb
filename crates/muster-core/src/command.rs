//! Commands: the payload of every Raft entry, and what applying one answers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::{Health, Instance, InstanceKey, InstanceSpec, LeaseId, Revision};
use crate::validate::ValidationError;

/// A state change, proposed by the leader and applied identically on every replica.
///
/// Each command carries the leader's clock (`now_ms`) when time matters, so `apply`
/// never reads a clock itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Register or update one instance. With `grant_ttl_ms`, first grant a new lease
    /// of that TTL and attach the instance to it, all in this one entry.
    Register {
        /// The instance to register.
        spec: InstanceSpec,
        /// Grant a fresh lease with this TTL for the instance (spec.lease_id must be
        /// unset).
        grant_ttl_ms: Option<u64>,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// Remove one instance.
    Deregister {
        /// The instance to remove.
        key: InstanceKey,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// Grant a lease. `lease_id` 0 lets the state machine assign the next free id.
    GrantLease {
        /// Requested id, or 0.
        lease_id: LeaseId,
        /// Time to live in milliseconds.
        ttl_ms: u64,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// Revoke a lease and remove every instance attached to it.
    RevokeLease {
        /// The lease.
        lease_id: LeaseId,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// Expire leases whose deadline passed on the leader; removes their instances.
    ExpireLeases {
        /// Leases to expire; unknown ones are skipped.
        lease_ids: Vec<LeaseId>,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// Changes nothing. The leader proposes one when a follower lags and replication
    /// has stalled (openraft 0.9 resumes replication to a follower that was
    /// unreachable only when a new entry arrives).
    Barrier,
    /// Record the remaining TTL of leases nobody renews, so a new leader does not
    /// restart their clocks from the full TTL. `None` clears a previous checkpoint
    /// (the lease is being kept alive again).
    CheckpointLeases {
        /// `(lease, remaining ms or None)`.
        remaining: Vec<(LeaseId, Option<u64>)>,
    },
    /// Change the health of one instance (one without checks: the health of an
    /// instance with checks follows them).
    SetHealth {
        /// The instance.
        key: InstanceKey,
        /// Its new health.
        health: Health,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// Record a report on one TTL check: its new status and output. The leader
    /// proposes this only when the status or output changes; reports that change
    /// nothing only renew the TTL in the leader's memory.
    UpdateCheck {
        /// The instance the check belongs to.
        key: InstanceKey,
        /// The check.
        check_id: String,
        /// Its new status.
        status: Health,
        /// Its new output.
        output: String,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// The leader saw these checks' TTLs run out: mark them critical with the
    /// output "TTL expired". Unknown checks are skipped.
    ExpireChecks {
        /// `(instance, check id)` pairs.
        checks: Vec<(InstanceKey, String)>,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// Remove instances that have a check critical for longer than its
    /// `deregister_critical_after` at `now_ms`. Instances that no longer qualify
    /// (a check passed meanwhile) are skipped.
    EvictCritical {
        /// Candidate instances.
        keys: Vec<InstanceKey>,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// A write a node forwarded to the leader, numbered so that sending it again
    /// after an unanswered attempt cannot apply it twice: the state machine keeps the
    /// result of each numbered write until the forwarding node says it was answered,
    /// and answers a repeat with the first result, changing nothing (see
    /// [`crate::sessions`]).
    Forwarded {
        /// The forwarding node's session: random, new each time the node starts.
        session: u64,
        /// The write's number in its session; every attempt of it carries the same.
        seq: u64,
        /// Every write of the session numbered below this was answered, so the
        /// state machine may forget their results.
        answered_below: u64,
        /// The write itself (neither a batch nor another forwarded write).
        command: Box<Command>,
    },
    /// Commands proposed together in one Raft entry (the leader batches concurrent
    /// writes), applied in order exactly as if each were an entry of its own; the
    /// outcome is [`Outcome::Batch`] with one result per command. Batches do not
    /// nest and hold at most [`MAX_BATCH_COMMANDS`] commands.
    Batch {
        /// The commands, in order.
        commands: Vec<Command>,
    },
    /// Put one instance in maintenance, or take it out: in maintenance it carries a
    /// critical check of its own ([`crate::Check::maintenance`]), so discovery skips
    /// it while it stays registered, keeps its lease and its other checks.
    SetMaintenance {
        /// The instance.
        key: InstanceKey,
        /// `Some(reason)` enables maintenance (an empty reason gets a default
        /// note; enabling again only changes the reason); `None` ends it.
        reason: Option<String>,
        /// Leader time (ms since the Unix epoch).
        now_ms: u64,
    },
}

/// The most commands one [`Command::Batch`] may carry.
pub const MAX_BATCH_COMMANDS: usize = 1024;

/// The command level of this build: the newest kind of command it can decode and
/// apply. Level 1 is every command of the first release; level 2 adds
/// [`Command::SetMaintenance`]. A replica of an older build cannot decode an entry
/// holding a command above its level (it stops replicating at that entry until it is
/// upgraded), so the leader proposes such a command only while no member is known
/// to run a lower level.
pub const COMMAND_LEVEL: u32 = 2;

impl Command {
    /// The command level a replica needs to apply this command.
    pub fn level(&self) -> u32 {
        match self {
            Command::Register { .. }
            | Command::Deregister { .. }
            | Command::GrantLease { .. }
            | Command::RevokeLease { .. }
            | Command::ExpireLeases { .. }
            | Command::Barrier
            | Command::CheckpointLeases { .. }
            | Command::SetHealth { .. }
            | Command::UpdateCheck { .. }
            | Command::ExpireChecks { .. }
            | Command::EvictCritical { .. } => 1,
            Command::SetMaintenance { .. } => 2,
            Command::Forwarded { command, .. } => command.level(),
            Command::Batch { commands } => commands.iter().map(Command::level).max().unwrap_or(1),
        }
    }
}

/// Why a command changed nothing. A rejection is an answer, not a failure: every
/// replica rejects the same command the same way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    /// The command's input is invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The lease does not exist (never granted, expired or revoked).
    #[error("lease {0} not found")]
    LeaseNotFound(LeaseId),
    /// A lease with this id already exists.
    #[error("lease {0} already exists")]
    LeaseExists(LeaseId),
    /// The instance is not registered.
    #[error("instance {0} not found")]
    InstanceNotFound(InstanceKey),
    /// The instance has no check with this id.
    #[error("check {check_id:?} of instance {key} not found")]
    CheckNotFound {
        /// The instance.
        key: InstanceKey,
        /// The check id asked for.
        check_id: String,
    },
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The instance as now stored (with the lease it was given, if one was granted).
    Registered(Arc<Instance>),
    /// The instance was removed.
    Deregistered,
    /// A lease was granted.
    LeaseGranted {
        /// Its id.
        lease_id: LeaseId,
        /// Its TTL in milliseconds.
        ttl_ms: u64,
    },
    /// A lease was revoked and its instances removed.
    LeaseRevoked {
        /// Instances removed.
        removed: u32,
    },
    /// Leases expired and their instances were removed.
    LeasesExpired {
        /// Leases that existed and were expired.
        expired: Vec<LeaseId>,
        /// Instances removed.
        removed: u32,
    },
    /// Checkpoints recorded.
    Checkpointed,
    /// The instance's health changed (or already was that).
    HealthSet(Arc<Instance>),
    /// The check's report was recorded (or already was that); the instance as now
    /// stored.
    CheckUpdated(Arc<Instance>),
    /// Checks were marked critical because their TTL ran out.
    ChecksExpired {
        /// Checks whose status changed.
        changed: u32,
    },
    /// Instances critical for too long were removed.
    Evicted {
        /// Instances removed.
        removed: u32,
    },
    /// Nothing changed, and why.
    Rejected(Rejection),
    /// A Raft-internal entry (blank or membership) with no registry change.
    Nothing,
    /// The results of a [`Command::Batch`], one per command, in order.
    Batch(Vec<ApplyResult>),
    /// The instance's maintenance was set (or already was that); the instance as
    /// now stored.
    MaintenanceSet(Arc<Instance>),
}

/// The answer to one applied entry: the outcome and the revision after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    /// The registry's revision once this entry was applied.
    pub revision: Revision,
    /// What happened.
    pub outcome: Outcome,
}
