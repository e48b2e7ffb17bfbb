//! The check keeper: TTL checks, kept the way leases are (see `leases.rs`).
//!
//! Reports on a check (pass, warn, fail) are not Raft entries unless they change
//! something: the leader keeps each check's TTL deadline in memory, and followers
//! forward reports to it. A report renews the deadline; only a report whose status
//! or output differs from the stored one is proposed (`UpdateCheck`). When a
//! deadline passes, the leader proposes `ExpireChecks` (critical, "TTL expired"),
//! and it proposes `EvictCritical` for instances with a check critical for longer
//! than its `deregister_critical_after`, judged on the leader's clock against the
//! time the status changed, which travels in the log.
//!
//! A new leader gives every TTL check its full TTL from the moment it takes over, so
//! an election never flips a passing check to critical. (Unlike leases, a dead owner
//! costs nothing here but one TTL per election: its check turns critical, it is not
//! deleted, so no checkpointing is needed.)
//!
//! The leader's check proposals go through one async lock, so a report and an
//! expiry of the same check can never be decided on a stale view of each other: the
//! expiry decision and its proposal happen under the lock, and a report that waited
//! for it sees the expiry applied and proposes its own status again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_core::registry::critical_too_long;
use muster_core::validate;
use muster_core::{ApplyResult, Command, Health, InstanceKey, Outcome, Registry, Revision};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::node::NodeCore;

/// Most checks expired, or instances evicted, by one proposal.
const MAX_BATCH: usize = 256;
/// How long the leader waits for one of its check proposals to apply.
const PROPOSE_DEADLINE: Duration = Duration::from_secs(5);

/// A report on one TTL check, as a frontend submits it and a follower forwards it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The instance the check belongs to.
    pub key: InstanceKey,
    /// The check.
    pub check_id: String,
    /// The reported status.
    pub status: Health,
    /// The reported output (Consul's `note`).
    pub output: String,
}

type CheckRef = (InstanceKey, String);

/// The leader's TTL deadlines.
pub struct CheckKeeper {
    state: Mutex<KeeperState>,
    /// Held from a decision to its applied proposal; see the module docs. A tokio
    /// lock because it is held across the proposal's await.
    writes: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct KeeperState {
    /// The term in which this node leads and the deadlines are valid.
    term: Option<u64>,
    deadlines: HashMap<CheckRef, Instant>,
    /// Registry revision the deadlines were last brought in line with.
    synced: Option<Revision>,
}

impl KeeperState {
    /// Adds checks the registry has and the keeper lacks (with a full TTL from
    /// `now`), and drops the ones gone.
    fn sync(&mut self, now: Instant, registry: &Registry) {
        let mut deadlines = HashMap::with_capacity(self.deadlines.len());
        for instance in registry.instances_with_checks() {
            // The maintenance check has no TTL to keep.
            for check in instance.checks.iter().filter(|c| c.has_ttl()) {
                let key = (instance.key(), check.id.clone());
                let deadline = self
                    .deadlines
                    .get(&key)
                    .copied()
                    .unwrap_or_else(|| now + Duration::from_millis(check.ttl_ms));
                deadlines.insert(key, deadline);
            }
        }
        self.deadlines = deadlines;
        self.synced = Some(registry.revision());
    }
}

/// What a report needs after the keeper looked at it.
enum Decision {
    /// Nothing changed: the TTL was renewed; this is the answer.
    Unchanged(ApplyResult),
    /// The status or output changed: propose it.
    Propose,
}

/// Work the leader found due in one tick.
#[derive(Default)]
struct Due {
    expire: Vec<CheckRef>,
    evict: Vec<InstanceKey>,
}

impl Default for CheckKeeper {
    fn default() -> Self {
        Self::new()
    }
}

impl CheckKeeper {
    /// A keeper that is idle until its node leads.
    pub fn new() -> Self {
        CheckKeeper {
            state: Mutex::new(KeeperState::default()),
            writes: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeeperState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the keeper in line with the node's role: active with full TTLs when it
    /// leads in `term`, idle otherwise.
    fn align(state: &mut KeeperState, leader_term: Option<u64>, registry: &Registry) {
        if state.term == leader_term {
            return;
        }
        state.deadlines.clear();
        state.synced = None;
        state.term = leader_term;
        if let Some(term) = leader_term {
            state.sync(Instant::now(), registry);
            tracing::info!(
                term,
                checks = state.deadlines.len(),
                "check keeper active: every TTL check gets its full TTL from now"
            );
        }
    }

    /// Milliseconds until a check's TTL runs out, as the leader sees it (`None` when
    /// this node does not lead or does not know the check).
    pub fn remaining_ms(&self, key: &InstanceKey, check_id: &str) -> Option<u64> {
        let state = self.lock();
        state.term?;
        let deadline = state.deadlines.get(&(key.clone(), check_id.to_string()))?;
        Some(deadline.saturating_duration_since(Instant::now()).as_millis() as u64)
    }

    /// Handles a report when this node leads: renews the TTL and proposes the new
    /// status and output if they changed. `None` when this node does not lead (the
    /// caller forwards the report to the leader).
    pub async fn report_local(&self, core: &NodeCore, report: &CheckReport) -> Option<Result<ApplyResult, ApiError>> {
        let term = core.leader_term()?;
        let _writes = self.writes.lock().await;
        let decision = {
            let registry = core.shared.read();
            let mut state = self.lock();
            Self::align(&mut state, Some(term), &registry);
            let Some(instance) = registry.instance(&report.key).cloned() else {
                return Some(Err(ApiError::InstanceNotFound(report.key.to_string())));
            };
            let Some(check) = instance.check(&report.check_id) else {
                return Some(Err(ApiError::CheckNotFound(format!(
                    "{:?} of instance {}",
                    report.check_id, report.key
                ))));
            };
            if let Err(refused) = validate::check_takes_reports(check) {
                return Some(Err(ApiError::Invalid(refused)));
            }
            state.deadlines.insert(
                (report.key.clone(), report.check_id.clone()),
                Instant::now() + Duration::from_millis(check.ttl_ms),
            );
            if check.status == report.status && check.output == report.output {
                Decision::Unchanged(ApplyResult {
                    revision: registry.revision(),
                    outcome: Outcome::CheckUpdated(instance.clone()),
                })
            } else {
                Decision::Propose
            }
        };
        match decision {
            Decision::Unchanged(answer) => Some(Ok(answer)),
            Decision::Propose => {
                let command = Command::UpdateCheck {
                    key: report.key.clone(),
                    check_id: report.check_id.clone(),
                    status: report.status,
                    output: report.output.clone(),
                    now_ms: NodeCore::now_ms(),
                };
                match tokio::time::timeout(PROPOSE_DEADLINE, core.propose_on_leader(command)).await {
                    Err(_) => Some(Err(ApiError::Timeout(format!(
                        "check report not applied within {}s",
                        PROPOSE_DEADLINE.as_secs()
                    )))),
                    Ok(Ok(result)) => match result.outcome {
                        Outcome::Rejected(r) => Some(Err(r.into())),
                        _ => Some(Ok(result)),
                    },
                    // Leadership moved while proposing: the caller retries on the new
                    // leader.
                    Ok(Err(ApiError::NoLeader { .. })) => None,
                    Ok(Err(e)) => Some(Err(e)),
                }
            }
        }
    }

    /// Checks whose TTL ran out and instances critical for too long, when this node
    /// leads. Call with `writes` held.
    fn due(&self, core: &NodeCore) -> Due {
        let term = core.leader_term();
        let registry = core.shared.read();
        let mut state = self.lock();
        Self::align(&mut state, term, &registry);
        if term.is_none() {
            return Due::default();
        }
        let now = Instant::now();
        if state.synced != Some(registry.revision()) {
            state.sync(now, &registry);
        }
        let mut due = Due::default();
        let mut evict = BTreeSet::new();
        let now_ms = NodeCore::now_ms();
        for ((key, id), deadline) in state.deadlines.iter_mut() {
            let Some(check) = registry.instance(key).and_then(|i| i.check(id)) else {
                continue;
            };
            if critical_too_long(check, now_ms) && evict.len() < MAX_BATCH {
                evict.insert(key.clone());
            }
            if *deadline > now {
                continue;
            }
            if check.status == Health::Critical {
                // Already critical: look again in a TTL.
                *deadline = now + Duration::from_millis(check.ttl_ms);
            } else if due.expire.len() < MAX_BATCH {
                *deadline = now + Duration::from_millis(check.ttl_ms);
                due.expire.push((key.clone(), id.clone()));
            }
        }
        due.expire.sort();
        due.evict = evict.into_iter().collect();
        due
    }
}

/// Runs the keeper until the node stops.
pub async fn run(core: Arc<NodeCore>) {
    let mut interval = tokio::time::interval(core.config.leases.tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let _writes = core.checks.writes.lock().await;
        let due = core.checks.due(&core);
        if !due.expire.is_empty() {
            let count = due.expire.len();
            let command = Command::ExpireChecks {
                checks: due.expire,
                now_ms: NodeCore::now_ms(),
            };
            match tokio::time::timeout(PROPOSE_DEADLINE, core.propose_on_leader(command)).await {
                Ok(Ok(result)) => {
                    if let Outcome::ChecksExpired { changed } = result.outcome {
                        tracing::info!(checks = changed, "TTL checks expired: marked critical");
                    }
                }
                Ok(Err(e)) => tracing::warn!(checks = count, error = %e, "proposing check expiry failed"),
                Err(_) => tracing::warn!(checks = count, "check expiry not applied in time"),
            }
        }
        if !due.evict.is_empty() {
            let count = due.evict.len();
            let command = Command::EvictCritical {
                keys: due.evict,
                now_ms: NodeCore::now_ms(),
            };
            match tokio::time::timeout(PROPOSE_DEADLINE, core.propose_on_leader(command)).await {
                Ok(Ok(result)) => {
                    if let Outcome::Evicted { removed } = result.outcome {
                        tracing::info!(
                            instances = removed,
                            "instances critical longer than their deregister_critical_after removed"
                        );
                    }
                }
                Ok(Err(e)) => tracing::warn!(instances = count, error = %e, "proposing eviction failed"),
                Err(_) => tracing::warn!(instances = count, "eviction not applied in time"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_core::{CheckSpec, InstanceSpec};

    #[test]
    fn the_keeper_keeps_deadlines_for_ttl_checks_and_not_for_the_maintenance_check() {
        let mut registry = Registry::new();
        registry.apply(&Command::Register {
            spec: InstanceSpec {
                service: "web".into(),
                instance_id: "w1".into(),
                address: "10.0.0.1".into(),
                port: 80,
                checks: vec![CheckSpec {
                    id: "service:w1".into(),
                    ttl_ms: 10_000,
                    ..Default::default()
                }],
                ..Default::default()
            },
            grant_ttl_ms: None,
            now_ms: 1,
        });
        let key = InstanceKey::new("", "web", "w1");
        registry.apply(&Command::SetMaintenance {
            key: key.clone(),
            reason: Some("deploy".into()),
            now_ms: 2,
        });
        assert_eq!(registry.instance(&key).map(|i| i.checks.len()), Some(2));
        let mut state = KeeperState::default();
        state.sync(Instant::now(), &registry);
        let tracked: Vec<&str> = state.deadlines.keys().map(|(_, id)| id.as_str()).collect();
        assert_eq!(tracked, ["service:w1"]);
    }
}
