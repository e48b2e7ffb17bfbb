//! The Consul-compatible HTTP API: the subset of Consul's agent, catalog, health and
//! status endpoints that discovery clients and tools use (py-consul, Prometheus's
//! `consul_sd_configs`, anything built on Consul's Go `api` package), with Consul's
//! paths, field names and status codes.
//!
//! Every endpoint is a thin adapter over the node's registry operations (`api.rs`)
//! and the core's validation:
//!
//! - Consul services live in Muster namespace `default`; a Consul service ID is a
//!   Muster instance id, a Consul service name a Muster service (a DNS label).
//! - Checks are TTL checks kept by the leader (`checks.rs`); HTTP, TCP, script and
//!   other probing checks are refused with 400.
//! - Reads are served from this node's memory (like Consul's `?stale`); `?consistent`
//!   confirms leadership through a quorum first. Writes answer once this node has
//!   applied them, so a client that registers and then reads or reports on the same
//!   node sees its write.
//! - Blocking queries (`?index=N&wait=D`) wait on per-service change notifications
//!   (`blocking.rs`) and the per-service modify index the registry keeps, so a busy
//!   service does not wake the waiters of others. The wait defaults to 5 minutes, is
//!   capped at 10, and gets up to wait/16 of random jitter, as in Consul.
//! - Errors are plain text, as Consul's are: 400 for bad input naming the field, 404
//!   for unknown service or check ids.

pub mod decode;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, put};
use axum::Router;
use muster_core::types::DEFAULT_NAMESPACE;
use muster_core::{validate, Health, Instance, InstanceKey, Registry, Revision, ServiceKey};
use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;

use crate::api::ReadConsistency;
use crate::checks::CheckReport;
use crate::error::ApiError;
use crate::node::NodeCore;
use decode::DecodeError;
use wire::{
    health_status_code, nodes_of, AgentService, AgentServiceHealth, CatalogService, HealthCheck, NodeServices,
    ServiceEntry, DATACENTER,
};

/// The Muster namespace the Consul API serves.
const NAMESPACE: &str = DEFAULT_NAMESPACE;
/// Wait of a blocking query that names none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// Longest wait of a blocking query.
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// The Consul API routes, merged into the node's HTTP router.
pub fn routes() -> Router<Arc<NodeCore>> {
    Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/service/maintenance/{id}", put(service_maintenance))
        .route("/v1/agent/service/{id}", get(agent_service))
        .route("/v1/agent/check/pass/{*check_id}", put(check_pass))
        .route("/v1/agent/check/warn/{*check_id}", put(check_warn))
        .route("/v1/agent/check/fail/{*check_id}", put(check_fail))
        .route("/v1/agent/check/update/{*check_id}", put(check_update))
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/health/service/id/{id}", get(agent_health_by_id))
        .route("/v1/agent/health/service/name/{name}", get(agent_health_by_name))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/checks", get(agent_checks))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .route("/v1/catalog/datacenters", get(catalog_datacenters))
        .route("/v1/catalog/nodes", get(catalog_nodes))
        .route("/v1/catalog/node/{node}", get(catalog_node))
        .route("/v1/health/node/{node}", get(health_node))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/health/checks/{name}", get(health_checks))
        .route("/v1/health/state/{state}", get(health_state))
        .route("/v1/status/leader", get(status_leader))
        .route("/v1/status/peers", get(status_peers))
}

/// An error answered as Consul answers it: a status code and a plain-text message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulError {
    status: StatusCode,
    message: String,
}

impl ConsulError {
    fn bad_request(message: impl Into<String>) -> Self {
        ConsulError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ConsulError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
}

impl From<DecodeError> for ConsulError {
    fn from(e: DecodeError) -> Self {
        ConsulError::bad_request(e.to_string())
    }
}

impl From<ApiError> for ConsulError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid(v) => {
                ConsulError::bad_request(format!("Invalid {}: {}", decode::consul_field(&v.field, &[]), v.reason))
            }
            other => ConsulError {
                status: StatusCode::from_u16(other.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                message: other.to_string(),
            },
        }
    }
}

impl IntoResponse for ConsulError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.message,
        )
            .into_response()
    }
}

/// Query parameters in order, repeated ones included (`tag=a&tag=b`).
type Params = Query<Vec<(String, String)>>;

fn param<'a>(params: &'a Params, key: &str) -> Option<&'a str> {
    params.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn params_all<'a>(params: &'a Params, key: &str) -> Vec<&'a str> {
    params
        .0
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A flag like `?passing` or `?passing=true`.
fn flag(params: &Params, key: &str) -> bool {
    param(params, key).is_some_and(|v| !matches!(v, "false" | "0"))
}

/// How a read is served.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ReadOptions {
    /// `(index, wait including jitter)` of a blocking query.
    blocking: Option<(Revision, Duration)>,
    /// `?consistent`: confirm leadership through a quorum before reading.
    consistent: bool,
}

fn read_options(params: &Params) -> Result<ReadOptions, ConsulError> {
    if param(params, "filter").is_some_and(|f| !f.is_empty()) {
        return Err(ConsulError::bad_request(
            "Invalid filter: filter expressions are not supported by Muster's Consul API; use tag= instead",
        ));
    }
    let index = match param(params, "index") {
        None | Some("") => 0,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ConsulError::bad_request(format!("Invalid index: {v:?} is not a whole number")))?,
    };
    let wait = match param(params, "wait") {
        None | Some("") => DEFAULT_WAIT,
        Some(v) => {
            decode::parse_go_duration(v).map_err(|e| ConsulError::bad_request(format!("Invalid wait time: {e}")))?
        }
    }
    .min(MAX_WAIT);
    let blocking = (index > 0).then(|| {
        let jitter_ms = rand::thread_rng().gen_range(0..=wait.as_millis() as u64 / 16);
        (index, wait + Duration::from_millis(jitter_ms))
    });
    Ok(ReadOptions {
        blocking,
        consistent: flag(params, "consistent"),
    })
}

/// Serves a read that may block: waits (when asked to) until `index_of` moves past
/// the client's index, then answers `(index, answer)` from one view of the registry.
/// `changes` must be subscribed before this is called, so no change falls between
/// the subscription and the first look.
async fn blocking_read<T>(
    core: &NodeCore,
    options: &ReadOptions,
    changes: Option<watch::Receiver<Revision>>,
    index_of: impl Fn(&Registry) -> Revision,
    answer: impl FnOnce(&Registry) -> T,
) -> Result<(Revision, T), ConsulError> {
    if options.consistent {
        core.read_barrier(ReadConsistency::Linearizable).await?;
    }
    if let (Some((client_index, wait)), Some(mut changes)) = (options.blocking, changes) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if index_of(&core.shared.read()) > client_index {
                break;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = core.shutdown.cancelled() => break,
            }
        }
    }
    let registry = core.shared.read();
    // Consul never answers index 0: clients treat it as "no blocking".
    Ok((index_of(&registry).max(1), answer(&registry)))
}

/// A JSON answer with Consul's query headers.
fn read_response<T: Serialize>(core: &NodeCore, index: Option<Revision>, body: &T) -> Response {
    let view = core.view();
    let mut headers = HeaderMap::new();
    if let Some(index) = index {
        headers.insert("X-Consul-Index", HeaderValue::from(index));
    }
    headers.insert(
        "X-Consul-KnownLeader",
        HeaderValue::from_static(if view.leader_id.is_some() { "true" } else { "false" }),
    );
    headers.insert("X-Consul-LastContact", HeaderValue::from(view.ms_since_leader_contact));
    (headers, Json(body)).into_response()
}

/// Checks a service name from a URL.
fn service_name(name: &str) -> Result<ServiceKey, ConsulError> {
    validate::dns_label("service", name)
        .map_err(|e| ConsulError::bad_request(format!("Invalid service name {name:?}: {}", e.reason)))?;
    Ok(ServiceKey::new(NAMESPACE, name))
}

/// The address a registration without `Address` gets: this node's HTTP address,
/// or its advertised peer host, as Consul uses its agent's address.
fn default_address(core: &NodeCore) -> String {
    let ip = core.config.http_addr.ip();
    if !ip.is_unspecified() {
        return ip.to_string();
    }
    let peer = core.config.advertised_peer_addr();
    match peer.rsplit_once(':') {
        Some((host, _)) if !host.is_empty() && host != "0.0.0.0" && host != "[::]" => host.to_string(),
        _ => "127.0.0.1".to_string(),
    }
}

/// An empty 200, Consul's answer to a write.
fn written() -> Response {
    StatusCode::OK.into_response()
}

#[tracing::instrument(skip_all, fields(service = tracing::field::Empty))]
async fn register(State(core): State<Arc<NodeCore>>, body: Bytes) -> Result<Response, ConsulError> {
    let registration = decode::registration(&body, &default_address(&core))?;
    let spec = registration.spec.clone();
    tracing::Span::current().record("service", spec.service.as_str());
    // A Consul service ID names one service on an agent: registering it under
    // another name moves it.
    let moved: Vec<InstanceKey> = core
        .shared
        .read()
        .instances_with_id(NAMESPACE, &spec.instance_id)
        .into_iter()
        .filter(|i| *i.service != *spec.service)
        .map(|i| i.key())
        .collect();
    // Each write returns once this node has applied it (`NodeCore::propose`).
    core.register(spec, None).await.map_err(|e| match e {
        ApiError::Invalid(v) => ConsulError::from(registration.consul_error(&v)),
        other => ConsulError::from(other),
    })?;
    for key in moved {
        match core.deregister(key).await {
            Ok(_) | Err(ApiError::InstanceNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(written())
}

/// The instances a Consul service ID names (one per service it is registered in).
fn keys_with_service_id(core: &NodeCore, id: &str) -> Vec<InstanceKey> {
    core.shared
        .read()
        .instances_with_id(NAMESPACE, id)
        .into_iter()
        .map(|i| i.key())
        .collect()
}

#[tracing::instrument(skip_all, fields(id = %id))]
async fn deregister(State(core): State<Arc<NodeCore>>, Path(id): Path<String>) -> Result<Response, ConsulError> {
    let keys = keys_with_service_id(&core, &id);
    if keys.is_empty() {
        return Err(ConsulError::not_found(format!(
            "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
        )));
    }
    for key in keys {
        match core.deregister(key).await {
            Ok(_) | Err(ApiError::InstanceNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(written())
}

/// `PUT /v1/agent/service/maintenance/:id?enable=true&reason=...`: puts the
/// instances with this service ID in maintenance (a critical check
/// `_service_maintenance:<id>`, so health reads and discovery skip them), or takes
/// them out.
#[tracing::instrument(skip_all, fields(id = %id))]
async fn service_maintenance(
    State(core): State<Arc<NodeCore>>,
    Path(id): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let enable = decode::maintenance_enable(param(&params, "enable"))?;
    let reason = enable.then(|| param(&params, "reason").unwrap_or_default().to_string());
    let keys = keys_with_service_id(&core, &id);
    if keys.is_empty() {
        return Err(ConsulError::not_found(format!("No service registered with ID {id:?}")));
    }
    for key in keys {
        core.set_maintenance(key, reason.clone()).await?;
    }
    Ok(written())
}

/// The instance that owns a check id, looked up the quick way for Consul's default
/// ids (`service:<id>[:n]`) and by a scan of the namespace otherwise.
fn check_owner(registry: &Registry, check_id: &str) -> Option<InstanceKey> {
    for id in decode::instance_ids_of_check(check_id) {
        if let Some(i) = registry
            .instances_with_id(NAMESPACE, id)
            .into_iter()
            .find(|i| i.check(check_id).is_some())
        {
            return Some(i.key());
        }
    }
    registry
        .namespace_instances(NAMESPACE)
        .find(|i| i.check(check_id).is_some())
        .map(|i| i.key())
}

async fn report(core: &NodeCore, check_id: String, status: Health, output: String) -> Result<Response, ConsulError> {
    let owner = check_owner(&core.shared.read(), &check_id);
    let Some(key) = owner else {
        return Err(ConsulError::not_found(format!(
            "Unknown check ID {check_id:?}. Ensure that the check ID is passed, not the check name."
        )));
    };
    core.report_check(CheckReport {
        key,
        check_id,
        status,
        output: decode::truncate_output(output),
    })
    .await?;
    Ok(written())
}

#[tracing::instrument(skip_all, fields(check_id = %check_id))]
async fn check_pass(
    State(core): State<Arc<NodeCore>>,
    Path(check_id): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let note = param(&params, "note").unwrap_or_default().to_string();
    report(&core, check_id, Health::Passing, note).await
}

#[tracing::instrument(skip_all, fields(check_id = %check_id))]
async fn check_warn(
    State(core): State<Arc<NodeCore>>,
    Path(check_id): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let note = param(&params, "note").unwrap_or_default().to_string();
    report(&core, check_id, Health::Warning, note).await
}

#[tracing::instrument(skip_all, fields(check_id = %check_id))]
async fn check_fail(
    State(core): State<Arc<NodeCore>>,
    Path(check_id): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let note = param(&params, "note").unwrap_or_default().to_string();
    report(&core, check_id, Health::Critical, note).await
}

#[tracing::instrument(skip_all, fields(check_id = %check_id))]
async fn check_update(
    State(core): State<Arc<NodeCore>>,
    Path(check_id): Path<String>,
    body: Bytes,
) -> Result<Response, ConsulError> {
    let (status, output) = decode::check_update(&body)?;
    report(&core, check_id, status, output).await
}

fn filtered<'a>(
    registry: &'a Registry,
    key: &ServiceKey,
    tags: &[&str],
    passing_only: bool,
) -> impl Iterator<Item = Arc<Instance>> + 'a {
    let filter = muster_core::DiscoverFilter {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        zone: None,
        health: if passing_only {
            vec![Health::Passing]
        } else {
            Vec::new()
        },
    };
    registry.discover(key, &filter).into_iter()
}

/// A blocking read of one service's instances (filtered by `?tag=` and, when
/// `passing`, health), each shown as `show` renders it: the catalog and health
/// endpoints differ only in that.
async fn service_instances<T: Serialize>(
    core: &NodeCore,
    name: &str,
    params: &Params,
    passing: bool,
    show: fn(&Instance) -> T,
) -> Result<Response, ConsulError> {
    let key = service_name(name)?;
    let options = read_options(params)?;
    let tags = params_all(params, "tag");
    // Muster's nodes carry no metadata: nothing matches a node-meta filter.
    let node_meta = param(params, "node-meta").is_some();
    let changes = options.blocking.map(|_| core.changes.service(&key));
    let (index, entries) = blocking_read(
        core,
        &options,
        changes,
        |r| r.service_index(&key),
        |r| -> Vec<T> {
            if node_meta {
                return Vec::new();
            }
            filtered(r, &key, &tags, passing).map(|i| show(&i)).collect()
        },
    )
    .await?;
    Ok(read_response(core, Some(index), &entries))
}

#[tracing::instrument(skip_all, fields(service = %name))]
async fn catalog_service(
    State(core): State<Arc<NodeCore>>,
    Path(name): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    service_instances(&core, &name, &params, false, CatalogService::of).await
}

#[tracing::instrument(skip_all, fields(service = %name))]
async fn health_service(
    State(core): State<Arc<NodeCore>>,
    Path(name): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let passing = flag(&params, "passing");
    service_instances(&core, &name, &params, passing, ServiceEntry::of).await
}

#[tracing::instrument(skip_all, fields(service = %name))]
async fn health_checks(
    State(core): State<Arc<NodeCore>>,
    Path(name): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let key = service_name(&name)?;
    let options = read_options(&params)?;
    let changes = options.blocking.map(|_| core.changes.service(&key));
    let (index, checks) = blocking_read(
        &core,
        &options,
        changes,
        |r| r.service_index(&key),
        |r| -> Vec<HealthCheck> {
            filtered(r, &key, &[], false)
                .flat_map(|i| HealthCheck::all_of(&i))
                .collect()
        },
    )
    .await?;
    Ok(read_response(&core, Some(index), &checks))
}

/// A read over the whole namespace, which may block (`?index=`) until anything in it
/// changes: `answer` from one view of the registry, with its index.
async fn namespace_read<T: Serialize>(
    core: &NodeCore,
    params: &Params,
    answer: impl FnOnce(&Registry) -> T,
) -> Result<Response, ConsulError> {
    let options = read_options(params)?;
    let changes = options.blocking.map(|_| core.changes.namespace(NAMESPACE));
    let (index, body) = blocking_read(core, &options, changes, |r| r.namespace_index(NAMESPACE), answer).await?;
    Ok(read_response(core, Some(index), &body))
}

/// `GET /v1/health/state/:state`: the checks of every service in one state (or
/// `any`), as alerting tools poll for critical ones.
#[tracing::instrument(skip_all, fields(state = %state))]
async fn health_state(
    State(core): State<Arc<NodeCore>>,
    Path(state): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let wanted = decode::check_state(&state)?;
    namespace_read(&core, &params, |r| -> Vec<HealthCheck> {
        r.namespace_instances(NAMESPACE)
            .flat_map(|i| HealthCheck::all_of(i))
            .filter(|c| wanted.is_none_or(|h| c.status == h.as_str()))
            .collect()
    })
    .await
}

/// `GET /v1/catalog/datacenters`: Muster is one datacenter.
async fn catalog_datacenters() -> Json<[&'static str; 1]> {
    Json([DATACENTER])
}

/// `GET /v1/catalog/nodes`: the nodes instances are shown on (one per address).
#[tracing::instrument(skip_all)]
async fn catalog_nodes(State(core): State<Arc<NodeCore>>, params: Params) -> Result<Response, ConsulError> {
    namespace_read(&core, &params, |r| {
        nodes_of(r.namespace_instances(NAMESPACE).map(|i| &**i))
    })
    .await
}

/// The instances shown on node `node` (those with that address), in service order.
fn instances_on<'a>(registry: &'a Registry, node: &'a str) -> impl Iterator<Item = &'a Arc<Instance>> + 'a {
    registry
        .namespace_instances(NAMESPACE)
        .filter(move |i| i.address == node)
}

/// `GET /v1/catalog/node/:node`: a node and its services; `null` for a node with none,
/// as Consul answers an unknown node.
#[tracing::instrument(skip_all, fields(node = %node))]
async fn catalog_node(
    State(core): State<Arc<NodeCore>>,
    Path(node): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    namespace_read(&core, &params, |r| -> Option<NodeServices> {
        let instances: Vec<&Arc<Instance>> = instances_on(r, &node).collect();
        let node = nodes_of(instances.iter().map(|i| &***i)).pop()?;
        let services = instances
            .iter()
            .map(|i| (i.instance_id.clone(), AgentService::of(i)))
            .collect();
        Some(NodeServices { node, services })
    })
    .await
}

/// `GET /v1/health/node/:node`: the checks of every service on a node.
#[tracing::instrument(skip_all, fields(node = %node))]
async fn health_node(
    State(core): State<Arc<NodeCore>>,
    Path(node): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    namespace_read(&core, &params, |r| -> Vec<HealthCheck> {
        instances_on(r, &node).flat_map(|i| HealthCheck::all_of(i)).collect()
    })
    .await
}

#[tracing::instrument(skip_all)]
async fn catalog_services(State(core): State<Arc<NodeCore>>, params: Params) -> Result<Response, ConsulError> {
    let node_meta = param(&params, "node-meta").is_some();
    namespace_read(&core, &params, |r| {
        let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if node_meta {
            return services;
        }
        for i in r.namespace_instances(NAMESPACE) {
            let tags = services.entry(i.service.to_string()).or_default();
            for t in &i.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
        services
    })
    .await
}

#[tracing::instrument(skip_all)]
async fn agent_services(State(core): State<Arc<NodeCore>>) -> Response {
    let mut services: BTreeMap<String, AgentService> = BTreeMap::new();
    for i in core.shared.read().namespace_instances(NAMESPACE) {
        // Ids registered over gRPC may repeat across services; the first one wins.
        services
            .entry(i.instance_id.clone())
            .or_insert_with(|| AgentService::of(i));
    }
    read_response(&core, None, &services)
}

#[tracing::instrument(skip_all, fields(id = %id))]
async fn agent_service(State(core): State<Arc<NodeCore>>, Path(id): Path<String>) -> Result<Response, ConsulError> {
    let service = core
        .shared
        .read()
        .instances_with_id(NAMESPACE, &id)
        .first()
        .map(|i| AgentService::of(i));
    match service {
        Some(s) => Ok(read_response(&core, None, &s)),
        None => Err(ConsulError::not_found(format!("unknown service ID: {id}"))),
    }
}

/// Whether a local health query asks for the status word alone (`?format=text`).
fn text_format(params: &Params) -> Result<bool, ConsulError> {
    match param(params, "format") {
        None | Some("") => Ok(false),
        Some("text") => Ok(true),
        Some(other) => Err(ConsulError::bad_request(format!(
            "Invalid format: only \"text\" is supported, got {other:?}"
        ))),
    }
}

/// A local health answer: `entries` (or, as text, the status word) under the status
/// code of `health`.
fn local_health_response<T: Serialize>(core: &NodeCore, health: Health, text: bool, entries: &T) -> Response {
    let code = health_status_code(health);
    if text {
        return (code, health.as_str()).into_response();
    }
    let mut response = read_response(core, None, entries);
    *response.status_mut() = code;
    response
}

/// `GET /v1/agent/health/service/id/:id`: one instance's health, with the status
/// code a load balancer's probe reads (200 passing, 429 warning, 503 critical).
#[tracing::instrument(skip_all, fields(id = %id))]
async fn agent_health_by_id(
    State(core): State<Arc<NodeCore>>,
    Path(id): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let text = text_format(&params)?;
    let found = core
        .shared
        .read()
        .instances_with_id(NAMESPACE, &id)
        .first()
        .map(|i| (i.health, AgentServiceHealth::of(i)));
    let (health, entry) = found.ok_or_else(|| ConsulError::not_found(format!("ServiceId {id} not found")))?;
    Ok(local_health_response(&core, health, text, &entry))
}

/// `GET /v1/agent/health/service/name/:name`: the health of every instance of a
/// service, under the status code of the worst of them.
#[tracing::instrument(skip_all, fields(service = %name))]
async fn agent_health_by_name(
    State(core): State<Arc<NodeCore>>,
    Path(name): Path<String>,
    params: Params,
) -> Result<Response, ConsulError> {
    let key = service_name(&name)?;
    let text = text_format(&params)?;
    let (worst, entries): (Option<Health>, Vec<AgentServiceHealth>) = {
        let registry = core.shared.read();
        let instances: Vec<Arc<Instance>> = filtered(&registry, &key, &[], false).collect();
        (
            instances.iter().map(|i| i.health).max(),
            instances.iter().map(|i| AgentServiceHealth::of(i)).collect(),
        )
    };
    let worst = worst.ok_or_else(|| ConsulError::not_found(format!("ServiceName {name} Not Found")))?;
    Ok(local_health_response(&core, worst, text, &entries))
}

#[tracing::instrument(skip_all)]
async fn agent_checks(State(core): State<Arc<NodeCore>>) -> Response {
    let mut checks: BTreeMap<String, HealthCheck> = BTreeMap::new();
    for c in core
        .shared
        .read()
        .namespace_instances(NAMESPACE)
        .flat_map(|i| HealthCheck::all_of(i))
    {
        checks.entry(c.check_id.clone()).or_insert(c);
    }
    read_response(&core, None, &checks)
}

/// `host` and `port` of a `host:port` peer address.
fn split_host_port(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), port.parse().unwrap_or(0)),
        None => (addr.to_string(), 0),
    }
}

#[tracing::instrument(skip_all)]
async fn agent_self(State(core): State<Arc<NodeCore>>) -> Response {
    let view = core.view();
    let name = format!("muster-{}", core.id);
    let (host, port) = split_host_port(&core.config.advertised_peer_addr());
    let body = serde_json::json!({
        "Config": {
            "Datacenter": DATACENTER,
            "PrimaryDatacenter": DATACENTER,
            "NodeName": name,
            "NodeID": "",
            "Server": true,
            "Version": env!("CARGO_PKG_VERSION"),
            "Revision": "",
        },
        "Member": {
            "Name": name,
            "Addr": host,
            "Port": port,
            "Tags": { "role": "consul", "dc": DATACENTER, "id": core.id.to_string() },
            "Status": 1,
        },
        "Meta": {},
        "Muster": {
            "NodeID": core.id,
            "LeaderID": view.leader_id,
            "Revision": view.revision,
        },
    });
    read_response(&core, None, &body)
}

#[tracing::instrument(skip_all)]
async fn status_leader(State(core): State<Arc<NodeCore>>) -> Response {
    let leader = core.leader().map(|(_, addr)| addr).unwrap_or_default();
    read_response(&core, None, &leader)
}

#[tracing::instrument(skip_all)]
async fn status_peers(State(core): State<Arc<NodeCore>>) -> Response {
    let metrics = core.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let peers: Vec<String> = membership
        .voter_ids()
        .filter_map(|id| membership.get_node(&id).map(|n| n.addr.clone()))
        .collect();
    read_response(&core, None, &peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        Query(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn a_query_without_index_does_not_block() {
        assert_eq!(read_options(&params(&[("wait", "10s")])).unwrap().blocking, None);
        assert_eq!(read_options(&params(&[("index", "0")])).unwrap().blocking, None);
    }

    #[test]
    fn the_wait_defaults_to_5_minutes_is_capped_at_10_and_gets_up_to_a_16th_of_jitter() {
        for _ in 0..50 {
            let (index, wait) = read_options(&params(&[("index", "7")])).unwrap().blocking.unwrap();
            assert_eq!(index, 7);
            assert!(
                wait >= DEFAULT_WAIT && wait <= DEFAULT_WAIT + DEFAULT_WAIT / 16,
                "{wait:?}"
            );
            let (_, capped) = read_options(&params(&[("index", "7"), ("wait", "1h")]))
                .unwrap()
                .blocking
                .unwrap();
            assert!(capped >= MAX_WAIT && capped <= MAX_WAIT + MAX_WAIT / 16, "{capped:?}");
            let (_, short) = read_options(&params(&[("index", "7"), ("wait", "1600ms")]))
                .unwrap()
                .blocking
                .unwrap();
            assert!(short >= Duration::from_millis(1600) && short <= Duration::from_millis(1700));
        }
    }

    #[test]
    fn bad_query_parameters_are_400() {
        for bad in [
            [("index", "x"), ("wait", "1s")],
            [("index", "1"), ("wait", "soon")],
            [("filter", "Service.Port == 80"), ("index", "1")],
        ] {
            let e = read_options(&params(&bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn flags_are_present_unless_false() {
        assert!(flag(&params(&[("passing", "")]), "passing"));
        assert!(flag(&params(&[("passing", "true")]), "passing"));
        assert!(!flag(&params(&[("passing", "false")]), "passing"));
        assert!(!flag(&params(&[]), "passing"));
    }
}
