//! The REST JSON API under `/v1/registry/*` and `/v1/cluster/*`: everything the
//! gRPC `Registry` and `Cluster` services do, plus a Server-Sent Events watch, as
//! thin adapters over [`crate::api`] (validation and Raft live there, once).
//! `/v1/openapi.json` documents it.
//!
//! Every answer carries where the answering node stands — `revision`, `node`,
//! `leader`, `leader_known`, `ms_since_leader_contact` — in the body and in
//! `X-Muster-*` headers, so a client can judge how fresh a local read is. Failures
//! answer `{"error": {"field": ..., "message": ...}}` (see [`extract`]).
//!
//! | method | path | does |
//! |---|---|---|
//! | POST | `/v1/registry/services/{service}/instances` | register (or update) |
//! | PUT | `/v1/registry/services/{service}/instances/{id}` | register (or update) |
//! | GET | `/v1/registry/services/{service}/instances` | discover (filters, read modes) |
//! | GET | `/v1/registry/services/{service}/instances/{id}` | one instance |
//! | DELETE | `/v1/registry/services/{service}/instances/{id}` | deregister |
//! | PUT | `/v1/registry/services/{service}/instances/{id}/health` | set health |
//! | GET | `/v1/registry/services` | services with counts |
//! | POST | `/v1/registry/leases` | grant a lease |
//! | GET | `/v1/registry/leases`, `/v1/registry/leases/{id}` | leases with time left |
//! | PUT | `/v1/registry/leases/{id}/keepalive` | heartbeat |
//! | DELETE | `/v1/registry/leases/{id}` | revoke (removes its instances) |
//! | GET | `/v1/registry/watch` | changes as SSE, resumable with `Last-Event-ID` |
//! | GET | `/v1/cluster/status`, `/v1/cluster/members` | the cluster |
//! | GET | `/v1/openapi.json` | this API as OpenAPI 3.0 |

pub mod extract;
pub mod json;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures::Stream;
use muster_core::{validate, DiscoverFilter, Health, InstanceKey, InstanceSpec, ValidationError};
use serde::{Deserialize, Deserializer, Serialize};
use tokio_stream::StreamExt;
use tracing::instrument;

use crate::api::ReadConsistency;
use crate::node::NodeCore;
use crate::status::{MemberInfo, NodeStatus};
use crate::watch::{MessageEncoder, WatchMessage};
use extract::{JsonBody, PathParams, QueryParams, RestError};
use json::{InstanceJson, NodeMeta, ServiceJson};

/// The OpenAPI 3.0 description of this API, served at `/v1/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("rest/openapi.json");

/// How often an idle SSE stream gets a comment line, so proxies keep it open.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// The REST routes (merged into the HTTP router).
pub fn routes() -> Router<Arc<NodeCore>> {
    Router::new()
        .route("/v1/registry/services", get(list_services))
        .route(
            "/v1/registry/services/{service}/instances",
            get(discover).post(register),
        )
        .route(
            "/v1/registry/services/{service}/instances/{instance_id}",
            get(get_instance).put(register_at).delete(deregister),
        )
        .route(
            "/v1/registry/services/{service}/instances/{instance_id}/health",
            put(set_health),
        )
        .route(
            "/v1/registry/services/{service}/instances/{instance_id}/maintenance",
            put(set_maintenance),
        )
        .route("/v1/registry/leases", get(list_leases).post(grant_lease))
        .route("/v1/registry/leases/{lease_id}", get(get_lease).delete(revoke_lease))
        .route(
            "/v1/registry/leases/{lease_id}/keepalive",
            put(keep_alive).post(keep_alive),
        )
        .route("/v1/registry/watch", get(watch))
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/members", get(cluster_members))
        .route("/v1/openapi.json", get(openapi))
}

type RestResult = Result<Response, RestError>;

#[derive(Serialize)]
struct WithMeta<T> {
    #[serde(flatten)]
    body: T,
    #[serde(flatten)]
    meta: NodeMeta,
}

static X_REVISION: HeaderName = HeaderName::from_static("x-muster-revision");
static X_NODE: HeaderName = HeaderName::from_static("x-muster-node");
static X_LEADER: HeaderName = HeaderName::from_static("x-muster-leader");
static X_LEADER_KNOWN: HeaderName = HeaderName::from_static("x-muster-leader-known");
static X_LEADER_CONTACT: HeaderName = HeaderName::from_static("x-muster-ms-since-leader-contact");

fn meta_headers(meta: &NodeMeta, headers: &mut HeaderMap) {
    let mut put = |name: &HeaderName, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name.clone(), v);
        }
    };
    put(&X_REVISION, meta.revision.to_string());
    put(&X_NODE, meta.node.to_string());
    if let Some(leader) = meta.leader {
        put(&X_LEADER, leader.to_string());
    }
    put(&X_LEADER_KNOWN, meta.leader_known.to_string());
    put(&X_LEADER_CONTACT, meta.ms_since_leader_contact.to_string());
}

/// A JSON answer about `revision`, with the node header in body and headers.
fn answer<T: Serialize>(core: &NodeCore, revision: u64, body: T) -> Response {
    let meta = NodeMeta::new(&core.view(), revision);
    let mut headers = HeaderMap::new();
    meta_headers(&meta, &mut headers);
    (headers, Json(WithMeta { body, meta })).into_response()
}

/// Reads `consistency` (`local`, the default, or `linearizable`) and `min_revision`.
fn read_consistency(query: &mut QueryParams) -> Result<ReadConsistency, RestError> {
    let min_revision = query.u64("min_revision")?.unwrap_or(0);
    match query.one("consistency")?.as_deref() {
        None | Some("local") => Ok(ReadConsistency::MinRevision(min_revision)),
        Some("linearizable") => Ok(ReadConsistency::Linearizable),
        Some(other) => Err(RestError::bad_request(
            "consistency",
            format!("must be local or linearizable, got {other:?}"),
        )),
    }
}

/// The namespace from the query (empty: `default`).
fn namespace(query: &mut QueryParams) -> Result<String, RestError> {
    let ns = query.one("namespace")?.unwrap_or_default();
    validate::namespace(&ns).map_err(crate::ApiError::Invalid)?;
    Ok(ns)
}

fn invalid(field: &str, reason: impl Into<String>) -> RestError {
    RestError::from(crate::ApiError::Invalid(ValidationError::new(field, reason)))
}

fn port_u16(field: &str, value: u64) -> Result<u16, RestError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("must be between 1 and 65535, got {value}")))
}

/// A duration given as a string such as `"10s"`, `"1m30s"` or `"500ms"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationString(pub Duration);

impl<'de> Deserialize<'de> for DurationString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DurationString;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"a duration string such as "10s" or "1m30s""#)
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationString, E> {
                humantime::parse_duration(v.trim())
                    .map(DurationString)
                    .map_err(|e| E::custom(format!(r#"{v:?} is not a duration such as "10s": {e}"#)))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// A TTL from `ttl` ("10s") or `ttl_ms` (10000); at most one may be given.
pub(crate) fn ttl_ms(ttl: Option<DurationString>, ttl_ms: Option<u64>) -> Result<Option<u64>, RestError> {
    match (ttl, ttl_ms) {
        (Some(_), Some(_)) => Err(invalid("ttl", "give ttl or ttl_ms, not both")),
        (Some(DurationString(d)), None) => {
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            validate::ttl_ms(ms).map_err(crate::ApiError::Invalid)?;
            Ok(Some(ms))
        }
        (None, Some(ms)) => {
            validate::ttl_ms(ms).map_err(|e| crate::ApiError::Invalid(ValidationError::new("ttl_ms", e.reason)))?;
            Ok(Some(ms))
        }
        (None, None) => Ok(None),
    }
}

/// The body of a registration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default, alias = "id")]
    instance_id: Option<String>,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u64,
    #[serde(default)]
    ports: BTreeMap<String, u64>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    weight: u32,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    health: Option<String>,
    #[serde(default)]
    lease_id: Option<u64>,
    #[serde(default)]
    ttl: Option<DurationString>,
    #[serde(default)]
    ttl_ms: Option<u64>,
}

/// Where a path or query value and a body value must agree.
fn agree(field: &str, outer: &str, body: Option<String>) -> Result<String, RestError> {
    match body {
        Some(b) if !outer.is_empty() && b != outer => Err(invalid(
            field,
            format!("the body says {b:?} but the URL says {outer:?}"),
        )),
        Some(b) if outer.is_empty() => Ok(b),
        _ => Ok(outer.to_string()),
    }
}

fn parse_health(field: &str, value: &str) -> Result<Health, RestError> {
    Health::parse(value).ok_or_else(|| invalid(field, format!("must be passing, warning or critical, got {value:?}")))
}

#[derive(Serialize)]
struct RegisteredJson {
    instance: InstanceJson,
    lease_id: Option<u64>,
}

async fn register_with(
    core: &NodeCore,
    service: String,
    path_instance: Option<String>,
    mut query: QueryParams,
    body: RegisterBody,
) -> RestResult {
    let ns = agree("namespace", &namespace(&mut query)?, body.namespace)?;
    query.finish()?;
    let service = agree("service", &service, body.service)?;
    let instance_id = agree("instance_id", path_instance.as_deref().unwrap_or(""), body.instance_id)?;
    let mut ports = BTreeMap::new();
    for (name, value) in body.ports {
        let port = port_u16(&format!("ports[{name:?}]"), value)?;
        ports.insert(name, port);
    }
    let spec = InstanceSpec {
        namespace: ns,
        service,
        instance_id,
        address: body.address,
        port: port_u16("port", body.port)?,
        ports,
        tags: body.tags,
        metadata: body.metadata,
        weight: body.weight,
        zone: body.zone,
        health: match body.health {
            Some(h) => parse_health("health", &h)?,
            None => Health::Passing,
        },
        lease_id: body.lease_id,
        ..Default::default()
    };
    let grant = ttl_ms(body.ttl, body.ttl_ms)?;
    tracing::Span::current().record("service", spec.service.as_str());
    tracing::Span::current().record("instance", spec.instance_id.as_str());
    let done = core.register(spec, grant).await?;
    Ok(answer(
        core,
        done.revision,
        RegisteredJson {
            lease_id: done.instance.lease_id,
            instance: InstanceJson::from(&*done.instance),
        },
    ))
}

#[instrument(skip_all, fields(service, instance))]
async fn register(
    State(core): State<Arc<NodeCore>>,
    PathParams(service): PathParams<String>,
    query: QueryParams,
    JsonBody(body): JsonBody<RegisterBody>,
) -> RestResult {
    register_with(&core, service, None, query, body).await
}

#[instrument(skip_all, fields(service, instance))]
async fn register_at(
    State(core): State<Arc<NodeCore>>,
    PathParams((service, instance_id)): PathParams<(String, String)>,
    query: QueryParams,
    JsonBody(body): JsonBody<RegisterBody>,
) -> RestResult {
    register_with(&core, service, Some(instance_id), query, body).await
}

#[derive(Serialize)]
struct DiscoveredJson<'a> {
    namespace: &'a str,
    service: &'a str,
    instances: Vec<InstanceJson>,
    service_revision: u64,
}

/// Reads `health` filters: repeated and/or comma-separated; `any` means all.
fn health_filter(query: &mut QueryParams) -> Result<Vec<Health>, RestError> {
    let mut healths = Vec::new();
    for value in query.all("health") {
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "any" {
                return Ok(Vec::new());
            }
            let h = parse_health("health", part)?;
            if !healths.contains(&h) {
                healths.push(h);
            }
        }
    }
    Ok(healths)
}

#[instrument(skip_all, fields(service))]
async fn discover(
    State(core): State<Arc<NodeCore>>,
    PathParams(service): PathParams<String>,
    mut query: QueryParams,
) -> RestResult {
    tracing::Span::current().record("service", service.as_str());
    let ns = namespace(&mut query)?;
    let filter = DiscoverFilter {
        tags: query.all("tag"),
        zone: query.one("zone")?.filter(|z| !z.is_empty()),
        health: health_filter(&mut query)?,
    };
    let consistency = read_consistency(&mut query)?;
    query.finish()?;
    validate::tags(&filter.tags).map_err(|e| {
        let field = e.field.replacen("tags", "tag", 1);
        crate::ApiError::Invalid(ValidationError::new(field, e.reason))
    })?;
    if let Some(zone) = &filter.zone {
        validate::zone(zone).map_err(crate::ApiError::Invalid)?;
    }
    core.read_barrier(consistency).await?;
    let found = core.discover_local(&ns, &service, &filter)?;
    let ns = muster_core::types::normalize_namespace(&ns);
    Ok(answer(
        &core,
        found.revision,
        DiscoveredJson {
            namespace: &ns,
            service: &service,
            instances: found.instances.iter().map(|i| InstanceJson::from(&**i)).collect(),
            service_revision: found.service_revision,
        },
    ))
}

#[derive(Serialize)]
struct OneInstanceJson {
    instance: InstanceJson,
}

/// The answer that shows one instance, at `revision`.
fn one_instance(core: &NodeCore, revision: u64, instance: &muster_core::Instance) -> Response {
    answer(
        core,
        revision,
        OneInstanceJson {
            instance: InstanceJson::from(instance),
        },
    )
}

#[instrument(skip_all)]
async fn get_instance(
    State(core): State<Arc<NodeCore>>,
    PathParams((service, instance_id)): PathParams<(String, String)>,
    mut query: QueryParams,
) -> RestResult {
    let ns = namespace(&mut query)?;
    let consistency = read_consistency(&mut query)?;
    query.finish()?;
    let key = InstanceKey::new(&ns, &service, &instance_id);
    // Refuse bad input before waiting on the read barrier.
    validate::instance_key(&key).map_err(crate::ApiError::Invalid)?;
    core.read_barrier(consistency).await?;
    let (instance, revision) = core.instance_local(&key)?;
    let instance = instance.ok_or_else(|| RestError::not_found("instance_id", format!("instance {key} not found")))?;
    Ok(one_instance(&core, revision, &instance))
}

#[derive(Serialize)]
struct Empty {}

#[instrument(skip_all)]
async fn deregister(
    State(core): State<Arc<NodeCore>>,
    PathParams((service, instance_id)): PathParams<(String, String)>,
    mut query: QueryParams,
) -> RestResult {
    let ns = namespace(&mut query)?;
    query.finish()?;
    let revision = core.deregister(InstanceKey::new(&ns, &service, &instance_id)).await?;
    Ok(answer(&core, revision, Empty {}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthBody {
    health: String,
}

#[instrument(skip_all)]
async fn set_health(
    State(core): State<Arc<NodeCore>>,
    PathParams((service, instance_id)): PathParams<(String, String)>,
    mut query: QueryParams,
    JsonBody(body): JsonBody<HealthBody>,
) -> RestResult {
    let ns = namespace(&mut query)?;
    query.finish()?;
    let health = parse_health("health", &body.health)?;
    let done = core
        .set_health(InstanceKey::new(&ns, &service, &instance_id), health)
        .await?;
    Ok(one_instance(&core, done.revision, &done.instance))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaintenanceBody {
    enable: bool,
    #[serde(default)]
    reason: Option<String>,
}

#[instrument(skip_all)]
async fn set_maintenance(
    State(core): State<Arc<NodeCore>>,
    PathParams((service, instance_id)): PathParams<(String, String)>,
    mut query: QueryParams,
    JsonBody(body): JsonBody<MaintenanceBody>,
) -> RestResult {
    let ns = namespace(&mut query)?;
    query.finish()?;
    let reason = match (body.enable, body.reason) {
        (true, reason) => Some(reason.unwrap_or_default()),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(invalid(
                "reason",
                "only a request that enables maintenance gives a reason",
            ))
        }
    };
    let done = core
        .set_maintenance(InstanceKey::new(&ns, &service, &instance_id), reason)
        .await?;
    Ok(one_instance(&core, done.revision, &done.instance))
}

#[derive(Serialize)]
struct ServicesJson {
    services: Vec<ServiceJson>,
}

#[instrument(skip_all)]
async fn list_services(State(core): State<Arc<NodeCore>>, mut query: QueryParams) -> RestResult {
    let ns = namespace(&mut query)?;
    let consistency = read_consistency(&mut query)?;
    query.finish()?;
    core.read_barrier(consistency).await?;
    let (services, revision) = core.services_local((!ns.is_empty()).then_some(ns.as_str()))?;
    Ok(answer(
        &core,
        revision,
        ServicesJson {
            services: services.iter().map(ServiceJson::from).collect(),
        },
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    #[serde(default)]
    lease_id: Option<u64>,
    #[serde(default)]
    ttl: Option<DurationString>,
    #[serde(default)]
    ttl_ms: Option<u64>,
}

#[derive(Serialize)]
struct LeaseJson {
    lease_id: u64,
    ttl_ms: u64,
}

#[instrument(skip_all)]
async fn grant_lease(
    State(core): State<Arc<NodeCore>>,
    query: QueryParams,
    JsonBody(body): JsonBody<GrantBody>,
) -> RestResult {
    query.finish()?;
    let ttl = ttl_ms(body.ttl, body.ttl_ms)?.ok_or_else(|| invalid("ttl", "a lease needs ttl or ttl_ms"))?;
    let (lease_id, ttl_ms, revision) = core.grant_lease(body.lease_id.unwrap_or(0), ttl).await?;
    Ok(answer(&core, revision, LeaseJson { lease_id, ttl_ms }))
}

fn lease_id(raw: &str) -> Result<u64, RestError> {
    let id = raw
        .parse::<u64>()
        .map_err(|_| invalid("lease_id", format!("must be a positive integer, got {raw:?}")))?;
    validate::lease_id(id).map_err(crate::ApiError::Invalid)?;
    Ok(id)
}

#[instrument(skip_all)]
async fn keep_alive(
    State(core): State<Arc<NodeCore>>,
    PathParams(raw): PathParams<String>,
    query: QueryParams,
) -> RestResult {
    query.finish()?;
    let id = lease_id(&raw)?;
    let answers = core.keep_alive(vec![id]).await?;
    let ttl_ms = answers.first().map_or(0, |(_, ttl)| *ttl);
    if ttl_ms == 0 {
        return Err(RestError::not_found(
            "lease_id",
            format!("lease {id} not found (expired or revoked)"),
        ));
    }
    Ok(answer(&core, 0, LeaseJson { lease_id: id, ttl_ms }))
}

/// The most `lease_id` parameters one lease listing takes.
const MAX_LEASES_ASKED: usize = 1000;

#[derive(Serialize)]
struct LeaseInfoJson {
    lease_id: u64,
    ttl_ms: u64,
    granted_at_ms: u64,
    remaining_ms: u64,
    remaining_exact: bool,
    instances: usize,
}

impl From<&crate::api::LeaseInfo> for LeaseInfoJson {
    fn from(l: &crate::api::LeaseInfo) -> Self {
        LeaseInfoJson {
            lease_id: l.lease_id,
            ttl_ms: l.ttl_ms,
            granted_at_ms: l.granted_at_ms,
            remaining_ms: l.remaining_ms,
            remaining_exact: l.remaining_exact,
            instances: l.instances,
        }
    }
}

#[derive(Serialize)]
struct LeasesJson {
    leases: Vec<LeaseInfoJson>,
}

/// Leases with the time they have left: the ones named by repeated `lease_id`
/// parameters that exist (the web console asks for those of one service), or all.
#[instrument(skip_all)]
async fn list_leases(State(core): State<Arc<NodeCore>>, mut query: QueryParams) -> RestResult {
    let raw = query.all("lease_id");
    query.finish()?;
    if raw.len() > MAX_LEASES_ASKED {
        return Err(invalid("lease_id", format!("at most {MAX_LEASES_ASKED} may be given")));
    }
    let ids = raw.iter().map(|r| lease_id(r)).collect::<Result<Vec<_>, _>>()?;
    let (leases, revision) = core.leases_local((!ids.is_empty()).then_some(ids.as_slice()));
    Ok(answer(
        &core,
        revision,
        LeasesJson {
            leases: leases.iter().map(LeaseInfoJson::from).collect(),
        },
    ))
}

/// One lease with the time it has left.
#[instrument(skip_all)]
async fn get_lease(
    State(core): State<Arc<NodeCore>>,
    PathParams(raw): PathParams<String>,
    query: QueryParams,
) -> RestResult {
    query.finish()?;
    let id = lease_id(&raw)?;
    let (leases, revision) = core.leases_local(Some(&[id]));
    let lease = leases
        .first()
        .ok_or_else(|| RestError::not_found("lease_id", format!("lease {id} not found (expired or revoked)")))?;
    Ok(answer(&core, revision, LeaseInfoJson::from(lease)))
}

#[derive(Serialize)]
struct RevokedJson {
    removed: u32,
}

#[instrument(skip_all)]
async fn revoke_lease(
    State(core): State<Arc<NodeCore>>,
    PathParams(raw): PathParams<String>,
    query: QueryParams,
) -> RestResult {
    query.finish()?;
    let id = lease_id(&raw)?;
    let (removed, revision) = core.revoke_lease(id).await?;
    Ok(answer(&core, revision, RevokedJson { removed }))
}

/// The SSE event for one watch message: `id` is its revision, so a reconnecting
/// client's `Last-Event-ID` resumes right after it.
fn sse_event(message: WatchMessage) -> SseEvent {
    let revision = message.revision();
    let (name, data): (&str, String) = match &message {
        WatchMessage::Event(e) => (json::event_name(&e.event), e.json().to_string()),
        WatchMessage::Reset { revision, instances } => ("reset", json::reset_data(*revision, instances)),
        WatchMessage::Progress(revision) => ("progress", json::progress_data(*revision)),
    };
    SseEvent::default().event(name).id(revision.to_string()).data(data)
}

#[instrument(skip_all)]
async fn watch(State(core): State<Arc<NodeCore>>, headers: HeaderMap, mut query: QueryParams) -> RestResult {
    let namespace = query.one("namespace")?.unwrap_or_default();
    let service = query.one("service")?.unwrap_or_default();
    let mut start_revision = query.u64("start_revision")?.unwrap_or(0);
    query.finish()?;
    // A reconnecting EventSource repeats the original URL and adds Last-Event-ID:
    // the header wins.
    if let Some(last) = headers.get("last-event-id") {
        let last = last
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| invalid("Last-Event-ID", "must be a revision (a non-negative integer)"))?;
        start_revision = last.saturating_add(1);
    }
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>> = Box::pin(
        core.watch(&namespace, &service, start_revision, None, MessageEncoder)?
            .map(|m| Ok(sse_event(m))),
    );
    let meta = NodeMeta::new(&core.view(), 0);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE))
        .into_response();
    meta_headers(&meta, response.headers_mut());
    // Ask reverse proxies (nginx) not to buffer the stream.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

#[derive(Serialize)]
struct ClusterStatusJson {
    #[serde(flatten)]
    status: NodeStatus,
    instances: usize,
    services: usize,
    leases: usize,
    digest: String,
}

#[instrument(skip_all)]
async fn cluster_status(State(core): State<Arc<NodeCore>>, query: QueryParams) -> RestResult {
    query.finish()?;
    let status = core.status();
    let (instances, services, leases, digest) = {
        let registry = core.shared.read();
        (
            registry.instance_count(),
            registry.service_count(),
            registry.lease_count(),
            registry.digest(),
        )
    };
    let meta = NodeMeta::new(&core.view(), status.revision);
    let mut headers = HeaderMap::new();
    meta_headers(&meta, &mut headers);
    // The status already names node, leader, revision and contact time.
    Ok((
        headers,
        Json(ClusterStatusJson {
            status,
            instances,
            services,
            leases,
            digest,
        }),
    )
        .into_response())
}

#[derive(Serialize)]
struct MembersJson {
    members: Vec<MemberInfo>,
}

#[instrument(skip_all)]
async fn cluster_members(State(core): State<Arc<NodeCore>>, query: QueryParams) -> RestResult {
    query.finish()?;
    Ok(answer(
        &core,
        0,
        MembersJson {
            members: core.members(),
        },
    ))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_is_json_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        for path in [
            "/v1/registry/services",
            "/v1/registry/services/{service}/instances",
            "/v1/registry/services/{service}/instances/{instance_id}",
            "/v1/registry/services/{service}/instances/{instance_id}/health",
            "/v1/registry/services/{service}/instances/{instance_id}/maintenance",
            "/v1/registry/leases",
            "/v1/registry/leases/{lease_id}",
            "/v1/registry/leases/{lease_id}/keepalive",
            "/v1/registry/watch",
            "/v1/cluster/status",
            "/v1/cluster/members",
            "/v1/actions",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing from openapi.json");
        }
    }

    #[test]
    fn ttl_accepts_strings_or_milliseconds_but_not_both() {
        let d = |s: &str| serde_json::from_str::<DurationString>(s);
        assert_eq!(d(r#""10s""#).unwrap().0, Duration::from_secs(10));
        assert!(d("10").is_err());
        assert!(d(r#""ten""#).is_err());
        assert_eq!(
            ttl_ms(Some(DurationString(Duration::from_secs(10))), None).unwrap(),
            Some(10_000)
        );
        assert_eq!(ttl_ms(None, Some(5_000)).unwrap(), Some(5_000));
        assert_eq!(
            ttl_ms(Some(DurationString(Duration::from_secs(10))), Some(1))
                .unwrap_err()
                .field
                .as_deref(),
            Some("ttl")
        );
        assert_eq!(ttl_ms(None, Some(10)).unwrap_err().field.as_deref(), Some("ttl_ms"));
    }

    #[test]
    fn ports_outside_1_to_65535_are_refused_naming_the_field() {
        assert_eq!(port_u16("port", 80).unwrap(), 80);
        assert_eq!(port_u16("port", 0).unwrap_err().field.as_deref(), Some("port"));
        assert_eq!(port_u16("port", 70_000).unwrap_err().field.as_deref(), Some("port"));
    }
}
