//! The client: one lazily connected channel per node, one node in use at a time,
//! and failover to the next node when the one in use cannot serve a call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use muster_core::{Health, Instance, InstanceSpec, LeaseId, Revision, ServiceSummary};
use muster_proto::convert;
use muster_proto::v1 as pb;
use muster_proto::v1::cluster_client::ClusterClient;
use muster_proto::v1::registry_client::RegistryClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::error::{is_retryable, retry_after, ClientError};
use crate::fallback::StaticFallback;
use crate::registration::Registration;
use crate::resolver::{Resolver, ResolverOptions};
use crate::retry::{Backoff, RetryPolicy};
use crate::types::{
    DiscoverOptions, LeaseGrant, Members, MembershipChange, NodeStatus, ReadMode, Registered, ResponseHeader,
};
use crate::watch::WatchStream;

/// The largest message sent or accepted by default: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How the client connects and retries.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Time allowed to open a TCP connection to one node.
    pub connect_timeout: Duration,
    /// Deadline of each unary call (streams have none).
    pub request_timeout: Duration,
    /// Failover and backoff.
    pub retry: RetryPolicy,
    /// Largest gRPC message sent or accepted.
    pub max_message_bytes: usize,
    /// How resolvers made by [`Client::resolver`] and [`Client::service_url`] pick.
    pub resolver: ResolverOptions,
    /// Addresses for services the registry has never answered for.
    pub fallback: StaticFallback,
    /// TLS to the nodes; plain TCP when `None`.
    pub tls: Option<ClientTls>,
}

/// TLS to the nodes: the CA their certificates are checked against and, for nodes
/// that require client certificates, this client's certificate and key (PEM text).
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM certificates of the CA that signs the nodes' certificates.
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and private key this client presents, if any.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Largest TLS file [`ClientTls::from_files`] reads.
const MAX_TLS_FILE_BYTES: u64 = 1024 * 1024;

impl ClientTls {
    /// Reads the CA file and, when both are given, the client certificate and key.
    /// A certificate without a key (or a key without one) is refused.
    pub fn from_files(
        ca: &std::path::Path,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read_tls_file("cert", cert)?, read_tls_file("key", key)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ClientError::Tls {
                    setting: "key",
                    reason: "a client certificate needs its key".into(),
                })
            }
            (None, Some(_)) => {
                return Err(ClientError::Tls {
                    setting: "cert",
                    reason: "a client key needs its certificate".into(),
                })
            }
        };
        Ok(ClientTls {
            ca_pem: read_tls_file("ca", ca)?,
            identity,
        })
    }

    fn tonic_config(&self) -> tonic::transport::ClientTlsConfig {
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        match &self.identity {
            Some((cert, key)) => config.identity(tonic::transport::Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

fn read_tls_file(setting: &'static str, path: &std::path::Path) -> Result<Vec<u8>, ClientError> {
    let failed = |reason: String| ClientError::Tls { setting, reason };
    let size = std::fs::metadata(path)
        .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?
        .len();
    if size > MAX_TLS_FILE_BYTES {
        return Err(failed(format!(
            "{} is larger than {MAX_TLS_FILE_BYTES} bytes",
            path.display()
        )));
    }
    std::fs::read(path).map_err(|e| failed(format!("cannot read {}: {e}", path.display())))
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            resolver: ResolverOptions::default(),
            fallback: StaticFallback::none(),
            tls: None,
        }
    }
}

/// A node the client may talk to.
#[derive(Debug)]
pub(crate) struct NodeConn {
    pub(crate) addr: String,
    pub(crate) channel: Channel,
}

#[derive(Debug)]
struct Inner {
    nodes: Vec<NodeConn>,
    current: AtomicUsize,
    options: ClientOptions,
}

/// A Muster client. Cheap to clone: clones share the channels and the node in use.
///
/// Any node serves every call (reads from its memory, writes forwarded to the
/// leader), so the client uses one node at a time and moves to the next one only
/// when a call fails with `UNAVAILABLE` (the node is unreachable, has no leader, or
/// is shutting down). See [`RetryPolicy`] for the backoff.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
    /// The resolvers [`Client::service_url`] made, by service. Not in `Inner`: a
    /// resolver's task holds a client without this map, so that dropping the last
    /// clone of the caller's client stops the tasks.
    resolvers: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Resolver>>>>>,
}

/// Turns `host:port` (or a full `http://` URI) into a lazily connected channel.
fn endpoint(addr: &str, options: &ClientOptions) -> Result<Channel, ClientError> {
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| ClientError::InvalidAddress {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    if let Some(tls) = &options.tls {
        endpoint = endpoint.tls_config(tls.tonic_config()).map_err(|e| ClientError::Tls {
            setting: "ca",
            reason: e.to_string(),
        })?;
    }
    Ok(endpoint
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// The instance a write answered with (`what` names the answer, for the error when
/// it is missing).
fn stored_instance(instance: Option<&pb::Instance>, what: &str) -> Result<Instance, ClientError> {
    instance
        .map(convert::instance_from_pb)
        .ok_or_else(|| ClientError::MalformedResponse(format!("{what}.instance is missing")))
}

pub(crate) fn registry_client(channel: Channel, max: usize) -> RegistryClient<Channel> {
    RegistryClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

fn cluster_client(channel: Channel, max: usize) -> ClusterClient<Channel> {
    ClusterClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

/// The protobuf form of a spec (revisions and timestamps left zero).
pub(crate) fn spec_to_pb(spec: &InstanceSpec) -> pb::Instance {
    pb::Instance {
        namespace: spec.namespace.clone(),
        service: spec.service.clone(),
        instance_id: spec.instance_id.clone(),
        address: spec.address.clone(),
        port: u32::from(spec.port),
        ports: spec.ports.iter().map(|(k, v)| (k.clone(), u32::from(*v))).collect(),
        tags: spec.tags.clone(),
        metadata: spec.metadata.clone().into_iter().collect(),
        weight: spec.weight,
        zone: spec.zone.clone(),
        health: pb::Health::from(spec.health) as i32,
        lease_id: spec.lease_id.unwrap_or(0),
        ..Default::default()
    }
}

fn summary_from_pb(s: pb::ServiceSummary) -> ServiceSummary {
    ServiceSummary {
        namespace: s.namespace,
        service: s.service,
        instances: s.instances,
        passing: s.passing,
        warning: s.warning,
        critical: s.critical,
        mod_revision: s.mod_revision,
    }
}

/// The answer to [`Client::revoke_lease`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRevoked {
    /// Instances removed with the lease.
    pub removed: u32,
    /// The revision of the revocation.
    pub revision: Revision,
}

impl Client {
    /// A client for the nodes at `addrs` (`host:port`, or `http://host:port`), with
    /// default options. Nothing is dialled until the first call.
    ///
    /// Must be called within a Tokio runtime.
    pub async fn connect(addrs: Vec<String>) -> Result<Client, ClientError> {
        Client::connect_with(addrs, ClientOptions::default()).await
    }

    /// A client for the nodes at `addrs` with the given options.
    pub async fn connect_with(addrs: Vec<String>, options: ClientOptions) -> Result<Client, ClientError> {
        let nodes = addrs
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .map(|addr| {
                Ok(NodeConn {
                    addr: addr.to_string(),
                    channel: endpoint(addr, &options)?,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        if nodes.is_empty() {
            return Err(ClientError::NoAddresses);
        }
        Ok(Client {
            inner: Arc::new(Inner {
                nodes,
                current: AtomicUsize::new(0),
                options,
            }),
            resolvers: Arc::default(),
        })
    }

    /// A clone that shares the channels but not the resolvers of
    /// [`Client::service_url`] (given to background tasks).
    fn detached(&self) -> Client {
        Client {
            inner: self.inner.clone(),
            resolvers: Arc::default(),
        }
    }

    /// A cache of `service`'s instances fed by a watch, with the client's
    /// [`ClientOptions::resolver`] options and fallback. Waits up to
    /// `first_sync_timeout` for the registry's first answer; when no node answers,
    /// the resolver still works from the static fallback and keeps reconnecting.
    pub async fn resolver(&self, service: &str) -> Resolver {
        self.resolver_with(service, self.inner.options.resolver.clone()).await
    }

    /// [`Client::resolver`] with its own options.
    pub async fn resolver_with(&self, service: &str, options: ResolverOptions) -> Resolver {
        Resolver::start(self.detached(), service, options, &self.inner.options.fallback).await
    }

    /// `http://host:port/path` of an instance of `service`, picked from a cache
    /// that the first call for the service creates and later calls reuse.
    pub async fn service_url(&self, service: &str, path: &str) -> Result<String, ClientError> {
        self.cached_resolver(service).await.url(path)
    }

    /// The resolver [`Client::service_url`] uses for `service`, created on first use.
    /// Concurrent first calls for one service share one creation; calls for other
    /// services do not wait for it.
    pub async fn cached_resolver(&self, service: &str) -> Resolver {
        let cell = self
            .resolvers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service.to_string())
            .or_default()
            .clone();
        cell.get_or_init(|| self.resolver(service)).await.clone()
    }

    /// The resolvers [`Client::service_url`] has created so far.
    pub fn cached_resolvers(&self) -> Vec<Resolver> {
        self.resolvers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|cell| cell.get().cloned())
            .collect()
    }

    /// The address of the node in use.
    pub fn current_node(&self) -> &str {
        &self.current().1.addr
    }

    /// Every node address the client knows, in the order given.
    pub fn nodes(&self) -> Vec<&str> {
        self.inner.nodes.iter().map(|n| n.addr.as_str()).collect()
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    pub(crate) fn current(&self) -> (usize, &NodeConn) {
        let idx = self.inner.current.load(Ordering::Relaxed) % self.inner.nodes.len();
        (idx, &self.inner.nodes[idx])
    }

    /// Moves to the node after `idx`, unless another caller already moved on (so
    /// concurrent failures of one node skip it once, not once per caller).
    pub(crate) fn advance_from(&self, idx: usize) {
        let next = (idx + 1) % self.inner.nodes.len();
        if self
            .inner
            .current
            .compare_exchange(idx, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && next != idx
        {
            tracing::debug!(from = %self.inner.nodes[idx].addr, to = %self.inner.nodes[next].addr, "moving to the next node");
        }
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(&self.inner.options.retry, self.inner.nodes.len())
    }

    pub(crate) fn node_count(&self) -> usize {
        self.inner.nodes.len()
    }

    fn unary<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.inner.options.request_timeout);
        request
    }

    /// Runs `call` against the node in use, moving to the next node with backoff
    /// while it fails with a retryable status.
    async fn with_failover<T, F, Fut>(&self, what: &'static str, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let mut backoff = self.backoff();
        loop {
            let (idx, node) = self.current();
            match call(node.channel.clone()).await {
                Ok(value) => return Ok(value),
                Err(status) if is_retryable(&status) => {
                    self.advance_from(idx);
                    match backoff.next_delay(retry_after(&status)) {
                        Some(delay) => {
                            tracing::debug!(call = what, node = %node.addr, error = %status.message(), ?delay, "retrying on the next node");
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                        }
                        None => {
                            return Err(ClientError::Unavailable {
                                attempts: backoff.failures(),
                                last: format!("{}: {}", node.addr, status.message()),
                            })
                        }
                    }
                }
                Err(status) => return Err(ClientError::from_status(&status)),
            }
        }
    }

    fn max(&self) -> usize {
        self.inner.options.max_message_bytes
    }

    /// Registers (or updates) an instance. With `ttl`, a new lease with that TTL is
    /// granted in the same Raft entry and the instance attached to it; keep it alive
    /// with [`Client::keep_alive_once`] or use [`Client::register_with_keepalive`].
    pub async fn register(&self, spec: InstanceSpec, ttl: Option<Duration>) -> Result<Registered, ClientError> {
        let request = pb::RegisterRequest {
            instance: Some(spec_to_pb(&spec)),
            ttl_ms: ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        };
        let max = self.max();
        let answer = self
            .with_failover("register", |ch| {
                let request = self.unary(request.clone());
                async move { registry_client(ch, max).register(request).await }
            })
            .await?
            .into_inner();
        let instance = stored_instance(answer.instance.as_ref(), "RegisterResponse")?;
        let header = ResponseHeader::from(answer.header);
        Ok(Registered {
            instance,
            lease_id: (answer.lease_id != 0).then_some(answer.lease_id),
            revision: header.revision,
            header,
        })
    }

    /// Registers an instance on a new lease of `ttl` and keeps the lease alive in a
    /// background task until the returned handle is deregistered or dropped.
    pub async fn register_with_keepalive(
        &self,
        spec: InstanceSpec,
        ttl: Duration,
    ) -> Result<Registration, ClientError> {
        Registration::start(self.clone(), spec, ttl).await
    }

    /// Removes an instance; returns the revision of the removal.
    pub async fn deregister(&self, namespace: &str, service: &str, instance_id: &str) -> Result<Revision, ClientError> {
        let request = pb::DeregisterRequest {
            namespace: namespace.to_string(),
            service: service.to_string(),
            instance_id: instance_id.to_string(),
        };
        let max = self.max();
        let answer = self
            .with_failover("deregister", |ch| {
                let request = self.unary(request.clone());
                async move { registry_client(ch, max).deregister(request).await }
            })
            .await?
            .into_inner();
        Ok(ResponseHeader::from(answer.header).revision)
    }

    /// Grants a lease of `ttl` (1 s to 24 h).
    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseGrant, ClientError> {
        let request = pb::GrantLeaseRequest {
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            lease_id: 0,
        };
        let max = self.max();
        let answer = self
            .with_failover("grant_lease", |ch| {
                let request = self.unary(request);
                async move { registry_client(ch, max).grant_lease(request).await }
            })
            .await?
            .into_inner();
        Ok(LeaseGrant {
            id: answer.lease_id,
            ttl: Duration::from_millis(answer.ttl_ms),
            revision: ResponseHeader::from(answer.header).revision,
        })
    }

    /// Revokes a lease, removing every instance attached to it.
    pub async fn revoke_lease(&self, lease_id: LeaseId) -> Result<LeaseRevoked, ClientError> {
        let max = self.max();
        let answer = self
            .with_failover("revoke_lease", |ch| {
                let request = self.unary(pb::RevokeLeaseRequest { lease_id });
                async move { registry_client(ch, max).revoke_lease(request).await }
            })
            .await?
            .into_inner();
        Ok(LeaseRevoked {
            removed: answer.removed,
            revision: ResponseHeader::from(answer.header).revision,
        })
    }

    /// Renews a lease once over a short-lived keep-alive stream; returns the TTL
    /// renewed, or [`ClientError::NotFound`] when the lease no longer exists.
    pub async fn keep_alive_once(&self, lease_id: LeaseId) -> Result<Duration, ClientError> {
        let max = self.max();
        let timeout = self.inner.options.request_timeout;
        let answer = self
            .with_failover("keep_alive", |ch| async move {
                let outbound = futures::stream::iter([pb::KeepAliveRequest { lease_id }]);
                let mut request = Request::new(outbound);
                request.set_timeout(timeout);
                let mut inbound = registry_client(ch, max).keep_alive(request).await?.into_inner();
                inbound
                    .message()
                    .await?
                    .ok_or_else(|| tonic::Status::unavailable("keep-alive stream closed without an answer"))
            })
            .await?;
        if answer.ttl_ms == 0 {
            return Err(ClientError::NotFound(format!("lease {lease_id} not found")));
        }
        Ok(Duration::from_millis(answer.ttl_ms))
    }

    /// Sets the health of an instance; returns the instance as stored.
    pub async fn set_health(
        &self,
        namespace: &str,
        service: &str,
        instance_id: &str,
        health: Health,
    ) -> Result<Instance, ClientError> {
        let request = pb::SetHealthRequest {
            namespace: namespace.to_string(),
            service: service.to_string(),
            instance_id: instance_id.to_string(),
            health: pb::Health::from(health) as i32,
        };
        let max = self.max();
        let answer = self
            .with_failover("set_health", |ch| {
                let request = self.unary(request.clone());
                async move { registry_client(ch, max).set_health(request).await }
            })
            .await?
            .into_inner();
        stored_instance(answer.instance.as_ref(), "SetHealthResponse")
    }

    /// Puts an instance in maintenance with `Some(reason)` (discovery of healthy
    /// instances skips it while it stays registered), or takes it out with `None`;
    /// returns the instance as stored.
    pub async fn set_maintenance(
        &self,
        namespace: &str,
        service: &str,
        instance_id: &str,
        reason: Option<&str>,
    ) -> Result<Instance, ClientError> {
        let request = pb::SetMaintenanceRequest {
            namespace: namespace.to_string(),
            service: service.to_string(),
            instance_id: instance_id.to_string(),
            enable: reason.is_some(),
            reason: reason.unwrap_or_default().to_string(),
        };
        let max = self.max();
        let answer = self
            .with_failover("set_maintenance", |ch| {
                let request = self.unary(request.clone());
                async move { registry_client(ch, max).set_maintenance(request).await }
            })
            .await?
            .into_inner();
        stored_instance(answer.instance.as_ref(), "SetMaintenanceResponse")
    }

    /// The instances of one service that match `options`, and where the answering
    /// node stood.
    pub async fn discover(
        &self,
        service: &str,
        options: &DiscoverOptions,
    ) -> Result<(Vec<Instance>, ResponseHeader), ClientError> {
        let (mode, mode_revision) = options.mode.to_pb();
        let request = pb::DiscoverRequest {
            namespace: options.namespace.clone(),
            service: service.to_string(),
            tags: options.tags.clone(),
            zone: options.zone.clone().unwrap_or_default(),
            health: options.health.iter().map(|h| pb::Health::from(*h) as i32).collect(),
            mode: mode as i32,
            min_revision: mode_revision.max(options.min_revision),
        };
        let max = self.max();
        let answer = self
            .with_failover("discover", |ch| {
                let request = self.unary(request.clone());
                async move { registry_client(ch, max).discover(request).await }
            })
            .await?
            .into_inner();
        Ok((
            answer.instances.iter().map(convert::instance_from_pb).collect(),
            ResponseHeader::from(answer.header),
        ))
    }

    /// Services with instance counts; `namespace` `None` lists every namespace.
    pub async fn list_services(
        &self,
        namespace: Option<&str>,
        mode: ReadMode,
    ) -> Result<(Vec<ServiceSummary>, ResponseHeader), ClientError> {
        let (mode, min_revision) = mode.to_pb();
        let request = pb::ListServicesRequest {
            namespace: namespace.unwrap_or_default().to_string(),
            mode: mode as i32,
            min_revision,
        };
        let max = self.max();
        let answer = self
            .with_failover("list_services", |ch| {
                let request = self.unary(request.clone());
                async move { registry_client(ch, max).list_services(request).await }
            })
            .await?
            .into_inner();
        Ok((
            answer.services.into_iter().map(summary_from_pb).collect(),
            ResponseHeader::from(answer.header),
        ))
    }

    /// Watches changes to `service` in `namespace` (empty strings: every service,
    /// every namespace) from `start_revision` (0: from now on).
    ///
    /// The stream survives node failures: it reopens on the next node from the
    /// revision after the last one it delivered, so no change is missed or repeated
    /// (the server sends a [`WatchItem::Reset`](crate::WatchItem::Reset) when its
    /// history no longer reaches back). It ends with an error only when no node can
    /// serve it within the retry budget, or the request is invalid.
    pub fn watch(&self, namespace: &str, service: &str, start_revision: Revision) -> WatchStream {
        WatchStream::start(self.clone(), namespace.to_string(), service.to_string(), start_revision)
    }

    /// The status of the node in use (or the next one that answers).
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        let max = self.max();
        let answer = self
            .with_failover("status", |ch| {
                let request = self.unary(pb::StatusRequest {});
                async move { cluster_client(ch, max).status(request).await }
            })
            .await?
            .into_inner();
        Ok(NodeStatus::from(answer))
    }

    /// The status of every node the client knows, asked once each without failover.
    pub async fn status_of_each(&self) -> Vec<(String, Result<NodeStatus, ClientError>)> {
        let max = self.max();
        let asks = self.inner.nodes.iter().map(|node| {
            let request = self.unary(pb::StatusRequest {});
            let channel = node.channel.clone();
            async move {
                let answer = cluster_client(channel, max).status(request).await;
                (
                    node.addr.clone(),
                    answer
                        .map(|a| NodeStatus::from(a.into_inner()))
                        .map_err(|s| ClientError::from_status(&s)),
                )
            }
        });
        futures::future::join_all(asks).await
    }

    /// The cluster's members as the answering node knows them.
    pub async fn members(&self) -> Result<Members, ClientError> {
        let max = self.max();
        let answer = self
            .with_failover("members", |ch| {
                let request = self.unary(pb::MembersRequest {});
                async move { cluster_client(ch, max).members(request).await }
            })
            .await?
            .into_inner();
        Ok(Members {
            members: answer.members.into_iter().map(Into::into).collect(),
            leader_id: (answer.leader_id != 0).then_some(answer.leader_id),
        })
    }

    /// Adds node `node_id`, reachable by peers at `peer_addr`, as a learner.
    pub async fn add_learner(&self, node_id: u64, peer_addr: &str) -> Result<MembershipChange, ClientError> {
        let request = pb::AddLearnerRequest {
            node_id,
            peer_addr: peer_addr.to_string(),
        };
        let max = self.max();
        let answer = self
            .with_failover("add_learner", |ch| {
                let request = self.unary(request.clone());
                async move { cluster_client(ch, max).add_learner(request).await }
            })
            .await?
            .into_inner();
        Ok(answer.into())
    }

    /// Makes learner `node_id` a voter.
    pub async fn promote(&self, node_id: u64) -> Result<MembershipChange, ClientError> {
        let max = self.max();
        let answer = self
            .with_failover("promote", |ch| {
                let request = self.unary(pb::PromoteRequest { node_id });
                async move { cluster_client(ch, max).promote(request).await }
            })
            .await?
            .into_inner();
        Ok(answer.into())
    }

    /// Removes node `node_id` from the cluster.
    pub async fn remove_member(&self, node_id: u64) -> Result<MembershipChange, ClientError> {
        let max = self.max();
        let answer = self
            .with_failover("remove_member", |ch| {
                let request = self.unary(pb::RemoveMemberRequest { node_id });
                async move { cluster_client(ch, max).remove_member(request).await }
            })
            .await?
            .into_inner();
        Ok(answer.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_get_a_scheme_and_blanks_are_skipped() {
        let c = Client::connect(vec![
            "127.0.0.1:7100".into(),
            " ".into(),
            "http://127.0.0.1:7101".into(),
        ])
        .await
        .unwrap();
        assert_eq!(c.nodes(), vec!["127.0.0.1:7100", "http://127.0.0.1:7101"]);
        assert_eq!(c.current_node(), "127.0.0.1:7100");
    }

    #[tokio::test]
    async fn no_address_is_an_error() {
        assert_eq!(Client::connect(vec![]).await.unwrap_err(), ClientError::NoAddresses);
    }

    #[tokio::test]
    async fn a_malformed_address_is_refused() {
        let err = Client::connect(vec!["bad host:1".into()]).await.unwrap_err();
        assert!(matches!(err, ClientError::InvalidAddress { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn failover_moves_once_per_failed_node() {
        let c = Client::connect(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()])
            .await
            .unwrap();
        c.advance_from(0);
        c.advance_from(0); // a second caller that saw the same failure
        assert_eq!(c.current_node(), "127.0.0.1:2");
        c.advance_from(1);
        assert_eq!(c.current_node(), "127.0.0.1:1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_to_unreachable_nodes_ends_unavailable() {
        let options = ClientOptions {
            retry: RetryPolicy {
                max_elapsed: Duration::from_millis(300),
                ..RetryPolicy::default()
            },
            connect_timeout: Duration::from_millis(50),
            ..ClientOptions::default()
        };
        // Port 1 on loopback refuses connections.
        let c = Client::connect_with(vec!["127.0.0.1:1".into(), "127.0.0.1:1".into()], options)
            .await
            .unwrap();
        let err = c.status().await.unwrap_err();
        assert!(
            matches!(err, ClientError::Unavailable { attempts, .. } if attempts >= 2),
            "{err:?}"
        );
    }
}
