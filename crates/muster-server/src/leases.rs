//! The lease keeper. Keep-alives are not Raft entries: the leader keeps each lease's
//! deadline in memory and followers forward keep-alives to it. When a deadline
//! passes, the leader proposes `ExpireLeases`, rate-limited so an outage of
//! keep-alives drains the registry gradually and visibly.
//!
//! A new leader starts the clock of every lease that was renewed under the previous
//! leader afresh (now + TTL), so a leader change causes no expiry storm. A lease not
//! renewed during the current term is checkpointed into the log with its remaining
//! TTL (about once a second while it stays idle), and a new leader resumes such a
//! lease from its checkpoint, so a run of elections cannot keep a dead lease alive
//! forever (etcd issue 9888). Leases that are kept alive cost one checkpoint entry
//! per election (to clear their checkpoint), not one per second.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_core::{Command, LeaseId, Registry};

use crate::config::LeaseSettings;
use crate::metrics::Metrics;
use crate::node::NodeCore;

/// The leader's lease deadlines.
pub struct LeaseKeeper {
    settings: LeaseSettings,
    metrics: Arc<Metrics>,
    state: Mutex<KeeperState>,
}

struct KeeperState {
    /// The term in which this node leads and the deadlines are valid.
    term: Option<u64>,
    deadlines: HashMap<LeaseId, Instant>,
    /// Leases renewed during this term (their checkpoints are cleared).
    renewed: HashSet<LeaseId>,
    tokens: f64,
    last_refill: Instant,
    last_sync: Instant,
    last_checkpoint: Instant,
    last_throttle_log: Option<Instant>,
}

impl KeeperState {
    /// Deadline for a lease this leader has not seen renewed yet.
    fn initial_deadline(now: Instant, lease: &muster_core::Lease) -> Instant {
        let ms = match lease.checkpoint_remaining_ms {
            Some(remaining) => remaining.min(lease.ttl_ms),
            None => lease.ttl_ms,
        };
        now + Duration::from_millis(ms)
    }

    /// Adds leases the registry has and the keeper lacks; drops the ones gone.
    fn sync(&mut self, now: Instant, registry: &Registry) {
        self.deadlines.retain(|id, _| registry.lease(*id).is_some());
        self.renewed.retain(|id| registry.lease(*id).is_some());
        for lease in registry.leases() {
            self.deadlines
                .entry(lease.id)
                .or_insert_with(|| Self::initial_deadline(now, lease));
        }
        self.last_sync = now;
    }
}

impl LeaseKeeper {
    /// A keeper that is idle until its node leads.
    pub fn new(settings: LeaseSettings, metrics: Arc<Metrics>) -> Self {
        let now = Instant::now();
        LeaseKeeper {
            settings,
            metrics,
            state: Mutex::new(KeeperState {
                term: None,
                deadlines: HashMap::new(),
                renewed: HashSet::new(),
                tokens: 0.0,
                last_refill: now,
                last_sync: now,
                last_checkpoint: now,
                last_throttle_log: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeeperState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the keeper in line with the node's role: active with fresh deadlines
    /// when it leads in `term`, idle otherwise.
    fn align(&self, state: &mut KeeperState, leader_term: Option<u64>, registry: &Registry) {
        if state.term == leader_term {
            return;
        }
        state.deadlines.clear();
        state.renewed.clear();
        state.term = leader_term;
        if let Some(term) = leader_term {
            let now = Instant::now();
            state.sync(now, registry);
            state.last_checkpoint = now;
            state.tokens = 0.0;
            state.last_refill = now;
            tracing::info!(
                term,
                leases = state.deadlines.len(),
                "lease keeper active: leases renewed under the last leader get their full TTL from now; idle ones resume from their checkpoint"
            );
        }
    }

    /// Whether this leader heard from a quorum recently enough to renew leases.
    ///
    /// A leader cut off from its followers believes it leads until it hears a higher
    /// term (openraft 0.9 has no check-quorum step-down), while the majority elects
    /// a new leader after an election timeout and starts lease clocks afresh there.
    /// Renewing on the cut-off leader acknowledged keep-alives for leases the
    /// majority then expired (found by the fault suite's `leader-isolated` fault;
    /// regression test in `crates/muster-chaos/tests/regressions.rs`). Half the
    /// election timeout ends renewals here before the majority can elect anyone.
    fn quorum_is_fresh(core: &NodeCore) -> bool {
        let limit = (core.config.raft.election_min / 2).max(core.config.raft.heartbeat * 2);
        core.raft
            .metrics()
            .borrow()
            .millis_since_quorum_ack
            .is_some_and(|ms| u128::from(ms) <= limit.as_millis())
    }

    /// Renews leases when this node leads and a quorum recently confirmed it;
    /// `None` otherwise (the caller forwards, or retries until a leader is known).
    pub fn keep_alive_local(&self, core: &NodeCore, ids: &[LeaseId]) -> Option<Vec<(LeaseId, u64)>> {
        let term = core.leader_term()?;
        if !Self::quorum_is_fresh(core) {
            return None;
        }
        let registry = core.shared.read();
        let mut state = self.lock();
        self.align(&mut state, Some(term), &registry);
        let now = Instant::now();
        Some(
            ids.iter()
                .map(|id| match registry.lease(*id) {
                    Some(lease) => {
                        state.deadlines.insert(*id, now + Duration::from_millis(lease.ttl_ms));
                        state.renewed.insert(*id);
                        (*id, lease.ttl_ms)
                    }
                    None => (*id, 0),
                })
                .collect(),
        )
    }

    /// Remaining TTL of a lease in ms as the leader sees it (None when not leading or
    /// unknown).
    pub fn remaining_ms(&self, id: LeaseId) -> Option<u64> {
        let state = self.lock();
        state.term?;
        let deadline = state.deadlines.get(&id)?;
        Some(deadline.saturating_duration_since(Instant::now()).as_millis() as u64)
    }

    /// One tick: what to expire and what to checkpoint.
    fn tick(&self, core: &NodeCore) -> (Vec<LeaseId>, Vec<(LeaseId, Option<u64>)>) {
        let term = core.leader_term();
        let registry = core.shared.read();
        let mut state = self.lock();
        self.align(&mut state, term, &registry);
        if term.is_none() {
            return (Vec::new(), Vec::new());
        }
        let now = Instant::now();
        if state.deadlines.len() != registry.lease_count()
            || now.duration_since(state.last_sync) >= Duration::from_secs(1)
        {
            state.sync(now, &registry);
        }

        // Token bucket: at most `rate` expiries per second.
        let rate = (self.settings.expiry_rate * registry.lease_count() as f64)
            .ceil()
            .max(f64::from(self.settings.expiry_floor_per_sec));
        let elapsed = now.duration_since(state.last_refill).as_secs_f64();
        state.tokens = (state.tokens + rate * elapsed).min(rate);
        state.last_refill = now;

        let mut due: Vec<(Instant, LeaseId)> = state
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, d)| (*d, *id))
            .collect();
        due.sort();
        let allowed = (state.tokens.floor() as usize).min(due.len());
        if allowed < due.len() {
            self.metrics.lease_expiry_throttled.inc_by((due.len() - allowed) as u64);
            let log_now = state
                .last_throttle_log
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5));
            if log_now {
                state.last_throttle_log = Some(now);
                tracing::warn!(
                    due = due.len(),
                    per_second = rate,
                    "lease expiry rate-limited: more leases are due than may expire at once; draining gradually"
                );
            }
        }
        state.tokens -= allowed as f64;
        let expire: Vec<LeaseId> = due.into_iter().take(allowed).map(|(_, id)| id).collect();
        for id in &expire {
            // Not expired again while the proposal is in flight.
            state.deadlines.insert(*id, now + Duration::from_secs(3600));
        }

        let mut checkpoint = Vec::new();
        if now.duration_since(state.last_checkpoint) >= self.settings.checkpoint_interval {
            state.last_checkpoint = now;
            for lease in registry.leases() {
                let Some(deadline) = state.deadlines.get(&lease.id) else {
                    continue;
                };
                let remaining = deadline.saturating_duration_since(now).as_millis() as u64;
                let idle = !state.renewed.contains(&lease.id);
                let wanted = idle.then_some(remaining / 100 * 100);
                let changed = match (wanted, lease.checkpoint_remaining_ms) {
                    (None, None) => false,
                    (Some(w), Some(c)) => c.abs_diff(w) >= 500,
                    _ => true,
                };
                if changed && !expire.contains(&lease.id) {
                    checkpoint.push((lease.id, wanted));
                }
            }
        }
        (expire, checkpoint)
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
        let (expire, checkpoint) = core.leases.tick(&core);
        if !expire.is_empty() {
            let count = expire.len();
            let command = Command::ExpireLeases {
                lease_ids: expire,
                now_ms: NodeCore::now_ms(),
            };
            match core.propose_on_leader(command).await {
                Ok(result) => {
                    if let muster_core::Outcome::LeasesExpired { expired, removed } = result.outcome {
                        core.metrics.lease_expirations.inc_by(expired.len() as u64);
                        tracing::info!(leases = expired.len(), instances = removed, "leases expired");
                    }
                }
                Err(e) => tracing::warn!(leases = count, error = %e, "proposing lease expiry failed"),
            }
        }
        if !checkpoint.is_empty() {
            let command = Command::CheckpointLeases { remaining: checkpoint };
            if let Err(e) = core.propose_on_leader(command).await {
                tracing::debug!(error = %e, "lease checkpoint failed");
            }
        }
    }
}
