//! Muster's storage: the fsynced, checksummed, segmented Raft log and vote
//! ([`log::SegmentLog`]), the sled-backed registry state machine
//! ([`state_machine::StateMachineStore`]) and its snapshots.
#![forbid(unsafe_code)]

pub mod log;
pub mod state_machine;
pub mod types;

pub use log::{LogDurability, LogOptions, SegmentLog};
pub use state_machine::{
    ApplyGate, EventSink, SharedState, StateError, StateMachineStore, WriteBatching, PENDING_MAX_AGE,
    PENDING_MAX_COMMANDS, SNAPSHOT_FORMAT, STATE_FORMAT,
};
pub use types::{NodeId, TypeConfig};

/// Locks `mutex`, also when a thread panicked holding it: every state guarded here is
/// left consistent between statements, and a writer must keep working for the rest.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
