//! One conversion per type between protobuf messages and `muster-core` types.
//! Conversions from the network validate what they convert and name the field.

use std::collections::BTreeMap;

use muster_core::validate::{self, ValidationError};
use muster_core::{Check, DeleteReason, Event, EventKind, Health, Instance, InstanceKey, InstanceSpec, ServiceSummary};

use crate::v1 as pb;

impl From<Health> for pb::Health {
    fn from(h: Health) -> Self {
        match h {
            Health::Passing => pb::Health::Passing,
            Health::Warning => pb::Health::Warning,
            Health::Critical => pb::Health::Critical,
        }
    }
}

/// Reads a protobuf health value; unspecified means passing.
pub fn health_from_pb(field: &str, value: i32) -> Result<Health, ValidationError> {
    match pb::Health::try_from(value) {
        Ok(pb::Health::Unspecified) | Ok(pb::Health::Passing) => Ok(Health::Passing),
        Ok(pb::Health::Warning) => Ok(Health::Warning),
        Ok(pb::Health::Critical) => Ok(Health::Critical),
        Err(_) => Err(ValidationError::new(field, format!("unknown health value {value}"))),
    }
}

/// Reads a list of protobuf health values (a filter; unspecified is refused).
pub fn health_filter_from_pb(values: &[i32]) -> Result<Vec<Health>, ValidationError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match pb::Health::try_from(*v) {
            Ok(pb::Health::Passing) => Ok(Health::Passing),
            Ok(pb::Health::Warning) => Ok(Health::Warning),
            Ok(pb::Health::Critical) => Ok(Health::Critical),
            _ => Err(ValidationError::new(
                format!("health[{i}]"),
                format!("unknown health value {v}"),
            )),
        })
        .collect()
}

impl From<&Instance> for pb::Instance {
    fn from(i: &Instance) -> Self {
        pb::Instance {
            namespace: i.namespace.to_string(),
            service: i.service.to_string(),
            instance_id: i.instance_id.clone(),
            address: i.address.clone(),
            port: u32::from(i.port),
            ports: i.ports.iter().map(|(k, v)| (k.clone(), u32::from(*v))).collect(),
            tags: i.tags.clone(),
            metadata: i.metadata.clone().into_iter().collect(),
            weight: i.weight,
            zone: i.zone.clone(),
            health: pb::Health::from(i.health) as i32,
            lease_id: i.lease_id.unwrap_or(0),
            create_revision: i.create_revision,
            mod_revision: i.mod_revision,
            registered_at_ms: i.registered_at_ms,
            updated_at_ms: i.updated_at_ms,
            maintenance: i.maintenance().map(|m| pb::Maintenance {
                reason: m.notes.clone(),
                since_ms: m.status_since_ms,
                health_after: pb::Health::from(i.health_without_maintenance()) as i32,
            }),
        }
    }
}

/// Turns a registration message into a validated spec.
pub fn spec_from_pb(i: pb::Instance) -> Result<InstanceSpec, ValidationError> {
    let port = validate::port("port", i.port)?;
    let mut ports = BTreeMap::new();
    for (name, value) in i.ports {
        let p = validate::port(&format!("ports[{name:?}]"), value)?;
        ports.insert(name, p);
    }
    let spec = InstanceSpec {
        namespace: i.namespace,
        service: i.service,
        instance_id: i.instance_id,
        address: i.address,
        port,
        ports,
        tags: i.tags,
        metadata: i.metadata.into_iter().collect(),
        weight: i.weight,
        zone: i.zone,
        health: health_from_pb("health", i.health)?,
        lease_id: (i.lease_id != 0).then_some(i.lease_id),
        // TTL checks are registered through the Consul-compatible API only (for now).
        checks: Vec::new(),
    };
    validate::instance_spec(&spec)?;
    Ok(spec)
}

/// Turns an instance reference into a validated key.
pub fn key_from_parts(namespace: &str, service: &str, instance_id: &str) -> Result<InstanceKey, ValidationError> {
    let key = InstanceKey::new(namespace, service, instance_id);
    validate::instance_key(&key)?;
    Ok(key)
}

/// Reads an instance as served back into a core instance (clients, caches).
pub fn instance_from_pb(i: &pb::Instance) -> Instance {
    Instance {
        namespace: i.namespace.as_str().into(),
        service: i.service.as_str().into(),
        instance_id: i.instance_id.clone(),
        address: i.address.clone(),
        port: u16::try_from(i.port).unwrap_or(0),
        ports: i
            .ports
            .iter()
            .map(|(k, v)| (k.clone(), u16::try_from(*v).unwrap_or(0)))
            .collect(),
        tags: i.tags.clone(),
        metadata: i.metadata.clone().into_iter().collect(),
        weight: i.weight,
        zone: i.zone.clone(),
        health: health_from_pb("health", i.health).unwrap_or(Health::Critical),
        lease_id: (i.lease_id != 0).then_some(i.lease_id),
        create_revision: i.create_revision,
        mod_revision: i.mod_revision,
        registered_at_ms: i.registered_at_ms,
        updated_at_ms: i.updated_at_ms,
        // TTL checks are not carried over gRPC yet (`health` reflects them); the
        // maintenance check is.
        checks: i
            .maintenance
            .as_ref()
            .map(|m| {
                let after = health_from_pb("maintenance.health_after", m.health_after).unwrap_or(Health::Passing);
                Check::maintenance(&i.instance_id, &m.reason, after, m.since_ms)
            })
            .into_iter()
            .collect(),
    }
}

impl From<DeleteReason> for pb::DeleteReason {
    fn from(r: DeleteReason) -> Self {
        match r {
            DeleteReason::Deregistered => pb::DeleteReason::Deregistered,
            DeleteReason::LeaseExpired => pb::DeleteReason::LeaseExpired,
            DeleteReason::LeaseRevoked => pb::DeleteReason::LeaseRevoked,
            DeleteReason::HealthEvicted => pb::DeleteReason::HealthEvicted,
        }
    }
}

impl From<&InstanceKey> for pb::InstanceRef {
    fn from(k: &InstanceKey) -> Self {
        pb::InstanceRef {
            namespace: k.namespace.clone(),
            service: k.service.clone(),
            instance_id: k.instance_id.clone(),
        }
    }
}

impl From<&Event> for pb::Event {
    fn from(e: &Event) -> Self {
        let kind = match &e.kind {
            EventKind::Put(i) => pb::event::Kind::Put(pb::Instance::from(&**i)),
            EventKind::Delete { key, reason } => pb::event::Kind::Delete(pb::Delete {
                key: Some(pb::InstanceRef::from(key)),
                reason: pb::DeleteReason::from(*reason) as i32,
            }),
        };
        pb::Event {
            revision: e.revision,
            kind: Some(kind),
        }
    }
}

impl From<&ServiceSummary> for pb::ServiceSummary {
    fn from(s: &ServiceSummary) -> Self {
        pb::ServiceSummary {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_above_65535_is_refused_naming_the_field() {
        let msg = pb::Instance {
            service: "web".into(),
            instance_id: "w1".into(),
            address: "h".into(),
            port: 70_000,
            ..Default::default()
        };
        assert_eq!(spec_from_pb(msg).unwrap_err().field, "port");
    }

    #[test]
    fn maintenance_crosses_protobuf_and_comes_back_as_the_same_check() {
        let mut msg = pb::Instance {
            service: "web".into(),
            instance_id: "w1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            health: pb::Health::Critical as i32,
            ..Default::default()
        };
        let plain = instance_from_pb(&msg);
        assert!(plain.maintenance().is_none() && plain.checks.is_empty());
        assert!(pb::Instance::from(&plain).maintenance.is_none());

        msg.maintenance = Some(pb::Maintenance {
            reason: "disk swap".into(),
            since_ms: 42,
            health_after: pb::Health::Warning as i32,
        });
        let drained = instance_from_pb(&msg);
        let check = drained.maintenance().expect("in maintenance");
        assert_eq!(*check, Check::maintenance("w1", "disk swap", Health::Warning, 42));
        assert_eq!(drained.health_without_maintenance(), Health::Warning);
        assert_eq!(pb::Instance::from(&drained), msg, "and back to the same message");
    }

    #[test]
    fn an_unknown_health_value_is_refused() {
        assert_eq!(health_from_pb("health", 42).unwrap_err().field, "health");
    }

    #[test]
    fn a_spec_round_trips_through_protobuf() {
        let msg = pb::Instance {
            service: "web".into(),
            instance_id: "w1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            ports: [("health".to_string(), 81)].into(),
            tags: vec!["v1".into()],
            ..Default::default()
        };
        let spec = spec_from_pb(msg).unwrap();
        assert_eq!(spec.ports.get("health"), Some(&81));
        assert_eq!(spec.health, Health::Passing);
    }
}
