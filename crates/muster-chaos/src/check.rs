//! The invariants checked after every round, on its recorded history alone (so a
//! saved history can be checked again):
//!
//! 1. linearizability of every register / deregister / revoke / linearizable read,
//!    per key (see [`crate::model`]);
//! 2. no acknowledged write lost or reverted: the final state on every node holds the
//!    last acknowledged write of each key that no other write overlapped;
//! 3. every watch stream in revision order with no gap (or a `Reset`), and the state
//!    rebuilt from it equal to every linearizable read of the same revision, to the
//!    other watchers' at the same revision, and to the final state;
//! 4. after the heal, one agreed leader and every node caught up with what the
//!    cluster had applied before the heal within the recovery bound, and equal
//!    digests once the load stops;
//! 5. no lease expired while its owner kept it alive: an expiry observed less than
//!    one TTL (divided by the fastest clock rate) after a successful renewal was
//!    sent is an anomaly.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use muster_proto::v1 as pb;
use muster_testkit::linearizability::{check, Operation, Verdict};
use serde::{Deserialize, Serialize};

use crate::history::{Micros, Request, Response, RoundHistory, Seen, WatchItem};
use crate::model::{Held, KeyInput, KeyOperation, KeyOutput, RegistryModel, NEVER};

/// Search budget per key.
pub const MAX_STEPS: u64 = 5_000_000;
/// The recovery bound: one leader, and every node caught up with the revision
/// reached before the heal, this long after the heal.
pub const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// One violated invariant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Anomaly {
    /// Which invariant.
    pub invariant: String,
    /// What exactly.
    pub detail: String,
}

/// What the checks found in one round.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Findings {
    /// Client operations (reads, writes, lease calls).
    pub ops: usize,
    /// Writes acknowledged (register, deregister, revoke answered OK).
    pub acked_writes: usize,
    /// Operations with no definite answer.
    pub ambiguous: usize,
    /// Acknowledged writes missing from the final state.
    pub lost_writes: usize,
    /// Watch messages received.
    pub watch_messages: usize,
    /// Resets among them.
    pub watch_resets: usize,
    /// Keys whose linearizability search gave up (not an anomaly, but not proven).
    pub unchecked_keys: Vec<String>,
    /// Keep-alives answered.
    pub keepalives: usize,
    /// Linearizable reads answered by followers under a read lease.
    #[serde(default)]
    pub follower_lease_reads: u64,
    /// Linearizable reads that saw an instance in maintenance.
    #[serde(default)]
    pub maintenance_reads: usize,
    /// Elections the round cost: how far the highest term moved from just before the
    /// fault to the end. Not an anomaly, but a fault that leaves a quorum with its
    /// leader (a follower killed, paused or cut off) should cost none.
    #[serde(default)]
    pub elections: u64,
    /// Violations.
    pub anomalies: Vec<Anomaly>,
}

impl Findings {
    fn anomaly(&mut self, invariant: &str, detail: String) {
        self.anomalies.push(Anomaly {
            invariant: invariant.into(),
            detail,
        });
    }
}

/// Runs every check on `h`.
pub fn check_round(h: &RoundHistory) -> Findings {
    let mut f = Findings {
        ops: h.ops.len(),
        follower_lease_reads: h.follower_lease_reads,
        elections: h.terms.1.saturating_sub(h.terms.0),
        ..Default::default()
    };
    for op in &h.ops {
        match (&op.request, &op.response) {
            (
                Request::Register { .. } | Request::Deregister { .. } | Request::SetMaintenance { .. },
                Response::Ok { .. },
            )
            | (Request::Revoke { .. }, Response::Revoked { .. }) => f.acked_writes += 1,
            (_, Response::Unknown { .. }) => f.ambiguous += 1,
            (Request::Read, Response::Read { instances, .. }) if instances.iter().any(|i| i.maintenance) => {
                f.maintenance_reads += 1
            }
            _ => {}
        }
    }
    linearizability(h, &mut f);
    lost_writes(h, &mut f);
    let expiries = watches(h, &mut f);
    convergence(h, &mut f);
    leases(h, &expiries, &mut f);
    f
}

/// The per-key histories of a round (final reads appended as reads after
/// everything else).
pub fn key_histories(h: &RoundHistory) -> BTreeMap<String, Vec<KeyOperation>> {
    let mut per_key: BTreeMap<String, Vec<KeyOperation>> = h.keys.iter().map(|k| (k.clone(), Vec::new())).collect();
    let mut push = |key: &str, client: usize, call: Micros, ret: Micros, input: KeyInput, output: KeyOutput| {
        let ret = if output == KeyOutput::Unknown { NEVER } else { ret };
        per_key.entry(key.to_string()).or_default().push(Operation {
            client,
            call,
            ret,
            input,
            output,
        });
    };
    let mut end = 0;
    for op in &h.ops {
        end = end.max(op.ret);
        let output = match &op.response {
            Response::Ok { .. } => KeyOutput::Ok,
            Response::NotFound => KeyOutput::NotFound,
            Response::Unknown { .. } => KeyOutput::Unknown,
            Response::Revoked { removed } => KeyOutput::Revoked { removed: *removed > 0 },
            Response::Read { .. } => KeyOutput::Ok,
            Response::Failed { .. } => continue,
        };
        match &op.request {
            Request::Register { key, value, leased, .. } => {
                // A registration under a lease that is gone changes nothing.
                if output == KeyOutput::NotFound {
                    continue;
                }
                push(
                    key,
                    op.client,
                    op.call,
                    op.ret,
                    KeyInput::Register {
                        value: value.clone(),
                        leased: *leased,
                    },
                    output,
                )
            }
            Request::Deregister { key } => push(key, op.client, op.call, op.ret, KeyInput::Deregister, output),
            Request::Revoke { key, .. } => push(key, op.client, op.call, op.ret, KeyInput::Revoke, output),
            Request::SetMaintenance { key, enable } => push(
                key,
                op.client,
                op.call,
                op.ret,
                KeyInput::SetMaintenance(*enable),
                output,
            ),
            Request::GrantLease => {}
            Request::Read => {
                let Response::Read { instances, .. } = &op.response else {
                    continue;
                };
                for key in &h.keys {
                    push(key, op.client, op.call, op.ret, KeyInput::Read, read_of(instances, key));
                }
            }
        }
    }
    // The final reads happened after every client stopped.
    for (n, (node, instances, _)) in h.final_reads.iter().enumerate() {
        let t = end + 1 + n as u64 * 2;
        for key in &h.keys {
            push(
                key,
                1000 + *node as usize,
                t,
                t + 1,
                KeyInput::Read,
                read_of(instances, key),
            );
        }
    }
    per_key
}

/// What a read of `instances` saw of `key`.
fn read_of(instances: &[Seen], key: &str) -> KeyOutput {
    KeyOutput::Read(instances.iter().find(|i| i.key == key).map(|i| Held {
        value: i.value.clone(),
        maintenance: i.maintenance,
    }))
}

fn linearizability(h: &RoundHistory, f: &mut Findings) {
    for (key, ops) in key_histories(h) {
        match check(&RegistryModel, &ops, MAX_STEPS) {
            Verdict::Linearizable => {}
            Verdict::Unknown { .. } => f.unchecked_keys.push(key),
            Verdict::NotLinearizable { longest } => {
                let done: BTreeSet<usize> = longest.iter().copied().collect();
                // The first operation (by return) that could not be placed.
                let mut stuck: Vec<&KeyOperation> = ops
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !done.contains(i))
                    .map(|(_, o)| o)
                    .collect();
                stuck.sort_by_key(|o| o.ret);
                let around: Vec<String> = stuck.iter().take(3).map(|o| describe(o)).collect();
                let last_state = longest.last().map(|i| describe(&ops[*i])).unwrap_or_default();
                f.anomaly(
                    "linearizable",
                    format!(
                        "key {key}: no linearization ({} of {} ops placed; last placed {last_state}; cannot place {})",
                        longest.len(),
                        ops.len(),
                        around.join(" / ")
                    ),
                );
            }
        }
    }
}

fn describe(o: &KeyOperation) -> String {
    let ret = if o.ret == NEVER {
        "∞".to_string()
    } else {
        format!("{:.3}s", o.ret as f64 / 1e6)
    };
    format!(
        "client {} [{:.3}s..{ret}] {:?} -> {:?}",
        o.client,
        o.call as f64 / 1e6,
        o.input,
        o.output
    )
}

fn lost_writes(h: &RoundHistory, f: &mut Findings) {
    if h.final_reads.is_empty() {
        return;
    }
    let per_key = key_histories(h);
    for (key, ops) in per_key {
        // The writes that set the key's value (maintenance leaves it as it is).
        let writes: Vec<&KeyOperation> = ops
            .iter()
            .filter(|o| !matches!(o.input, KeyInput::Read | KeyInput::SetMaintenance(_)))
            .collect();
        if writes
            .iter()
            .any(|o| matches!(o.input, KeyInput::Register { leased: true, .. } | KeyInput::Revoke))
        {
            continue; // leased keys may vanish
        }
        // The acknowledged write every other write finished before.
        let last = writes.iter().find(|w| {
            w.output != KeyOutput::Unknown
                && writes
                    .iter()
                    .all(|o| std::ptr::eq(*o, **w) || (o.ret != NEVER && o.ret < w.call))
        });
        let Some(last) = last else { continue };
        let expected = match &last.input {
            KeyInput::Register { value, .. } => Some(value.clone()),
            _ => None,
        };
        for (node, instances, _) in &h.final_reads {
            let found = instances.iter().find(|i| i.key == key).map(|i| i.value.clone());
            if found != expected {
                f.lost_writes += 1;
                f.anomaly(
                    "no acknowledged write lost",
                    format!(
                        "key {key}: last acknowledged write {} but node {node} holds {found:?}",
                        describe(last)
                    ),
                );
            }
        }
    }
}

fn state_hash(state: &BTreeMap<String, Seen>) -> u64 {
    let mut hasher = DefaultHasher::new();
    for s in state.values() {
        (&s.key, &s.value, s.mod_revision, s.lease_id, s.maintenance).hash(&mut hasher);
    }
    hasher.finish()
}

fn as_state(instances: &[Seen]) -> BTreeMap<String, Seen> {
    instances.iter().map(|i| (i.key.clone(), i.clone())).collect()
}

/// Lease expiries observed on watches: `(lease, earliest arrival)`.
type Expiries = BTreeMap<u64, Micros>;

fn watches(h: &RoundHistory, f: &mut Findings) -> Expiries {
    let mut expiries = Expiries::new();
    // revision -> (state hash, watcher) from every watcher.
    let mut at_revision: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
    let mut finals: Vec<(usize, u64, BTreeMap<String, Seen>)> = Vec::new();
    for (w, records) in h.watches.iter().enumerate() {
        let mut state: BTreeMap<String, Seen> = BTreeMap::new();
        let mut last = 0u64;
        let mut node = 0u64;
        let mut record_state = |rev: u64, state: &BTreeMap<String, Seen>, f: &mut Findings| {
            let hash = state_hash(state);
            match at_revision.get(&rev) {
                Some((other, ow)) if *other != hash => f.anomaly(
                    "watch",
                    format!("watchers {ow} and {w} rebuilt different states at revision {rev}"),
                ),
                Some(_) => {}
                None => {
                    at_revision.insert(rev, (hash, w));
                }
            }
        };
        for r in records {
            f.watch_messages += 1;
            match &r.item {
                WatchItem::Connect { node: n, start } => {
                    node = *n;
                    if *start == 1 {
                        // Starting over, as a new client.
                        state.clear();
                        last = 0;
                    } else if *start != last + 1 {
                        f.anomaly(
                            "watch",
                            format!("watcher {w} resumed at {start}, expected {}", last + 1),
                        );
                    }
                }
                WatchItem::Disconnect { .. } => {}
                WatchItem::Put { revision, instance } => {
                    if *revision != last + 1 {
                        f.anomaly(
                            "watch",
                            format!(
                                "watcher {w} on node {node}: put at revision {revision} after {last} (gap or reorder)"
                            ),
                        );
                    }
                    if instance.mod_revision != *revision {
                        f.anomaly(
                            "watch",
                            format!(
                                "watcher {w}: put of {} at revision {revision} carries mod_revision {}",
                                instance.key, instance.mod_revision
                            ),
                        );
                    }
                    state.insert(instance.key.clone(), instance.clone());
                    last = last.max(*revision);
                    record_state(*revision, &state, f);
                }
                WatchItem::Delete { revision, key, reason } => {
                    if *revision != last + 1 {
                        f.anomaly(
                            "watch",
                            format!("watcher {w} on node {node}: delete at revision {revision} after {last} (gap or reorder)"),
                        );
                    }
                    match state.remove(key) {
                        Some(gone) => {
                            if *reason == pb::DeleteReason::LeaseExpired as i32 && gone.lease_id != 0 {
                                let e = expiries.entry(gone.lease_id).or_insert(r.at);
                                *e = (*e).min(r.at);
                            }
                        }
                        None => f.anomaly(
                            "watch",
                            format!(
                                "watcher {w}: delete of {key} at revision {revision}, which its state does not hold"
                            ),
                        ),
                    }
                    last = last.max(*revision);
                    record_state(*revision, &state, f);
                }
                WatchItem::Reset { revision, instances } => {
                    f.watch_resets += 1;
                    if *revision < last {
                        f.anomaly(
                            "watch",
                            format!("watcher {w} on node {node}: reset to revision {revision} after {last}"),
                        );
                    }
                    state = as_state(instances);
                    last = last.max(*revision);
                    record_state(*revision, &state, f);
                }
                WatchItem::Progress { revision } => {
                    if *revision > last {
                        f.anomaly(
                            "watch",
                            format!(
                                "watcher {w} on node {node}: progress at {revision} but events after {last} never came"
                            ),
                        );
                    }
                }
            }
        }
        finals.push((w, last, state));
    }
    // Every linearizable read of a revision the watches rebuilt must agree with them.
    for op in &h.ops {
        if let Response::Read {
            instances,
            service_revision,
            ..
        } = &op.response
        {
            if *service_revision == 0 {
                continue;
            }
            if let Some((hash, w)) = at_revision.get(service_revision) {
                if *hash != state_hash(&as_state(instances)) {
                    f.anomaly(
                        "watch",
                        format!(
                            "watcher {w}'s state at revision {service_revision} differs from a linearizable read of it on node {} at {:.3}s",
                            op.node,
                            op.call as f64 / 1e6
                        ),
                    );
                }
            }
        }
    }
    // And every watcher ends where the cluster ended.
    if let Some((node, instances, revision)) = h.final_reads.first() {
        let end = as_state(instances);
        for (w, last, state) in &finals {
            if *last < *revision {
                f.anomaly(
                    "watch",
                    format!("watcher {w} stopped at revision {last}, the cluster is at {revision}"),
                );
            } else if state_hash(state) != state_hash(&end) {
                f.anomaly(
                    "watch",
                    format!("watcher {w}'s final state differs from node {node}'s at revision {revision}"),
                );
            }
        }
    }
    expiries
}

fn convergence(h: &RoundHistory, f: &mut Findings) {
    match h.recovery {
        Some(t) if Duration::from_micros(t) <= RECOVERY_BOUND => {}
        Some(t) => f.anomaly(
            "recovery",
            format!(
                "one leader with every node caught up only {:.1}s after the heal (bound {RECOVERY_BOUND:?})",
                t as f64 / 1e6
            ),
        ),
        None => f.anomaly(
            "recovery",
            format!(
                "no single leader with every node caught up and equal digests after the heal: {:?}",
                h.final_status
            ),
        ),
    }
    let states: BTreeSet<&Vec<Seen>> = h.final_reads.iter().map(|(_, i, _)| i).collect();
    if states.len() > 1 {
        f.anomaly("recovery", "nodes hold different instances after recovery".into());
    }
}

fn leases(h: &RoundHistory, watch_expiries: &Expiries, f: &mut Findings) {
    let rate = if h.max_clock_rate > 0.0 { h.max_clock_rate } else { 1.0 };
    for lease in &h.leases {
        let ttl_eff = (lease.ttl_ms as f64 * 1000.0 / rate) as u64;
        f.keepalives += lease.keepalives.iter().filter(|k| k.ttl_ms.is_some()).count();
        // When the lease was observed gone while the owner still held it.
        let mut observed: Vec<(Micros, &str)> = Vec::new();
        if let Some(at) = watch_expiries.get(&lease.lease_id) {
            observed.push((*at, "a watch saw it expire"));
        }
        if let Some(k) = lease.keepalives.iter().find(|k| k.ttl_ms == Some(0)) {
            observed.push((k.ret, "a keep-alive found it gone"));
        }
        for (at, how) in observed {
            if lease.released_at.is_some_and(|r| r <= at) {
                continue; // the owner had let it go
            }
            let renewed = lease
                .keepalives
                .iter()
                .filter(|k| k.ttl_ms.is_some_and(|t| t > 0) && k.call <= at)
                .map(|k| k.call)
                .max()
                .unwrap_or(lease.granted)
                .max(lease.granted);
            if at.saturating_sub(renewed) < ttl_eff {
                f.anomaly(
                    "lease kept alive",
                    format!(
                        "lease {} ({}): {how} at {:.3}s, {} ms after a renewal sent at {:.3}s succeeded (TTL {} ms, clock rate x{rate})",
                        lease.lease_id,
                        lease.key,
                        at as f64 / 1e6,
                        (at - renewed) / 1000,
                        renewed as f64 / 1e6,
                        lease.ttl_ms
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{KeepAliveRecord, LeaseRecord, OpRecord, WatchRecord};

    fn seen(key: &str, value: &str, rev: u64) -> Seen {
        Seen {
            key: key.into(),
            value: value.into(),
            mod_revision: rev,
            lease_id: 0,
            maintenance: false,
        }
    }

    fn base() -> RoundHistory {
        RoundHistory {
            keys: vec!["k0".into()],
            nodes: vec![1, 2, 3],
            recovery: Some(1_000_000),
            max_clock_rate: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn a_round_counts_the_elections_it_cost_from_the_terms_around_it() {
        for (terms, elections) in [((3, 3), 0), ((3, 5), 2), ((0, 1), 1), ((4, 2), 0)] {
            let h = RoundHistory { terms, ..base() };
            let f = check_round(&h);
            assert_eq!(f.elections, elections, "terms {terms:?}");
            assert!(f.anomalies.is_empty(), "elections are no anomaly: {:?}", f.anomalies);
        }
    }

    fn register(call: u64, ret: u64, value: &str) -> OpRecord {
        OpRecord {
            client: 0,
            node: 1,
            call,
            ret,
            request: Request::Register {
                key: "k0".into(),
                value: value.into(),
                leased: false,
                lease_id: 0,
            },
            response: Response::Ok {
                lease_id: 0,
                revision: 1,
            },
        }
    }

    #[test]
    fn a_clean_history_has_no_anomaly() {
        let mut h = base();
        h.ops.push(register(0, 10, "a"));
        h.final_reads = vec![(1, vec![seen("k0", "a", 1)], 1)];
        h.watches = vec![vec![
            WatchRecord {
                at: 0,
                item: WatchItem::Connect { node: 1, start: 1 },
            },
            WatchRecord {
                at: 5,
                item: WatchItem::Put {
                    revision: 1,
                    instance: seen("k0", "a", 1),
                },
            },
        ]];
        let f = check_round(&h);
        assert!(f.anomalies.is_empty(), "{:?}", f.anomalies);
        assert_eq!(f.acked_writes, 1);
    }

    #[test]
    fn an_acknowledged_write_missing_at_the_end_is_lost() {
        let mut h = base();
        h.ops.push(register(0, 10, "a"));
        h.final_reads = vec![(1, vec![], 0)];
        let f = check_round(&h);
        assert_eq!(f.lost_writes, 1);
        assert!(f.anomalies.iter().any(|a| a.invariant == "linearizable"));
    }

    #[test]
    fn a_watch_gap_is_an_anomaly() {
        let mut h = base();
        h.watches = vec![vec![
            WatchRecord {
                at: 0,
                item: WatchItem::Connect { node: 1, start: 1 },
            },
            WatchRecord {
                at: 5,
                item: WatchItem::Put {
                    revision: 2,
                    instance: seen("k0", "a", 2),
                },
            },
        ]];
        let f = check_round(&h);
        assert!(
            f.anomalies.iter().any(|a| a.detail.contains("gap")),
            "{:?}",
            f.anomalies
        );
    }

    #[test]
    fn a_watch_state_that_disagrees_with_a_read_at_its_revision_is_an_anomaly() {
        let mut h = base();
        h.watches = vec![vec![WatchRecord {
            at: 5,
            item: WatchItem::Reset {
                revision: 3,
                instances: vec![seen("k0", "a", 3)],
            },
        }]];
        h.ops.push(OpRecord {
            client: 1,
            node: 2,
            call: 6,
            ret: 7,
            request: Request::Read,
            response: Response::Read {
                instances: vec![seen("k0", "b", 3)],
                service_revision: 3,
                revision: 3,
            },
        });
        let f = check_round(&h);
        assert!(
            f.anomalies
                .iter()
                .any(|a| a.detail.contains("differs from a linearizable read")),
            "{:?}",
            f.anomalies
        );
    }

    #[test]
    fn a_lease_expiring_right_after_a_renewal_is_an_anomaly_but_not_after_a_ttl() {
        let lease = |gone_at: u64| LeaseRecord {
            owner: 0,
            lease_id: 7,
            ttl_ms: 4_000,
            key: "lease-0".into(),
            granted: 0,
            released_at: None,
            keepalives: vec![
                KeepAliveRecord {
                    lease_id: 7,
                    node: 1,
                    call: 1_000_000,
                    ret: 1_001_000,
                    ttl_ms: Some(4_000),
                },
                KeepAliveRecord {
                    lease_id: 7,
                    node: 1,
                    call: gone_at - 1000,
                    ret: gone_at,
                    ttl_ms: Some(0),
                },
            ],
        };
        let mut h = base();
        h.leases = vec![lease(2_000_000)];
        assert!(check_round(&h)
            .anomalies
            .iter()
            .any(|a| a.invariant == "lease kept alive"));
        let mut h = base();
        h.leases = vec![lease(6_000_000)];
        assert!(check_round(&h).anomalies.is_empty());
    }

    #[test]
    fn no_recovery_is_an_anomaly() {
        let mut h = base();
        h.recovery = None;
        assert!(check_round(&h).anomalies.iter().any(|a| a.invariant == "recovery"));
    }
}
