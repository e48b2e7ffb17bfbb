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
//!
//! Checkpoints record a time left, not a point in time, so clock offsets between
//! nodes do not move a lease's end. They are soft state: applying one changes the
//! replicated registry in memory only (a lease's record in the state database is
//! not rewritten), which keeps the once-a-second entry for thousands of idle leases
//! cheap to apply.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_core::{Command, Lease, LeaseId, Registry};

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
    /// Leases whose expiry is being proposed (not due again, not checkpointed).
    expiring: HashSet<LeaseId>,
    /// The highest lease id seen: leases above it are new since the last look.
    newest_lease: LeaseId,
    tokens: f64,
    last_refill: Instant,
    last_sync: Instant,
    last_checkpoint: Instant,
    last_throttle_log: Option<Instant>,
}

/// How far a lease's checkpoint may be from the time it has left before the next
/// checkpoint records it again.
const CHECKPOINT_TOLERANCE_MS: u64 = 500;

impl KeeperState {
    /// Empty, for a leader of `term` (none: not leading) from `now`.
    fn new(term: Option<u64>, now: Instant) -> Self {
        KeeperState {
            term,
            deadlines: HashMap::new(),
            renewed: HashSet::new(),
            expiring: HashSet::new(),
            newest_lease: 0,
            tokens: 0.0,
            last_refill: now,
            last_sync: now,
            last_checkpoint: now,
            last_throttle_log: None,
        }
    }

    /// Adds leases the registry has and the keeper lacks; drops the ones gone.
    fn sync(&mut self, now: Instant, registry: &Registry) {
        self.deadlines.retain(|id, _| registry.lease(*id).is_some());
        self.renewed.retain(|id| registry.lease(*id).is_some());
        self.expiring.retain(|id| registry.lease(*id).is_some());
        self.add(now, registry.leases());
        self.last_sync = now;
    }

    /// Adds the leases granted with ids above any seen so far: between full syncs
    /// a tick looks only at these (a lease granted with a lower id the client chose
    /// waits for the next full sync, at most a second).
    fn add_new(&mut self, now: Instant, registry: &Registry) {
        self.add(now, registry.leases_after(self.newest_lease));
    }

    fn add<'a>(&mut self, now: Instant, leases: impl Iterator<Item = &'a Lease>) {
        for lease in leases {
            self.newest_lease = self.newest_lease.max(lease.id);
            self.deadlines
                .entry(lease.id)
                .or_insert_with(|| now + Duration::from_millis(lease.unrenewed_remaining_ms()));
        }
    }

    /// The checkpoints to record: for each lease not renewed this term, the time it
    /// has left (in whole 100 ms) where its checkpoint is missing or off by
    /// [`CHECKPOINT_TOLERANCE_MS`]; `None` for each renewed lease that still has
    /// one. Leases being expired are left out.
    fn checkpoints<'a>(&self, leases: impl Iterator<Item = &'a Lease>, now: Instant) -> Vec<(LeaseId, Option<u64>)> {
        let mut checkpoint = Vec::new();
        for lease in leases {
            let Some(deadline) = self.deadlines.get(&lease.id) else {
                continue;
            };
            let idle = !self.renewed.contains(&lease.id);
            let wanted = idle.then(|| deadline.saturating_duration_since(now).as_millis() as u64 / 100 * 100);
            let changed = match (wanted, lease.checkpoint_remaining_ms) {
                (None, None) => false,
                (Some(w), Some(recorded)) => recorded.abs_diff(w) >= CHECKPOINT_TOLERANCE_MS,
                _ => true,
            };
            if changed && !self.expiring.contains(&lease.id) {
                checkpoint.push((lease.id, wanted));
            }
        }
        checkpoint
    }
}

impl LeaseKeeper {
    /// A keeper that is idle until its node leads.
    pub fn new(settings: LeaseSettings, metrics: Arc<Metrics>) -> Self {
        LeaseKeeper {
            settings,
            metrics,
            state: Mutex::new(KeeperState::new(None, Instant::now())),
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
        state.expiring.clear();
        state.newest_lease = 0;
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

    /// Renews leases when this node leads and a quorum recently confirmed it;
    /// `None` otherwise (the caller forwards, or retries until a leader is known).
    pub fn keep_alive_local(&self, core: &NodeCore, ids: &[LeaseId]) -> Option<Vec<(LeaseId, u64)>> {
        let term = core.leader_term()?;
        // A leader cut off from its followers believes it leads until it hears a
        // higher term (openraft 0.9 has no check-quorum step-down), while the majority
        // elects a new leader and starts lease clocks afresh there. Renewing on the
        // cut-off leader acknowledged keep-alives for leases the majority then expired
        // (found by the fault suite's `leader-isolated` fault; regression test in
        // `crates/muster-chaos/tests/regressions.rs`), so renewals need the leader
        // lease, which ends before the majority can elect anyone.
        core.leased_leadership()?;
        let registry = core.shared.read();
        let mut state = self.lock();
        self.align(&mut state, Some(term), &registry);
        let now = Instant::now();
        Some(
            ids.iter()
                .map(|id| match registry.lease(*id) {
                    // Its expiry is being proposed: it is as good as gone (if the
                    // proposal fails, the holder registers again).
                    Some(_) if state.expiring.contains(id) => (*id, 0),
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

    /// Makes leases whose expiry could not be proposed due again.
    fn expiry_failed(&self, ids: &[LeaseId]) {
        let mut state = self.lock();
        for id in ids {
            state.expiring.remove(id);
        }
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
        if now.duration_since(state.last_sync) >= Duration::from_secs(1) {
            state.sync(now, &registry);
        } else {
            state.add_new(now, &registry);
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
            .filter(|(id, d)| **d <= now && !state.expiring.contains(id) && registry.lease(**id).is_some())
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
        state.expiring.extend(expire.iter().copied());

        let mut checkpoint = Vec::new();
        if now.duration_since(state.last_checkpoint) >= self.settings.checkpoint_interval {
            state.last_checkpoint = now;
            checkpoint = state.checkpoints(registry.leases(), now);
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
                lease_ids: expire.clone(),
                now_ms: NodeCore::now_ms(),
            };
            match core.propose_on_leader(command).await {
                Ok(result) => {
                    if let muster_core::Outcome::LeasesExpired { expired, removed } = result.outcome {
                        core.metrics.lease_expirations.inc_by(expired.len() as u64);
                        tracing::info!(leases = expired.len(), instances = removed, "leases expired");
                    }
                }
                Err(e) => {
                    tracing::warn!(leases = count, error = %e, "proposing lease expiry failed; will try again");
                    core.leases.expiry_failed(&expire);
                }
            }
        }
        if !checkpoint.is_empty() {
            let count = checkpoint.len() as u64;
            let command = Command::CheckpointLeases { remaining: checkpoint };
            match core.propose_on_leader(command).await {
                Ok(_) => {
                    core.metrics.lease_checkpoints.inc_by(count);
                }
                // The next checkpoint compares with the log again and retries.
                Err(e) => tracing::debug!(error = %e, "lease checkpoint failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL_MS: u64 = 10_000;

    fn state(term: u64) -> KeeperState {
        KeeperState::new(Some(term), Instant::now())
    }

    fn apply(registry: &mut Registry, command: Command) {
        let applied = registry.apply(&command);
        assert!(!matches!(applied.result.outcome, muster_core::Outcome::Rejected(_)));
    }

    fn registry_with_leases(ids: &[LeaseId]) -> Registry {
        let mut registry = Registry::new();
        for id in ids {
            apply(
                &mut registry,
                Command::GrantLease {
                    lease_id: *id,
                    ttl_ms: TTL_MS,
                    now_ms: 1,
                },
            );
        }
        registry
    }

    #[test]
    fn an_idle_lease_is_checkpointed_with_the_time_it_has_left_and_again_once_that_moved() {
        let mut registry = registry_with_leases(&[1]);
        let mut keeper = state(1);
        let start = Instant::now();
        keeper.sync(start, &registry);
        let later = start + Duration::from_millis(1_000);
        let due = keeper.checkpoints(registry.leases(), later);
        assert_eq!(due, vec![(1, Some(TTL_MS - 1_000))]);
        apply(&mut registry, Command::CheckpointLeases { remaining: due });
        // Within the tolerance nothing is due; a second later it is again.
        let soon = later + Duration::from_millis(300);
        assert_eq!(keeper.checkpoints(registry.leases(), soon), vec![]);
        let next = later + Duration::from_millis(1_000);
        assert_eq!(
            keeper.checkpoints(registry.leases(), next),
            vec![(1, Some(TTL_MS - 2_000))]
        );
        // Leases being expired are left out.
        keeper.expiring.insert(1);
        assert_eq!(keeper.checkpoints(registry.leases(), next), vec![]);
    }

    #[test]
    fn a_new_leader_resumes_an_idle_lease_from_its_checkpoint_and_gives_a_renewed_one_its_ttl() {
        let mut registry = registry_with_leases(&[1, 2]);
        let mut keeper = state(1);
        let start = Instant::now();
        keeper.sync(start, &registry);
        keeper.renewed.insert(1);
        let at = start + Duration::from_millis(3_000);
        let due = keeper.checkpoints(registry.leases(), at);
        assert_eq!(due, vec![(2, Some(TTL_MS - 3_000))]);
        apply(&mut registry, Command::CheckpointLeases { remaining: due });

        let mut next = state(2);
        let now = at + Duration::from_millis(500);
        next.sync(now, &registry);
        assert_eq!(next.deadlines[&1], now + Duration::from_millis(TTL_MS));
        assert_eq!(next.deadlines[&2], now + Duration::from_millis(TTL_MS - 3_000));
    }

    #[test]
    fn applying_a_checkpoint_does_not_rewrite_lease_records() {
        let mut registry = registry_with_leases(&[1]);
        let applied = registry.apply(&Command::CheckpointLeases {
            remaining: vec![(1, Some(4_000))],
        });
        assert!(applied.leases_changed.is_empty(), "soft state: no state database write");
        assert_eq!(registry.lease(1).and_then(|l| l.checkpoint_remaining_ms), Some(4_000));
    }

    #[test]
    fn a_lease_granted_between_full_syncs_gets_its_deadline_at_the_next_tick() {
        let mut registry = registry_with_leases(&[1]);
        let mut keeper = state(1);
        let start = Instant::now();
        keeper.sync(start, &registry);
        apply(
            &mut registry,
            Command::GrantLease {
                lease_id: 0,
                ttl_ms: TTL_MS,
                now_ms: 2,
            },
        );
        let now = start + Duration::from_millis(100);
        keeper.add_new(now, &registry);
        assert_eq!(keeper.deadlines.len(), 2);
        assert_eq!(keeper.deadlines[&2], now + Duration::from_millis(TTL_MS));
    }
}
