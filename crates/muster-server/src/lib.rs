//! The Muster node runtime: openraft wired to Muster's storage, the client gRPC API,
//! the peer network, the lease keeper, the watch hub and HTTP.
//!
//! ```text
//! Node::start(config, listeners) -> NodeHandle     (NodeHandle::shutdown to stop)
//! ```
#![forbid(unsafe_code)]

pub mod actions;
pub mod api;
pub mod append_budget;
pub mod blocking;
pub mod checks;
pub mod coalesced_writes;
pub mod config;
pub mod consul;
pub mod discover_cache;
pub mod encoded_routes;
pub mod error;
pub mod forward;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod join;
pub mod leader_lease;
pub mod leases;
pub mod member_levels;
pub mod metrics;
pub mod network;
pub mod node;
pub mod peer;
pub mod peer_transport;
pub mod pre_vote;
pub mod read_index;
pub mod read_lease;
pub mod replication;
pub mod request_metrics;
pub mod rest;
pub mod snapshots;
pub mod status;
pub mod tls;
pub mod ui;
pub mod watch;
pub mod write_batch;

pub use config::{ConfigError, LeaseSettings, NodeConfig, RaftTiming, WatchSettings};
pub use error::ApiError;
pub use node::{Listeners, Node, NodeCore, NodeError, NodeHandle};
