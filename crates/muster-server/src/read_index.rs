//! Batches linearizable reads. Every concurrent linearizable read needs a read index
//! confirmed by the leader; one confirmation serves every read that arrived before it
//! was requested, so readers queue and each request takes the whole queue. A reader
//! joins only a batch whose request starts after it arrived, which keeps the reads
//! linearizable.
//!
//! Up to [`MAX_IN_FLIGHT`] requests run at once: a reader arriving while one is on
//! its way starts the next instead of waiting for the first to come back, so a
//! follower's linearizable reads are not bound to one round trip to the leader at a
//! time.
//!
//! A lone reader (nobody queued, no request in flight) requests its read index
//! itself, on its own task: through the batcher it would wait for two task
//! hand-offs, to the batcher and to the request's task, and a third back, each a
//! thread wake-up when the runtime's other worker is parked. Readers that find a
//! request in flight queue as before, so under load the requests still carry batches
//! (letting each reader go alone while a slot was free cost 10 % of the reads at 16
//! clients: more, smaller requests).

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::node::NodeCore;

/// Most read-index requests a node has in flight at once.
pub const MAX_IN_FLIGHT: usize = 4;

type Waiter = oneshot::Sender<Result<u64, ApiError>>;

/// The queue of readers waiting for the next read index.
pub struct ReadIndexBatcher {
    waiting: Mutex<Vec<Waiter>>,
    wake: Notify,
    /// One permit per request in flight, batched or lone.
    slots: Arc<Semaphore>,
}

impl Default for ReadIndexBatcher {
    fn default() -> Self {
        ReadIndexBatcher {
            waiting: Mutex::default(),
            wake: Notify::new(),
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }
}

impl ReadIndexBatcher {
    /// The read index for a read arriving now: requested with `fetch_alone` by this
    /// reader when nobody is queued and no request is in flight, else from the next
    /// batch.
    pub async fn read_index<Fut>(&self, fetch_alone: impl FnOnce() -> Fut) -> Result<u64, ApiError>
    where
        Fut: Future<Output = Result<u64, ApiError>>,
    {
        let alone = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let lone = waiting.is_empty() && self.slots.available_permits() == MAX_IN_FLIGHT;
            match lone.then(|| self.slots.try_acquire().ok()).flatten() {
                Some(slot) => Ok(slot),
                None => {
                    let (tx, rx) = oneshot::channel();
                    waiting.push(tx);
                    Err(rx)
                }
            }
        };
        let rx = match alone {
            Ok(_slot) => {
                // The request starts here, after this reader arrived.
                return fetch_alone().await;
            }
            Err(rx) => rx,
        };
        self.wake.notify_one();
        rx.await.map_err(|_| ApiError::ShuttingDown)?
    }

    /// Serves batches with `fetch` until `shutdown`: each batch is every reader queued
    /// when its request starts, with at most [`MAX_IN_FLIGHT`] requests at once.
    /// `fetch` is told how many readers the request serves.
    pub async fn serve<F, Fut>(self: Arc<Self>, shutdown: CancellationToken, fetch: F)
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<u64, ApiError>> + Send + 'static,
    {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            // Wait for a free slot before taking the queue, so that readers arriving
            // meanwhile join this batch.
            let slot = tokio::select! {
                _ = shutdown.cancelled() => return,
                slot = self.slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
            };
            let batch: Vec<Waiter> = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
            if batch.is_empty() {
                continue;
            }
            // The request starts here, after every reader in `batch` arrived.
            let request = fetch(batch.len());
            tokio::spawn(async move {
                let result = request.await;
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
                drop(slot);
            });
        }
    }
}

/// Serves the node's batched linearizable reads until it stops.
pub async fn run(core: Arc<NodeCore>) {
    let batcher = core.read_index_batcher.clone();
    let shutdown = core.shutdown.clone();
    batcher
        .serve(shutdown, move |readers| {
            let core = core.clone();
            async move { core.fetch_read_index(readers).await }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A leader whose read index is the number of requests it has started, and
    /// which answers only when told to.
    struct Leader {
        started: AtomicU64,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        /// Readers the requests said they serve.
        served: AtomicUsize,
        answer: Notify,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_gets_an_index_requested_after_it_arrived_with_requests_overlapping_up_to_the_limit() {
        let leader = Arc::new(Leader {
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            answer: Notify::new(),
        });
        let batcher = Arc::new(ReadIndexBatcher::default());
        let shutdown = CancellationToken::new();
        let fetch = {
            let leader = leader.clone();
            move |readers| {
                let leader = leader.clone();
                leader.served.fetch_add(readers, Ordering::SeqCst);
                let index = leader.started.fetch_add(1, Ordering::SeqCst) + 1;
                let now = leader.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                leader.most_in_flight.fetch_max(now, Ordering::SeqCst);
                async move {
                    leader.answer.notified().await;
                    leader.in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok(index)
                }
            }
        };
        tokio::spawn(batcher.clone().serve(shutdown.clone(), fetch.clone()));

        // Readers arrive one after another while earlier requests are unanswered.
        let mut readers = Vec::new();
        for _ in 0..12 {
            let arrived_after = leader.started.load(Ordering::SeqCst);
            let batcher = batcher.clone();
            let fetch = fetch.clone();
            readers.push((
                arrived_after,
                tokio::spawn(async move { batcher.read_index(|| fetch(1)).await }),
            ));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for (arrived_after, reader) in readers {
            let index = loop {
                leader.answer.notify_waiters();
                if reader.is_finished() {
                    break reader.await.expect("reader").expect("index");
                }
                assert!(tokio::time::Instant::now() < deadline, "a reader got no index");
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            assert!(
                index > arrived_after,
                "index {index} comes from a request started after the reader arrived (after request {arrived_after})"
            );
        }
        assert_eq!(
            leader.served.load(Ordering::SeqCst),
            12,
            "every reader is counted in one batch"
        );
        let most = leader.most_in_flight.load(Ordering::SeqCst);
        assert!(most > 1, "requests overlap ({most} at most)");
        assert!(
            most <= MAX_IN_FLIGHT,
            "at most {MAX_IN_FLIGHT} requests at once, saw {most}"
        );
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_reader_requests_its_own_index_and_a_reader_finding_a_request_in_flight_queues() {
        let batcher = Arc::new(ReadIndexBatcher::default());
        // Nothing serves batches yet: a lone reader needs no batcher task.
        assert_eq!(batcher.read_index(|| async { Ok(7) }).await.expect("index"), 7);

        // A lone reader whose request hangs.
        let release = CancellationToken::new();
        let lone = {
            let (batcher, release) = (batcher.clone(), release.clone());
            tokio::spawn(async move {
                batcher
                    .read_index(|| async move {
                        release.cancelled().await;
                        Ok(100)
                    })
                    .await
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while batcher.slots.available_permits() == MAX_IN_FLIGHT {
            assert!(tokio::time::Instant::now() < deadline, "the lone reader took no slot");
            tokio::task::yield_now().await;
        }
        // The next reader finds that request in flight: it queues, although slots are
        // free, and a batch serves it while the lone request still hangs.
        let shutdown = CancellationToken::new();
        let batched = Arc::new(AtomicUsize::new(0));
        let counted = batched.clone();
        let queued = {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.read_index(|| async { panic!("a request was in flight") }).await })
        };
        while batcher.waiting.lock().expect("lock").is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the reader did not queue");
            tokio::task::yield_now().await;
        }
        tokio::spawn(batcher.clone().serve(shutdown.clone(), move |readers| {
            counted.fetch_add(readers, Ordering::SeqCst);
            async { Ok(42) }
        }));
        assert_eq!(queued.await.expect("reader").expect("index"), 42);
        assert_eq!(batched.load(Ordering::SeqCst), 1);
        assert!(!lone.is_finished());
        release.cancel();
        assert_eq!(lone.await.expect("reader").expect("index"), 100);
        shutdown.cancel();
    }
}
