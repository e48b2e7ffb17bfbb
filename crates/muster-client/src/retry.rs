//! Exponential backoff with jitter for moving between nodes.
//!
//! Written here rather than taken from the `backoff` crate: that crate is
//! unmaintained (RUSTSEC-2025-0012) and measures elapsed time with
//! `std::time::Instant`, which would make the client's retries ignore
//! `tokio::time::pause()` in tests. This one uses `tokio::time::Instant`.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// How the client retries a call that no node could serve.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// First delay after a full pass over the nodes failed.
    pub initial_delay: Duration,
    /// Largest delay between two attempts.
    pub max_delay: Duration,
    /// Factor the delay grows by after each failed attempt.
    pub multiplier: f64,
    /// Give up once this much time has passed since the first failed attempt.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            multiplier: 2.0,
            max_elapsed: Duration::from_secs(15),
        }
    }
}

/// The state of one retried call.
///
/// The first pass over the nodes is immediate (a dead node should cost one
/// connect attempt, not a sleep); after that every failure waits an exponentially
/// growing delay with jitter in `[delay/2, delay]`, and never less than the
/// server's `retry-after-ms` hint.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: RetryPolicy,
    /// When the first failure of the current run of failures happened.
    first_failure: Option<Instant>,
    free_attempts: usize,
    failures: u32,
    next: Duration,
}

impl Backoff {
    /// A new call over `nodes` nodes.
    pub(crate) fn new(policy: &RetryPolicy, nodes: usize) -> Self {
        Backoff {
            policy: policy.clone(),
            first_failure: None,
            free_attempts: nodes.saturating_sub(1),
            failures: 0,
            next: policy.initial_delay,
        }
    }

    /// How many attempts failed so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Starts the budget afresh (after a long-lived stream made progress).
    ///
    /// The budget runs from the first failure, not from creation, so a stream
    /// that was healthy for an hour still gets the whole budget when it breaks.
    pub(crate) fn reset(&mut self, nodes: usize) {
        *self = Backoff::new(&self.policy, nodes);
    }

    /// Records a failure and says how long to wait before the next attempt, or
    /// `None` when the budget is spent.
    pub(crate) fn next_delay(&mut self, hint: Option<Duration>) -> Option<Duration> {
        self.failures += 1;
        let elapsed = self.first_failure.get_or_insert_with(Instant::now).elapsed();
        if elapsed >= self.policy.max_elapsed {
            return None;
        }
        let delay = if self.free_attempts > 0 && hint.is_none() {
            self.free_attempts -= 1;
            Duration::ZERO
        } else {
            let base = self.next;
            self.next = self.next.mul_f64(self.policy.multiplier).min(self.policy.max_delay);
            let jittered = base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
            jittered.max(hint.unwrap_or_default())
        };
        // Never sleep past the budget by more than the last delay would.
        let left = self.policy.max_elapsed - elapsed;
        Some(delay.min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_pass_over_the_nodes_is_immediate_then_delays_grow() {
        let mut b = Backoff::new(&RetryPolicy::default(), 3);
        assert_eq!(b.next_delay(None), Some(Duration::ZERO));
        assert_eq!(b.next_delay(None), Some(Duration::ZERO));
        let d1 = b.next_delay(None).unwrap();
        let d2 = b.next_delay(None).unwrap();
        let d3 = b.next_delay(None).unwrap();
        assert!(
            d1 >= Duration::from_millis(25) && d1 <= Duration::from_millis(50),
            "{d1:?}"
        );
        assert!(
            d2 >= Duration::from_millis(50) && d2 <= Duration::from_millis(100),
            "{d2:?}"
        );
        assert!(
            d3 >= Duration::from_millis(100) && d3 <= Duration::from_millis(200),
            "{d3:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_servers_hint_is_honoured() {
        let mut b = Backoff::new(&RetryPolicy::default(), 3);
        let d = b.next_delay(Some(Duration::from_millis(300))).unwrap();
        assert!(d >= Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_ends_the_retries() {
        let policy = RetryPolicy {
            max_elapsed: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let mut b = Backoff::new(&policy, 1);
        // Time before the first failure does not count.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut waited = Duration::ZERO;
        while let Some(d) = b.next_delay(None) {
            tokio::time::sleep(d).await;
            waited += d;
        }
        assert!(waited <= Duration::from_secs(1));
        assert!(b.failures() > 3);
    }
}
