//! Fuzz-style test of `Registry::apply` on long arbitrary command sequences (stable
//! Rust, proptest): names valid and invalid, every command kind, lease ids and times
//! anywhere. Checks that apply never panics, that replicas and snapshots agree, that
//! revisions step by one per event, that the lease index matches the instances, and
//! that replaying the events alone (what a watcher sees) rebuilds the state.
//!
//! 64 cases by default so `cargo test` stays quick; `MUSTER_FUZZ_CASES=100000` runs
//! long (see the README's "Fault suite").

use std::collections::BTreeMap;
use std::sync::Arc;

use muster_core::types::CheckSpec;
use muster_core::{
    Command, EventKind, Health, Instance, InstanceKey, InstanceSpec, Outcome, Registry, RegistrySnapshot,
};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("MUSTER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["web", "api", "db", "default", "ns-2"]).prop_map(String::from),
        1 => "[a-z0-9-]{0,66}",
        1 => any::<String>(),
    ]
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0u8..8).prop_map(|n| format!("i-{n}")),
        1 => any::<String>(),
    ]
}

fn health() -> impl Strategy<Value = Health> {
    prop::sample::select(vec![Health::Passing, Health::Warning, Health::Critical])
}

fn check() -> impl Strategy<Value = CheckSpec> {
    (
        prop::sample::select(vec!["c1", "c2", "", "Bad Id"]),
        prop::sample::select(vec![0u64, 500, 5_000, 100_000_000]),
        prop::option::of(prop::sample::select(vec![0u64, 1_000, 60_000])),
        health(),
    )
        .prop_map(|(id, ttl_ms, deregister_critical_after_ms, initial_status)| CheckSpec {
            id: id.into(),
            ttl_ms,
            deregister_critical_after_ms,
            initial_status,
            ..Default::default()
        })
}

fn spec() -> impl Strategy<Value = InstanceSpec> {
    (
        (prop::sample::select(vec!["", "default", "other", "Bad"]), name(), id()),
        (
            prop::sample::select(vec!["10.0.0.1", "host.example", "", "::1"]),
            any::<u16>(),
        ),
        prop::collection::vec(name(), 0..4),
        prop::collection::btree_map(name(), ".{0,20}", 0..3),
        (any::<u32>(), health(), prop::option::of(0u64..8)),
        prop::collection::vec(check(), 0..3),
    )
        .prop_map(
            |(
                (namespace, service, instance_id),
                (address, port),
                tags,
                metadata,
                (weight, health, lease_id),
                checks,
            )| {
                InstanceSpec {
                    namespace: namespace.into(),
                    service,
                    instance_id,
                    address: address.into(),
                    port,
                    tags,
                    metadata,
                    weight,
                    health,
                    lease_id,
                    checks,
                    ..Default::default()
                }
            },
        )
}

fn key() -> impl Strategy<Value = InstanceKey> {
    (prop::sample::select(vec!["", "default", "other"]), name(), id())
        .prop_map(|(ns, s, i)| InstanceKey::new(ns, &s, &i))
}

fn single_command() -> impl Strategy<Value = Command> {
    let now = prop_oneof![Just(0u64), 1u64..10_000_000, Just(u64::MAX)];
    let lease = prop_oneof![0u64..8, Just(u64::MAX)];
    let ttl = prop_oneof![Just(0u64), 999u64..1_001, Just(5_000u64), Just(u64::MAX)];
    prop_oneof![
        6 => (spec(), now.clone()).prop_map(|(spec, now_ms)| Command::Register { spec, grant_ttl_ms: None, now_ms }),
        2 => (spec(), ttl.clone(), now.clone()).prop_map(|(spec, t, now_ms)| Command::Register { spec, grant_ttl_ms: Some(t), now_ms }),
        3 => (key(), now.clone()).prop_map(|(key, now_ms)| Command::Deregister { key, now_ms }),
        2 => (lease.clone(), ttl, now.clone()).prop_map(|(lease_id, ttl_ms, now_ms)| Command::GrantLease { lease_id, ttl_ms, now_ms }),
        1 => (lease.clone(), now.clone()).prop_map(|(lease_id, now_ms)| Command::RevokeLease { lease_id, now_ms }),
        1 => (prop::collection::vec(lease.clone(), 0..4), now.clone())
            .prop_map(|(lease_ids, now_ms)| Command::ExpireLeases { lease_ids, now_ms }),
        1 => prop::collection::vec((lease, prop::option::of(any::<u64>())), 0..4)
            .prop_map(|remaining| Command::CheckpointLeases { remaining }),
        1 => (key(), health(), now.clone()).prop_map(|(key, health, now_ms)| Command::SetHealth { key, health, now_ms }),
        1 => (key(), prop::sample::select(vec!["c1", "c2", "x"]), health(), ".{0,10}", now.clone())
            .prop_map(|(key, c, status, output, now_ms)| Command::UpdateCheck { key, check_id: c.into(), status, output, now_ms }),
        1 => (prop::collection::vec((key(), prop::sample::select(vec!["c1", "c2"])), 0..3), now.clone())
            .prop_map(|(checks, now_ms)| Command::ExpireChecks {
                checks: checks.into_iter().map(|(k, c)| (k, c.to_string())).collect(),
                now_ms,
            }),
        1 => (prop::collection::vec(key(), 0..3), now.clone())
            .prop_map(|(keys, now_ms)| Command::EvictCritical { keys, now_ms }),
        1 => (key(), prop::option::of(".{0,10}|.{1020,1030}"), now)
            .prop_map(|(key, reason, now_ms)| Command::SetMaintenance { key, reason, now_ms }),
    ]
}

/// Single commands, and now and then a batch of them (as the leader proposes
/// concurrent writes), or a batch holding a batch (refused whole), or a forwarded
/// write, numbered in a session with any bounds, sometimes holding a batch
/// (refused).
fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        12 => single_command(),
        2 => (single_command(), 0u64..3, 0u64..8, 0u64..8).prop_map(|(command, session, seq, answered_below)| {
            Command::Forwarded { session, seq, answered_below, command: Box::new(command) }
        }),
        1 => prop::collection::vec(single_command(), 0..3).prop_map(|commands| Command::Forwarded {
            session: 0,
            seq: 0,
            answered_below: 0,
            command: Box::new(Command::Batch { commands }),
        }),
        2 => prop::collection::vec(single_command(), 0..8).prop_map(|commands| Command::Batch { commands }),
        1 => prop::collection::vec(single_command(), 0..3).prop_map(|inner| Command::Batch {
            commands: vec![Command::Batch { commands: inner }],
        }),
    ]
}

fn instances(snapshot: &RegistrySnapshot) -> BTreeMap<InstanceKey, Instance> {
    snapshot.instances.iter().map(|i| (i.key(), (**i).clone())).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn apply_survives_arbitrary_command_sequences(log in prop::collection::vec(command(), 0..200)) {
        let mut a = Registry::new();
        let mut b = Registry::new();
        // What a watcher holds: the state rebuilt from events alone.
        let mut mirror: BTreeMap<InstanceKey, Arc<Instance>> = BTreeMap::new();
        let mut last = 0;
        for command in &log {
            let applied = a.apply(command);
            prop_assert_eq!(&applied, &b.apply(command));
            if matches!(applied.result.outcome, Outcome::Rejected(_)) {
                prop_assert!(applied.events.is_empty());
            }
            for event in &applied.events {
                prop_assert_eq!(event.revision, last + 1);
                last = event.revision;
                match &event.kind {
                    EventKind::Put(i) => {
                        prop_assert_eq!(i.mod_revision, event.revision);
                        mirror.insert(i.key(), i.clone());
                    }
                    EventKind::Delete { key, .. } => {
                        prop_assert!(mirror.remove(key).is_some(), "delete of {} that was not there", key);
                    }
                }
            }
            prop_assert_eq!(applied.result.revision, a.revision());
        }
        prop_assert_eq!(a.digest(), b.digest());
        let snapshot = a.to_snapshot();
        let state = instances(&snapshot);
        prop_assert_eq!(state.len(), a.instance_count());
        let rebuilt: BTreeMap<InstanceKey, Instance> = mirror.iter().map(|(k, i)| (k.clone(), (**i).clone())).collect();
        prop_assert_eq!(&rebuilt, &state);
        // The lease index matches the instances.
        for i in state.values() {
            if let Some(l) = i.lease_id {
                prop_assert!(a.lease(l).is_some(), "{} attached to missing lease {}", i.key(), l);
                prop_assert!(a.lease_instances(l).contains(&i.key()));
            }
        }
        for lease in a.leases() {
            for k in a.lease_instances(lease.id) {
                prop_assert_eq!(state.get(&k).and_then(|i| i.lease_id), Some(lease.id));
            }
        }
        // Snapshots, also through serde, restore the same state.
        let json = serde_json::to_vec(&snapshot).expect("snapshot serializes");
        let back: RegistrySnapshot = serde_json::from_slice(&json).expect("snapshot deserializes");
        prop_assert_eq!(&back, &snapshot);
        let restored = Registry::from_snapshot(back);
        prop_assert_eq!(restored.digest(), a.digest());
        prop_assert_eq!(restored.revision(), a.revision());
    }
}

/// Bug found by this fuzz test: granting lease id `u64::MAX` explicitly (any client
/// may ask for an id) made the next assigned id overflow in `Registry::grant`: a
/// panic in every replica's apply in debug builds, a lease with id 0 ("no lease")
/// in release builds.
#[test]
fn granting_lease_u64_max_then_an_assigned_lease_does_not_overflow() {
    let mut r = Registry::new();
    let first = r.apply(&Command::GrantLease {
        lease_id: u64::MAX,
        ttl_ms: 5_000,
        now_ms: 1,
    });
    assert!(matches!(
        first.result.outcome,
        Outcome::LeaseGranted { lease_id: u64::MAX, .. }
    ));
    for _ in 0..3 {
        let next = r.apply(&Command::GrantLease {
            lease_id: 0,
            ttl_ms: 5_000,
            now_ms: 2,
        });
        let Outcome::LeaseGranted { lease_id, .. } = next.result.outcome else {
            panic!("{next:?}")
        };
        assert_ne!(lease_id, 0);
        assert_ne!(lease_id, u64::MAX);
    }
    assert_eq!(r.lease_count(), 4);
}
