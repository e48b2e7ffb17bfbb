//! Property tests of `Registry::apply`: determinism, revision order, lease semantics.

use std::collections::{BTreeMap, BTreeSet};

use muster_core::registry::{critical_too_long, Applied};
use muster_core::{
    maintenance_check_id, CheckSpec, Command, DeleteReason, Event, EventKind, Health, InstanceKey, InstanceSpec,
    Outcome, Registry, Rejection, ServiceKey,
};
use proptest::prelude::*;

fn health_strategy() -> impl Strategy<Value = Health> {
    prop::sample::select(vec![Health::Passing, Health::Warning, Health::Critical])
}

/// TTL checks: ids may repeat (rejected), TTLs may be too short (rejected).
fn check_strategy() -> impl Strategy<Value = CheckSpec> {
    (
        prop::sample::select(vec!["c0", "c1", "c2"]),
        prop::sample::select(vec![500u64, 5_000, 60_000]),
        prop::option::of(prop::sample::select(vec![1_000u64, 30_000])),
        health_strategy(),
    )
        .prop_map(|(id, ttl_ms, after, initial_status)| CheckSpec {
            id: id.into(),
            name: format!("check {id}"),
            ttl_ms,
            deregister_critical_after_ms: after,
            initial_status,
            ..Default::default()
        })
}

fn spec_strategy() -> impl Strategy<Value = InstanceSpec> {
    (
        prop::sample::select(vec!["web", "api", "db", "Bad_Name"]),
        0u8..6,
        prop::option::of(1u64..6),
        prop::sample::select(vec![0u16, 80, 8080]),
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..3),
        prop::collection::vec(check_strategy(), 0..3),
        health_strategy(),
    )
        .prop_map(|(service, n, lease, port, tags, checks, health)| InstanceSpec {
            service: service.to_string(),
            instance_id: format!("i-{n}"),
            address: "10.0.0.1".into(),
            port,
            tags: tags.into_iter().map(String::from).collect(),
            lease_id: lease,
            checks,
            health,
            ..Default::default()
        })
}

fn check_ref_strategy() -> impl Strategy<Value = (InstanceKey, String)> {
    (key_strategy(), prop::sample::select(vec!["c0", "c1", "c2", "c9"])).prop_map(|(k, c)| (k, c.to_string()))
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
        1 => Just(Command::Barrier),
        1 => (key_strategy(), health_strategy(), now.clone())
            .prop_map(|(key, health, now_ms)| Command::SetHealth { key, health, now_ms }),
        3 => (check_ref_strategy(), health_strategy(), prop::sample::select(vec!["", "ok", "TTL expired"]), now.clone())
            .prop_map(|((key, check_id), status, output, now_ms)| Command::UpdateCheck {
                key, check_id, status, output: output.into(), now_ms,
            }),
        1 => (prop::collection::vec(check_ref_strategy(), 0..4), now.clone())
            .prop_map(|(checks, now_ms)| Command::ExpireChecks { checks, now_ms }),
        1 => (prop::collection::vec(key_strategy(), 0..4), now.clone())
            .prop_map(|(keys, now_ms)| Command::EvictCritical { keys, now_ms }),
        2 => (key_strategy(), prop::sample::select(vec![Some(""), Some("deploy"), Some("disk swap"), None]), now.clone())
            .prop_map(|(key, reason, now_ms)| Command::SetMaintenance { key, reason: reason.map(String::from), now_ms }),
        1 => (key_strategy(), health_strategy(), now)
            .prop_map(|(key, status, now_ms)| Command::UpdateCheck {
                check_id: maintenance_check_id(&key.instance_id), key, status, output: String::new(), now_ms,
            }),
    ]
}

fn apply_all(registry: &mut Registry, log: &[Command]) -> Vec<Applied> {
    log.iter().map(|c| registry.apply(c)).collect()
}

/// `log` cut into consecutive batches of the sizes in `cut`, taken in turn.
fn cut_into_batches<'a>(log: &'a [Command], cut: &[usize]) -> Vec<&'a [Command]> {
    let mut batches = Vec::new();
    let mut rest = log;
    for size in cut.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (batch, tail) = rest.split_at((*size).min(rest.len()));
        batches.push(batch);
        rest = tail;
    }
    batches
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
    fn a_batch_applies_exactly_as_its_commands_one_by_one(
        log in prop::collection::vec(command_strategy(), 0..80),
        cut in prop::collection::vec(1usize..12, 1..20),
    ) {
        // The same log, once entry by entry and once cut into batches.
        let mut single = Registry::new();
        let one_by_one = apply_all(&mut single, &log);
        let mut batched = Registry::new();
        let mut results = Vec::new();
        let mut events = Vec::new();
        for batch in cut_into_batches(&log, &cut) {
            let applied = batched.apply(&Command::Batch { commands: batch.to_vec() });
            let Outcome::Batch(inner) = applied.result.outcome else {
                panic!("a batch answers Outcome::Batch");
            };
            prop_assert_eq!(inner.len(), batch.len());
            prop_assert_eq!(applied.result.revision, inner.last().map_or(0, |r| r.revision));
            results.extend(inner);
            events.extend(applied.events);
        }
        prop_assert_eq!(batched.digest(), single.digest());
        prop_assert_eq!(results, one_by_one.iter().map(|a| a.result.clone()).collect::<Vec<_>>());
        prop_assert_eq!(events, one_by_one.into_iter().flat_map(|a| a.events).collect::<Vec<_>>());
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_instances_with_checks_are_exactly_those_whose_checks_are_not_empty(
        log in prop::collection::vec(command_strategy(), 0..80),
    ) {
        let mut r = Registry::new();
        for command in &log {
            r.apply(command);
            let expected: Vec<InstanceKey> = r
                .to_snapshot()
                .instances
                .iter()
                .filter(|i| !i.checks.is_empty())
                .map(|i| i.key())
                .collect();
            let listed: Vec<InstanceKey> = r.instances_with_checks().map(|i| i.key()).collect();
            prop_assert_eq!(&listed, &expected);
            let restored = Registry::from_snapshot(r.to_snapshot());
            let relisted: Vec<InstanceKey> = restored.instances_with_checks().map(|i| i.key()).collect();
            prop_assert_eq!(relisted, expected);
        }
    }

    #[test]
    fn an_instance_with_checks_is_as_healthy_as_its_worst_check(log in prop::collection::vec(command_strategy(), 0..80)) {
        let mut r = Registry::new();
        for command in &log {
            r.apply(command);
            for i in r.to_snapshot().instances {
                if let Some(worst) = i.checks.iter().map(|c| c.status).max() {
                    prop_assert_eq!(i.health, worst, "instance {}", i.key());
                }
            }
        }
    }

    #[test]
    fn a_service_index_never_moves_back_and_covers_every_change(log in prop::collection::vec(command_strategy(), 0..80)) {
        let mut r = Registry::new();
        let services: Vec<ServiceKey> = ["web", "api", "db"].iter().map(|s| ServiceKey::new("", s)).collect();
        let mut last: BTreeMap<ServiceKey, u64> = BTreeMap::new();
        for command in &log {
            let applied = r.apply(command);
            for key in &services {
                let index = r.service_index(key);
                prop_assert!(index >= last.get(key).copied().unwrap_or(0), "{:?} moved back", key);
                last.insert(key.clone(), index);
            }
            for event in &applied.events {
                let (ns, service) = event.service();
                let key = ServiceKey::new(ns, service);
                prop_assert!(r.service_index(&key) >= event.revision);
                prop_assert!(r.namespace_index(ns) >= event.revision);
            }
        }
        // A replica restored from a snapshot never reports an index below one that
        // a client may have seen from the original for a changed service.
        let restored = Registry::from_snapshot(r.to_snapshot());
        for key in &services {
            prop_assert!(restored.service_index(key) >= r.service_index(key));
        }
    }

    #[test]
    fn eviction_removes_exactly_the_instances_critical_for_too_long(
        log in prop::collection::vec(command_strategy(), 0..80),
        now_ms in 1_000u64..3_000_000,
    ) {
        let mut r = Registry::new();
        apply_all(&mut r, &log);
        let all: Vec<InstanceKey> = r.to_snapshot().instances.iter().map(|i| i.key()).collect();
        let due: BTreeSet<InstanceKey> = r
            .to_snapshot()
            .instances
            .iter()
            .filter(|i| i.checks.iter().any(|c| critical_too_long(c, now_ms)))
            .map(|i| i.key())
            .collect();
        let applied = r.apply(&Command::EvictCritical { keys: all, now_ms });
        let evicted: BTreeSet<InstanceKey> = applied.events.iter().map(|e| match &e.kind {
            EventKind::Delete { key, reason } => {
                assert_eq!(*reason, DeleteReason::HealthEvicted);
                key.clone()
            }
            EventKind::Put(_) => panic!("eviction must not put"),
        }).collect();
        prop_assert_eq!(evicted, due);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Maintenance changes nothing but itself: next to a replica that skips every
    /// `SetMaintenance`, the same instances exist with the same TTL checks, and each
    /// one's health out of maintenance is the other replica's health.
    #[test]
    fn maintenance_makes_an_instance_critical_and_gives_back_the_health_it_would_have_had(
        log in prop::collection::vec(command_strategy(), 0..80),
    ) {
        let mut with = Registry::new();
        let mut without = Registry::new();
        for command in &log {
            with.apply(command);
            if !matches!(command, Command::SetMaintenance { .. }) {
                without.apply(command);
            }
            let ours = with.to_snapshot().instances;
            let theirs = without.to_snapshot().instances;
            prop_assert_eq!(ours.len(), theirs.len());
            for (a, b) in ours.iter().zip(&theirs) {
                prop_assert_eq!(a.key(), b.key());
                prop_assert_eq!(a.health_without_maintenance(), b.health, "instance {}", a.key());
                if a.maintenance().is_some() {
                    prop_assert_eq!(a.health, Health::Critical);
                } else {
                    prop_assert_eq!(a.health, b.health);
                }
                let ttl_checks: Vec<_> = a.checks.iter().filter(|c| c.has_ttl()).cloned().collect();
                prop_assert_eq!(&ttl_checks, &b.checks);
                prop_assert_eq!(a.checks.iter().filter(|c| c.is_maintenance()).count() + b.checks.len(), a.checks.len());
            }
        }
    }
}

fn web_with_ttl_check(after: Option<u64>) -> InstanceSpec {
    InstanceSpec {
        service: "web".into(),
        instance_id: "w1".into(),
        address: "h".into(),
        port: 80,
        checks: vec![CheckSpec {
            id: "service:w1".into(),
            ttl_ms: 10_000,
            deregister_critical_after_ms: after,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn update(status: Health, output: &str, now_ms: u64) -> Command {
    Command::UpdateCheck {
        key: InstanceKey::new("", "web", "w1"),
        check_id: "service:w1".into(),
        status,
        output: output.into(),
        now_ms,
    }
}

#[test]
fn a_new_ttl_check_starts_critical_and_reregistering_keeps_its_status() {
    let mut r = Registry::new();
    let register = Command::Register {
        spec: web_with_ttl_check(None),
        grant_ttl_ms: None,
        now_ms: 1,
    };
    let Outcome::Registered(i) = r.apply(&register).result.outcome else {
        panic!()
    };
    assert_eq!((i.health, i.checks[0].status), (Health::Critical, Health::Critical));
    let Outcome::CheckUpdated(i) = r.apply(&update(Health::Passing, "fine", 2)).result.outcome else {
        panic!()
    };
    assert_eq!((i.health, i.checks[0].output.as_str()), (Health::Passing, "fine"));
    let Outcome::Registered(i) = r.apply(&register).result.outcome else {
        panic!()
    };
    assert_eq!((i.health, i.checks[0].status), (Health::Passing, Health::Passing));
}

#[test]
fn a_report_that_changes_nothing_creates_no_revision() {
    let mut r = Registry::new();
    r.apply(&Command::Register {
        spec: web_with_ttl_check(None),
        grant_ttl_ms: None,
        now_ms: 1,
    });
    let first = r.apply(&update(Health::Passing, "", 2));
    let second = r.apply(&update(Health::Passing, "", 3));
    assert_eq!(first.events.len(), 1);
    assert!(second.events.is_empty());
    assert_eq!(second.result.revision, first.result.revision);
}

#[test]
fn an_unknown_check_is_rejected() {
    let mut r = Registry::new();
    r.apply(&Command::Register {
        spec: web_with_ttl_check(None),
        grant_ttl_ms: None,
        now_ms: 1,
    });
    let mut command = update(Health::Passing, "", 2);
    if let Command::UpdateCheck { check_id, .. } = &mut command {
        *check_id = "service:w2".into();
    }
    assert!(matches!(
        r.apply(&command).result.outcome,
        Outcome::Rejected(muster_core::Rejection::CheckNotFound { .. })
    ));
}

#[test]
fn expired_checks_turn_critical_and_evict_only_after_the_deregister_delay() {
    let mut r = Registry::new();
    r.apply(&Command::Register {
        spec: web_with_ttl_check(Some(60_000)),
        grant_ttl_ms: None,
        now_ms: 1_000,
    });
    r.apply(&update(Health::Passing, "", 2_000));
    let key = InstanceKey::new("", "web", "w1");
    let expired = r.apply(&Command::ExpireChecks {
        checks: vec![(key.clone(), "service:w1".into())],
        now_ms: 12_000,
    });
    assert_eq!(expired.result.outcome, Outcome::ChecksExpired { changed: 1 });
    let i = r.instance(&key).unwrap().clone();
    assert_eq!(
        (i.health, i.checks[0].output.as_str()),
        (Health::Critical, "TTL expired")
    );
    let early = r.apply(&Command::EvictCritical {
        keys: vec![key.clone()],
        now_ms: 71_999,
    });
    assert_eq!(early.result.outcome, Outcome::Evicted { removed: 0 });
    let due = r.apply(&Command::EvictCritical {
        keys: vec![key.clone()],
        now_ms: 72_000,
    });
    assert_eq!(due.result.outcome, Outcome::Evicted { removed: 1 });
    assert!(r.instance(&key).is_none());
}

#[test]
fn setting_health_by_hand_is_refused_for_an_instance_with_checks() {
    let mut r = Registry::new();
    r.apply(&Command::Register {
        spec: web_with_ttl_check(None),
        grant_ttl_ms: None,
        now_ms: 1,
    });
    let applied = r.apply(&Command::SetHealth {
        key: InstanceKey::new("", "web", "w1"),
        health: Health::Passing,
        now_ms: 2,
    });
    assert!(matches!(applied.result.outcome, Outcome::Rejected(_)));
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

#[test]
fn nested_and_oversized_batches_are_refused_whole() {
    let mut r = Registry::new();
    let register = Command::Register {
        spec: InstanceSpec {
            service: "web".into(),
            instance_id: "w1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            ..Default::default()
        },
        grant_ttl_ms: None,
        now_ms: 1_000,
    };
    let nested = Command::Batch {
        commands: vec![
            register.clone(),
            Command::Batch {
                commands: vec![register.clone()],
            },
        ],
    };
    let applied = r.apply(&nested);
    assert!(
        matches!(&applied.result.outcome, Outcome::Rejected(Rejection::Invalid(e)) if e.field == "commands"),
        "{:?}",
        applied.result
    );
    assert!(applied.events.is_empty());
    let oversized = Command::Batch {
        commands: vec![Command::Barrier; muster_core::MAX_BATCH_COMMANDS + 1],
    };
    assert!(matches!(r.apply(&oversized).result.outcome, Outcome::Rejected(_)));
    assert_eq!(r.revision(), 0, "nothing was applied");
}

/// Commands as a follower forwards them: numbered in one of two sessions, each
/// saying that writes up to a few numbers back were answered.
fn forwarded_strategy() -> impl Strategy<Value = Command> {
    (command_strategy(), 1u64..3, 0u64..12, 0u64..4).prop_map(|(command, session, seq, back)| Command::Forwarded {
        session,
        seq,
        answered_below: seq.saturating_sub(back),
        command: Box::new(command),
    })
}

fn mixed_strategy() -> impl Strategy<Value = Command> {
    prop_oneof![2 => command_strategy(), 1 => forwarded_strategy()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn replicas_agree_on_forwarded_writes_also_in_batches_and_from_snapshots(
        log in prop::collection::vec(mixed_strategy(), 0..80),
        cut in prop::collection::vec(1usize..12, 1..20),
    ) {
        let mut a = Registry::new();
        let mut b = Registry::new();
        prop_assert_eq!(apply_all(&mut a, &log), apply_all(&mut b, &log));
        prop_assert_eq!(a.digest(), b.digest());
        let c = Registry::from_snapshot(a.to_snapshot());
        prop_assert_eq!(c.digest(), a.digest());
        prop_assert_eq!(c.forward_sessions(), a.forward_sessions());
        // Cut into batches, the same results one by one and the same state.
        let mut batched = Registry::new();
        let mut results = Vec::new();
        for batch in cut_into_batches(&log, &cut) {
            let Outcome::Batch(inner) = batched.apply(&Command::Batch { commands: batch.to_vec() }).result.outcome else {
                panic!("a batch answers Outcome::Batch");
            };
            results.extend(inner);
        }
        prop_assert_eq!(results, apply_all(&mut Registry::new(), &log).into_iter().map(|a| a.result).collect::<Vec<_>>());
        prop_assert_eq!(batched.digest(), a.digest());
    }

    #[test]
    fn a_forwarded_write_sent_again_answers_its_first_result_and_changes_nothing(
        log in prop::collection::vec(command_strategy(), 1..60),
        repeats in prop::collection::vec((any::<bool>(), 0usize..6), 1..60),
    ) {
        const WINDOW: u64 = 3;
        let numbered = |seq: usize| Command::Forwarded {
            session: 9,
            seq: seq as u64,
            answered_below: (seq as u64).saturating_sub(WINDOW),
            command: Box::new(log[seq].clone()),
        };
        let mut once = Registry::new();
        let mut again = Registry::new();
        let mut first_results = Vec::new();
        for (seq, (repeat, back)) in (0..log.len()).zip(repeats.iter().cycle()) {
            let first = once.apply(&numbered(seq));
            prop_assert_eq!(&again.apply(&numbered(seq)), &first);
            first_results.push(first.result);
            if !repeat {
                continue;
            }
            // Sent again after a later write: remembered while within the window
            // the session's latest write keeps, stale (answered) below it.
            let earlier = seq.saturating_sub(*back);
            let applied = again.apply(&numbered(earlier));
            prop_assert!(applied.events.is_empty());
            prop_assert!(applied.leases_changed.is_empty());
            if (earlier as u64) >= (seq as u64).saturating_sub(WINDOW) {
                prop_assert_eq!(&applied.result, &first_results[earlier]);
            } else {
                prop_assert_eq!(applied.result.outcome, Outcome::Nothing);
            }
            prop_assert_eq!(again.digest(), once.digest());
        }
        prop_assert_eq!(again.digest(), once.digest());
    }
}

#[test]
fn a_forwarded_write_holds_one_command() {
    let mut r = Registry::new();
    for (seq, inner) in [
        Command::Batch {
            commands: vec![Command::Barrier],
        },
        Command::Forwarded {
            session: 1,
            seq: 0,
            answered_below: 0,
            command: Box::new(Command::Barrier),
        },
    ]
    .into_iter()
    .enumerate()
    {
        let applied = r.apply(&Command::Forwarded {
            session: 1,
            seq: 5 + seq as u64,
            answered_below: 0,
            command: Box::new(inner),
        });
        assert!(
            matches!(&applied.result.outcome, Outcome::Rejected(Rejection::Invalid(e)) if e.field == "command"),
            "{applied:?}"
        );
    }
}

fn web_without_checks(health: Health) -> Command {
    Command::Register {
        spec: InstanceSpec {
            service: "web".into(),
            instance_id: "w1".into(),
            address: "h".into(),
            port: 80,
            health,
            ..Default::default()
        },
        grant_ttl_ms: None,
        now_ms: 1,
    }
}

fn maintenance(reason: Option<&str>, now_ms: u64) -> Command {
    Command::SetMaintenance {
        key: InstanceKey::new("", "web", "w1"),
        reason: reason.map(String::from),
        now_ms,
    }
}

fn maintenance_outcome(applied: &Applied) -> std::sync::Arc<muster_core::Instance> {
    match &applied.result.outcome {
        Outcome::MaintenanceSet(i) => i.clone(),
        other => panic!("expected MaintenanceSet, got {other:?}"),
    }
}

#[test]
fn maintenance_turns_an_instance_critical_and_ending_it_gives_its_own_health_back() {
    let mut r = Registry::new();
    r.apply(&web_without_checks(Health::Warning));
    let on = r.apply(&maintenance(Some("disk swap"), 5));
    let i = maintenance_outcome(&on);
    assert_eq!(i.health, Health::Critical);
    let m = i.maintenance().expect("in maintenance");
    assert_eq!(m.id, "_service_maintenance:w1");
    assert_eq!(m.notes, "disk swap");
    assert_eq!(m.status_since_ms, 5);
    assert_eq!(i.health_without_maintenance(), Health::Warning);
    assert_eq!(on.events.len(), 1, "one Put tells watchers");

    // Enabling again with the same reason changes nothing; a new reason keeps the start.
    let again = r.apply(&maintenance(Some("disk swap"), 6));
    assert!(again.events.is_empty());
    assert_eq!(again.result.revision, on.result.revision);
    let reworded = maintenance_outcome(&r.apply(&maintenance(Some("disk swap, slot 3"), 7)));
    assert_eq!(reworded.maintenance().unwrap().status_since_ms, 5);

    let off = maintenance_outcome(&r.apply(&maintenance(None, 8)));
    assert_eq!(off.health, Health::Warning);
    assert!(off.checks.is_empty());
    assert!(
        r.apply(&maintenance(None, 9)).events.is_empty(),
        "ending it twice changes nothing"
    );
}

#[test]
fn maintenance_without_a_reason_gets_the_default_note() {
    let mut r = Registry::new();
    r.apply(&web_without_checks(Health::Passing));
    let i = maintenance_outcome(&r.apply(&maintenance(Some(""), 2)));
    assert_eq!(
        i.maintenance().unwrap().notes,
        muster_core::types::MAINTENANCE_DEFAULT_REASON
    );
}

#[test]
fn in_maintenance_setting_health_changes_what_comes_back_and_reregistering_keeps_it() {
    let mut r = Registry::new();
    r.apply(&web_without_checks(Health::Passing));
    r.apply(&maintenance(Some("deploy"), 2));
    let set = r.apply(&Command::SetHealth {
        key: InstanceKey::new("", "web", "w1"),
        health: Health::Critical,
        now_ms: 3,
    });
    let Outcome::HealthSet(i) = &set.result.outcome else {
        panic!("{:?}", set.result.outcome)
    };
    assert_eq!(i.health, Health::Critical);
    assert_eq!(i.health_without_maintenance(), Health::Critical);

    // Re-registering with a TTL check keeps maintenance; ending it shows the check.
    let Outcome::Registered(i) = r
        .apply(&Command::Register {
            spec: web_with_ttl_check(None),
            grant_ttl_ms: None,
            now_ms: 4,
        })
        .result
        .outcome
    else {
        panic!("registration refused")
    };
    assert_eq!(i.maintenance().unwrap().notes, "deploy");
    assert_eq!(i.checks.len(), 2);
    let passed = r.apply(&update(Health::Passing, "ok", 5));
    let Outcome::CheckUpdated(i) = &passed.result.outcome else {
        panic!("{:?}", passed.result.outcome)
    };
    assert_eq!(i.health, Health::Critical, "still in maintenance");
    assert_eq!(i.health_without_maintenance(), Health::Passing);
    let off = maintenance_outcome(&r.apply(&maintenance(None, 6)));
    assert_eq!(off.health, Health::Passing);
    assert_eq!(off.checks.len(), 1);
}

#[test]
fn the_maintenance_check_takes_no_reports_and_its_id_is_not_for_registered_checks() {
    let mut r = Registry::new();
    r.apply(&web_without_checks(Health::Passing));
    r.apply(&maintenance(Some("deploy"), 2));
    let report = r.apply(&Command::UpdateCheck {
        key: InstanceKey::new("", "web", "w1"),
        check_id: "_service_maintenance:w1".into(),
        status: Health::Passing,
        output: String::new(),
        now_ms: 3,
    });
    let Outcome::Rejected(Rejection::Invalid(e)) = &report.result.outcome else {
        panic!("{:?}", report.result.outcome)
    };
    assert_eq!(e.field, "check_id");
    assert!(report.events.is_empty());

    let mut spec = web_with_ttl_check(None);
    spec.checks[0].id = "_service_maintenance:w1".into();
    let register = r.apply(&Command::Register {
        spec: spec.clone(),
        grant_ttl_ms: None,
        now_ms: 4,
    });
    let Outcome::Rejected(Rejection::Invalid(e)) = &register.result.outcome else {
        panic!("{:?}", register.result.outcome)
    };
    assert_eq!(e.field, "checks[0].id");

    // Out of maintenance such a check registers, and then maintenance is refused.
    r.apply(&maintenance(None, 5));
    assert!(matches!(
        r.apply(&Command::Register {
            spec,
            grant_ttl_ms: None,
            now_ms: 6
        })
        .result
        .outcome,
        Outcome::Registered(_)
    ));
    let refused = r.apply(&maintenance(Some("deploy"), 7));
    let Outcome::Rejected(Rejection::Invalid(e)) = &refused.result.outcome else {
        panic!("{:?}", refused.result.outcome)
    };
    assert_eq!(e.field, "instance_id");
}

#[test]
fn maintenance_of_an_unknown_instance_or_with_an_overlong_reason_is_refused() {
    let mut r = Registry::new();
    assert!(matches!(
        r.apply(&maintenance(Some("x"), 1)).result.outcome,
        Outcome::Rejected(Rejection::InstanceNotFound(_))
    ));
    r.apply(&web_without_checks(Health::Passing));
    let long = "x".repeat(1025);
    let applied = r.apply(&maintenance(Some(&long), 2));
    let Outcome::Rejected(Rejection::Invalid(e)) = &applied.result.outcome else {
        panic!("{:?}", applied.result.outcome)
    };
    assert_eq!(e.field, "reason");
}
