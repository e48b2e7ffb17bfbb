//! The lease keeper. Keep-alives are not Raft entries: the leader keeps each lease's
//! deadline in memory and followers forward keep-alives to it. When a deadline
//! passes, the leader proposes `ExpireLeases`, rate-limited so an outage of
//! keep-alives drains the registry gradually and visibly.
//!
//! A new leader starts the clock of every lease that was renewed under the previous
//! leader afresh (now + TTL), so a leader change causes no expiry storm. A lease not
//! renewed during the current term carries its idle deadline in the log (leader
//! time at which it ends): the grant records one, and the leader's checkpoint (at
//! most once a second) records it for a lease seen idle whose record is missing or
//! off by half a second or more. A new leader resumes such a lease from that
//! deadline, so a run of elections cannot keep a dead lease alive forever (etcd
//! issue 9888). Because the deadline is absolute, an idle lease is recorded once,
//! not once a second: a thousand idle leases cost no entries while they wait to
//! expire. A lease that is kept alive costs one entry to clear its record after its
//! first renewal and about two per election (recorded idle until its holder's next
//! keep-alive reaches the new leader, then cleared).
//!
//! The deadline is read with each leader's own clock, so clock skew between nodes
//! moves an idle lease's end after an election by that skew, once: it does not add
//! up over elections, since the recorded deadline stays where it is.

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

/// How far a recorded idle deadline may be from the keeper's before a checkpoint
/// records it again (the two are computed from different clocks and rounded).
const IDLE_DEADLINE_TOLERANCE_MS: u64 = 500;

impl KeeperState {
    /// Adds leases the registry has and the keeper lacks (`now_ms` is the same
    /// moment as `now` on the wall clock); drops the ones gone.
    fn sync(&mut self, now: Instant, now_ms: u64, registry: &Registry) {
        self.deadlines.retain(|id, _| registry.lease(*id).is_some());
        self.renewed.retain(|id| registry.lease(*id).is_some());
        self.expiring.retain(|id| registry.lease(*id).is_some());
        self.add(now, now_ms, registry.leases());
        self.last_sync = now;
    }

    /// Adds the leases granted with ids above any seen so far: between full syncs
    /// a tick looks only at these (a lease granted with a lower id the client chose
    /// waits for the next full sync; its idle deadline does not move meanwhile).
    fn add_new(&mut self, now: Instant, now_ms: u64, registry: &Registry) {
        self.add(now, now_ms, registry.leases_after(self.newest_lease));
    }

    fn add<'a>(&mut self, now: Instant, now_ms: u64, leases: impl Iterator<Item = &'a Lease>) {
        for lease in leases {
            self.newest_lease = self.newest_lease.max(lease.id);
            self.deadlines
                .entry(lease.id)
                .or_insert_with(|| now + Duration::from_millis(lease.unrenewed_remaining_ms(now_ms)));
        }
    }

    /// The idle deadlines to record: for each lease not renewed this term, its
    /// deadline on the wall clock where the log lacks it or holds another one;
    /// `None` for each renewed lease whose log still holds one. Leases in `skip`
    /// (being expired) are left out.
    fn checkpoints<'a>(
        &self,
        leases: impl Iterator<Item = &'a Lease>,
        now: Instant,
        now_ms: u64,
        skip: &HashSet<LeaseId>,
    ) -> Vec<(LeaseId, Option<u64>)> {
        let mut checkpoint = Vec::new();
        for lease in leases {
            let Some(deadline) = self.deadlines.get(&lease.id) else {
                continue;
            };
            let idle = !self.renewed.contains(&lease.id);
            let wanted = idle.then(|| now_ms + deadline.saturating_duration_since(now).as_millis() as u64);
            let changed = match (wanted, lease.idle_deadline_ms) {
                (None, None) => false,
                (Some(w), Some(recorded)) => recorded.abs_diff(w) >= IDLE_DEADLINE_TOLERANCE_MS,
                _ => true,
            };
            if changed && !skip.contains(&lease.id) {
                checkpoint.push((lease.id, wanted));
            }
        }
        checkpoint
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
                expiring: HashSet::new(),
                newest_lease: 0,
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
        state.expiring.clear();
        state.newest_lease = 0;
        state.term = leader_term;
        if let Some(term) = leader_term {
            let now = Instant::now();
            state.sync(now, NodeCore::now_ms(), registry);
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
        let now_ms = NodeCore::now_ms();
        if now.duration_since(state.last_sync) >= Duration::from_secs(1) {
            state.sync(now, now_ms, &registry);
        } else {
            state.add_new(now, now_ms, &registry);
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
            checkpoint = state.checkpoints(registry.leases(), now, now_ms, &state.expiring);
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
            let command = Command::CheckpointLeases { deadlines: checkpoint };
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

    fn state() -> KeeperState {
        let now = Instant::now();
        KeeperState {
            term: Some(1),
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

    fn registry_with_leases(ids: &[LeaseId], granted_at_ms: u64) -> Registry {
        let mut registry = Registry::new();
        for id in ids {
            let applied = registry.apply(&Command::GrantLease {
                lease_id: *id,
                ttl_ms: TTL_MS,
                now_ms: granted_at_ms,
            });
            assert!(!matches!(applied.result.outcome, muster_core::Outcome::Rejected(_)));
        }
        registry
    }

    fn record(registry: &mut Registry, deadlines: Vec<(LeaseId, Option<u64>)>) {
        let applied = registry.apply(&Command::CheckpointLeases { deadlines });
        assert!(!matches!(applied.result.outcome, muster_core::Outcome::Rejected(_)));
    }

    #[test]
    fn an_idle_lease_is_recorded_once_and_not_again_while_it_waits_to_expire() {
        let granted_ms = 1_000_000;
        let registry = registry_with_leases(&[1, 2], granted_ms);
        let mut state = state();
        let start = Instant::now();
        state.sync(start, granted_ms, &registry);
        // Born idle: the grant recorded the deadline, so no checkpoint is due, at the
        // start or seconds later.
        for elapsed_ms in [0u64, 1_000, 5_000, 9_000] {
            let now = start + Duration::from_millis(elapsed_ms);
            let due = state.checkpoints(registry.leases(), now, granted_ms + elapsed_ms, &HashSet::new());
            assert_eq!(due, vec![], "nothing to record {elapsed_ms} ms after the grant");
        }
    }

    #[test]
    fn a_renewed_lease_is_cleared_once_and_recorded_again_when_it_goes_idle_in_a_new_term() {
        let granted_ms = 1_000_000;
        let mut registry = registry_with_leases(&[1, 2], granted_ms);
        let mut state = state();
        let start = Instant::now();
        state.sync(start, granted_ms, &registry);
        state.renewed.insert(1);
        state.deadlines.insert(1, start + Duration::from_millis(TTL_MS));
        let due = state.checkpoints(registry.leases(), start, granted_ms, &HashSet::new());
        assert_eq!(due, vec![(1, None)]);
        record(&mut registry, due);
        assert_eq!(
            state.checkpoints(registry.leases(), start, granted_ms, &HashSet::new()),
            vec![]
        );

        // A new leader 3 s later: lease 1 was renewed (full TTL from now), lease 2 was
        // idle and resumes from its recorded deadline.
        let mut next = state_after_election();
        let now = start + Duration::from_millis(3_000);
        let now_ms = granted_ms + 3_000;
        next.sync(now, now_ms, &registry);
        assert_eq!(next.deadlines[&1], now + Duration::from_millis(TTL_MS));
        assert_eq!(next.deadlines[&2], now + Duration::from_millis(TTL_MS - 3_000));
        // Lease 1 is idle under this leader: recorded once with its deadline.
        let due = next.checkpoints(registry.leases(), now, now_ms, &HashSet::new());
        assert_eq!(due, vec![(1, Some(now_ms + TTL_MS))]);
        record(&mut registry, due);
        let later = now + Duration::from_millis(2_000);
        assert_eq!(
            next.checkpoints(registry.leases(), later, now_ms + 2_000, &HashSet::new()),
            vec![]
        );
    }

    #[test]
    fn a_recorded_deadline_off_by_the_tolerance_is_recorded_again_and_expiring_leases_are_skipped() {
        let granted_ms = 1_000_000;
        let registry = registry_with_leases(&[1, 2], granted_ms);
        let mut state = state();
        let start = Instant::now();
        state.sync(start, granted_ms, &registry);
        // The wall clock stepped forward by a second after the grant.
        let due = state.checkpoints(registry.leases(), start, granted_ms + 1_000, &HashSet::from([2]));
        assert_eq!(due, vec![(1, Some(granted_ms + 1_000 + TTL_MS))]);
        // Within the tolerance nothing is due.
        let due = state.checkpoints(registry.leases(), start, granted_ms + 400, &HashSet::new());
        assert_eq!(due, vec![]);
    }

    #[test]
    fn elections_cannot_extend_an_idle_lease() {
        let granted_ms = 1_000_000;
        let registry = registry_with_leases(&[7], granted_ms);
        let start = Instant::now();
        // Whatever the number of new leaders, each gives the lease only what is left
        // until the deadline recorded at the grant.
        for elapsed_ms in [1_500u64, 3_000, 4_500, 6_000, 9_999, 10_000, 20_000] {
            let mut leader = state_after_election();
            let now = start + Duration::from_millis(elapsed_ms);
            leader.sync(now, granted_ms + elapsed_ms, &registry);
            let left = leader.deadlines[&7].saturating_duration_since(now).as_millis() as u64;
            assert_eq!(left, TTL_MS.saturating_sub(elapsed_ms));
        }
    }

    #[test]
    fn a_lease_granted_between_full_syncs_gets_its_deadline_at_the_next_tick() {
        let granted_ms = 1_000_000;
        let mut registry = registry_with_leases(&[1], granted_ms);
        let mut state = state();
        let start = Instant::now();
        state.sync(start, granted_ms, &registry);
        let applied = registry.apply(&Command::GrantLease {
            lease_id: 0,
            ttl_ms: TTL_MS,
            now_ms: granted_ms + 2_000,
        });
        assert!(!matches!(applied.result.outcome, muster_core::Outcome::Rejected(_)));
        let now = start + Duration::from_millis(3_000);
        state.add_new(now, granted_ms + 3_000, &registry);
        assert_eq!(state.deadlines.len(), 2);
        assert_eq!(state.deadlines[&2], now + Duration::from_millis(TTL_MS - 1_000));
    }

    fn state_after_election() -> KeeperState {
        let mut s = state();
        s.term = Some(2);
        s
    }
}
