//! Batches concurrent writes into one Raft entry.
//!
//! Every Raft entry costs the leader the same bookkeeping, log append and
//! replication message whether it carries one command or many, so writers queue
//! here and one task proposes what has queued as a single [`Command::Batch`]. At most
//! [`MAX_IN_FLIGHT`] batches are proposed at once: while they are replicating, new
//! writes gather into the next batch, so batches grow with the load. A lone writer
//! (nothing queued, a slot free) proposes its command itself, bare, on its own task:
//! going through the batcher would cost it two task hand-offs, to the batcher and to
//! a proposal task, each a thread wake-up when the runtime's other worker is parked.

use std::sync::{Arc, Mutex};

use muster_core::{ApplyResult, Command, Outcome, MAX_BATCH_COMMANDS};
use openraft::error::{ClientWriteError, Fatal, RaftError};
use openraft::BasicNode;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{oneshot, Notify, Semaphore};

use crate::node::NodeCore;

/// How many batches may be in Raft at once.
pub const MAX_IN_FLIGHT: usize = 4;

/// What proposing a command answers: its result, or openraft's error (e.g. "forward
/// to the leader") for the whole batch it was part of.
pub type WriteAnswer = Result<ApplyResult, RaftError<u64, ClientWriteError<u64, BasicNode>>>;

type Waiter = (Command, oneshot::Sender<WriteAnswer>);

/// The queue of writes waiting to be proposed.
pub struct WriteBatcher {
    waiting: Mutex<Vec<Waiter>>,
    wake: Notify,
    in_flight: Arc<Semaphore>,
    /// Counts the writes proposed alone.
    lone_writes: Counter,
}

impl WriteBatcher {
    /// An empty queue; each write proposed alone is counted in `lone_writes`.
    pub fn new(lone_writes: Counter) -> Self {
        WriteBatcher {
            waiting: Mutex::new(Vec::new()),
            wake: Notify::new(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            lone_writes,
        }
    }

    /// Proposes `command` through `core`'s Raft, alone when no write is waiting and a
    /// slot is free, else in the next batch, and answers its own result.
    pub async fn write(&self, core: &NodeCore, command: Command) -> WriteAnswer {
        let lone = {
            let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            waiting.is_empty().then(|| self.in_flight.try_acquire().ok()).flatten()
        };
        if let Some(permit) = lone {
            self.lone_writes.inc();
            let answer = core.client_write(command).await;
            drop(permit);
            return answer;
        }
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((command, tx));
        self.wake.notify_one();
        rx.await.unwrap_or(Err(RaftError::Fatal(Fatal::Stopped)))
    }
}

/// Proposes batches until the node stops.
pub async fn run(core: Arc<NodeCore>) {
    let batcher = &core.write_batcher;
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = batcher.wake.notified() => {}
        }
        loop {
            // Wait for a free slot first: writes arriving meanwhile join this batch.
            let Ok(permit) = batcher.in_flight.clone().acquire_owned().await else {
                return;
            };
            let batch: Vec<Waiter> = {
                let mut waiting = batcher.waiting.lock().unwrap_or_else(|p| p.into_inner());
                let take = waiting.len().min(MAX_BATCH_COMMANDS);
                waiting.drain(..take).collect()
            };
            if batch.is_empty() {
                break;
            }
            let core = core.clone();
            tokio::spawn(async move {
                propose(&core, batch).await;
                drop(permit);
            });
        }
    }
}

/// Proposes one batch and hands each writer its answer.
async fn propose(core: &NodeCore, mut batch: Vec<Waiter>) {
    if batch.len() == 1 {
        if let Some((command, tx)) = batch.pop() {
            let answer = core.client_write(command).await;
            let _ = tx.send(answer);
        }
        return;
    }
    core.metrics.write_batch_size.observe(batch.len() as f64);
    let (commands, waiters): (Vec<Command>, Vec<oneshot::Sender<WriteAnswer>>) = batch.into_iter().unzip();
    let count = commands.len();
    match core.client_write(Command::Batch { commands }).await {
        Ok(response) => match response.outcome {
            Outcome::Batch(results) if results.len() == count => {
                for (tx, result) in waiters.into_iter().zip(results) {
                    let _ = tx.send(Ok(result));
                }
            }
            other => {
                // Only a leader bug could get here; every writer learns it.
                tracing::error!(?other, count, "a batch was not answered one result per command");
                let result = ApplyResult {
                    revision: response.revision,
                    outcome: other,
                };
                for tx in waiters {
                    let _ = tx.send(Ok(result.clone()));
                }
            }
        },
        Err(e) => {
            for tx in waiters {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}
