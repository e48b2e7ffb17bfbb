//! The writer: every file change of the log goes through it, one operation at a time,
//! on the thread that asks for it.
//!
//! Order: Raft requires that a vote saved after an append is not durable before the
//! append, and operations executed one after the other under one lock guarantee that:
//! every operation but a background append first makes all earlier writes durable.
//! An append is written and fdatasynced before its callback runs, on the caller's
//! thread: openraft 0.9 awaits the flush of each append before it does anything else
//! (it never has two appends in flight), so a writer thread could never group appends
//! and only added two thread wake-ups to every write, one to hand the append over and
//! one to hand the flush back (about 50 µs each on this project's machines, on the
//! path of every acknowledged write, on the leader and again on the follower).
//!
//! The one exception is the leader's own append ([`Op::Append`] with `sync: false`):
//! it is written on the caller's thread and fdatasynced by the writer's background
//! thread, so openraft sends the entries to the followers while the leader's disk
//! flushes them (see `super::LogDurability` for why that is safe). Each fdatasync
//! publishes the index it made durable; a truncation or deletion that happened while
//! the background thread's fdatasync ran (outside the lock) makes it publish nothing.
//! The same thread writes a committed id that was left waiting
//! ([`super::LogOptions::committed_flush_interval`]).
//!
//! Zeros ahead of the records: when an append reaches the end of the active segment's
//! file, the writer extends the file with [`PREALLOCATE_BYTES`] of written zeros (never
//! past the segment's size limit), so the appends after it overwrite blocks the file
//! already has and their fdatasync has no file size or block allocation to journal:
//! 92-123 µs instead of 164-177 µs for a 400 B append on this project's machines. A
//! record's payload is never empty, so recovery reads a header of zeros as the end of
//! the records (see `record.rs`).
//!
//! The front end ([`super::SegmentLog`]) decides everything (record bytes, which segment,
//! which offset, what to delete); the writer only executes. It never parses a record.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::meta::{sync_dir, write_meta_file};
use super::record::segment_path;
use crate::lock;

/// How far past the last record a segment file is extended with zeros at a time.
pub(crate) const PREALLOCATE_BYTES: u64 = 1024 * 1024;

/// Zeros written ahead of the records, a piece at a time.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Bytes to write into one segment at one offset.
pub(crate) struct Chunk {
    /// First index of the target segment (its file name).
    pub(crate) segment: u64,
    /// The segment is new: create (or empty) the file before writing.
    pub(crate) create: bool,
    /// Where in the file the bytes go; always the segment's current end.
    pub(crate) offset: u64,
    /// Framed records.
    pub(crate) data: bytes::Bytes,
}

/// One unit of work for the writer; each is durable when [`SharedWriter::execute`]
/// returns.
pub(crate) enum Op {
    /// Write records ending with entry `last_index`; fdatasync them now when `sync`,
    /// else leave that to the background thread (the caller learns of it through the
    /// published [`DurableMark`]).
    Append {
        chunks: Vec<Chunk>,
        last_index: u64,
        sync: bool,
    },
    /// Delete whole segments (given newest first), then cut one segment to a length;
    /// `last_kept` is the index of the last entry left.
    Truncate {
        delete: Vec<u64>,
        cut: Option<(u64, u64)>,
        last_kept: Option<u64>,
    },
    /// Replace the metadata file, then delete whole segments (oldest first).
    Purge { meta: Vec<u8>, delete: Vec<u64> },
    /// Replace the metadata file (vote change).
    SaveMeta { meta: Vec<u8> },
    /// Metadata whose only change is the committed log id: written lazily, see
    /// [`super::LogOptions::committed_flush_interval`].
    SaveCommitted { meta: Vec<u8> },
}

/// How far the log's entries are on disk, published by the writer after each fdatasync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurableMark {
    /// Every entry up to this index is durable (`None`: no entry is).
    pub(crate) index: Option<u64>,
    /// A write failed: nothing more will become durable.
    pub(crate) failed: bool,
}

/// Counters the writer keeps; read through [`super::SegmentLog::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) append_batches: AtomicU64,
    pub(crate) data_syncs: AtomicU64,
    pub(crate) meta_writes: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
}

/// The writer, shared by the log and the thread that writes a waiting committed id.
pub(crate) struct SharedWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    writer: Mutex<Writer>,
    /// Wakes the background thread: a background append was written, a committed id
    /// started waiting, or the log closes.
    wake: Condvar,
}

impl SharedWriter {
    /// The writer of the log in `dir`, whose entries up to `last_index` are on disk, with
    /// its background thread started.
    pub(crate) fn start(
        dir: PathBuf,
        committed_interval: Duration,
        segment_bytes: u64,
        last_index: Option<u64>,
        counters: Arc<Counters>,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            writer: Mutex::new(Writer::new(
                dir,
                committed_interval,
                segment_bytes,
                last_index,
                counters,
            )),
            wake: Condvar::new(),
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || for_thread.run_background())?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Executes `op` now, on this thread: what it wrote is durable when this returns,
    /// except for an append without `sync`, which the background thread makes durable.
    ///
    /// A committed id alone is left to the background thread (woken when one starts
    /// waiting), so its two fsyncs never hold up the caller.
    pub(crate) fn execute(&self, op: Op) -> io::Result<()> {
        let mut writer = lock(&self.shared.writer);
        let was_waiting = writer.lazy_meta.is_some();
        let executed = writer.execute(op);
        if writer.active_dirty || (!was_waiting && writer.lazy_meta.is_some()) {
            self.shared.wake.notify_one();
        }
        executed
    }

    /// Follows how far the entries are durable.
    pub(crate) fn durable(&self) -> watch::Receiver<DurableMark> {
        lock(&self.shared.writer).durable.subscribe()
    }

    /// Stops the background thread, makes every written entry durable and writes a
    /// committed id still waiting.
    pub(crate) fn close(&mut self) {
        lock(&self.shared.writer).closing = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("raft log background thread panicked");
            }
        }
        let mut writer = lock(&self.shared.writer);
        if writer.failed.is_none() {
            if let Err(e) = writer.sync_active() {
                writer.fail(&e);
            }
        }
        writer.write_lazy_meta();
    }
}

impl Shared {
    /// The background thread: fdatasyncs background appends as soon as they are
    /// written, and writes a waiting committed id once it is due, until the writer
    /// closes.
    fn run_background(&self) {
        let mut writer = lock(&self.writer);
        while !writer.closing {
            if writer.active_dirty && writer.failed.is_none() {
                writer = self.sync_in_background(writer);
                continue;
            }
            match writer.lazy_meta_due_in() {
                None => writer = self.wake.wait(writer).unwrap_or_else(PoisonError::into_inner),
                Some(wait) if wait.is_zero() => writer.write_lazy_meta(),
                Some(wait) => {
                    writer = self
                        .wake
                        .wait_timeout(writer, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    /// Fdatasyncs the active segment without holding the lock, so the next append can
    /// be written meanwhile, then publishes what that covered.
    fn sync_in_background<'a>(&'a self, mut writer: MutexGuard<'a, Writer>) -> MutexGuard<'a, Writer> {
        let file = match &writer.active {
            Some((_, file)) if !writer.dir_dirty => Arc::clone(file),
            _ => {
                // A new segment's directory entry, or nothing open: done under the lock.
                if let Err(e) = writer.sync_active() {
                    writer.fail(&e);
                }
                return writer;
            }
        };
        let (seq, epoch, written) = (writer.write_seq, writer.epoch, writer.written);
        drop(writer);
        let synced = file.sync_data();
        let mut writer = lock(&self.writer);
        match synced {
            Err(e) => writer.fail(&e),
            Ok(()) => {
                writer.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
                // A truncation or deletion meanwhile may have removed what was synced.
                if writer.epoch == epoch {
                    if writer.write_seq == seq {
                        writer.active_dirty = false;
                    }
                    writer.publish_durable(written);
                }
            }
        }
        writer
    }
}

/// The state of the log's files, behind [`SharedWriter`]'s lock.
pub(crate) struct Writer {
    dir: PathBuf,
    /// The segment currently written to, kept open between batches (shared with the
    /// background thread's fdatasync).
    active: Option<(u64, Arc<File>)>,
    /// Length of the active segment's file: its records, then zeros.
    active_allocated: u64,
    /// Zeros are never written past this length of a segment file.
    segment_bytes: u64,
    /// `active` has writes not yet covered by an fdatasync.
    active_dirty: bool,
    /// A segment was created and the directory not yet fsynced.
    dir_dirty: bool,
    /// Index of the last entry written to the files.
    written: Option<u64>,
    /// Counts writes to segment files, so a background fdatasync knows whether it
    /// covered the last one.
    write_seq: u64,
    /// Counts truncations and deletions, so a background fdatasync that raced one
    /// publishes nothing.
    epoch: u64,
    /// How far the entries are durable, for the log's readers.
    durable: watch::Sender<DurableMark>,
    /// Metadata waiting to be written because only `committed` changed.
    lazy_meta: Option<Vec<u8>>,
    last_meta_write: Instant,
    committed_interval: Duration,
    /// Set by the first I/O error. After it the state of the files is unknown (a failed
    /// fsync may have dropped dirty pages), so every later operation fails too rather than
    /// acknowledging writes on top of a hole.
    failed: Option<(io::ErrorKind, String)>,
    counters: Arc<Counters>,
    /// The log is being dropped: the committed-id thread stops.
    closing: bool,
}

impl Writer {
    pub(crate) fn new(
        dir: PathBuf,
        committed_interval: Duration,
        segment_bytes: u64,
        last_index: Option<u64>,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            dir,
            active: None,
            active_allocated: 0,
            segment_bytes,
            active_dirty: false,
            dir_dirty: false,
            written: last_index,
            write_seq: 0,
            epoch: 0,
            durable: watch::Sender::new(DurableMark {
                index: last_index,
                failed: false,
            }),
            lazy_meta: None,
            last_meta_write: Instant::now(),
            committed_interval,
            failed: None,
            counters,
            closing: false,
        }
    }

    /// How long until pending lazy metadata must be written; `None` when there is none.
    fn lazy_meta_due_in(&self) -> Option<Duration> {
        self.lazy_meta.as_ref()?;
        Some(self.committed_interval.saturating_sub(self.last_meta_write.elapsed()))
    }

    /// Executes `op`; the first failure is remembered and fails every later operation.
    fn execute(&mut self, op: Op) -> io::Result<()> {
        if let Some(err) = self.failure() {
            return Err(err);
        }
        let executed = match op {
            Op::Append {
                chunks,
                last_index,
                sync,
            } => {
                self.counters.append_batches.fetch_add(1, Ordering::Relaxed);
                chunks
                    .iter()
                    .try_for_each(|chunk| self.write_chunk(chunk))
                    .and_then(|()| {
                        self.written = Some(last_index);
                        if sync {
                            self.sync_active()
                        } else {
                            Ok(())
                        }
                    })
            }
            // Every other change waits for the writes before it to be durable.
            Op::Truncate { delete, cut, last_kept } => {
                self.sync_active().and_then(|()| self.truncate(&delete, cut, last_kept))
            }
            Op::Purge { meta, delete } => self
                .sync_active()
                .and_then(|()| self.write_meta(&meta))
                .and_then(|()| self.delete_segments(&delete)),
            Op::SaveMeta { meta } => self.sync_active().and_then(|()| self.write_meta(&meta)),
            Op::SaveCommitted { meta } => {
                self.lazy_meta = Some(meta);
                Ok(())
            }
        };
        if let Err(e) = &executed {
            self.fail(e);
        }
        executed
    }

    fn write_chunk(&mut self, chunk: &Chunk) -> io::Result<()> {
        let end = chunk.offset + chunk.data.len() as u64;
        // Switches the active segment (and learns its file's length) first.
        self.segment_file(chunk.segment, chunk.create)?;
        let zeros_to = if end > self.active_allocated {
            // The records reach past the file's end: zeros ahead of the next ones.
            (end + PREALLOCATE_BYTES).min(end.max(self.segment_bytes))
        } else {
            end
        };
        // Marked before writing: a write that fails half way has still changed the file.
        self.active_dirty = true;
        self.write_seq += 1;
        let mut file = self.segment_file(chunk.segment, false)?;
        file.seek(SeekFrom::Start(chunk.offset))?;
        file.write_all(&chunk.data)?;
        let mut at = end;
        while at < zeros_to {
            let piece = usize::try_from(zeros_to - at).map_or(ZEROS.len(), |left| left.min(ZEROS.len()));
            file.write_all(&ZEROS[..piece])?;
            at += piece as u64;
        }
        self.active_allocated = self.active_allocated.max(zeros_to);
        self.counters
            .bytes_written
            .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The open file of `segment`, switching the active segment when needed.
    fn segment_file(&mut self, segment: u64, create: bool) -> io::Result<&File> {
        let reuse = matches!(&self.active, Some((s, _)) if *s == segment) && !create;
        if !reuse {
            // Leaving a segment: its data must be durable before the group's callbacks run,
            // and only the active segment is synced at the end of the group.
            self.sync_active()?;
            self.active = None;
            let path = segment_path(&self.dir, segment);
            let file = if create {
                self.dir_dirty = true;
                OpenOptions::new().write(true).create(true).truncate(true).open(&path)?
            } else {
                OpenOptions::new().write(true).open(&path)?
            };
            self.active_allocated = file.metadata()?.len();
            self.active = Some((segment, Arc::new(file)));
        }
        match &self.active {
            Some((_, file)) => Ok(file),
            None => Err(io::Error::other("no active segment")),
        }
    }

    fn sync_active(&mut self) -> io::Result<()> {
        if self.active_dirty {
            if let Some((_, file)) = &self.active {
                file.sync_data()?;
                self.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
            }
            self.active_dirty = false;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        let written = self.written;
        self.publish_durable(written);
        Ok(())
    }

    /// Raises the published durable index to `index`.
    fn publish_durable(&self, index: Option<u64>) {
        self.durable.send_if_modified(|mark| {
            let raise = index > mark.index;
            if raise {
                mark.index = index;
            }
            raise
        });
    }

    fn truncate(&mut self, delete: &[u64], cut: Option<(u64, u64)>, last_kept: Option<u64>) -> io::Result<()> {
        // What was written past the cut is gone whatever happens below.
        self.epoch += 1;
        self.written = self.written.min(last_kept);
        self.durable.send_if_modified(|mark| {
            let lower = mark.index > last_kept;
            if lower {
                mark.index = last_kept;
            }
            lower
        });
        // Newest segments go first, so a crash half way leaves a log that is a prefix of the
        // old one, never one with a hole in the middle.
        self.delete_segments(delete)?;
        if let Some((segment, len)) = cut {
            let reuse = matches!(&self.active, Some((s, _)) if *s == segment);
            if !reuse {
                self.active = None;
                let file = OpenOptions::new().write(true).open(segment_path(&self.dir, segment))?;
                self.active = Some((segment, Arc::new(file)));
            }
            if let Some((_, file)) = &self.active {
                file.set_len(len)?;
                self.active_allocated = len;
                file.sync_data()?;
                self.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn delete_segments(&mut self, segments: &[u64]) -> io::Result<()> {
        if segments.is_empty() {
            return Ok(());
        }
        self.epoch += 1;
        for &segment in segments {
            if matches!(&self.active, Some((s, _)) if *s == segment) {
                self.active = None;
                self.active_dirty = false;
            }
            remove_if_exists(&segment_path(&self.dir, segment))?;
        }
        sync_dir(&self.dir)
    }

    fn write_meta(&mut self, bytes: &[u8]) -> io::Result<()> {
        write_meta_file(&self.dir, bytes)?;
        // Whatever committed id was waiting is older than (or equal to) this one.
        self.lazy_meta = None;
        self.last_meta_write = Instant::now();
        self.counters.meta_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn write_lazy_meta(&mut self) {
        let Some(meta) = self.lazy_meta.take() else {
            return;
        };
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = self.write_meta(&meta) {
            self.fail(&e);
        }
    }

    fn fail(&mut self, e: &io::Error) {
        if self.failed.is_none() {
            tracing::error!(dir = %self.dir.display(), error = %e, "raft log write failed; refusing further writes");
            self.failed = Some((e.kind(), e.to_string()));
            self.durable.send_modify(|mark| mark.failed = true);
        }
    }

    fn failure(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, format!("log writer failed earlier: {msg}")))
    }
}

/// Removes a file, treating "already gone" as done (a crashed purge may have removed it).
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
