//! The state database's writer: applied changes wait in one pending sled batch, which a
//! thread of its own writes once it holds enough commands or its oldest change has
//! waited long enough, so openraft's apply task never stalls on a large sled write
//! and a quiet node still writes what it applied.
//!
//! Order: every write, on the thread or on a caller that needs the batch written now
//! (a snapshot, a close), takes the whole pending batch under the `writing` lock, so
//! batches reach sled in the order they were applied. The batch carries the
//! `last_applied` id, the membership and the counters of the last command in it, so
//! whatever has been written is a consistent point.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{StateError, KEY_COUNTERS, KEY_LAST_APPLIED, KEY_MEMBERSHIP};
use crate::lock;
use crate::types::{LogId, StoredMembership};

/// When the pending batch is written to sled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteBatching {
    /// Written once it holds this many applied commands...
    pub max_commands: usize,
    /// ...or once its oldest change has waited this long.
    pub max_age: Duration,
}

/// The pending batch is written once it holds this many applied commands...
pub const PENDING_MAX_COMMANDS: usize = 1024;
/// ...or once its oldest change has waited this long.
pub const PENDING_MAX_AGE: Duration = Duration::from_millis(100);

impl Default for WriteBatching {
    fn default() -> Self {
        Self {
            max_commands: PENDING_MAX_COMMANDS,
            max_age: PENDING_MAX_AGE,
        }
    }
}

/// Changes applied in memory and not yet written to sled.
#[derive(Default)]
pub(super) struct PendingWrites {
    /// Instance, lease and session changes.
    pub(super) batch: sled::Batch,
    /// Commands applied into `batch`.
    pub(super) commands: usize,
    /// When the first change in it was applied; `None` while nothing is pending.
    since: Option<Instant>,
    /// The last applied log id, revision and next lease id after the newest change.
    position: Option<(Option<LogId>, (u64, u64))>,
    /// The membership, when an applied entry changed it.
    membership: Option<StoredMembership>,
}

impl PendingWrites {
    /// Records where the state stands after the changes in the batch.
    pub(super) fn set_position(&mut self, last_applied: Option<LogId>, counters: (u64, u64)) {
        self.since.get_or_insert_with(Instant::now);
        self.position = Some((last_applied, counters));
    }

    /// Records a membership change.
    pub(super) fn set_membership(&mut self, membership: StoredMembership) {
        self.membership = Some(membership);
    }

    /// How long until the batch is due; `None` while nothing is pending.
    fn due_in(&self, batching: WriteBatching) -> Option<Duration> {
        let since = self.since?;
        if self.commands >= batching.max_commands {
            return Some(Duration::ZERO);
        }
        Some(batching.max_age.saturating_sub(since.elapsed()))
    }

    /// The batch with the position and membership written into it.
    fn into_batch(mut self) -> Result<sled::Batch, StateError> {
        if let Some((last_applied, counters)) = self.position {
            self.batch.insert(KEY_LAST_APPLIED, bincode::serialize(&last_applied)?);
            self.batch.insert(KEY_COUNTERS, bincode::serialize(&counters)?);
        }
        if let Some(membership) = &self.membership {
            self.batch.insert(KEY_MEMBERSHIP, bincode::serialize(membership)?);
        }
        Ok(self.batch)
    }
}

/// What the applying side and the writer thread share.
struct Shared {
    db: sled::Db,
    batching: WriteBatching,
    pending: Mutex<Pending>,
    /// Wakes the thread when a batch starts, comes due, or the writer closes.
    wake: Condvar,
    /// Held while a batch is taken and written: batches reach sled in order.
    writing: Mutex<()>,
}

#[derive(Default)]
struct Pending {
    writes: PendingWrites,
    closing: bool,
    /// The first failed write; the state database is no longer known to follow the
    /// log after it, so every later apply fails.
    failed: Option<String>,
}

/// Writes applied changes to sled, from a thread of its own or on demand.
pub(super) struct StateWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl StateWriter {
    /// Starts the writer thread for `db`.
    pub(super) fn start(db: sled::Db, batching: WriteBatching) -> Result<Self, StateError> {
        let shared = Arc::new(Shared {
            db,
            batching,
            pending: Mutex::default(),
            wake: Condvar::new(),
            writing: Mutex::new(()),
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("muster-state-writer".into())
            .spawn(move || for_thread.run())?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Adds changes to the pending batch through `stage`, then wakes the thread if the
    /// batch just started or came due. Fails if an earlier write failed.
    pub(super) fn stage<T>(
        &self,
        stage: impl FnOnce(&mut PendingWrites) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut pending = lock(&self.shared.pending);
        if let Some(failed) = &pending.failed {
            return Err(StateError::WriteFailed(failed.clone()));
        }
        let was_empty = pending.writes.since.is_none();
        let staged = stage(&mut pending.writes)?;
        if was_empty || pending.writes.commands >= self.shared.batching.max_commands {
            self.shared.wake.notify_one();
        }
        Ok(staged)
    }

    /// Writes everything pending now, on the calling thread, after any write under way.
    pub(super) fn write_now(&self) -> Result<(), StateError> {
        self.shared.write_pending()
    }

    /// Drops what is pending and holds off every write while the guard lives: the
    /// caller replaces the whole state.
    pub(super) fn discard_pending(&self) -> MutexGuard<'_, ()> {
        let writing = lock(&self.shared.writing);
        lock(&self.shared.pending).writes = PendingWrites::default();
        writing
    }

    /// Stops the thread and writes what is left.
    pub(super) fn close(&mut self) -> Result<(), StateError> {
        lock(&self.shared.pending).closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the state writer thread panicked");
            }
        }
        self.shared.write_pending()
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "writing applied changes at close failed; the log will be re-applied");
        }
    }
}

impl Shared {
    /// The thread body: writes the pending batch whenever it comes due, until closed.
    fn run(&self) {
        let mut pending = lock(&self.pending);
        while !pending.closing {
            match pending.writes.due_in(self.batching) {
                None => pending = self.wake.wait(pending).unwrap_or_else(PoisonError::into_inner),
                Some(wait) if !wait.is_zero() => {
                    pending = self
                        .wake
                        .wait_timeout(pending, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                Some(_) => {
                    drop(pending);
                    if let Err(e) = self.write_pending() {
                        tracing::error!(error = %e, "writing applied changes to the state database failed");
                    }
                    pending = lock(&self.pending);
                }
            }
        }
    }

    /// Takes the whole pending batch and writes it, if anything is pending.
    fn write_pending(&self) -> Result<(), StateError> {
        let _writing = lock(&self.writing);
        let writes = {
            let mut pending = lock(&self.pending);
            if let Some(failed) = &pending.failed {
                return Err(StateError::WriteFailed(failed.clone()));
            }
            if pending.writes.since.is_none() {
                return Ok(());
            }
            std::mem::take(&mut pending.writes)
        };
        let written = writes.into_batch().and_then(|batch| Ok(self.db.apply_batch(batch)?));
        if let Err(e) = &written {
            lock(&self.pending).failed.get_or_insert_with(|| e.to_string());
        }
        written
    }
}
