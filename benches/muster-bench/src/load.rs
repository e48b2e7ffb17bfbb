//! Closed-loop load: N clients, each issuing one request after another.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What a run measured.
pub struct LoadResult {
    /// Successful operations in the measured window.
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    /// Latency of successful operations, microseconds.
    pub hist: Histogram<u64>,
    /// Length of the measured window.
    pub elapsed: Duration,
}

impl LoadResult {
    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Runs `clients` concurrent loops of `op` for `warmup + duration`, measuring the
/// last `duration`.
pub async fn closed_loop<F, Fut>(clients: usize, warmup: Duration, duration: Duration, op: F) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
            let (mut ops, mut errors, mut seq) = (0u64, 0u64, 0u64);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = op(c, seq).await;
                seq += 1;
                if t0 < measure_from {
                    continue;
                }
                if ok {
                    ops += 1;
                    let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                } else {
                    errors += 1;
                }
            }
            (ops, errors, hist)
        }));
    }
    let mut result = LoadResult {
        ops: 0,
        errors: 0,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        elapsed: duration,
    };
    for t in tasks {
        if let Ok((ops, errors, hist)) = t.await {
            result.ops += ops;
            result.errors += errors;
            let _ = result.hist.add(hist);
        }
    }
    result
}
