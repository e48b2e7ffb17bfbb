//! Consul's JSON shapes, built from Muster instances.
//!
//! Consul ties a service instance to the agent node it registered on; a Muster
//! instance belongs to the cluster. Each instance is shown on a node named after its
//! address, with that address, in datacenter [`DATACENTER`], which is what
//! address-based consumers (Prometheus, load balancers) use.

use std::collections::BTreeMap;

use muster_core::{Check, Health, Instance};
use serde::Serialize;

/// The datacenter every answer names.
pub const DATACENTER: &str = "dc1";

/// `Weights` of a service.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    /// Weight while passing.
    pub passing: u32,
    /// Weight while warning.
    pub warning: u32,
}

/// A service as `/v1/agent/services` and `/v1/health/service` show it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    /// Service (instance) id.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name.
    pub service: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: muster_core::CompactMap<String>,
    /// Port.
    pub port: u16,
    /// Address.
    pub address: String,
    /// Weights.
    pub weights: Weights,
    /// Always false.
    pub enable_tag_override: bool,
    /// The datacenter.
    pub datacenter: String,
    /// Revision that created the instance.
    pub create_index: u64,
    /// Revision of its last change.
    pub modify_index: u64,
}

impl AgentService {
    /// The Consul view of an instance.
    pub fn of(i: &Instance) -> Self {
        AgentService {
            id: i.instance_id.clone(),
            service: i.service.to_string(),
            tags: i.tags.clone(),
            meta: i.metadata.clone(),
            port: i.port,
            address: i.address.clone(),
            weights: Weights {
                passing: i.weight,
                warning: 1,
            },
            enable_tag_override: false,
            datacenter: DATACENTER.to_string(),
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }
}

/// A health check as `/v1/health/*` and `/v1/agent/checks` show it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    /// The node (the instance's address).
    pub node: String,
    /// Check id.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// Check name.
    pub name: String,
    /// passing, warning or critical.
    pub status: &'static str,
    /// Notes.
    pub notes: String,
    /// Output of the last report.
    pub output: String,
    /// The instance id.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// The service name.
    pub service_name: String,
    /// The instance's tags.
    pub service_tags: Vec<String>,
    /// `ttl`, or `muster` for an instance's own health.
    #[serde(rename = "Type")]
    pub kind: &'static str,
    /// The TTL as a Go duration (`"10s"`), empty for no TTL.
    #[serde(rename = "TTL")]
    pub ttl: String,
    /// Revision that created the instance.
    pub create_index: u64,
    /// Revision of the instance's last change.
    pub modify_index: u64,
}

/// The id of the check that stands for the health of an instance without TTL
/// checks (registered over gRPC or REST, health set by its owner).
pub fn own_health_check_id(instance_id: &str) -> String {
    format!("muster:health:{instance_id}")
}

/// A duration in milliseconds as a Go duration string.
pub fn go_duration(ms: u64) -> String {
    for (unit, suffix) in [(3_600_000, "h"), (60_000, "m"), (1_000, "s")] {
        if ms != 0 && ms / unit * unit == ms {
            return format!("{}{suffix}", ms / unit);
        }
    }
    format!("{ms}ms")
}

impl HealthCheck {
    fn base(i: &Instance) -> Self {
        HealthCheck {
            node: i.address.clone(),
            check_id: String::new(),
            name: String::new(),
            status: Health::Passing.as_str(),
            notes: String::new(),
            output: String::new(),
            service_id: i.instance_id.clone(),
            service_name: i.service.to_string(),
            service_tags: i.tags.clone(),
            kind: "ttl",
            ttl: String::new(),
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }

    fn of_check(i: &Instance, c: &Check) -> Self {
        HealthCheck {
            check_id: c.id.clone(),
            name: c.name.clone(),
            status: c.status.as_str(),
            notes: c.notes.clone(),
            output: c.output.clone(),
            kind: if c.is_maintenance() { "maintenance" } else { "ttl" },
            ttl: if c.has_ttl() {
                go_duration(c.ttl_ms)
            } else {
                String::new()
            },
            ..Self::base(i)
        }
    }

    /// The checks of an instance: its TTL checks and its maintenance check, and,
    /// for an instance without TTL checks whose own health is not passing, one
    /// check standing for that health (so consumers that aggregate checks see it).
    pub fn all_of(i: &Instance) -> Vec<Self> {
        let mut checks: Vec<Self> = i.checks.iter().map(|c| Self::of_check(i, c)).collect();
        let own = i.health_without_maintenance();
        if !i.has_ttl_checks() && own != Health::Passing {
            checks.insert(
                0,
                HealthCheck {
                    check_id: own_health_check_id(&i.instance_id),
                    name: "Muster instance health".into(),
                    status: own.as_str(),
                    notes: "Set by the instance's owner through the Muster API".into(),
                    kind: "muster",
                    ..Self::base(i)
                },
            );
        }
        checks
    }
}

/// The node an instance is shown on.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// Node id (empty: Muster has no agent nodes).
    #[serde(rename = "ID")]
    pub id: String,
    /// Node name: the instance's address.
    pub node: String,
    /// The instance's address.
    pub address: String,
    /// The datacenter.
    pub datacenter: String,
    /// Tagged addresses (`lan`, `wan`: the address).
    pub tagged_addresses: BTreeMap<String, String>,
    /// Node metadata (none).
    pub meta: BTreeMap<String, String>,
    /// Revision that created the instance.
    pub create_index: u64,
    /// Revision of its last change.
    pub modify_index: u64,
}

impl Node {
    /// The node an instance is shown on.
    pub fn of(i: &Instance) -> Self {
        Node {
            id: String::new(),
            node: i.address.clone(),
            address: i.address.clone(),
            datacenter: DATACENTER.to_string(),
            tagged_addresses: [
                ("lan".to_string(), i.address.clone()),
                ("wan".to_string(), i.address.clone()),
            ]
            .into(),
            meta: BTreeMap::new(),
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }
}

/// The nodes the instances of `instances` are shown on, one per address in address
/// order: created with the oldest instance there, modified with the latest change.
pub fn nodes_of<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> Vec<Node> {
    let mut nodes: BTreeMap<&str, Node> = BTreeMap::new();
    for i in instances {
        nodes
            .entry(i.address.as_str())
            .and_modify(|n| {
                n.create_index = n.create_index.min(i.create_revision);
                n.modify_index = n.modify_index.max(i.mod_revision);
            })
            .or_insert_with(|| Node::of(i));
    }
    nodes.into_values().collect()
}

/// `/v1/catalog/node/:node`: a node and the services on it, by service id.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct NodeServices {
    /// The node.
    pub node: Node,
    /// Its services, by id.
    pub services: BTreeMap<String, AgentService>,
}

/// One entry of `/v1/health/service/:name`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    /// The node.
    pub node: Node,
    /// The service.
    pub service: AgentService,
    /// Its checks.
    pub checks: Vec<HealthCheck>,
}

impl ServiceEntry {
    /// The health entry of an instance.
    pub fn of(i: &Instance) -> Self {
        ServiceEntry {
            node: Node::of(i),
            service: AgentService::of(i),
            checks: HealthCheck::all_of(i),
        }
    }
}

/// One entry of `/v1/agent/health/service/...`: a service, its checks and the status
/// they add up to.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AgentServiceHealth {
    /// The worst status among the checks (the instance's health).
    pub aggregated_status: &'static str,
    /// The service.
    pub service: AgentService,
    /// Its checks.
    pub checks: Vec<HealthCheck>,
}

impl AgentServiceHealth {
    /// The local health entry of an instance.
    pub fn of(i: &Instance) -> Self {
        AgentServiceHealth {
            aggregated_status: i.health.as_str(),
            service: AgentService::of(i),
            checks: HealthCheck::all_of(i),
        }
    }
}

/// The HTTP status a local health query answers for `health`, as Consul's agent
/// does, so a load balancer's probe can read it: 200 passing, 429 warning, 503
/// critical.
pub fn health_status_code(health: Health) -> http::StatusCode {
    match health {
        Health::Passing => http::StatusCode::OK,
        Health::Warning => http::StatusCode::TOO_MANY_REQUESTS,
        Health::Critical => http::StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// One entry of `/v1/catalog/service/:name`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogService {
    /// Node id (empty).
    #[serde(rename = "ID")]
    pub id: String,
    /// Node name: the instance's address.
    pub node: String,
    /// Node address: the instance's address.
    pub address: String,
    /// The datacenter.
    pub datacenter: String,
    /// Tagged addresses of the node.
    pub tagged_addresses: BTreeMap<String, String>,
    /// Node metadata (none).
    pub node_meta: BTreeMap<String, String>,
    /// Always empty (a typical service).
    pub service_kind: String,
    /// Instance id.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// Service name.
    pub service_name: String,
    /// Tags.
    pub service_tags: Vec<String>,
    /// Address.
    pub service_address: String,
    /// Weights.
    pub service_weights: Weights,
    /// Metadata.
    pub service_meta: muster_core::CompactMap<String>,
    /// Port.
    pub service_port: u16,
    /// Always false.
    pub service_enable_tag_override: bool,
    /// Revision that created the instance.
    pub create_index: u64,
    /// Revision of its last change.
    pub modify_index: u64,
}

impl CatalogService {
    /// The catalog entry of an instance.
    pub fn of(i: &Instance) -> Self {
        let node = Node::of(i);
        CatalogService {
            id: node.id,
            node: node.node,
            address: node.address,
            datacenter: node.datacenter,
            tagged_addresses: node.tagged_addresses,
            node_meta: node.meta,
            service_kind: String::new(),
            service_id: i.instance_id.clone(),
            service_name: i.service.to_string(),
            service_tags: i.tags.clone(),
            service_address: i.address.clone(),
            service_weights: Weights {
                passing: i.weight,
                warning: 1,
            },
            service_meta: i.metadata.clone(),
            service_port: i.port,
            service_enable_tag_override: false,
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance {
            namespace: "default".into(),
            service: "web".into(),
            instance_id: "web-1".into(),
            address: "10.0.0.1".into(),
            port: 8080,
            ports: Default::default(),
            tags: vec!["v1".into()],
            metadata: [("version".to_string(), "1".to_string())].into(),
            weight: 100,
            zone: String::new(),
            health: Health::Critical,
            lease_id: None,
            create_revision: 3,
            mod_revision: 5,
            registered_at_ms: 0,
            updated_at_ms: 0,
            checks: vec![Check {
                id: "service:web-1".into(),
                name: "Service 'web' check".into(),
                notes: String::new(),
                ttl_ms: 10_000,
                deregister_critical_after_ms: None,
                status: Health::Critical,
                output: "TTL expired".into(),
                status_since_ms: 0,
            }],
        }
    }

    #[test]
    fn a_health_entry_has_consuls_field_names() {
        let v = serde_json::to_value(ServiceEntry::of(&instance())).unwrap();
        assert_eq!(v["Service"]["ID"], "web-1");
        assert_eq!(v["Service"]["Service"], "web");
        assert_eq!(v["Service"]["Port"], 8080);
        assert_eq!(v["Service"]["Meta"]["version"], "1");
        assert_eq!(v["Node"]["Address"], "10.0.0.1");
        assert_eq!(v["Checks"][0]["CheckID"], "service:web-1");
        assert_eq!(v["Checks"][0]["Status"], "critical");
        assert_eq!(v["Checks"][0]["ServiceID"], "web-1");
        assert_eq!(v["Checks"][0]["TTL"], "10s");
    }

    #[test]
    fn the_maintenance_check_shows_as_consul_shows_it_beside_the_owners_health() {
        let mut i = instance();
        i.checks = vec![Check::maintenance("web-1", "", Health::Warning, 7)];
        let checks = HealthCheck::all_of(&i);
        let ids: Vec<&str> = checks.iter().map(|c| c.check_id.as_str()).collect();
        assert_eq!(ids, ["muster:health:web-1", "_service_maintenance:web-1"]);
        assert_eq!(checks[0].status, "warning");
        let m = &checks[1];
        assert_eq!((m.status, m.kind, m.ttl.as_str()), ("critical", "maintenance", ""));
        assert_eq!(m.name, "Service Maintenance Mode");
        assert!(m.notes.starts_with("Maintenance mode is enabled"), "{}", m.notes);

        // With a TTL check, the TTL check speaks for the owner's health.
        i.checks.insert(0, instance().checks[0].clone());
        let kinds: Vec<&str> = HealthCheck::all_of(&i).iter().map(|c| c.kind).collect();
        assert_eq!(kinds, ["ttl", "maintenance"]);
    }

    #[test]
    fn an_instance_without_checks_shows_its_own_health_only_when_not_passing() {
        let mut i = instance();
        i.checks.clear();
        i.health = Health::Warning;
        let checks = HealthCheck::all_of(&i);
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].status, "warning");
        i.health = Health::Passing;
        assert!(HealthCheck::all_of(&i).is_empty());
    }

    #[test]
    fn durations_print_as_go_durations() {
        assert_eq!(go_duration(10_000), "10s");
        assert_eq!(go_duration(60_000), "1m");
        assert_eq!(go_duration(7_200_000), "2h");
        assert_eq!(go_duration(1_500), "1500ms");
    }
}
