//! The registry's data model.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A cluster-wide counter, +1 for each change event. Revision 0 means "nothing yet".
pub type Revision = u64;

/// A lease id, granted by the leader. 0 is never a valid lease id.
pub type LeaseId = u64;

/// The namespace used when a client names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The weight an instance gets when it asks for none.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Health of an instance, as reported by its checks or its owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Serving normally.
    #[default]
    Passing,
    /// Serving, but degraded.
    Warning,
    /// Not serving; discovery skips it unless asked for all.
    Critical,
}

impl Health {
    /// The lowercase name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Health> {
        match s.to_ascii_lowercase().as_str() {
            "passing" => Some(Health::Passing),
            "warning" => Some(Health::Warning),
            "critical" => Some(Health::Critical),
            _ => None,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one service within one namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Namespace of the service.
    pub namespace: String,
    /// Service name.
    pub service: String,
}

impl ServiceKey {
    /// Builds a key, putting an empty namespace into the default one.
    pub fn new(namespace: &str, service: &str) -> Self {
        ServiceKey {
            namespace: normalize_namespace(namespace),
            service: service.to_string(),
        }
    }
}

/// Identifies one instance: namespace, service and the instance id unique within it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceKey {
    /// Namespace of the service.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Instance id, unique within the service.
    pub instance_id: String,
}

impl InstanceKey {
    /// Builds a key, putting an empty namespace into the default one.
    pub fn new(namespace: &str, service: &str, instance_id: &str) -> Self {
        InstanceKey {
            namespace: normalize_namespace(namespace),
            service: service.to_string(),
            instance_id: instance_id.to_string(),
        }
    }

    /// The service this instance belongs to.
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
        }
    }
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.service, self.instance_id)
    }
}

/// Maps an empty namespace to [`DEFAULT_NAMESPACE`].
pub fn normalize_namespace(namespace: &str) -> String {
    if namespace.is_empty() {
        DEFAULT_NAMESPACE.to_string()
    } else {
        namespace.to_string()
    }
}

/// What a client submits to register (or update) an instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Namespace; empty means `default`.
    pub namespace: String,
    /// Service name (a DNS label).
    pub service: String,
    /// Instance id, unique within the service.
    pub instance_id: String,
    /// Host name or IP address clients connect to.
    pub address: String,
    /// Main port.
    pub port: u16,
    /// Named extra ports, e.g. `health`.
    pub ports: BTreeMap<String, u16>,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// String metadata.
    pub metadata: BTreeMap<String, String>,
    /// Relative weight for weighted picking; 0 means the default (100).
    pub weight: u32,
    /// Zone (a DNS label) or empty.
    pub zone: String,
    /// Initial health.
    pub health: Health,
    /// Lease that keeps this instance alive, if any.
    pub lease_id: Option<LeaseId>,
    /// TTL checks. When there are any, the instance's health is the worst of their
    /// statuses and `health` above is ignored.
    pub checks: Vec<CheckSpec>,
}

impl InstanceSpec {
    /// The key this spec registers under.
    pub fn key(&self) -> InstanceKey {
        InstanceKey::new(&self.namespace, &self.service, &self.instance_id)
    }
}

/// A registered instance, as stored and served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Namespace of the service.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Instance id, unique within the service.
    pub instance_id: String,
    /// Host name or IP address clients connect to.
    pub address: String,
    /// Main port.
    pub port: u16,
    /// Named extra ports.
    pub ports: BTreeMap<String, u16>,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// String metadata.
    pub metadata: BTreeMap<String, String>,
    /// Relative weight for weighted picking.
    pub weight: u32,
    /// Zone or empty.
    pub zone: String,
    /// Current health.
    pub health: Health,
    /// Lease that keeps this instance alive, if any.
    pub lease_id: Option<LeaseId>,
    /// Revision at which this instance was first registered.
    pub create_revision: Revision,
    /// Revision of the last change to this instance.
    pub mod_revision: Revision,
    /// Leader time (ms since the Unix epoch) of the first registration.
    pub registered_at_ms: u64,
    /// Leader time (ms since the Unix epoch) of the last change.
    pub updated_at_ms: u64,
    /// TTL checks, in the order they were registered.
    pub checks: Vec<Check>,
}

impl Instance {
    /// The key of this instance.
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            instance_id: self.instance_id.clone(),
        }
    }

    /// One check by id.
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }
}

/// A TTL check as registered: its owner must report on it (pass, warn or fail) at
/// least once per `ttl_ms`, or the leader marks it critical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// Check id, unique within the instance (Consul's `service:<id>` by default).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Free-form notes for humans.
    pub notes: String,
    /// How long a report stays valid, in milliseconds.
    pub ttl_ms: u64,
    /// Remove the instance once this check has been critical for this long.
    pub deregister_critical_after_ms: Option<u64>,
    /// Status of a check registered for the first time (critical unless told
    /// otherwise). A check that already exists keeps its status across
    /// re-registration, as Consul does.
    pub initial_status: Health,
}

impl Default for CheckSpec {
    fn default() -> Self {
        CheckSpec {
            id: String::new(),
            name: String::new(),
            notes: String::new(),
            ttl_ms: 0,
            deregister_critical_after_ms: None,
            initial_status: Health::Critical,
        }
    }
}

/// A TTL check as stored: its definition and its current status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Check id, unique within the instance.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Free-form notes for humans.
    pub notes: String,
    /// How long a report stays valid, in milliseconds.
    pub ttl_ms: u64,
    /// Remove the instance once this check has been critical for this long.
    pub deregister_critical_after_ms: Option<u64>,
    /// Current status.
    pub status: Health,
    /// Output of the last report (or why the leader changed the status).
    pub output: String,
    /// Leader time (ms since the Unix epoch) at which `status` last changed.
    pub status_since_ms: u64,
}

/// The health of an instance with these checks: the worst status among them, or
/// `None` when there are none.
pub fn worst_status(checks: &[Check]) -> Option<Health> {
    checks.iter().map(|c| c.status).max()
}

/// A lease: every instance attached to it is removed when it expires or is revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Lease id.
    pub id: LeaseId,
    /// Time to live in milliseconds, renewed by each keep-alive.
    pub ttl_ms: u64,
    /// Leader time (ms since the Unix epoch) at which the lease was granted.
    pub granted_at_ms: u64,
    /// Remaining TTL recorded by the leader's last checkpoint, if it recorded one.
    ///
    /// A new leader starts a lease whose checkpoint shows it idle (not renewed during
    /// the last leader's term) from this value instead of the full TTL, so a run of elections cannot keep a
    /// dead lease alive forever.
    pub checkpoint_remaining_ms: Option<u64>,
}
