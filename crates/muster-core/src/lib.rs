//! Muster's pure domain: the registry's data model, validation, the commands that
//! travel through Raft, the deterministic `apply`, the read index and the watch
//! history.
//!
//! Nothing here knows about clocks, sockets, disks or Raft. Timestamps and expiry
//! decisions arrive inside commands (stamped by the leader when it proposes), so
//! applying the same log on any replica yields the same state, byte for byte.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod command;
pub mod event;
pub mod filter;
pub mod history;
pub mod registry;
pub mod sessions;
pub mod types;
pub mod validate;

pub use command::{ApplyResult, Command, Outcome, Rejection, COMMAND_LEVEL, MAX_BATCH_COMMANDS};
pub use event::{DeleteReason, Event, EventKind};
pub use filter::{DiscoverFilter, WatchFilter};
pub use history::WatchHistory;
pub use registry::{Registry, RegistrySnapshot, ServiceSummary};
pub use types::{
    maintenance_check_id, worst_status, Check, CheckSpec, CompactMap, Health, Instance, InstanceKey, InstanceSpec,
    Lease, LeaseId, Revision, ServiceKey,
};
pub use validate::ValidationError;
