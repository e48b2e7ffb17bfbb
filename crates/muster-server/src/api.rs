//! The registry operations every frontend (gRPC, REST, Consul-compatible) calls:
//! validation, proposing through Raft, read barriers and local reads, in one place.

use std::sync::Arc;

use muster_core::{
    validate, Command, DiscoverFilter, Health, Instance, InstanceKey, InstanceSpec, LeaseId, Outcome, Revision,
    ServiceKey, ServiceSummary, WatchFilter,
};

use crate::error::ApiError;
use crate::node::NodeCore;
use crate::watch::WatchEncoder;

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

    /// Puts an instance in maintenance with `Some(reason)`, or takes it out with
    /// `None`.
    pub async fn set_maintenance(&self, key: InstanceKey, reason: Option<String>) -> Result<Registered, ApiError> {
        validate::instance_key(&key)?;
        if let Some(reason) = &reason {
            validate::maintenance_reason(reason)?;
        }
        let result = self
            .propose(Command::SetMaintenance {
                key,
                reason,
                now_ms: Self::now_ms(),
            })
            .await?;
        match result.outcome {
            Outcome::MaintenanceSet(instance) => Ok(Registered {
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
        Ok(self.discover_service(&Self::service_key(namespace, service)?, filter))
    }

    /// The key of one service, its namespace and name validated.
    pub fn service_key(namespace: &str, service: &str) -> Result<ServiceKey, ApiError> {
        validate::namespace(namespace)?;
        validate::dns_label("service", service)?;
        Ok(ServiceKey::new(namespace, service))
    }

    /// [`NodeCore::discover_local`] for a validated key.
    pub fn discover_service(&self, key: &ServiceKey, filter: &DiscoverFilter) -> Discovered {
        let registry = self.shared.read();
        Discovered {
            instances: registry.discover(key, filter),
            service_revision: registry.service_revision(key),
            revision: registry.revision(),
        }
    }

    /// The revision of the last change to one service and the node's applied
    /// revision, read together from this node's memory (call `read_barrier` first).
    pub fn service_revisions(&self, key: &ServiceKey) -> (Revision, Revision) {
        let registry = self.shared.read();
        (registry.service_revision(key), registry.revision())
    }

    /// One instance from this node's memory (call `read_barrier` first), with the
    /// node's applied revision.
    pub fn instance_local(&self, key: &InstanceKey) -> Result<(Option<Arc<Instance>>, Revision), ApiError> {
        validate::instance_key(key)?;
        let registry = self.shared.read();
        Ok((registry.instance(key).cloned(), registry.revision()))
    }

    /// Services with counts from this node's memory; `None` namespace: all.
    pub fn services_local(&self, namespace: Option<&str>) -> Result<(Vec<ServiceSummary>, Revision), ApiError> {
        if let Some(ns) = namespace {
            validate::namespace(ns)?;
        }
        let registry = self.shared.read();
        Ok((registry.services(namespace), registry.revision()))
    }

    /// Opens a watch of one namespace (empty: all) and service (empty: all) from
    /// `start_revision` (0: live from now), handing out items made by `encoder`, for a
    /// client on `connection` (see [`crate::watch::ConnectionKey`]). The stream ends
    /// when the receiver is dropped or the node stops.
    pub fn watch<E: WatchEncoder>(
        &self,
        namespace: &str,
        service: &str,
        start_revision: Revision,
        connection: crate::watch::ConnectionKey,
        encoder: E,
    ) -> Result<crate::watch::WatchStream<E::Item>, ApiError> {
        validate::namespace(namespace)?;
        if !service.is_empty() {
            validate::dns_label("service", service)?;
        }
        let filter = WatchFilter {
            namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
            service: (!service.is_empty()).then(|| service.to_string()),
        };
        Ok(crate::watch::start_watch_with(
            self.hub.clone(),
            self.shared.clone(),
            filter,
            start_revision,
            connection,
            encoder,
        ))
    }
}

impl NodeCore {
    /// Reports on a TTL check: renews its TTL on the leader (here, or forwarded) and
    /// records the status and output when they changed. Answers the instance as
    /// stored and the revision that holds the report.
    pub async fn report_check(&self, report: crate::checks::CheckReport) -> Result<Registered, ApiError> {
        validate::instance_key(&report.key)?;
        validate::check_id("check_id", &report.check_id)?;
        validate::check_output(&report.output)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let answer = match self.checks.report_local(self, &report).await {
                Some(answer) => Some(answer),
                None => match self.leader() {
                    Some((leader, addr)) if leader != self.id => {
                        match self
                            .forward_to(&addr, &crate::forward::ForwardRequest::ReportCheck(report.clone()))
                            .await
                        {
                            Ok(crate::forward::ForwardResponse::Written(result)) => Some(Ok(result)),
                            Ok(crate::forward::ForwardResponse::Failed(e)) => Some(Err(e)),
                            Ok(_) | Err(_) => None,
                        }
                    }
                    _ => None,
                },
            };
            match answer {
                Some(Ok(result)) => {
                    self.await_applied_here(result.revision).await;
                    return match result.outcome {
                        Outcome::CheckUpdated(instance) => Ok(Registered {
                            instance,
                            revision: result.revision,
                        }),
                        Outcome::Rejected(r) => Err(r.into()),
                        other => Err(unexpected(&other)),
                    };
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
            if std::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Err(ApiError::NoLeader {
                    reason: "no leader to report the check to".into(),
                    retry_after_ms: 500,
                });
            }
            self.wait_for_leader_change().await;
        }
    }
}

/// A lease as one node sees it, with the time it has left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Lease id.
    pub lease_id: LeaseId,
    /// Time to live, renewed by each keep-alive.
    pub ttl_ms: u64,
    /// Leader time (ms since the Unix epoch) of the grant.
    pub granted_at_ms: u64,
    /// Time left before it expires: exact on the leader (which alone holds the
    /// deadlines; a lease the keeper has not picked up yet shows what the keeper
    /// will give it); elsewhere an upper bound — the leader's last checkpoint for an
    /// idle lease, or the TTL.
    pub remaining_ms: u64,
    /// Whether `remaining_ms` comes from the leader's deadline.
    pub remaining_exact: bool,
    /// Instances attached to it.
    pub instances: usize,
}

impl NodeCore {
    /// Leases from this node's memory: the ones in `ids` that exist (`None`: all),
    /// in id order, with the node's applied revision.
    ///
    /// Keep-alives are not replicated, so only the leader knows how long a lease has
    /// left; a follower answers an upper bound and says so (`remaining_exact`).
    pub fn leases_local(&self, ids: Option<&[LeaseId]>) -> (Vec<LeaseInfo>, Revision) {
        let leading = self.is_leader();
        let registry = self.shared.read();
        let info = |lease: &muster_core::Lease| {
            // What a keeper that has not seen the lease yet starts it from.
            let initial = lease.unrenewed_remaining_ms();
            let remaining_ms = if leading {
                self.leases.remaining_ms(lease.id).unwrap_or(initial)
            } else {
                initial
            };
            LeaseInfo {
                lease_id: lease.id,
                ttl_ms: lease.ttl_ms,
                granted_at_ms: lease.granted_at_ms,
                remaining_ms,
                remaining_exact: leading,
                instances: registry.lease_instances(lease.id).len(),
            }
        };
        let leases = match ids {
            None => registry.leases().map(info).collect(),
            Some(ids) => {
                let mut ids = ids.to_vec();
                ids.sort_unstable();
                ids.dedup();
                ids.iter().filter_map(|id| registry.lease(*id)).map(info).collect()
            }
        };
        (leases, registry.revision())
    }
}
