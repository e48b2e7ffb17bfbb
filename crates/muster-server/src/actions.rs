//! The action-style JSON API older agents speak: `POST /v1/actions` with
//! `{"action": "register_agent" | "get_agent_endpoint" | "list_agents" |
//! "deregister_agent", ...}`, answering `{"status": "success", ...}` or
//! `{"status": "error", "message": ..., "field": ...}`.
//!
//! Agents are ordinary Muster instances, so every other API (gRPC, REST, Consul,
//! watches) sees them too:
//!
//! | agent field | Muster instance |
//! |---|---|
//! | `agent_id` (or `agent_name` when no id is given) | `instance_id` in service [`AGENTS_SERVICE`] of namespace [`AGENTS_NAMESPACE`] |
//! | `agent_name` | metadata `agent.name` |
//! | `host` | `address` |
//! | `port` | `port` |
//! | `health_check_port` | named port `health` |
//! | `agent_type` | metadata `agent.type` |
//! | `capabilities` | `tags` |
//! | `metadata` | `metadata` (keys starting `agent.` are reserved; non-string values are stored as their JSON text) |
//! | `ttl` / `ttl_ms` (optional) | a lease of that TTL; without one the agent stays until deregistered |
//! | `last_registered` | `updated_at` as RFC 3339 (also `last_registered_ms`) |
//!
//! Validation is Muster's own (ids `[A-Za-z0-9._:-]`, ports 1..65535, at most 64
//! capabilities, metadata ≤ 64 entries and 4 KiB); errors name the agent field.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use muster_core::{DiscoverFilter, Health, Instance, InstanceKey, InstanceSpec, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::instrument;

use crate::api::ReadConsistency;
use crate::error::ApiError;
use crate::node::NodeCore;
use crate::rest::extract::{from_json_value, JsonBody, RestError};
use crate::rest::DurationString;

/// The namespace agents are registered in.
pub const AGENTS_NAMESPACE: &str = "default";
/// The service every agent is an instance of.
pub const AGENTS_SERVICE: &str = "agents";
/// Metadata key holding the agent type.
pub const META_AGENT_TYPE: &str = "agent.type";
/// Metadata key holding the agent name.
pub const META_AGENT_NAME: &str = "agent.name";
/// Named port holding the health-check port.
pub const HEALTH_PORT: &str = "health";

const ACTIONS: &str = "register_agent, get_agent_endpoint, list_agents or deregister_agent";

/// The action routes (merged into the HTTP router).
pub fn routes() -> Router<Arc<NodeCore>> {
    Router::new().route("/v1/actions", post(handle))
}

/// A failed action: `{"status": "error", "message": ..., "field": ...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong.
    pub message: String,
    /// The request field at fault, if one is.
    pub field: Option<String>,
}

impl ActionError {
    fn bad_request(field: &str, message: impl Into<String>) -> Self {
        ActionError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
}

/// How a Muster field is called in the agent API.
fn agent_field(field: &str, id_field: &str) -> String {
    let renamed = match field {
        "instance_id" => id_field.to_string(),
        "address" => "host".into(),
        f if f == format!("ports[{HEALTH_PORT:?}]") => "health_check_port".into(),
        f if f.starts_with("tags") => f.replacen("tags", "capabilities", 1),
        f => f.to_string(),
    };
    renamed
}

impl From<RestError> for ActionError {
    fn from(e: RestError) -> Self {
        let message = match &e.field {
            Some(f) if !e.message.contains(f.as_str()) => format!("{f}: {}", e.message),
            _ => e.message.clone(),
        };
        ActionError {
            status: e.status,
            message,
            field: e.field,
        }
    }
}

impl From<ApiError> for ActionError {
    fn from(e: ApiError) -> Self {
        RestError::from(e).into()
    }
}

impl IntoResponse for ActionError {
    fn into_response(self) -> Response {
        let body = ErrorAnswer {
            status: "error",
            message: &self.message,
            field: self.field.as_deref(),
        };
        (self.status, Json(body)).into_response()
    }
}

/// The fields any action may carry; each action uses its own.
#[derive(Debug, Default, Deserialize)]
struct AgentRequest {
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    agent_name: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u64>,
    #[serde(default)]
    health_check_port: Option<u64>,
    #[serde(default)]
    agent_type: Option<String>,
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    ttl: Option<DurationString>,
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default)]
    min_revision: Option<u64>,
    #[serde(default)]
    consistency: Option<String>,
}

impl AgentRequest {
    /// The agent's id and the field it came from.
    fn id(&self) -> Result<(String, &'static str), ActionError> {
        match (&self.agent_id, &self.agent_name) {
            (Some(id), _) if !id.is_empty() => Ok((id.clone(), "agent_id")),
            (_, Some(name)) if !name.is_empty() => Ok((name.clone(), "agent_name")),
            _ => Err(ActionError::bad_request(
                "agent_id",
                "agent_id (or agent_name) is required",
            )),
        }
    }

    fn consistency(&self) -> Result<ReadConsistency, ActionError> {
        match self.consistency.as_deref() {
            None | Some("local") => Ok(ReadConsistency::MinRevision(self.min_revision.unwrap_or(0))),
            Some("linearizable") => Ok(ReadConsistency::Linearizable),
            Some(other) => Err(ActionError::bad_request(
                "consistency",
                format!("consistency must be local or linearizable, got {other:?}"),
            )),
        }
    }
}

/// An agent as the action API shows it.
#[derive(Debug, Serialize)]
struct AgentJson {
    agent_id: String,
    agent_name: Option<String>,
    host: String,
    port: u16,
    health_check_port: Option<u16>,
    agent_type: Option<String>,
    capabilities: Vec<String>,
    metadata: BTreeMap<String, String>,
    health: &'static str,
    last_registered: String,
    last_registered_ms: u64,
    lease_id: Option<u64>,
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl From<&Instance> for AgentJson {
    fn from(i: &Instance) -> Self {
        AgentJson {
            agent_id: i.instance_id.clone(),
            agent_name: i.metadata.get(META_AGENT_NAME).cloned(),
            host: i.address.clone(),
            port: i.port,
            health_check_port: i.ports.get(HEALTH_PORT).copied(),
            agent_type: i.metadata.get(META_AGENT_TYPE).cloned(),
            capabilities: i.tags.clone(),
            metadata: i
                .metadata
                .iter()
                .filter(|(k, _)| !k.starts_with("agent."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            health: i.health.as_str(),
            last_registered: rfc3339(i.updated_at_ms),
            last_registered_ms: i.updated_at_ms,
            lease_id: i.lease_id,
        }
    }
}

#[derive(Serialize)]
struct ErrorAnswer<'a> {
    status: &'static str,
    message: &'a str,
    field: Option<&'a str>,
}

/// `{"status": "success", ...fields}`, with `status` first.
#[derive(Serialize)]
struct Success<T> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(flatten)]
    body: T,
    revision: u64,
}

fn success<T: Serialize>(message: Option<String>, body: T, revision: u64) -> Response {
    Json(Success {
        status: "success",
        message,
        body,
        revision,
    })
    .into_response()
}

#[derive(Serialize)]
struct AgentList {
    count: usize,
    agents: Vec<AgentJson>,
}

#[derive(Serialize)]
struct Deregistered {
    agent_id: String,
}

#[instrument(skip_all, fields(action))]
async fn handle(State(core): State<Arc<NodeCore>>, body: Result<JsonBody<Value>, RestError>) -> Response {
    match run(&core, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn run(core: &NodeCore, body: Result<JsonBody<Value>, RestError>) -> Result<Response, ActionError> {
    let JsonBody(value) = body?;
    let Some(object) = value.as_object() else {
        return Err(ActionError::bad_request("body", "the request must be a JSON object"));
    };
    let action = match object.get("action") {
        None | Some(Value::Null) => {
            return Err(ActionError::bad_request(
                "action",
                format!("action is required: one of {ACTIONS}"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ActionError::bad_request(
                "action",
                format!("action must be a string, got {other}"),
            ))
        }
    };
    tracing::Span::current().record("action", action.as_str());
    let request: AgentRequest = from_json_value(value)?;
    match action.as_str() {
        "register_agent" => register_agent(core, request).await,
        "get_agent_endpoint" => get_agent_endpoint(core, request).await,
        "list_agents" => list_agents(core, request).await,
        "deregister_agent" => deregister_agent(core, request).await,
        other => Err(ActionError::bad_request(
            "action",
            format!("unknown action {other:?}: expected {ACTIONS}"),
        )),
    }
}

/// Renames Muster's field names in a validation failure to the agent API's.
fn renamed(e: ApiError, id_field: &str) -> ActionError {
    match e {
        ApiError::Invalid(v) => {
            let field = agent_field(&v.field, id_field);
            ActionError::from(ApiError::Invalid(ValidationError::new(field, v.reason)))
        }
        other => other.into(),
    }
}

fn port(field: &str, value: u64) -> Result<u16, ActionError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ActionError::bad_request(field, format!("{field} must be between 1 and 65535, got {value}")))
}

async fn register_agent(core: &NodeCore, req: AgentRequest) -> Result<Response, ActionError> {
    let (agent_id, id_field) = req.id()?;
    let host = req
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ActionError::bad_request("host", "host is required"))?;
    let port_value = req
        .port
        .ok_or_else(|| ActionError::bad_request("port", "port is required"))?;
    let mut metadata = BTreeMap::new();
    for (key, value) in req.metadata.clone().unwrap_or_default() {
        if key.starts_with("agent.") {
            return Err(ActionError::bad_request(
                &format!("metadata[{key:?}]"),
                format!("metadata key {key:?}: keys starting with \"agent.\" are reserved"),
            ));
        }
        let text = match value {
            Value::String(s) => s,
            other => other.to_string(),
        };
        metadata.insert(key, text);
    }
    if let Some(t) = req.agent_type.clone().filter(|t| !t.is_empty()) {
        metadata.insert(META_AGENT_TYPE.into(), t);
    }
    if let Some(name) = req.agent_name.clone().filter(|n| !n.is_empty()) {
        metadata.insert(META_AGENT_NAME.into(), name);
    }
    let mut ports = BTreeMap::new();
    if let Some(hp) = req.health_check_port {
        ports.insert(HEALTH_PORT.to_string(), port("health_check_port", hp)?);
    }
    let spec = InstanceSpec {
        namespace: AGENTS_NAMESPACE.into(),
        service: AGENTS_SERVICE.into(),
        instance_id: agent_id,
        address: host,
        port: port("port", port_value)?,
        ports,
        tags: req.capabilities.clone().unwrap_or_default(),
        metadata,
        weight: 0,
        zone: String::new(),
        health: Health::Passing,
        lease_id: None,
        ..Default::default()
    };
    let grant = crate::rest::ttl_ms(req.ttl, req.ttl_ms)?;
    let done = core.register(spec, grant).await.map_err(|e| renamed(e, id_field))?;
    let agent = AgentJson::from(&*done.instance);
    Ok(success(
        Some(format!("agent {} registered", agent.agent_id)),
        agent,
        done.revision,
    ))
}

/// Reads the agents service on this node at the requested consistency.
async fn agents(core: &NodeCore, req: &AgentRequest) -> Result<(Vec<Arc<Instance>>, u64), ActionError> {
    core.read_barrier(req.consistency()?).await?;
    let found = core.discover_local(AGENTS_NAMESPACE, AGENTS_SERVICE, &DiscoverFilter::default())?;
    Ok((found.instances, found.revision))
}

async fn get_agent_endpoint(core: &NodeCore, req: AgentRequest) -> Result<Response, ActionError> {
    let (agent_id, id_field) = req.id()?;
    muster_core::validate::instance_id(&agent_id).map_err(|e| renamed(ApiError::Invalid(e), id_field))?;
    let (instances, revision) = agents(core, &req).await?;
    // An agent registered by name only is found by that name, and vice versa.
    let found = instances.iter().find(|i| i.instance_id == agent_id).or_else(|| {
        req.agent_name
            .as_ref()
            .and_then(|name| instances.iter().find(|i| i.metadata.get(META_AGENT_NAME) == Some(name)))
    });
    let Some(instance) = found else {
        return Err(ActionError {
            status: StatusCode::NOT_FOUND,
            message: format!("agent {agent_id:?} not found"),
            field: Some(id_field.into()),
        });
    };
    Ok(success(None, AgentJson::from(&**instance), revision))
}

async fn list_agents(core: &NodeCore, req: AgentRequest) -> Result<Response, ActionError> {
    let (instances, revision) = agents(core, &req).await?;
    let wanted_type = req.agent_type.as_ref().filter(|t| !t.is_empty());
    let wanted_caps = req.capabilities.clone().unwrap_or_default();
    let agents: Vec<AgentJson> = instances
        .iter()
        .filter(|i| wanted_type.is_none_or(|t| i.metadata.get(META_AGENT_TYPE) == Some(t)))
        .filter(|i| wanted_caps.iter().all(|c| i.tags.contains(c)))
        .map(|i| AgentJson::from(&**i))
        .collect();
    Ok(success(
        None,
        AgentList {
            count: agents.len(),
            agents,
        },
        revision,
    ))
}

async fn deregister_agent(core: &NodeCore, req: AgentRequest) -> Result<Response, ActionError> {
    let (agent_id, id_field) = req.id()?;
    let key = InstanceKey::new(AGENTS_NAMESPACE, AGENTS_SERVICE, &agent_id);
    let revision = core.deregister(key).await.map_err(|e| match e {
        ApiError::InstanceNotFound(_) => ActionError {
            status: StatusCode::NOT_FOUND,
            message: format!("agent {agent_id:?} not found"),
            field: Some(id_field.into()),
        },
        other => renamed(other, id_field),
    })?;
    Ok(success(
        Some(format!("agent {agent_id} deregistered")),
        Deregistered { agent_id },
        revision,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn muster_field_names_become_agent_field_names() {
        assert_eq!(agent_field("instance_id", "agent_name"), "agent_name");
        assert_eq!(agent_field("address", "agent_id"), "host");
        assert_eq!(agent_field("ports[\"health\"]", "agent_id"), "health_check_port");
        assert_eq!(agent_field("tags[3]", "agent_id"), "capabilities[3]");
        assert_eq!(agent_field("metadata", "agent_id"), "metadata");
    }

    #[test]
    fn the_agent_id_falls_back_to_the_name() {
        let req = AgentRequest {
            agent_name: Some("planner".into()),
            ..Default::default()
        };
        assert_eq!(req.id().unwrap(), ("planner".to_string(), "agent_name"));
        assert_eq!(
            AgentRequest::default().id().unwrap_err().field.as_deref(),
            Some("agent_id")
        );
    }
}
