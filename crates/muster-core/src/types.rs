//! The registry's data model.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    /// Namespace of the service (shared by the service's instances in a registry).
    pub namespace: Arc<str>,
    /// Service name (shared by the service's instances in a registry).
    pub service: Arc<str>,
    /// Instance id, unique within the service.
    pub instance_id: String,
    /// Host name or IP address clients connect to.
    pub address: String,
    /// Main port.
    pub port: u16,
    /// Named extra ports.
    pub ports: CompactMap<u16>,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// String metadata.
    pub metadata: CompactMap<String>,
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
            namespace: self.namespace.to_string(),
            service: self.service.to_string(),
            instance_id: self.instance_id.clone(),
        }
    }

    /// One check by id.
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }

    /// The maintenance check, when the instance is in maintenance.
    pub fn maintenance(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.is_maintenance())
    }

    /// The health the instance has, or would have, out of maintenance: the worst of
    /// its TTL checks, or, without any, the health its owner set.
    pub fn health_without_maintenance(&self) -> Health {
        let Some(maintenance) = self.maintenance() else {
            return self.health;
        };
        self.checks
            .iter()
            .filter(|c| !c.is_maintenance())
            .map(|c| c.status)
            .max()
            .or_else(|| maintenance.health_before_maintenance())
            .unwrap_or_default()
    }

    /// Whether the instance has TTL checks (its health then follows them).
    pub fn has_ttl_checks(&self) -> bool {
        self.checks.iter().any(Check::has_ttl)
    }
}

/// A small map from names to values, for the metadata and named ports of a stored
/// [`Instance`]: one sorted, exactly sized allocation (none when empty).
///
/// The registry holds one per instance for its whole life, and a `BTreeMap` node
/// costs about half a kilobyte even for a single entry. It serializes as a map, in
/// key order, exactly as a `BTreeMap` does, so JSON and stored bytes are unchanged.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CompactMap<V> {
    entries: Box<[(String, V)]>,
}

impl<V> CompactMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        CompactMap {
            entries: Box::default(),
        }
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.entries
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in key order.
    pub fn iter(&self) -> CompactMapIter<'_, V> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> + '_ {
        self.entries.iter().map(|(k, _)| k)
    }

    /// The values in key order.
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.entries.iter().map(|(_, v)| v)
    }
}

/// Iterator over the entries of a [`CompactMap`], in key order.
pub type CompactMapIter<'a, V> =
    std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&'a (String, V)) -> (&'a String, &'a V)>;

impl<V> Default for CompactMap<V> {
    fn default() -> Self {
        CompactMap::new()
    }
}

impl<V: fmt::Debug> fmt::Debug for CompactMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Later entries win over earlier ones with the same key, as when collecting into a
/// `BTreeMap`.
impl<V> FromIterator<(String, V)> for CompactMap<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        let mut entries: Vec<(String, V)> = iter.into_iter().collect();
        // Stable: equal keys keep their order, so the last one is the one kept.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<(String, V)> = Vec::with_capacity(entries.len());
        for entry in entries {
            match kept.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => kept.push(entry),
            }
        }
        CompactMap {
            entries: kept.into_boxed_slice(),
        }
    }
}

impl<V> From<BTreeMap<String, V>> for CompactMap<V> {
    fn from(map: BTreeMap<String, V>) -> Self {
        // Already sorted and unique.
        CompactMap {
            entries: map.into_iter().collect(),
        }
    }
}

impl<V: Clone> From<&BTreeMap<String, V>> for CompactMap<V> {
    fn from(map: &BTreeMap<String, V>) -> Self {
        CompactMap {
            entries: map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

impl<V, const N: usize> From<[(String, V); N]> for CompactMap<V> {
    fn from(entries: [(String, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<V> From<CompactMap<V>> for BTreeMap<String, V> {
    fn from(map: CompactMap<V>) -> Self {
        map.into_iter().collect()
    }
}

impl<V> IntoIterator for CompactMap<V> {
    type Item = (String, V);
    type IntoIter = std::vec::IntoIter<(String, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_vec().into_iter()
    }
}

impl<'a, V> IntoIterator for &'a CompactMap<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = CompactMapIter<'a, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<V: Serialize> Serialize for CompactMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for CompactMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, V>::deserialize(deserializer).map(CompactMap::from)
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

/// Start of the id of the check that puts an instance in maintenance (Consul's own
/// id for it, `_service_maintenance:<instance id>`). Registered checks may not use it.
pub const MAINTENANCE_CHECK_PREFIX: &str = "_service_maintenance:";

/// Name of the maintenance check.
pub const MAINTENANCE_CHECK_NAME: &str = "Service Maintenance Mode";

/// Notes of a maintenance check enabled without a reason (Consul's words).
pub const MAINTENANCE_DEFAULT_REASON: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";

/// How a maintenance check's output begins: it records the health an instance
/// without other checks had, to get back when maintenance ends.
const MAINTENANCE_OUTPUT_PREFIX: &str = "Health before maintenance: ";

/// The id of the maintenance check of instance `instance_id`.
pub fn maintenance_check_id(instance_id: &str) -> String {
    format!("{MAINTENANCE_CHECK_PREFIX}{instance_id}")
}

impl Check {
    /// The check that puts an instance in maintenance: always critical, no TTL, no
    /// reports; `health` is what the instance's own health is without it.
    pub fn maintenance(instance_id: &str, reason: &str, health: Health, now_ms: u64) -> Check {
        Check {
            id: maintenance_check_id(instance_id),
            name: MAINTENANCE_CHECK_NAME.to_string(),
            notes: if reason.is_empty() {
                MAINTENANCE_DEFAULT_REASON.to_string()
            } else {
                reason.to_string()
            },
            ttl_ms: 0,
            deregister_critical_after_ms: None,
            status: Health::Critical,
            output: format!("{MAINTENANCE_OUTPUT_PREFIX}{health}"),
            status_since_ms: now_ms,
        }
    }

    /// Whether this is a maintenance check (see [`Check::maintenance`]).
    pub fn is_maintenance(&self) -> bool {
        self.ttl_ms == 0 && self.id.starts_with(MAINTENANCE_CHECK_PREFIX)
    }

    /// Whether the check has a TTL its owner reports on (every check but the
    /// maintenance check).
    pub fn has_ttl(&self) -> bool {
        self.ttl_ms > 0
    }

    /// For a maintenance check: the own health recorded in it.
    fn health_before_maintenance(&self) -> Option<Health> {
        self.output
            .strip_prefix(MAINTENANCE_OUTPUT_PREFIX)
            .and_then(Health::parse)
    }
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
    /// Remaining TTL recorded by the leader's last checkpoint of the lease while
    /// nobody renewed it; `None` once a leader has seen it renewed.
    ///
    /// A new leader starts a lease whose checkpoint shows it idle (not renewed during
    /// the last leader's term) from this value instead of the full TTL, so a run of
    /// elections cannot keep a dead lease alive forever. It is a time left, not a
    /// point in time, so clock offsets between nodes do not move it. Soft state:
    /// replicated through the log and kept in snapshots, but not written to the
    /// state database on every checkpoint and not part of the digest; a node that
    /// restarts has it again from the leader's next checkpoint.
    pub checkpoint_remaining_ms: Option<u64>,
}

impl Lease {
    /// The time in ms a leader that has not seen this lease renewed gives it: its
    /// last checkpoint, at most the TTL; the full TTL when it was seen renewed.
    pub fn unrenewed_remaining_ms(&self) -> u64 {
        self.checkpoint_remaining_ms
            .map_or(self.ttl_ms, |left| left.min(self.ttl_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_compact_map_reads_and_serializes_as_the_btree_map_it_was_built_from(
            entries in prop::collection::vec(("[a-e]{0,3}", any::<u16>()), 0..12),
        ) {
            let btree: BTreeMap<String, u16> = entries.iter().cloned().collect();
            // Collected from the same pairs, duplicates included: the last one wins.
            let compact: CompactMap<u16> = entries.iter().cloned().collect();
            prop_assert_eq!(&compact, &CompactMap::from(&btree));
            prop_assert_eq!(compact.len(), btree.len());
            prop_assert_eq!(compact.iter().collect::<Vec<_>>(), btree.iter().collect::<Vec<_>>());
            for (k, v) in &btree {
                prop_assert_eq!(compact.get(k), Some(v));
            }
            prop_assert_eq!(compact.get("zz"), None);
            // Same bytes on disk, same JSON on the wire, and back.
            prop_assert_eq!(bincode::serialize(&compact).unwrap(), bincode::serialize(&btree).unwrap());
            let json = serde_json::to_string(&compact).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&btree).unwrap());
            prop_assert_eq!(serde_json::from_str::<CompactMap<u16>>(&json).unwrap(), compact.clone());
            prop_assert_eq!(BTreeMap::from(compact), btree);
        }
    }

    #[test]
    fn an_instance_stored_before_compact_maps_still_decodes() {
        // The layout `Instance` had with `BTreeMap` fields, as sled and snapshot files
        // hold it.
        #[derive(Serialize)]
        struct Old {
            namespace: String,
            service: String,
            instance_id: String,
            address: String,
            port: u16,
            ports: BTreeMap<String, u16>,
            tags: Vec<String>,
            metadata: BTreeMap<String, String>,
            weight: u32,
            zone: String,
            health: Health,
            lease_id: Option<LeaseId>,
            create_revision: Revision,
            mod_revision: Revision,
            registered_at_ms: u64,
            updated_at_ms: u64,
            checks: Vec<Check>,
        }
        let old = Old {
            namespace: "default".into(),
            service: "web".into(),
            instance_id: "w-1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            ports: [("health".to_string(), 81)].into(),
            tags: vec!["a".into()],
            metadata: [("v".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into(),
            weight: 100,
            zone: String::new(),
            health: Health::Passing,
            lease_id: Some(7),
            create_revision: 3,
            mod_revision: 4,
            registered_at_ms: 5,
            updated_at_ms: 6,
            checks: Vec::new(),
        };
        let decoded: Instance = bincode::deserialize(&bincode::serialize(&old).unwrap()).unwrap();
        assert_eq!(decoded.ports.get("health"), Some(&81));
        assert_eq!(
            decoded.metadata.iter().collect::<Vec<_>>(),
            old.metadata.iter().collect::<Vec<_>>()
        );
        assert_eq!(bincode::serialize(&decoded).unwrap(), bincode::serialize(&old).unwrap());
        assert_eq!(
            serde_json::to_value(&decoded).unwrap(),
            serde_json::to_value(&old).unwrap()
        );
    }
}
