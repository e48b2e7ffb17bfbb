//! Batches linearizable reads. Every concurrent linearizable read needs a read index
//! confirmed by a quorum; one confirmation serves every read that arrived before it
//! was requested, so readers queue and a single task fetches one index per batch.
//! A reader joins only a batch whose request starts after it arrived, which keeps
//! the reads linearizable.

use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};

use crate::error::ApiError;
use crate::node::NodeCore;

type Waiter = oneshot::Sender<Result<u64, ApiError>>;

/// The queue of readers waiting for the next read index.
#[derive(Default)]
pub struct ReadIndexBatcher {
    waiting: Mutex<Vec<Waiter>>,
    wake: Notify,
}

impl ReadIndexBatcher {
    /// The read index for a read arriving now (from the next batch).
    pub async fn read_index(&self) -> Result<u64, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        self.wake.notify_one();
        rx.await.map_err(|_| ApiError::ShuttingDown)?
    }
}

/// Serves batches until the node stops.
pub async fn run(core: Arc<NodeCore>) {
    let batcher = &core.read_index_batcher;
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = batcher.wake.notified() => {}
        }
        let batch: Vec<Waiter> = std::mem::take(&mut *batcher.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            continue;
        }
        let result = core.fetch_read_index().await;
        for waiter in batch {
            let _ = waiter.send(result.clone());
        }
    }
}
