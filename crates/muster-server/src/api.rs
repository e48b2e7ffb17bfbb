//! The registry operations every frontend (gRPC, REST, Consul-compatible) calls:
//! validation, proposing through Raft, read barriers and local reads, in one place.

use std::sync::Arc;

use muster_core::{
    validate, Command, DiscoverFilter, Health, Instance, InstanceKey, InstanceSpec, LeaseId, Outcome, Revision,
    ServiceKey, ServiceSummary,
};

use crate::error::ApiError;
use crate::node::NodeCore;

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// This node's memory as applied now.
    #[default]
    Local,
    /// Wait until this node has applied the revision (read-your-writes).
    MinRevision(Revision),
    /// Confirm leadership through a quorum, then read locally.
    Linearizable,
}

/// A registration's result.
#[derive(Clone, Debug)]
pub struct Registered {
    /// The instance as stored.
    pub instance: Arc<Instance>,
    /// The revision the write produced.
    pub revision: Revision,
}

/// A discovery's result.
#[derive(Clone, Debug)]
pub struct Discovered {
    /// Matching instances, in id order.
    pub instances: Vec<Arc<Instance>>,
    /// Revision of the last change to the service (0: none).
    pub service_revision: Revision,
    /// The node's applied revision at the read.
    pub revision: Revision,
}

fn unexpected(outcome: &Outcome) -> ApiError {
    ApiError::Internal(format!("unexpected outcome {outcome:?}"))
}

impl NodeCore {
    /// Registers (or updates) an instance; with `grant_ttl_ms`, under a new lease.
    pub async fn register(&self, spec: InstanceSpec, grant_ttl_ms: Option<u64>) -> Result<Registered, ApiError> {
        validate::instance_spec(&spec)?;
        if let Some(ttl) = grant_ttl_ms {
            validate::ttl_ms(ttl)?;
        }
        let result = self
            .propose(Command::Register {
                spec,
                grant_ttl_ms,
                now_ms: Self::now_ms(),
            })
            .await?;
        match result.outcome {
            Outcome::Registered(instance) => Ok(Registered {
                instance,
                revision: result.revision,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes an instance; answers the revision of the removal.
    pub async fn deregister(&self, key: InstanceKey) -> Result<Revision, ApiError> {
        validate::instance_key(&key)?;
        let result = self
            .propose(Command::Deregister {
                key,
                now_ms: Self::now_ms(),
            })
            .await?;
        Ok(result.revision)
    }

    /// Grants a lease (`lease_id` 0: assigned). Answers `(id, ttl_ms, revision)`.
    pub async fn grant_lease(&self, lease_id: LeaseId, ttl_ms: u64) -> Result<(LeaseId, u64, Revision), ApiError> {
        validate::ttl_ms(ttl_ms)?;
        let result = self
            .propose(Command::GrantLease {
                lease_id,
                ttl_ms,
                now_ms: Self::now_ms(),
            })
            .await?;
        match result.outcome {
            Outcome::LeaseGranted { lease_id, ttl_ms } => Ok((lease_id, ttl_ms, result.revision)),
            other => Err(unexpected(&other)),
        }
    }

    /// Revokes a lease; answers `(instances removed, revision)`.
    pub async fn revoke_lease(&self, lease_id: LeaseId) -> Result<(u32, Revision), ApiError> {
        validate::lease_id(lease_id)?;
        let result = self
            .propose(Command::RevokeLease {
                lease_id,
                now_ms: Self::now_ms(),
            })
            .await?;
        match result.outcome {
            Outcome::LeaseRevoked { removed } => Ok((removed, result.revision)),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets an instance's health.
    pub async fn set_health(&self, key: InstanceKey, health: Health) -> Result<Registered, ApiError> {
        validate::instance_key(&key)?;
        let result = self
            .propose(Command::SetHealth {
                key,
                health,
                now_ms: Self::now_ms(),
            })
            .await?;
        match result.outcome {
            Outcome::HealthSet(instance) => Ok(Registered {
                instance,
                revision: result.revision,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Waits until a read at `consistency` may be served from this node's memory.
    pub async fn read_barrier(&self, consistency: ReadConsistency) -> Result<(), ApiError> {
        match consistency {
            ReadConsistency::Local => Ok(()),
            ReadConsistency::MinRevision(0) => Ok(()),
            ReadConsistency::MinRevision(r) => self.wait_for_revision(r).await,
            ReadConsistency::Linearizable => self.linearizable_barrier().await,
        }
    }

    /// Instances of one service from this node's memory (call `read_barrier` first).
    pub fn discover_local(
        &self,
        namespace: &str,
        service: &str,
        filter: &DiscoverFilter,
    ) -> Result<Discovered, ApiError> {
        validate::namespace(namespace)?;
        validate::dns_label("service", service)?;
        let key = ServiceKey::new(namespace, service);
        let registry = self.shared.read();
        Ok(Discovered {
            instances: registry.discover(&key, filter),
            service_revision: registry.service_revision(&key),
            revision: registry.revision(),
        })
    }

    /// Services with counts from this node's memory; `None` namespace: all.
    pub fn services_local(&self, namespace: Option<&str>) -> Result<(Vec<ServiceSummary>, Revision), ApiError> {
        if let Some(ns) = namespace {
            validate::namespace(ns)?;
        }
        let registry = self.shared.read();
        Ok((registry.services(namespace), registry.revision()))
    }
}
