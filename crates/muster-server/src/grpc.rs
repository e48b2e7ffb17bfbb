//! The client gRPC API: `muster.v1.Registry`, `muster.v1.Cluster`, gRPC health and
//! reflection. Handlers are thin: convert (validating), call the node core, convert
//! back. Errors map to status codes in `error.rs`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use muster_core::DiscoverFilter;
use muster_proto::convert;
use muster_proto::v1 as pb;
use muster_proto::v1::cluster_server::{Cluster, ClusterServer};
use muster_proto::v1::registry_server::{Registry, RegistryServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::api::ReadConsistency;
use crate::coalesced_writes::{incoming, incoming_tls};
use crate::error::ApiError;
use crate::forward::MembershipChange;
use crate::node::NodeCore;
use crate::tls::TlsPort;

/// Most leases one keep-alive stream may renew per second before it is slowed.
const KEEPALIVE_BATCH: usize = 256;

/// Serves the client API on `listener` until the node shuts down.
pub async fn serve(core: Arc<NodeCore>, listener: TcpListener) {
    let max = core.config.max_message_bytes;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<RegistryServer<RegistryApi>>().await;
    health_reporter.set_serving::<ClusterServer<ClusterApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(muster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let registry = crate::encoded_routes::RegistryService::new(
        RegistryServer::new(RegistryApi { core: core.clone() })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        core.clone(),
        max,
    );
    let cluster = ClusterServer::new(ClusterApi { core: core.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .concurrency_limit_per_connection(1024)
        .layer(crate::request_metrics::GrpcMetricsLayer::new(core.metrics.clone()));
    let router = builder
        .add_service(health_service)
        .add_service(registry)
        .add_service(cluster);
    let reflection = reflection
        .inspect_err(|e| tracing::warn!(error = %e, "gRPC reflection unavailable"))
        .ok();
    let router = router.add_optional_service(reflection);
    let shutdown = core.shutdown.clone().cancelled_owned();
    // Plain TCP is served as it is, with nothing in between.
    let result = match core.tls.clone() {
        None => router.serve_with_incoming_shutdown(incoming(listener), shutdown).await,
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(incoming_tls(listener, tls, TlsPort::Grpc), shutdown)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "client gRPC server failed");
    }
}

/// The header for an answer about `revision` (the write's, or the read's).
fn header(core: &NodeCore, revision: u64) -> pb::ResponseHeader {
    let view = core.view();
    pb::ResponseHeader {
        revision: view.revision.max(revision),
        node_id: view.node_id,
        leader_known: view.leader_id.is_some(),
        leader_id: view.leader_id.unwrap_or(0),
        ms_since_leader_contact: view.ms_since_leader_contact,
    }
}

/// A Discover answer in its encoded parts: the header and the service revision, and
/// the instances between them, encoded for this read or for an earlier one at the
/// same service revision. Written one after the other they are one
/// `DiscoverResponse`, fields in order.
pub struct EncodedDiscover {
    header: pb::DiscoverResponse,
    instances: bytes::Bytes,
    service_revision: pb::DiscoverResponse,
}

impl EncodedDiscover {
    /// Writes the answer into `dst`.
    pub fn put_into(&self, dst: &mut impl bytes::BufMut) {
        use prost::Message;
        self.header.encode_raw(dst);
        dst.put_slice(&self.instances);
        self.service_revision.encode_raw(dst);
    }
}

/// Answers a Discover request, encoded, reusing the instances encoded for an earlier
/// read while the service has not changed (see [`crate::discover_cache`]).
pub async fn discover_encoded(core: &NodeCore, req: pb::DiscoverRequest) -> Result<EncodedDiscover, ApiError> {
    use prost::Message;
    let health = convert::health_filter_from_pb(&req.health).map_err(ApiError::Invalid)?;
    let consistency = read_consistency(req.mode, req.min_revision)?;
    core.read_barrier(consistency).await?;
    let filter = DiscoverFilter {
        tags: req.tags,
        zone: (!req.zone.is_empty()).then_some(req.zone),
        health,
    };
    let service = NodeCore::service_key(&req.namespace, &req.service)?;
    let (service_revision, revision) = core.service_revisions(&service);
    let (instances, service_revision, revision) = match core.discover_cache.get(&service, &filter, service_revision) {
        Some(instances) => {
            core.metrics.discover_cache_hits.inc();
            (instances, service_revision, revision)
        }
        None => {
            core.metrics.discover_cache_misses.inc();
            let found = core.discover_service(&service, &filter);
            let instances = pb::DiscoverResponse {
                instances: found.instances.iter().map(|i| pb::Instance::from(&**i)).collect(),
                ..Default::default()
            };
            let instances = bytes::Bytes::from(instances.encode_to_vec());
            core.discover_cache
                .insert(&service, &filter, found.service_revision, instances.clone());
            (instances, found.service_revision, found.revision)
        }
    };
    Ok(EncodedDiscover {
        header: pb::DiscoverResponse {
            header: Some(header(core, revision)),
            ..Default::default()
        },
        instances,
        service_revision: pb::DiscoverResponse {
            service_revision,
            ..Default::default()
        },
    })
}

/// Reads a protobuf read mode.
fn read_consistency(mode: i32, min_revision: u64) -> Result<ReadConsistency, ApiError> {
    match pb::ReadMode::try_from(mode) {
        Ok(pb::ReadMode::Linearizable) => Ok(ReadConsistency::Linearizable),
        Ok(pb::ReadMode::MinRevision) | Ok(pb::ReadMode::Local) => Ok(ReadConsistency::MinRevision(min_revision)),
        Err(_) => Err(ApiError::Invalid(muster_core::ValidationError::new(
            "mode",
            format!("unknown read mode {mode}"),
        ))),
    }
}

/// `muster.v1.Registry`.
pub struct RegistryApi {
    core: Arc<NodeCore>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Registry for RegistryApi {
    #[instrument(skip_all, fields(service, instance))]
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        let instance = req
            .instance
            .ok_or_else(|| ApiError::Invalid(muster_core::ValidationError::new("instance", "is required")))?;
        let spec = convert::spec_from_pb(instance).map_err(ApiError::Invalid)?;
        tracing::Span::current().record("service", spec.service.as_str());
        tracing::Span::current().record("instance", spec.instance_id.as_str());
        let grant_ttl_ms = (req.ttl_ms > 0).then_some(req.ttl_ms);
        let done = self.core.register(spec, grant_ttl_ms).await?;
        Ok(Response::new(pb::RegisterResponse {
            header: Some(header(&self.core, done.revision)),
            lease_id: done.instance.lease_id.unwrap_or(0),
            instance: Some(pb::Instance::from(&*done.instance)),
        }))
    }

    #[instrument(skip_all)]
    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let req = request.into_inner();
        let key = convert::key_from_parts(&req.namespace, &req.service, &req.instance_id).map_err(ApiError::Invalid)?;
        let revision = self.core.deregister(key).await?;
        Ok(Response::new(pb::DeregisterResponse {
            header: Some(header(&self.core, revision)),
        }))
    }

    #[instrument(skip_all)]
    async fn grant_lease(
        &self,
        request: Request<pb::GrantLeaseRequest>,
    ) -> Result<Response<pb::GrantLeaseResponse>, Status> {
        let req = request.into_inner();
        let (lease_id, ttl_ms, revision) = self.core.grant_lease(req.lease_id, req.ttl_ms).await?;
        Ok(Response::new(pb::GrantLeaseResponse {
            header: Some(header(&self.core, revision)),
            lease_id,
            ttl_ms,
        }))
    }

    type KeepAliveStream = BoxStream<pb::KeepAliveResponse>;

    #[instrument(skip_all)]
    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let core = self.core.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(KEEPALIVE_BATCH);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = core.shutdown.cancelled() => return,
                    next = inbound.next() => next,
                };
                let Some(Ok(req)) = next else { return };
                let reply = match core.keep_alive(vec![req.lease_id]).await {
                    Ok(answers) => Ok(pb::KeepAliveResponse {
                        lease_id: req.lease_id,
                        ttl_ms: answers.first().map_or(0, |(_, ttl)| *ttl),
                    }),
                    Err(e) => Err(Status::from(e)),
                };
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[instrument(skip_all)]
    async fn revoke_lease(
        &self,
        request: Request<pb::RevokeLeaseRequest>,
    ) -> Result<Response<pb::RevokeLeaseResponse>, Status> {
        let (removed, revision) = self.core.revoke_lease(request.into_inner().lease_id).await?;
        Ok(Response::new(pb::RevokeLeaseResponse {
            header: Some(header(&self.core, revision)),
            removed,
        }))
    }

    #[instrument(skip_all)]
    async fn set_health(
        &self,
        request: Request<pb::SetHealthRequest>,
    ) -> Result<Response<pb::SetHealthResponse>, Status> {
        let req = request.into_inner();
        let key = convert::key_from_parts(&req.namespace, &req.service, &req.instance_id).map_err(ApiError::Invalid)?;
        let health = convert::health_from_pb("health", req.health).map_err(ApiError::Invalid)?;
        let done = self.core.set_health(key, health).await?;
        Ok(Response::new(pb::SetHealthResponse {
            header: Some(header(&self.core, done.revision)),
            instance: Some(pb::Instance::from(&*done.instance)),
        }))
    }

    #[instrument(skip_all)]
    async fn set_maintenance(
        &self,
        request: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::SetMaintenanceResponse>, Status> {
        let req = request.into_inner();
        let key = convert::key_from_parts(&req.namespace, &req.service, &req.instance_id).map_err(ApiError::Invalid)?;
        let done = self.core.set_maintenance(key, req.enable.then_some(req.reason)).await?;
        Ok(Response::new(pb::SetMaintenanceResponse {
            header: Some(header(&self.core, done.revision)),
            instance: Some(pb::Instance::from(&*done.instance)),
        }))
    }

    /// Reached only when this service is served without [`crate::encoded_routes`]'s
    /// wrapper (which answers Discover with the encoded answer); decodes it back.
    #[instrument(skip_all)]
    async fn discover(&self, request: Request<pb::DiscoverRequest>) -> Result<Response<pb::DiscoverResponse>, Status> {
        let answer = discover_encoded(&self.core, request.into_inner()).await?;
        let mut encoded = bytes::BytesMut::new();
        answer.put_into(&mut encoded);
        let response = <pb::DiscoverResponse as prost::Message>::decode(encoded.freeze())
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(response))
    }

    #[instrument(skip_all)]
    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let req = request.into_inner();
        let consistency = read_consistency(req.mode, req.min_revision)?;
        self.core.read_barrier(consistency).await?;
        let ns = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
        let (services, revision) = self.core.services_local(ns)?;
        Ok(Response::new(pb::ListServicesResponse {
            header: Some(header(&self.core, revision)),
            services: services.iter().map(pb::ServiceSummary::from).collect(),
        }))
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    /// Reached only when this service is served without [`crate::encoded_routes`]'s
    /// wrapper (which answers Watch with pre-encoded events); decodes them back.
    #[instrument(skip_all)]
    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let stream = crate::encoded_routes::open_watch(&self.core, request)?.map(|bytes| {
            <pb::WatchResponse as prost::Message>::decode(bytes).map_err(|e| Status::internal(e.to_string()))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// `muster.v1.Cluster`.
pub struct ClusterApi {
    core: Arc<NodeCore>,
}

fn members(core: &NodeCore) -> (Vec<pb::Member>, u64) {
    let members = core
        .members()
        .into_iter()
        .map(|m| pb::Member {
            node_id: m.node,
            peer_addr: m.peer_addr,
            voter: m.voter,
            leader: m.leader,
            matched_index: m.matched_index,
        })
        .collect();
    (members, core.view().leader_id.unwrap_or(0))
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    #[instrument(skip_all)]
    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let status = self.core.status();
        // The revision read with the digest, so the two describe the same state.
        let (digest, instances, leases, revision) = {
            let registry = self.core.shared.read();
            (
                registry.digest(),
                registry.instance_count(),
                registry.lease_count(),
                registry.revision(),
            )
        };
        Ok(Response::new(pb::StatusResponse {
            node_id: status.node,
            role: status.role.into(),
            term: status.term,
            leader_known: status.leader_known,
            leader_id: status.leader.unwrap_or(0),
            last_log_index: status.last_log_index,
            applied_index: status.applied_index,
            revision,
            digest,
            ms_since_leader_contact: status.ms_since_leader_contact,
            instances: instances as u64,
            leases: leases as u64,
            snapshot_index: status.snapshot_index,
            cluster_id: status.cluster_id.unwrap_or_default(),
            command_level: status.command_level,
        }))
    }

    #[instrument(skip_all)]
    async fn members(&self, _request: Request<pb::MembersRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        let (members, leader_id) = members(&self.core);
        Ok(Response::new(pb::MembersResponse { members, leader_id }))
    }

    #[instrument(skip_all)]
    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let req = request.into_inner();
        if req.peer_addr.is_empty() {
            return Err(ApiError::Invalid(muster_core::ValidationError::new("peer_addr", "must not be empty")).into());
        }
        let index = self
            .core
            .change_membership(MembershipChange::AddLearner {
                id: req.node_id,
                addr: req.peer_addr,
            })
            .await?;
        Ok(Response::new(pb::MembershipResponse {
            members: members(&self.core).0,
            log_index: index,
        }))
    }

    #[instrument(skip_all)]
    async fn promote(&self, request: Request<pb::PromoteRequest>) -> Result<Response<pb::MembershipResponse>, Status> {
        let index = self
            .core
            .change_membership(MembershipChange::Promote(request.into_inner().node_id))
            .await?;
        Ok(Response::new(pb::MembershipResponse {
            members: members(&self.core).0,
            log_index: index,
        }))
    }

    #[instrument(skip_all)]
    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let index = self
            .core
            .change_membership(MembershipChange::Remove(request.into_inner().node_id))
            .await?;
        Ok(Response::new(pb::MembershipResponse {
            members: members(&self.core).0,
            log_index: index,
        }))
    }
}
