//! The JSON shapes of the REST API (documented in `openapi.json`): instances,
//! services, watch events and the node header every answer carries. Core types are
//! converted here, once, so the REST answers and the SSE watch agree.

use muster_core::{Check, Event, EventKind, Instance, ServiceSummary};
use serde::Serialize;

use crate::node::NodeView;

/// An instance as the REST API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceJson {
    /// Namespace of the service.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Instance id, unique within the service.
    pub instance_id: String,
    /// Host name or IP address.
    pub address: String,
    /// Main port.
    pub port: u16,
    /// Named extra ports.
    pub ports: muster_core::CompactMap<u16>,
    /// Tags.
    pub tags: Vec<String>,
    /// String metadata.
    pub metadata: muster_core::CompactMap<String>,
    /// Relative weight.
    pub weight: u32,
    /// Zone, or empty.
    pub zone: String,
    /// `passing`, `warning` or `critical`.
    pub health: &'static str,
    /// The lease keeping it alive, if any.
    pub lease_id: Option<u64>,
    /// Revision of its first registration.
    pub create_revision: u64,
    /// Revision of its last change.
    pub mod_revision: u64,
    /// First registration, ms since the Unix epoch (leader time).
    pub registered_at_ms: u64,
    /// Last change, ms since the Unix epoch (leader time).
    pub updated_at_ms: u64,
    /// TTL checks (registered through the Consul-compatible API) and the
    /// maintenance check; omitted when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckJson>,
    /// Set while the instance is in maintenance (its health is then critical).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceJson>,
}

/// Why and since when an instance is in maintenance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MaintenanceJson {
    /// The reason given (a default note when none was).
    pub reason: String,
    /// When maintenance began, ms since the Unix epoch (leader time).
    pub since_ms: u64,
    /// The health the instance gets back when maintenance ends.
    pub health_after: &'static str,
}

/// A TTL check as the REST API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckJson {
    /// Check id, unique within the instance.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// `passing`, `warning` or `critical`.
    pub status: &'static str,
    /// Output of the last report.
    pub output: String,
    /// How long a report stays valid, in milliseconds.
    pub ttl_ms: u64,
    /// When the status last changed, ms since the Unix epoch (leader time).
    pub status_since_ms: u64,
}

impl From<&Check> for CheckJson {
    fn from(c: &Check) -> Self {
        CheckJson {
            id: c.id.clone(),
            name: c.name.clone(),
            status: c.status.as_str(),
            output: c.output.clone(),
            ttl_ms: c.ttl_ms,
            status_since_ms: c.status_since_ms,
        }
    }
}

impl From<&Instance> for InstanceJson {
    fn from(i: &Instance) -> Self {
        InstanceJson {
            namespace: i.namespace.to_string(),
            service: i.service.to_string(),
            instance_id: i.instance_id.clone(),
            address: i.address.clone(),
            port: i.port,
            ports: i.ports.clone(),
            tags: i.tags.clone(),
            metadata: i.metadata.clone(),
            weight: i.weight,
            zone: i.zone.clone(),
            health: i.health.as_str(),
            lease_id: i.lease_id,
            create_revision: i.create_revision,
            mod_revision: i.mod_revision,
            registered_at_ms: i.registered_at_ms,
            updated_at_ms: i.updated_at_ms,
            checks: i.checks.iter().map(CheckJson::from).collect(),
            maintenance: i.maintenance().map(|m| MaintenanceJson {
                reason: m.notes.clone(),
                since_ms: m.status_since_ms,
                health_after: i.health_without_maintenance().as_str(),
            }),
        }
    }
}

/// A service with instance counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceJson {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Instances registered.
    pub instances: u32,
    /// Of which passing.
    pub passing: u32,
    /// Of which warning.
    pub warning: u32,
    /// Of which critical.
    pub critical: u32,
    /// Revision of the service's last change.
    pub mod_revision: u64,
}

impl From<&ServiceSummary> for ServiceJson {
    fn from(s: &ServiceSummary) -> Self {
        ServiceJson {
            namespace: s.namespace.clone(),
            service: s.service.clone(),
            instances: s.instances,
            passing: s.passing,
            warning: s.warning,
            critical: s.critical,
            mod_revision: s.mod_revision,
        }
    }
}

/// Where the answering node stands; flattened into every REST answer and repeated
/// in the `X-Muster-*` headers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeMeta {
    /// The node's applied revision (for a write: at least the write's revision).
    pub revision: u64,
    /// The node that answered.
    pub node: u64,
    /// The leader it knows, if any.
    pub leader: Option<u64>,
    /// Whether it knows a leader.
    pub leader_known: bool,
    /// Milliseconds since it last heard from the leader: how stale a local read may be.
    pub ms_since_leader_contact: u64,
}

impl NodeMeta {
    /// The header for an answer about `revision` (a write's, or a read's).
    pub fn new(view: &NodeView, revision: u64) -> Self {
        NodeMeta {
            revision: view.revision.max(revision),
            node: view.node_id,
            leader: view.leader_id,
            leader_known: view.leader_id.is_some(),
            ms_since_leader_contact: view.ms_since_leader_contact,
        }
    }
}

/// The `data` of a `put` watch event.
#[derive(Serialize)]
struct PutData<'a> {
    revision: u64,
    instance: &'a InstanceJson,
}

/// The `data` of a `delete` watch event.
#[derive(Serialize)]
struct DeleteData<'a> {
    revision: u64,
    namespace: &'a str,
    service: &'a str,
    instance_id: &'a str,
    reason: &'static str,
}

/// The SSE event name of a change: `put` or `delete`.
pub fn event_name(event: &Event) -> &'static str {
    match event.kind {
        EventKind::Put(_) => "put",
        EventKind::Delete { .. } => "delete",
    }
}

/// The JSON `data` of a change event.
pub fn event_data(event: &Event) -> String {
    let encoded = match &event.kind {
        EventKind::Put(instance) => serde_json::to_string(&PutData {
            revision: event.revision,
            instance: &InstanceJson::from(&**instance),
        }),
        EventKind::Delete { key, reason } => serde_json::to_string(&DeleteData {
            revision: event.revision,
            namespace: &key.namespace,
            service: &key.service,
            instance_id: &key.instance_id,
            reason: reason.as_str(),
        }),
    };
    // Serializing plain structs of strings and numbers does not fail; should it,
    // the watcher still learns the revision.
    encoded.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "encoding a watch event as JSON failed");
        progress_data(event.revision)
    })
}

/// The JSON `data` of a reset: every matching instance at `revision`.
pub fn reset_data(revision: u64, instances: &[std::sync::Arc<Instance>]) -> String {
    let instances: Vec<InstanceJson> = instances.iter().map(|i| InstanceJson::from(&**i)).collect();
    serde_json::json!({ "revision": revision, "instances": instances }).to_string()
}

/// The JSON `data` of a progress bookmark.
pub fn progress_data(revision: u64) -> String {
    serde_json::json!({ "revision": revision }).to_string()
}
