//! The registry state, its deterministic `apply`, and the read index.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::command::{ApplyResult, Command, Outcome, Rejection, MAX_BATCH_COMMANDS};
use crate::event::{DeleteReason, Event, EventKind};
use crate::filter::{DiscoverFilter, WatchFilter};
use crate::sessions::{Attempt, ForwardSession, ForwardSessions, SessionChanges};
use crate::types::{
    maintenance_check_id, worst_status, Check, Health, Instance, InstanceKey, InstanceSpec, Lease, LeaseId, Revision,
    ServiceKey, DEFAULT_WEIGHT,
};
use crate::validate;

#[derive(Clone, Debug, Default)]
struct ServiceEntry {
    instances: BTreeMap<String, Arc<Instance>>,
    mod_revision: Revision,
}

impl ServiceEntry {
    /// The namespace and service name its instances share, if it has any.
    fn shared_names(&self) -> Option<(Arc<str>, Arc<str>)> {
        let any = self.instances.values().next()?;
        Some((any.namespace.clone(), any.service.clone()))
    }
}

/// The whole registry: instances indexed by service, leases, and the revision.
///
/// Reads take `&self` and return shared `Arc<Instance>`s, so a read copies no
/// instance data.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    revision: Revision,
    next_lease_id: LeaseId,
    services: BTreeMap<ServiceKey, ServiceEntry>,
    leases: BTreeMap<LeaseId, Lease>,
    lease_members: BTreeMap<LeaseId, BTreeSet<MemberKey>>,
    /// Results of forwarded writes that may still be unanswered (replicated).
    forward_sessions: ForwardSessions,
    /// Instances that have checks (derived: lets the check keeper look at these
    /// instead of every instance).
    checked: BTreeSet<InstanceKey>,
    instance_count: usize,
    /// Revision at which each recently emptied service lost its last instance, so a
    /// blocking query on a service that disappeared still sees its index move.
    /// Derived state: not replicated, not in the digest.
    tombstones: BTreeMap<ServiceKey, Revision>,
    /// A lower bound for every service's index: the revision this registry was
    /// loaded at (changes before it are not tracked per service), raised when the
    /// tombstones are dropped.
    index_floor: Revision,
}

/// An instance key as one allocation: its parts joined by NUL, which no valid part
/// contains. Lease membership is kept for every instance on a lease, so this saves
/// two allocations and 56 bytes per member against an [`InstanceKey`]. Joined keys
/// sort as the keys do (NUL sorts before every character a part may hold), so
/// members leave a dropped lease in the same order either way.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct MemberKey(Box<str>);

impl MemberKey {
    const SEPARATOR: char = '\0';

    fn new(key: &InstanceKey) -> Self {
        let sep = Self::SEPARATOR;
        MemberKey(format!("{}{sep}{}{sep}{}", key.namespace, key.service, key.instance_id).into_boxed_str())
    }

    fn key(&self) -> InstanceKey {
        let mut parts = self.0.splitn(3, Self::SEPARATOR);
        let mut next = || parts.next().unwrap_or_default().to_string();
        InstanceKey {
            namespace: next(),
            service: next(),
            instance_id: next(),
        }
    }
}

/// Most tombstones kept before they are folded into the index floor.
const MAX_TOMBSTONES: usize = 4096;

/// The output a check gets when its TTL runs out (Consul's wording).
pub const TTL_EXPIRED_OUTPUT: &str = "TTL expired";

/// Everything one `apply` did, for the storage layer and the watch hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The answer for the proposer.
    pub result: ApplyResult,
    /// Change events, in revision order.
    pub events: Vec<Event>,
    /// Leases created, changed or removed (storage rewrites or deletes them).
    pub leases_changed: Vec<LeaseId>,
    /// Forwarding sessions and results recorded or dropped.
    pub sessions_changed: SessionChanges,
}

/// A serializable image of the registry (snapshots, state transfer).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrySnapshot {
    /// Revision of the image.
    pub revision: Revision,
    /// Next lease id the registry would assign.
    pub next_lease_id: LeaseId,
    /// Every instance, in key order. Shared with the registry (an image copies no
    /// instance data); serialized exactly as a list of [`Instance`]s.
    pub instances: Vec<Arc<Instance>>,
    /// Every lease, in id order.
    pub leases: Vec<Lease>,
    /// Every forwarding session, in id order.
    pub forward_sessions: Vec<ForwardSession>,
}

/// One line of a service listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub service: String,
    /// Number of instances.
    pub instances: u32,
    /// Instances passing.
    pub passing: u32,
    /// Instances warning.
    pub warning: u32,
    /// Instances critical.
    pub critical: u32,
    /// Revision of the last change to this service.
    pub mod_revision: Revision,
}

impl Registry {
    /// An empty registry at revision 0.
    pub fn new() -> Self {
        Registry {
            next_lease_id: 1,
            ..Default::default()
        }
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Number of instances.
    pub fn instance_count(&self) -> usize {
        self.instance_count
    }

    /// Number of services with at least one instance.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Number of leases.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// One lease.
    pub fn lease(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every lease, in id order.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Leases with an id above `id`, in id order.
    pub fn leases_after(&self, id: LeaseId) -> impl Iterator<Item = &Lease> {
        use std::ops::Bound;
        self.leases
            .range((Bound::Excluded(id), Bound::Unbounded))
            .map(|(_, lease)| lease)
    }

    /// Instances that have at least one check, in key order.
    pub fn instances_with_checks(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.checked.iter().filter_map(|key| self.instance(key))
    }

    /// Keys of the instances attached to a lease.
    pub fn lease_instances(&self, id: LeaseId) -> Vec<InstanceKey> {
        self.lease_members
            .get(&id)
            .map(|m| m.iter().map(MemberKey::key).collect())
            .unwrap_or_default()
    }

    /// One instance.
    pub fn instance(&self, key: &InstanceKey) -> Option<&Arc<Instance>> {
        self.services
            .get(&key.service_key())
            .and_then(|s| s.instances.get(&key.instance_id))
    }

    /// Instances of one service that pass `filter`, in instance id order.
    pub fn discover(&self, service: &ServiceKey, filter: &DiscoverFilter) -> Vec<Arc<Instance>> {
        self.services
            .get(service)
            .map(|s| s.instances.values().filter(|i| filter.matches(i)).cloned().collect())
            .unwrap_or_default()
    }

    /// The revision of the last change to one service, as [`Registry::service_index`]:
    /// it never moves backwards, also across a restart or a snapshot load (which
    /// forget when a removed instance was removed).
    pub fn service_revision(&self, service: &ServiceKey) -> Revision {
        self.service_index(service)
    }

    /// The modify index of one service for blocking queries: the revision of its
    /// last change, including the removal of its last instance. Never 0 for a
    /// service that existed since this registry was loaded, and never below the
    /// revision the registry was loaded at, so it never moves backwards past a change
    /// a client may have seen.
    pub fn service_index(&self, service: &ServiceKey) -> Revision {
        let own = match self.services.get(service) {
            Some(entry) => entry.mod_revision,
            None => self.tombstones.get(service).copied().unwrap_or(0),
        };
        own.max(self.index_floor)
    }

    /// The modify index of a whole namespace: the greatest [`Registry::service_index`]
    /// of its services, live or removed.
    pub fn namespace_index(&self, namespace: &str) -> Revision {
        let live = self
            .services_in(namespace)
            .map(|(_, entry)| entry.mod_revision)
            .max()
            .unwrap_or(0);
        let removed = self
            .tombstones
            .iter()
            .filter(|(k, _)| k.namespace == namespace)
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(0);
        live.max(removed).max(self.index_floor)
    }

    fn services_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = (&'a ServiceKey, &'a ServiceEntry)> + 'a {
        self.services
            .range(
                ServiceKey {
                    namespace: namespace.to_string(),
                    service: String::new(),
                }..,
            )
            .take_while(move |(k, _)| k.namespace == namespace)
    }

    /// Every instance in one namespace, in key order.
    pub fn namespace_instances<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Arc<Instance>> + 'a {
        self.services_in(namespace).flat_map(|(_, s)| s.instances.values())
    }

    /// Instances with this id in any service of one namespace, in service order.
    pub fn instances_with_id<'a>(&'a self, namespace: &'a str, instance_id: &str) -> Vec<&'a Arc<Instance>> {
        self.services_in(namespace)
            .filter_map(|(_, s)| s.instances.get(instance_id))
            .collect()
    }

    /// Every service in a namespace (or all namespaces), with instance counts.
    pub fn services(&self, namespace: Option<&str>) -> Vec<ServiceSummary> {
        self.services
            .iter()
            .filter(|(k, _)| namespace.is_none_or(|n| n == k.namespace))
            .map(|(k, s)| {
                let count = |h: Health| s.instances.values().filter(|i| i.health == h).count() as u32;
                ServiceSummary {
                    namespace: k.namespace.clone(),
                    service: k.service.clone(),
                    instances: s.instances.len() as u32,
                    passing: count(Health::Passing),
                    warning: count(Health::Warning),
                    critical: count(Health::Critical),
                    mod_revision: s.mod_revision,
                }
            })
            .collect()
    }

    /// Every instance that passes a watch filter (a `Reset` snapshot), in key order.
    pub fn matching(&self, filter: &WatchFilter) -> Vec<Arc<Instance>> {
        self.services
            .iter()
            .filter(|(k, _)| filter.matches_service(&k.namespace, &k.service))
            .flat_map(|(_, s)| s.instances.values().cloned())
            .collect()
    }

    /// Applies one command. Deterministic: the same state and command give the same
    /// result on every replica. A command that cannot be carried out is rejected in
    /// the result and changes nothing.
    pub fn apply(&mut self, command: &Command) -> Applied {
        match command {
            Command::Batch { commands } => return self.apply_batch(commands),
            Command::Forwarded {
                session,
                seq,
                answered_below,
                command,
            } => return self.apply_forwarded(*session, *seq, *answered_below, command),
            _ => {}
        }
        let mut events = Vec::new();
        let mut leases_changed = Vec::new();
        let outcome = match self.apply_inner(command, &mut events, &mut leases_changed) {
            Ok(outcome) => outcome,
            Err(rejection) => {
                debug_assert!(events.is_empty());
                Outcome::Rejected(rejection)
            }
        };
        Applied {
            result: ApplyResult {
                revision: self.revision,
                outcome,
            },
            events,
            leases_changed,
            sessions_changed: SessionChanges::default(),
        }
    }

    /// Applies write `seq` of forwarding session `session` unless an earlier attempt
    /// of it was applied, whose result it then answers (see [`crate::sessions`]).
    fn apply_forwarded(&mut self, session: u64, seq: u64, answered_below: u64, command: &Command) -> Applied {
        let mut changes = SessionChanges::default();
        let mut applied = match self.forward_sessions.begin(session, seq, answered_below, &mut changes) {
            Attempt::Repeat(result) => self.unchanged(result),
            Attempt::Stale => self.unchanged(self.nothing()),
            Attempt::First => {
                let applied = match command {
                    Command::Batch { .. } | Command::Forwarded { .. } => self.unchanged(ApplyResult {
                        revision: self.revision,
                        outcome: Outcome::Rejected(Rejection::Invalid(validate::ValidationError::new(
                            "command",
                            "a forwarded write is one command, not a batch or another forwarded write",
                        ))),
                    }),
                    single => self.apply(single),
                };
                self.forward_sessions
                    .record(session, seq, applied.result.clone(), &mut changes);
                applied
            }
        };
        applied.sessions_changed.extend(changes);
        applied
    }

    /// An answer that changed no instance or lease.
    fn unchanged(&self, result: ApplyResult) -> Applied {
        Applied {
            result,
            events: Vec::new(),
            leases_changed: Vec::new(),
            sessions_changed: SessionChanges::default(),
        }
    }

    /// Applies each command of a batch as if it were an entry of its own; the events
    /// and changed leases of all of them, and one result per command.
    fn apply_batch(&mut self, commands: &[Command]) -> Applied {
        let invalid = if commands.len() > MAX_BATCH_COMMANDS {
            Some(format!(
                "a batch holds at most {MAX_BATCH_COMMANDS} commands, got {}",
                commands.len()
            ))
        } else if commands.iter().any(|c| matches!(c, Command::Batch { .. })) {
            Some("batches do not nest".to_string())
        } else {
            None
        };
        if let Some(reason) = invalid {
            return self.unchanged(ApplyResult {
                revision: self.revision,
                outcome: Outcome::Rejected(Rejection::Invalid(validate::ValidationError::new("commands", reason))),
            });
        }
        let mut events = Vec::new();
        let mut leases_changed = Vec::new();
        let mut sessions_changed = SessionChanges::default();
        let mut results = Vec::with_capacity(commands.len());
        for command in commands {
            let applied = self.apply(command);
            events.extend(applied.events);
            leases_changed.extend(applied.leases_changed);
            sessions_changed.extend(applied.sessions_changed);
            results.push(applied.result);
        }
        Applied {
            result: ApplyResult {
                revision: self.revision,
                outcome: Outcome::Batch(results),
            },
            events,
            leases_changed,
            sessions_changed,
        }
    }

    /// The answer for a Raft entry that carries no command (blank or membership).
    pub fn nothing(&self) -> ApplyResult {
        ApplyResult {
            revision: self.revision,
            outcome: Outcome::Nothing,
        }
    }

    fn apply_inner(
        &mut self,
        command: &Command,
        events: &mut Vec<Event>,
        leases_changed: &mut Vec<LeaseId>,
    ) -> Result<Outcome, Rejection> {
        match command {
            Command::Register {
                spec,
                grant_ttl_ms,
                now_ms,
            } => {
                validate::instance_spec(spec)?;
                let key = spec.key();
                if self.instance(&key).is_some_and(|i| i.maintenance().is_some()) {
                    let id = maintenance_check_id(&key.instance_id);
                    if let Some(i) = spec.checks.iter().position(|c| c.id == id) {
                        return Err(validate::ValidationError::new(
                            format!("checks[{i}].id"),
                            format!("{id:?} is the id of this instance's maintenance check"),
                        )
                        .into());
                    }
                }
                if let Some(lease) = spec.lease_id {
                    if !self.leases.contains_key(&lease) {
                        return Err(Rejection::LeaseNotFound(lease));
                    }
                }
                let Some(ttl_ms) = grant_ttl_ms else {
                    return Ok(Outcome::Registered(self.put_instance(spec, *now_ms, events)));
                };
                if spec.lease_id.is_some() {
                    return Err(validate::ValidationError::new(
                        "lease_id",
                        "must be unset when a TTL asks for a new lease",
                    )
                    .into());
                }
                validate::ttl_ms(*ttl_ms)?;
                let lease_id = self.grant(0, *ttl_ms, *now_ms)?;
                leases_changed.push(lease_id);
                let mut spec = spec.clone();
                spec.lease_id = Some(lease_id);
                Ok(Outcome::Registered(self.put_instance(&spec, *now_ms, events)))
            }
            Command::Deregister { key, .. } => {
                validate::instance_key(key)?;
                if self.instance(key).is_none() {
                    return Err(Rejection::InstanceNotFound(key.clone()));
                }
                self.remove_instance(key, DeleteReason::Deregistered, events);
                Ok(Outcome::Deregistered)
            }
            Command::GrantLease {
                lease_id,
                ttl_ms,
                now_ms,
            } => {
                validate::ttl_ms(*ttl_ms)?;
                let id = self.grant(*lease_id, *ttl_ms, *now_ms)?;
                leases_changed.push(id);
                Ok(Outcome::LeaseGranted {
                    lease_id: id,
                    ttl_ms: *ttl_ms,
                })
            }
            Command::RevokeLease { lease_id, .. } => {
                if !self.leases.contains_key(lease_id) {
                    return Err(Rejection::LeaseNotFound(*lease_id));
                }
                let removed = self.drop_lease(*lease_id, DeleteReason::LeaseRevoked, events);
                leases_changed.push(*lease_id);
                Ok(Outcome::LeaseRevoked { removed })
            }
            Command::ExpireLeases { lease_ids, .. } => {
                let mut expired = Vec::new();
                let mut removed = 0;
                for id in lease_ids {
                    if self.leases.contains_key(id) {
                        removed += self.drop_lease(*id, DeleteReason::LeaseExpired, events);
                        leases_changed.push(*id);
                        expired.push(*id);
                    }
                }
                Ok(Outcome::LeasesExpired { expired, removed })
            }
            Command::Barrier => Ok(Outcome::Nothing),
            // `apply` takes batches and forwarded writes apart before they get here.
            Command::Batch { .. } | Command::Forwarded { .. } => Err(Rejection::Invalid(
                validate::ValidationError::new("commands", "batches do not nest"),
            )),
            Command::CheckpointLeases { remaining } => {
                // Not in `leases_changed`: checkpoints are soft state, not rewritten
                // in the state database lease by lease (see `Lease`).
                for (id, left) in remaining {
                    if let Some(lease) = self.leases.get_mut(id) {
                        lease.checkpoint_remaining_ms = left.map(|l| l.min(lease.ttl_ms));
                    }
                }
                Ok(Outcome::Checkpointed)
            }
            Command::SetHealth { key, health, now_ms } => {
                validate::instance_key(key)?;
                let Some(current) = self.instance(key).cloned() else {
                    return Err(Rejection::InstanceNotFound(key.clone()));
                };
                if current.has_ttl_checks() {
                    return Err(validate::ValidationError::new(
                        "health",
                        "this instance's health follows its checks; report on a check instead",
                    )
                    .into());
                }
                if current.health_without_maintenance() == *health {
                    return Ok(Outcome::HealthSet(current));
                }
                let mut updated = (*current).clone();
                match updated.checks.iter_mut().find(|c| c.is_maintenance()) {
                    // In maintenance the instance stays critical; the health it gets
                    // back afterwards changes.
                    Some(maintenance) => {
                        *maintenance = Check::maintenance(
                            &current.instance_id,
                            &maintenance.notes,
                            *health,
                            maintenance.status_since_ms,
                        );
                    }
                    None => updated.health = *health,
                }
                updated.updated_at_ms = *now_ms;
                let instance = self.store_instance(updated, events);
                Ok(Outcome::HealthSet(instance))
            }
            Command::SetMaintenance { key, reason, now_ms } => {
                validate::instance_key(key)?;
                if let Some(reason) = reason {
                    validate::maintenance_reason(reason)?;
                }
                let Some(current) = self.instance(key).cloned() else {
                    return Err(Rejection::InstanceNotFound(key.clone()));
                };
                let id = maintenance_check_id(&key.instance_id);
                if current.check(&id).is_some_and(Check::has_ttl) {
                    return Err(validate::ValidationError::new(
                        "instance_id",
                        format!("the instance has a TTL check with the id {id:?}, which maintenance needs"),
                    )
                    .into());
                }
                let base = current.health_without_maintenance();
                let mut updated = (*current).clone();
                updated.checks.retain(|c| !c.is_maintenance());
                if let Some(reason) = reason {
                    let since = current.maintenance().map_or(*now_ms, |m| m.status_since_ms);
                    updated
                        .checks
                        .push(Check::maintenance(&key.instance_id, reason, base, since));
                }
                if updated.checks == current.checks {
                    return Ok(Outcome::MaintenanceSet(current));
                }
                updated.health = worst_status(&updated.checks).unwrap_or(base);
                updated.updated_at_ms = *now_ms;
                Ok(Outcome::MaintenanceSet(self.store_instance(updated, events)))
            }
            Command::UpdateCheck {
                key,
                check_id,
                status,
                output,
                now_ms,
            } => {
                validate::instance_key(key)?;
                validate::check_id("check_id", check_id)?;
                validate::check_output(output)?;
                let Some(current) = self.instance(key).cloned() else {
                    return Err(Rejection::InstanceNotFound(key.clone()));
                };
                let Some(pos) = current.checks.iter().position(|c| c.id == *check_id) else {
                    return Err(Rejection::CheckNotFound {
                        key: key.clone(),
                        check_id: check_id.clone(),
                    });
                };
                let check = &current.checks[pos];
                validate::check_takes_reports(check)?;
                if check.status == *status && check.output == *output {
                    return Ok(Outcome::CheckUpdated(current));
                }
                let mut updated = (*current).clone();
                set_check_status(&mut updated.checks[pos], *status, output, *now_ms);
                updated.health = worst_status(&updated.checks).unwrap_or(updated.health);
                updated.updated_at_ms = *now_ms;
                Ok(Outcome::CheckUpdated(self.store_instance(updated, events)))
            }
            Command::ExpireChecks { checks, now_ms } => {
                let mut by_instance: BTreeMap<&InstanceKey, BTreeSet<&str>> = BTreeMap::new();
                for (key, id) in checks {
                    by_instance.entry(key).or_default().insert(id);
                }
                let mut changed = 0;
                for (key, ids) in by_instance {
                    let Some(current) = self.instance(key).cloned() else {
                        continue;
                    };
                    let mut updated = (*current).clone();
                    let mut any = false;
                    for check in updated.checks.iter_mut() {
                        if ids.contains(check.id.as_str()) && check.status != Health::Critical {
                            set_check_status(check, Health::Critical, TTL_EXPIRED_OUTPUT, *now_ms);
                            changed += 1;
                            any = true;
                        }
                    }
                    if any {
                        updated.health = worst_status(&updated.checks).unwrap_or(updated.health);
                        updated.updated_at_ms = *now_ms;
                        self.store_instance(updated, events);
                    }
                }
                Ok(Outcome::ChecksExpired { changed })
            }
            Command::EvictCritical { keys, now_ms } => {
                let mut removed = 0;
                for key in keys {
                    let due = self
                        .instance(key)
                        .is_some_and(|i| i.checks.iter().any(|c| critical_too_long(c, *now_ms)));
                    if due {
                        self.remove_instance(key, DeleteReason::HealthEvicted, events);
                        removed += 1;
                    }
                }
                Ok(Outcome::Evicted { removed })
            }
        }
    }

    /// Grants a lease with `requested` id (0: the next free one).
    fn grant(&mut self, requested: LeaseId, ttl_ms: u64, now_ms: u64) -> Result<LeaseId, Rejection> {
        let id = if requested == 0 {
            // Wrapping, skipping 0 ("no lease"): a client may have taken u64::MAX
            // explicitly, which made `next_lease_id` overflow (a panic in every
            // replica's apply in debug builds, a lease with id 0 in release builds).
            let mut id = self.next_lease_id;
            while id == 0 || self.leases.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            id
        } else if self.leases.contains_key(&requested) {
            return Err(Rejection::LeaseExists(requested));
        } else {
            requested
        };
        self.next_lease_id = self.next_lease_id.max(id.saturating_add(1));
        self.leases.insert(
            id,
            Lease {
                id,
                ttl_ms,
                granted_at_ms: now_ms,
                checkpoint_remaining_ms: None,
            },
        );
        Ok(id)
    }

    fn put_instance(&mut self, spec: &InstanceSpec, now_ms: u64, events: &mut Vec<Event>) -> Arc<Instance> {
        let key = spec.key();
        let previous = self.instance(&key).cloned();
        if let Some(prev) = &previous {
            if prev.lease_id != spec.lease_id {
                if let Some(old) = prev.lease_id {
                    self.detach(old, &key);
                }
            }
        }
        if let Some(lease) = spec.lease_id {
            self.lease_members
                .entry(lease)
                .or_default()
                .insert(MemberKey::new(&key));
        }
        // A check that already exists keeps its status and output (Consul does the
        // same), so re-registering does not flap a passing instance to critical.
        let mut checks: Vec<Check> = spec
            .checks
            .iter()
            .map(|c| {
                let kept = previous.as_ref().and_then(|p| p.check(&c.id)).filter(|k| k.has_ttl());
                Check {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    notes: c.notes.clone(),
                    ttl_ms: c.ttl_ms,
                    deregister_critical_after_ms: c.deregister_critical_after_ms,
                    status: kept.map_or(c.initial_status, |k| k.status),
                    output: kept.map_or_else(String::new, |k| k.output.clone()),
                    status_since_ms: kept.map_or(now_ms, |k| k.status_since_ms),
                }
            })
            .collect();
        // Maintenance outlives re-registration; the health it gives back is the new
        // registration's.
        if let Some(maintenance) = previous.as_ref().and_then(|p| p.maintenance()) {
            let base = worst_status(&checks).unwrap_or(spec.health);
            checks.push(Check::maintenance(
                &key.instance_id,
                &maintenance.notes,
                base,
                maintenance.status_since_ms,
            ));
        }
        let (namespace, service) = match &previous {
            Some(p) => (p.namespace.clone(), p.service.clone()),
            None => self.names_for(&key),
        };
        let instance = Instance {
            namespace,
            service,
            instance_id: key.instance_id.clone(),
            address: spec.address.clone(),
            port: spec.port,
            ports: (&spec.ports).into(),
            tags: spec.tags.clone(),
            metadata: (&spec.metadata).into(),
            weight: if spec.weight == 0 { DEFAULT_WEIGHT } else { spec.weight },
            zone: spec.zone.clone(),
            health: worst_status(&checks).unwrap_or(spec.health),
            lease_id: spec.lease_id,
            create_revision: previous.as_ref().map_or(0, |p| p.create_revision),
            mod_revision: 0,
            registered_at_ms: previous.as_ref().map_or(now_ms, |p| p.registered_at_ms),
            updated_at_ms: now_ms,
            checks,
        };
        self.store_instance(instance, events)
    }

    /// The namespace and service name for a new instance of `key`'s service: the
    /// ones its instances already share, or new ones.
    fn names_for(&self, key: &InstanceKey) -> (Arc<str>, Arc<str>) {
        self.services
            .get(&key.service_key())
            .and_then(ServiceEntry::shared_names)
            .unwrap_or_else(|| (Arc::from(key.namespace.as_str()), Arc::from(key.service.as_str())))
    }

    /// Stamps `instance` with the next revision, stores it and emits its `Put`.
    fn store_instance(&mut self, mut instance: Instance, events: &mut Vec<Event>) -> Arc<Instance> {
        self.revision += 1;
        instance.mod_revision = self.revision;
        if instance.create_revision == 0 {
            instance.create_revision = self.revision;
        }
        let instance = Arc::new(instance);
        let service_key = ServiceKey {
            namespace: instance.namespace.to_string(),
            service: instance.service.to_string(),
        };
        self.tombstones.remove(&service_key);
        let entry = self.services.entry(service_key).or_default();
        entry.mod_revision = self.revision;
        let previous = entry.instances.insert(instance.instance_id.clone(), instance.clone());
        if previous.is_none() {
            self.instance_count += 1;
        }
        // The index of instances with checks changes only when that changes (no key
        // is built for the common write of an instance without checks).
        let had_checks = previous.is_some_and(|p| !p.checks.is_empty());
        match (had_checks, !instance.checks.is_empty()) {
            (false, true) => {
                self.checked.insert(instance.key());
            }
            (true, false) => {
                self.checked.remove(&instance.key());
            }
            _ => {}
        }
        events.push(Event {
            revision: self.revision,
            kind: EventKind::Put(instance.clone()),
        });
        instance
    }

    fn remove_instance(&mut self, key: &InstanceKey, reason: DeleteReason, events: &mut Vec<Event>) {
        let service_key = key.service_key();
        let Some(entry) = self.services.get_mut(&service_key) else {
            return;
        };
        let Some(removed) = entry.instances.remove(&key.instance_id) else {
            return;
        };
        self.revision += 1;
        self.instance_count -= 1;
        if !removed.checks.is_empty() {
            self.checked.remove(key);
        }
        entry.mod_revision = self.revision;
        if entry.instances.is_empty() {
            self.services.remove(&service_key);
            if self.tombstones.len() >= MAX_TOMBSTONES {
                self.tombstones.clear();
                self.index_floor = self.revision;
            }
            self.tombstones.insert(service_key, self.revision);
        }
        if let Some(lease) = removed.lease_id {
            self.detach(lease, key);
        }
        events.push(Event {
            revision: self.revision,
            kind: EventKind::Delete {
                key: key.clone(),
                reason,
            },
        });
    }

    fn detach(&mut self, lease: LeaseId, key: &InstanceKey) {
        if let Some(members) = self.lease_members.get_mut(&lease) {
            members.remove(&MemberKey::new(key));
            if members.is_empty() {
                self.lease_members.remove(&lease);
            }
        }
    }

    fn drop_lease(&mut self, id: LeaseId, reason: DeleteReason, events: &mut Vec<Event>) -> u32 {
        self.leases.remove(&id);
        let members = self.lease_members.remove(&id).unwrap_or_default();
        let removed = members.len() as u32;
        for member in &members {
            self.remove_instance(&member.key(), reason, events);
        }
        removed
    }

    /// A serializable image of the whole registry. It shares the instances with the
    /// registry, so taking one costs a pointer per instance, not a copy of each.
    pub fn to_snapshot(&self) -> RegistrySnapshot {
        RegistrySnapshot {
            revision: self.revision,
            next_lease_id: self.next_lease_id,
            instances: self
                .services
                .values()
                .flat_map(|s| s.instances.values().cloned())
                .collect(),
            leases: self.leases.values().cloned().collect(),
            forward_sessions: self.forward_sessions.iter().cloned().collect(),
        }
    }

    /// Rebuilds a registry from an image.
    pub fn from_snapshot(snapshot: RegistrySnapshot) -> Self {
        let mut registry = Registry {
            revision: snapshot.revision,
            next_lease_id: snapshot.next_lease_id.max(1),
            index_floor: snapshot.revision,
            ..Default::default()
        };
        for lease in snapshot.leases {
            registry.leases.insert(lease.id, lease);
        }
        for session in snapshot.forward_sessions {
            registry.forward_sessions.load(session);
        }
        for instance in snapshot.instances {
            registry.load_shared_instance(instance);
        }
        registry
    }

    /// Inserts a stored instance as is (no revision change, no event); used when
    /// loading state from disk.
    pub fn load_instance(&mut self, instance: Instance) {
        self.load_shared_instance(Arc::new(instance));
    }

    fn load_shared_instance(&mut self, mut instance: Arc<Instance>) {
        let key = instance.key();
        if let Some(lease) = instance.lease_id {
            self.lease_members
                .entry(lease)
                .or_default()
                .insert(MemberKey::new(&key));
        }
        if !instance.checks.is_empty() {
            self.checked.insert(key.clone());
        }
        let entry = self.services.entry(key.service_key()).or_default();
        // A freshly decoded instance takes the names its service's instances share.
        if let (Some((namespace, service)), Some(own)) = (entry.shared_names(), Arc::get_mut(&mut instance)) {
            own.namespace = namespace;
            own.service = service;
        }
        entry.mod_revision = entry.mod_revision.max(instance.mod_revision);
        if entry.instances.insert(key.instance_id, instance).is_none() {
            self.instance_count += 1;
        }
    }

    /// The forwarding sessions (see [`crate::sessions`]).
    pub fn forward_sessions(&self) -> &ForwardSessions {
        &self.forward_sessions
    }

    /// Sets a stored forwarding session's bounds (its results are loaded apart);
    /// used when loading state from disk.
    pub fn load_forward_session(&mut self, id: u64, answered_below: u64, last_revision: Revision) {
        self.forward_sessions.load_bounds(id, answered_below, last_revision);
    }

    /// Inserts a stored forwarded write's result as is; used when loading state
    /// from disk.
    pub fn load_forward_result(&mut self, session: u64, seq: u64, result: ApplyResult) {
        self.forward_sessions.load_result(session, seq, result);
    }

    /// Inserts a stored lease as is; used when loading state from disk.
    pub fn load_lease(&mut self, lease: Lease) {
        self.leases.insert(lease.id, lease);
    }

    /// Sets the revision and next lease id; used when loading state from disk.
    pub fn load_counters(&mut self, revision: Revision, next_lease_id: LeaseId) {
        self.revision = revision;
        self.index_floor = revision;
        self.next_lease_id = next_lease_id.max(1);
    }

    /// The next lease id the registry would assign.
    pub fn next_lease_id(&self) -> LeaseId {
        self.next_lease_id
    }

    /// A SHA-256 digest of the whole state, equal on replicas that applied the same
    /// log. Hex encoded.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut feed = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        feed(&self.revision.to_le_bytes());
        feed(&self.next_lease_id.to_le_bytes());
        for s in self.services.values() {
            for i in s.instances.values() {
                feed(i.namespace.as_bytes());
                feed(i.service.as_bytes());
                feed(i.instance_id.as_bytes());
                feed(i.address.as_bytes());
                feed(&i.port.to_le_bytes());
                for (name, port) in &i.ports {
                    feed(name.as_bytes());
                    feed(&port.to_le_bytes());
                }
                feed(b"tags");
                for t in &i.tags {
                    feed(t.as_bytes());
                }
                feed(b"meta");
                for (k, v) in &i.metadata {
                    feed(k.as_bytes());
                    feed(v.as_bytes());
                }
                feed(&i.weight.to_le_bytes());
                feed(i.zone.as_bytes());
                feed(i.health.as_str().as_bytes());
                feed(&i.lease_id.unwrap_or(0).to_le_bytes());
                feed(&i.create_revision.to_le_bytes());
                feed(&i.mod_revision.to_le_bytes());
                feed(&i.registered_at_ms.to_le_bytes());
                feed(&i.updated_at_ms.to_le_bytes());
                feed(b"checks");
                for c in &i.checks {
                    feed(c.id.as_bytes());
                    feed(c.name.as_bytes());
                    feed(c.notes.as_bytes());
                    feed(&c.ttl_ms.to_le_bytes());
                    feed(&c.deregister_critical_after_ms.map_or(u64::MAX, |a| a).to_le_bytes());
                    feed(c.status.as_str().as_bytes());
                    feed(c.output.as_bytes());
                    feed(&c.status_since_ms.to_le_bytes());
                }
            }
        }
        for l in self.leases.values() {
            feed(&l.id.to_le_bytes());
            feed(&l.ttl_ms.to_le_bytes());
            feed(&l.granted_at_ms.to_le_bytes());
            // Not the checkpoint: soft state a restarted node lacks until the next one.
        }
        feed(b"sessions");
        for session in self.forward_sessions.iter() {
            feed(&session.id.to_le_bytes());
            feed(&session.answered_below.to_le_bytes());
            feed(&session.last_revision.to_le_bytes());
            for (seq, result) in &session.results {
                feed(&seq.to_le_bytes());
                feed(&result.revision.to_le_bytes());
            }
        }
        hex::encode(h.finalize())
    }
}

/// Sets a check's status and output, moving `status_since_ms` only when the status
/// changes.
fn set_check_status(check: &mut Check, status: Health, output: &str, now_ms: u64) {
    if check.status != status {
        check.status_since_ms = now_ms;
    }
    check.status = status;
    check.output = output.to_string();
}

/// Whether `check` has been critical for longer than its
/// `deregister_critical_after` at `now_ms`.
pub fn critical_too_long(check: &Check, now_ms: u64) -> bool {
    check.status == Health::Critical
        && check
            .deregister_critical_after_ms
            .is_some_and(|after| now_ms >= check.status_since_ms.saturating_add(after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn part() -> impl Strategy<Value = String> {
        "[a-z0-9.:_-]{1,6}"
    }

    #[test]
    fn the_instances_of_a_service_share_its_names_also_after_a_reload() {
        let mut registry = Registry::new();
        for id in ["a", "b", "c"] {
            let spec = InstanceSpec {
                service: "web".into(),
                instance_id: id.into(),
                address: "10.0.0.1".into(),
                port: 80,
                ..Default::default()
            };
            registry.apply(&Command::Register {
                spec,
                grant_ttl_ms: None,
                now_ms: 1,
            });
        }
        let shared = |r: &Registry| {
            let all = r.to_snapshot().instances;
            assert_eq!(all.len(), 3);
            all.windows(2)
                .all(|w| Arc::ptr_eq(&w[0].namespace, &w[1].namespace) && Arc::ptr_eq(&w[0].service, &w[1].service))
        };
        assert!(shared(&registry));
        let image = bincode::serialize(&registry.to_snapshot()).expect("encode");
        let reloaded = Registry::from_snapshot(bincode::deserialize(&image).expect("decode"));
        assert!(shared(&reloaded));
        assert_eq!(reloaded.digest(), registry.digest());
    }

    proptest! {
        #[test]
        fn a_member_key_gives_back_its_key_and_sorts_as_the_keys_do(
            a in (part(), part(), part()),
            b in (part(), part(), part()),
        ) {
            let a = InstanceKey { namespace: a.0, service: a.1, instance_id: a.2 };
            let b = InstanceKey { namespace: b.0, service: b.1, instance_id: b.2 };
            prop_assert_eq!(MemberKey::new(&a).key(), a.clone());
            prop_assert_eq!(MemberKey::new(&a).cmp(&MemberKey::new(&b)), a.cmp(&b));
        }
    }
}
