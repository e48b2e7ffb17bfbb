//! Muster's Rust client.
//!
//! ```no_run
//! # async fn example() -> Result<(), muster_client::ClientError> {
//! use std::time::Duration;
//! use muster_client::{Client, DiscoverOptions};
//! use muster_core::InstanceSpec;
//!
//! // Any node serves every call; the client fails over between them.
//! let client = Client::connect(vec!["127.0.0.1:7100".into(), "127.0.0.1:7101".into()]).await?;
//!
//! // Register on a 10 s lease kept alive in the background.
//! let spec = InstanceSpec {
//!     service: "orders".into(),
//!     instance_id: "orders-1".into(),
//!     address: "10.0.0.7".into(),
//!     port: 8080,
//!     ..Default::default()
//! };
//! let registration = client.register_with_keepalive(spec, Duration::from_secs(10)).await?;
//!
//! let (instances, header) = client.discover("orders", &DiscoverOptions::default()).await?;
//! assert!(header.revision >= registration.registered().revision || instances.is_empty());
//!
//! registration.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! - [`Client`]: lazily connected channels to every node, one in use at a time,
//!   failover with backoff on `UNAVAILABLE`.
//! - [`Registration`]: an instance on its own lease, kept alive over the
//!   `KeepAlive` stream, registered again if the lease is lost.
//! - [`WatchStream`]: change events that survive node failures without missing
//!   or repeating one.
//! - [`Resolver`] ([`Client::resolver`], [`Client::service_url`]): a service's
//!   instances in memory, fed by a watch; [`Resolver::pick`] answers with no
//!   network call (round-robin, weighted or random, zone-preferring, healthy
//!   instances only), skips instances whose [circuit breaker](BreakerPolicy) is
//!   open, and keeps answering from the last known state (marked stale) or a
//!   [`StaticFallback`] when no node can be reached.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod breaker;
mod client;
mod error;
mod fallback;
mod pick;
mod registration;
mod resolver;
mod retry;
mod types;
mod watch;

pub use breaker::{BreakerPolicy, BreakerState};
pub use client::{Client, ClientOptions, ClientTls, LeaseRevoked, DEFAULT_MAX_MESSAGE_BYTES};
pub use error::ClientError;
pub use fallback::{StaticEndpoint, StaticFallback, FALLBACK_ENV_PREFIX, FALLBACK_FILE_ENV};
pub use pick::PickStrategy;
pub use registration::Registration;
pub use resolver::{InstanceStatus, PickSource, Picked, Resolver, ResolverOptions, ResolverStatus};
pub use retry::RetryPolicy;
pub use types::{
    DiscoverOptions, LeaseGrant, Member, Members, MembershipChange, NodeStatus, ReadMode, Registered, ResponseHeader,
};
pub use watch::{WatchItem, WatchStream};
