//! Property tests of `Registry::apply`: determinism, revision order, lease semantics.

use std::collections::BTreeSet;

use muster_core::registry::Applied;
use muster_core::{Command, Event, EventKind, Health, InstanceKey, InstanceSpec, Outcome, Registry};
use proptest::prelude::*;

fn spec_strategy() -> impl Strategy<Value = InstanceSpec> {
    (
        prop::sample::select(vec!["web", "api", "db", "Bad_Name"]),
        0u8..6,
        prop::option::of(1u64..6),
        prop::sample::select(vec![0u16, 80, 8080]),
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..3),
    )
        .prop_map(|(service, n, lease, port, tags)| InstanceSpec {
            service: service.to_string(),
            instance_id: format!("i-{n}"),
            address: "10.0.0.1".into(),
            port,
            tags: tags.into_iter().map(String::from).collect(),
            lease_id: lease,
            ..Default::default()
        })
}

fn key_strategy() -> impl Strategy<Value = InstanceKey> {
    (prop::sample::select(vec!["web", "api", "db"]), 0u8..6)
        .prop_map(|(s, n)| InstanceKey::new("", s, &format!("i-{n}")))
}

fn command_strategy() -> impl Strategy<Value = Command> {
    let now = 1_000u64..2_000_000;
    prop_oneof![
        4 => (spec_strategy(), now.clone()).prop_map(|(spec, now_ms)| Command::Register { spec, grant_ttl_ms: None, now_ms }),
        1 => (spec_strategy(), now.clone()).prop_map(|(mut spec, now_ms)| {
            spec.lease_id = None;
            Command::Register { spec, grant_ttl_ms: Some(5_000), now_ms }
        }),
        2 => (key_strategy(), now.clone()).prop_map(|(key, now_ms)| Command::Deregister { key, now_ms }),
        2 => (0u64..6, prop::sample::select(vec![500u64, 5_000, 60_000]), now.clone())
            .prop_map(|(lease_id, ttl_ms, now_ms)| Command::GrantLease { lease_id, ttl_ms, now_ms }),
        1 => (1u64..6, now.clone()).prop_map(|(lease_id, now_ms)| Command::RevokeLease { lease_id, now_ms }),
        1 => (prop::collection::vec(1u64..6, 0..3), now.clone())
            .prop_map(|(lease_ids, now_ms)| Command::ExpireLeases { lease_ids, now_ms }),
        1 => prop::collection::vec((1u64..6, prop::option::of(0u64..10_000)), 0..3)
            .prop_map(|remaining| Command::CheckpointLeases { remaining }),
        1 => (key_strategy(), prop::sample::select(vec![Health::Passing, Health::Warning, Health::Critical]), now)
            .prop_map(|(key, health, now_ms)| Command::SetHealth { key, health, now_ms }),
    ]
}

fn apply_all(registry: &mut Registry, log: &[Command]) -> Vec<Applied> {
    log.iter().map(|c| registry.apply(c)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn two_replicas_applying_the_same_log_end_identical(log in prop::collection::vec(command_strategy(), 0..80)) {
        let mut a = Registry::new();
        let mut b = Registry::new();
        let ra = apply_all(&mut a, &log);
        let rb = apply_all(&mut b, &log);
        prop_assert_eq!(ra, rb);
        prop_assert_eq!(a.digest(), b.digest());
        // A replica rebuilt from a snapshot is the same state too.
        let c = Registry::from_snapshot(a.to_snapshot());
        prop_assert_eq!(c.digest(), a.digest());
        prop_assert_eq!(c.instance_count(), a.instance_count());
    }

    #[test]
    fn revisions_strictly_increase_by_one_per_event(log in prop::collection::vec(command_strategy(), 0..80)) {
        let mut r = Registry::new();
        let mut last = 0;
        for applied in apply_all(&mut r, &log) {
            for event in &applied.events {
                prop_assert_eq!(event.revision, last + 1);
                last = event.revision;
            }
            prop_assert_eq!(applied.result.revision, last);
            if matches!(applied.result.outcome, Outcome::Rejected(_)) {
                prop_assert!(applied.events.is_empty());
            }
        }
    }

    #[test]
    fn expiring_or_revoking_a_lease_removes_exactly_its_instances(
        log in prop::collection::vec(command_strategy(), 0..80),
        lease in 1u64..6,
        revoke in any::<bool>(),
    ) {
        let mut r = Registry::new();
        apply_all(&mut r, &log);
        let attached: BTreeSet<InstanceKey> = r.lease_instances(lease).into_iter().collect();
        let before: BTreeSet<InstanceKey> = r.to_snapshot().instances.iter().map(|i| i.key()).collect();
        let existed = r.lease(lease).is_some();
        let command = if revoke {
            Command::RevokeLease { lease_id: lease, now_ms: 3_000_000 }
        } else {
            Command::ExpireLeases { lease_ids: vec![lease], now_ms: 3_000_000 }
        };
        let applied = r.apply(&command);
        let after: BTreeSet<InstanceKey> = r.to_snapshot().instances.iter().map(|i| i.key()).collect();
        let removed: BTreeSet<InstanceKey> = before.difference(&after).cloned().collect();
        prop_assert_eq!(&removed, &attached);
        let deleted: BTreeSet<InstanceKey> = applied.events.iter().map(|e: &Event| match &e.kind {
            EventKind::Delete { key, .. } => key.clone(),
            EventKind::Put(_) => panic!("expiry must not put"),
        }).collect();
        prop_assert_eq!(deleted, attached);
        prop_assert!(r.lease(lease).is_none());
        if !existed && revoke {
            prop_assert!(matches!(applied.result.outcome, Outcome::Rejected(_)));
        }
        for i in r.to_snapshot().instances {
            prop_assert_ne!(i.lease_id, Some(lease));
        }
    }
}

#[test]
fn registering_under_an_unknown_lease_is_rejected_and_changes_nothing() {
    let mut r = Registry::new();
    let applied = r.apply(&Command::Register {
        spec: InstanceSpec {
            service: "web".into(),
            instance_id: "w1".into(),
            address: "h".into(),
            port: 80,
            lease_id: Some(7),
            ..Default::default()
        },
        grant_ttl_ms: None,
        now_ms: 1,
    });
    assert!(matches!(
        applied.result.outcome,
        Outcome::Rejected(muster_core::Rejection::LeaseNotFound(7))
    ));
    assert_eq!(r.revision(), 0);
    assert_eq!(r.instance_count(), 0);
}

#[test]
fn reregistering_keeps_create_revision_and_moves_lease_membership() {
    let mut r = Registry::new();
    r.apply(&Command::GrantLease {
        lease_id: 0,
        ttl_ms: 5_000,
        now_ms: 1,
    });
    r.apply(&Command::GrantLease {
        lease_id: 0,
        ttl_ms: 5_000,
        now_ms: 1,
    });
    let spec = |lease| InstanceSpec {
        service: "web".into(),
        instance_id: "w1".into(),
        address: "h".into(),
        port: 80,
        lease_id: Some(lease),
        ..Default::default()
    };
    r.apply(&Command::Register {
        spec: spec(1),
        grant_ttl_ms: None,
        now_ms: 2,
    });
    let applied = r.apply(&Command::Register {
        spec: spec(2),
        grant_ttl_ms: None,
        now_ms: 3,
    });
    let Outcome::Registered(i) = applied.result.outcome else {
        panic!()
    };
    assert_eq!((i.create_revision, i.mod_revision, i.registered_at_ms), (1, 2, 2));
    assert!(r.lease_instances(1).is_empty());
    assert_eq!(r.lease_instances(2).len(), 1);
}
