//! Muster's storage: the fsynced, checksummed, segmented Raft log and vote
//! ([`log::SegmentLog`]), the sled-backed registry state machine
//! ([`state_machine::StateMachineStore`]) and its snapshots.
#![forbid(unsafe_code)]

pub mod log;
pub mod state_machine;
pub mod types;

pub use log::{LogOptions, SegmentLog};
pub use state_machine::{
    EventSink, SharedState, StateMachineStore, WriteBatching, PENDING_MAX_AGE, PENDING_MAX_COMMANDS,
};
pub use types::{NodeId, TypeConfig};
