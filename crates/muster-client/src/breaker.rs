//! Per-instance circuit breakers: after `failure_threshold` failures in a row an
//! instance is skipped for `cool_down`, then one trial call is let through
//! (half-open); its success closes the breaker, its failure opens it again.
//!
//! Pure state: every method takes the current time, so the rules are tested
//! without sleeping.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// When a breaker opens and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failures in a row that open the breaker (0 disables breakers).
    pub failure_threshold: u32,
    /// How long an open breaker skips its instance before a trial call.
    pub cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_threshold: 5,
            cool_down: Duration::from_secs(10),
        }
    }
}

/// What a breaker currently lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are skipped until the cool-down ends.
    Open,
    /// The cool-down ended: one trial call may go through.
    HalfOpen,
}

#[derive(Clone, Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    /// When the half-open trial call was handed out, if one is in flight.
    trial_started: Option<Instant>,
}

/// The breakers of one service's instances, by instance id.
#[derive(Debug, Default)]
pub(crate) struct Breakers {
    policy: BreakerPolicy,
    by_instance: HashMap<String, Breaker>,
}

impl Breakers {
    pub(crate) fn new(policy: BreakerPolicy) -> Self {
        Breakers {
            policy,
            by_instance: HashMap::new(),
        }
    }

    /// The state of `instance_id`'s breaker at `now`.
    pub(crate) fn state(&self, instance_id: &str, now: Instant) -> BreakerState {
        match self.by_instance.get(instance_id).and_then(|b| b.opened_at) {
            None => BreakerState::Closed,
            Some(opened) if now.saturating_duration_since(opened) < self.policy.cool_down => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a call to `instance_id` may be made at `now`: always when closed,
    /// never when open, and when half-open only if no trial is in flight (a trial
    /// whose outcome was never reported is given up after one cool-down).
    pub(crate) fn allows(&self, instance_id: &str, now: Instant) -> bool {
        match self.state(instance_id, now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => self
                .by_instance
                .get(instance_id)
                .and_then(|b| b.trial_started)
                .is_none_or(|started| now.saturating_duration_since(started) >= self.policy.cool_down),
        }
    }

    /// Records that a call to `instance_id` was handed out at `now` (marks the
    /// trial of a half-open breaker as in flight).
    pub(crate) fn on_pick(&mut self, instance_id: &str, now: Instant) {
        if self.state(instance_id, now) == BreakerState::HalfOpen {
            if let Some(b) = self.by_instance.get_mut(instance_id) {
                b.trial_started = Some(now);
            }
        }
    }

    /// A call to `instance_id` succeeded: the breaker closes.
    pub(crate) fn record_success(&mut self, instance_id: &str) {
        self.by_instance.remove(instance_id);
    }

    /// A call to `instance_id` failed at `now`. Returns true when this failure
    /// opened (or re-opened) the breaker.
    pub(crate) fn record_failure(&mut self, instance_id: &str, now: Instant) -> bool {
        if self.policy.failure_threshold == 0 {
            return false;
        }
        let was_half_open = self.state(instance_id, now) == BreakerState::HalfOpen;
        let threshold = self.policy.failure_threshold;
        let b = self.by_instance.entry(instance_id.to_string()).or_default();
        b.consecutive_failures = b.consecutive_failures.saturating_add(1);
        if was_half_open || (b.opened_at.is_none() && b.consecutive_failures >= threshold) {
            b.opened_at = Some(now);
            b.trial_started = None;
            return true;
        }
        false
    }

    /// Consecutive failures recorded for `instance_id`.
    pub(crate) fn failures(&self, instance_id: &str) -> u32 {
        self.by_instance.get(instance_id).map_or(0, |b| b.consecutive_failures)
    }

    /// Forgets breakers of instances no longer known.
    pub(crate) fn retain(&mut self, known: impl Fn(&str) -> bool) {
        self.by_instance.retain(|id, _| known(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: 3,
            cool_down: Duration::from_secs(10),
        }
    }

    #[test]
    fn opens_after_the_threshold_of_failures_in_a_row() {
        let t0 = Instant::now();
        let mut b = Breakers::new(policy());
        assert!(!b.record_failure("a", t0));
        assert!(!b.record_failure("a", t0));
        assert!(b.allows("a", t0));
        assert!(b.record_failure("a", t0));
        assert_eq!(b.state("a", t0), BreakerState::Open);
        assert!(!b.allows("a", t0 + Duration::from_secs(9)));
        assert!(b.allows("b", t0), "other instances are not affected");
    }

    #[test]
    fn a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breakers::new(policy());
        b.record_failure("a", t0);
        b.record_failure("a", t0);
        b.record_success("a");
        b.record_failure("a", t0);
        b.record_failure("a", t0);
        assert_eq!(b.state("a", t0), BreakerState::Closed);
        assert_eq!(b.failures("a"), 2);
    }

    #[test]
    fn half_open_lets_one_trial_through_then_closes_or_reopens() {
        let t0 = Instant::now();
        let mut b = Breakers::new(policy());
        for _ in 0..3 {
            b.record_failure("a", t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.state("a", t1), BreakerState::HalfOpen);
        assert!(b.allows("a", t1));
        b.on_pick("a", t1);
        assert!(!b.allows("a", t1), "only one trial at a time");

        // The trial fails: open again for a full cool-down from now.
        assert!(b.record_failure("a", t1));
        assert_eq!(b.state("a", t1 + Duration::from_secs(9)), BreakerState::Open);

        // The next trial succeeds: closed.
        let t2 = t1 + Duration::from_secs(10);
        assert!(b.allows("a", t2));
        b.on_pick("a", t2);
        b.record_success("a");
        assert_eq!(b.state("a", t2), BreakerState::Closed);
        assert!(b.allows("a", t2));
    }

    #[test]
    fn a_trial_never_reported_is_given_up_after_a_cool_down() {
        let t0 = Instant::now();
        let mut b = Breakers::new(policy());
        for _ in 0..3 {
            b.record_failure("a", t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        b.on_pick("a", t1);
        assert!(!b.allows("a", t1 + Duration::from_secs(5)));
        assert!(b.allows("a", t1 + Duration::from_secs(10)));
    }

    #[test]
    fn a_zero_threshold_disables_breakers() {
        let t0 = Instant::now();
        let mut b = Breakers::new(BreakerPolicy {
            failure_threshold: 0,
            cool_down: Duration::from_secs(1),
        });
        for _ in 0..100 {
            assert!(!b.record_failure("a", t0));
        }
        assert!(b.allows("a", t0));
    }
}
