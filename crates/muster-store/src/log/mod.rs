//! The Raft log and vote store: segmented, checksummed, fsynced before acknowledged.
//!
//! Why not keep the log in sled with the state machine: sled's flush uses
//! `sync_file_range` on Linux, which does not flush the disk's write cache, and Raft's
//! safety rests on a vote or an appended entry being on stable storage before it is
//! acknowledged. So the log lives here, in plain files that are `fdatasync`ed.
//!
//! Layout of the log directory:
//!
//! - `seg-{first_index:020}.log`: append-only segments of records
//!   `[u32 len LE][u32 crc32 LE][bincode(entry)]`, then zeros written ahead of the next
//!   records (see `writer.rs`). A new segment starts once the current one's records
//!   have reached [`LogOptions::segment_bytes`], so purging can delete whole files.
//! - `log-meta`: vote, last purged and committed log ids, replaced atomically.
//!
//! All file writes go through one writer, one at a time, on the calling thread (see
//! `writer.rs`; the leader's own appends are the exception, see [`LogDurability`]); every un-purged entry is also kept in memory, as the bytes of its record, so reads
//! never touch the disk. A read decodes what it returns: an entry's record is a few
//! times smaller than the decoded entry, and openraft takes its own copy of every
//! entry it reads anyway.

mod meta;
mod record;
mod segment;
mod writer;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogId, LogState, NodeId, OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig,
    StorageError, StorageIOError, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use self::meta::Meta;
use self::record::HEADER_LEN;
use self::segment::Segment;
use self::writer::{Chunk, Counters, DurableMark, Op, SharedWriter};
use tokio::sync::watch;

/// Tuning knobs of a [`SegmentLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// A new segment file is started once the current one holds at least this many bytes.
    ///
    /// Purging deletes whole segments only, so this bounds how much purged data stays on
    /// disk; recovery reads whole segments, so it also bounds the memory a read takes.
    pub segment_bytes: u64,
    /// Longest time a change of only the committed log id may wait before it is written.
    ///
    /// Openraft saves the committed id on every commit. Writing the metadata file costs two
    /// fsyncs, so doing that per commit would triple the disk flushes of the write path.
    /// Losing the newest committed id in a crash is harmless (entries are re-applied once the
    /// leader repeats the commit index), so it is written at most this often, and whenever
    /// the vote or purge point is written anyway. Votes are never delayed.
    pub committed_flush_interval: Duration,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
            committed_flush_interval: Duration::from_millis(100),
        }
    }
}

/// Why the log could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The writer reported a failed write or fsync. The log refuses further writes
    /// after this, since the state of the files is no longer known.
    #[error("raft log write failed: {0}")]
    Write(#[source] io::Error),
    /// The metadata file is unreadable; the vote in it cannot be trusted, so the log does
    /// not open rather than forget a vote.
    #[error("raft log metadata {} is corrupt: {reason}", path.display())]
    CorruptMeta {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A record passed its checksum but does not decode as a log entry: a format mismatch
    /// (e.g. a different entry type), not a torn write, so nothing is truncated.
    #[error("raft log record at {}:{offset} has a valid checksum but does not decode: {reason}", path.display())]
    Undecodable {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the record.
        offset: u64,
        /// The decoder's error.
        reason: String,
    },
    /// Entries right after the purge point are missing, so the log has a hole.
    #[error("raft log has a hole: last purged index is {last_purged} but the first entry on disk is {first_entry}")]
    Hole {
        /// Index of the last purged entry.
        last_purged: u64,
        /// Index of the first entry found.
        first_entry: u64,
    },
    /// An entry held in memory does not decode (it was encoded by this process, so this
    /// is a bug, not damage on disk).
    #[error("raft log entry {index} held in memory does not decode: {reason}")]
    UndecodableInMemory {
        /// The entry's index.
        index: u64,
        /// The decoder's error.
        reason: String,
    },
    /// An appended entry does not directly follow the last one.
    #[error("appended entry has index {got}, expected {expected}: the log must stay consecutive")]
    NonConsecutive {
        /// The index that would keep the log consecutive.
        expected: u64,
        /// The index of the offending entry.
        got: u64,
    },
    /// Something could not be serialized.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// The options cannot work.
    #[error("invalid log options: {0}")]
    InvalidOptions(&'static str),
}

/// Counters describing the log's I/O, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Append batches written.
    pub append_batches: u64,
    /// `fdatasync` calls on segment files (appends, rotations, truncations).
    pub data_syncs: u64,
    /// Atomic rewrites of the metadata file.
    pub meta_writes: u64,
    /// Record bytes written to segments.
    pub bytes_written: u64,
}

/// An un-purged entry held in memory: its log id and its encoded form (the payload
/// of its record, shared with the other records of its batch).
pub(crate) struct StoredEntry<NID: NodeId> {
    pub(crate) log_id: LogId<NID>,
    pub(crate) bytes: Bytes,
}

impl<NID: NodeId> StoredEntry<NID> {
    fn decode<E: DeserializeOwned>(&self) -> Result<E, LogError> {
        bincode::deserialize(&self.bytes).map_err(|e| LogError::UndecodableInMemory {
            index: self.log_id.index,
            reason: e.to_string(),
        })
    }
}

type EntryMap<C> = Arc<RwLock<BTreeMap<u64, StoredEntry<<C as RaftTypeConfig>::NodeId>>>>;

/// The Raft log and vote storage of one node: an openraft [`RaftLogStorage`].
///
/// Appends, votes, truncations and purges return once durable; an append calls openraft's
/// callback before it returns. Dropping the log writes a committed id still waiting.
pub struct SegmentLog<C: RaftTypeConfig> {
    dir: PathBuf,
    options: LogOptions,
    /// Un-purged entries, shared with every [`LogReader`].
    entries: EntryMap<C>,
    /// Segment files as they are.
    segments: BTreeMap<u64, Segment>,
    meta: Meta<C::NodeId>,
    writer: SharedWriter,
    counters: Arc<Counters>,
    /// This node's id, once [`SegmentLog::flush_leader_appends_in_background`] is called.
    own_id: Option<C::NodeId>,
    durability: LogDurability<C>,
}

/// How far a [`SegmentLog`]'s entries are on disk, for those who must not act on an
/// entry before it is: the state machine and the leader's messages to its followers.
///
/// The leader's own appends return once written, before their fdatasync, so openraft
/// sends them to the followers while the leader's disk flushes them (Raft dissertation,
/// §10.2.1: the leader may write to its disk in parallel with replicating). Openraft
/// then counts the leader in the quorum of an entry whose flush is still running, so
/// an entry can be "committed" on one durable follower and a leader that could still
/// lose it in a crash. Nothing may act on such an entry until it is durable here too:
/// the state machine waits for it before applying ([`Self::wait_durable`]), which holds
/// back every answer to the write and every read that could see it; the commit index
/// sent to followers ([`Self::durable_prefix`]) and the committed id saved with the
/// vote stop at it. Every other change to the log (a vote, a truncation, a purge) first
/// makes the writes before it durable, and a leader must save a new vote before it
/// answers another leader, so entries not yet durable only ever exist while this node
/// leads, in its own term.
pub struct LogDurability<C: RaftTypeConfig> {
    mark: watch::Receiver<DurableMark>,
    entries: EntryMap<C>,
}

impl<C: RaftTypeConfig> Clone for LogDurability<C> {
    fn clone(&self) -> Self {
        Self {
            mark: self.mark.clone(),
            entries: Arc::clone(&self.entries),
        }
    }
}

impl<C: RaftTypeConfig> LogDurability<C> {
    /// Every entry up to this index is on disk (`None`: no entry is).
    pub fn durable_index(&self) -> Option<u64> {
        self.mark.borrow().index
    }

    /// The index of the last entry appended to the log, on disk or not (`None`: the
    /// log holds no entry). An entry is here before it can be sent to a follower.
    pub fn last_index(&self) -> Option<u64> {
        let map = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        map.last_key_value().map(|(index, _)| *index)
    }

    /// The id of the last entry appended to the log, on disk or not (`None`: the log
    /// holds no entry, which it also does not when every entry was purged).
    pub fn last_log_id(&self) -> Option<LogId<C::NodeId>> {
        let map = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        map.last_key_value().map(|(_, stored)| stored.log_id.clone())
    }

    /// Waits until every entry up to `index` is on disk.
    ///
    /// Fails when a write of the log failed, or the log was closed first.
    pub async fn wait_durable(&self, index: u64) -> Result<(), LogError> {
        let mut mark = self.mark.clone();
        let reached = mark
            .wait_for(|m| m.failed || m.index >= Some(index))
            .await
            .map(|m| !m.failed);
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => Err(LogError::Write(io::Error::other(format!(
                "entry {index} will never be durable: a log write failed"
            )))),
            Err(_) => Err(LogError::Write(io::Error::other(format!(
                "entry {index} will never be durable: the log was closed"
            )))),
        }
    }

    /// The longest prefix of the log ending at `log_id` that is on disk: `log_id`
    /// itself when it is durable, else the id of the last durable entry (`None` when
    /// that entry is purged or there is none). `log_id` must be in this log.
    pub fn durable_prefix(&self, log_id: Option<LogId<C::NodeId>>) -> Option<LogId<C::NodeId>> {
        let wanted = log_id?;
        let durable = self.durable_index()?;
        if wanted.index <= durable {
            return Some(wanted);
        }
        let map = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        map.get(&durable).map(|stored| stored.log_id.clone())
    }
}

/// A cheap, cloneable read handle on the entries of a [`SegmentLog`].
///
/// Openraft hands one to every replication task; reads come from memory and never wait for
/// the writer.
pub struct LogReader<C: RaftTypeConfig> {
    entries: EntryMap<C>,
}

impl<C: RaftTypeConfig> Clone for LogReader<C> {
    fn clone(&self) -> Self {
        Self {
            entries: Arc::clone(&self.entries),
        }
    }
}

impl<C> SegmentLog<C>
where
    C: RaftTypeConfig,
    C::Entry: Clone + Serialize + DeserializeOwned,
{
    /// Opens (or creates) the log in `dir`, recovering from a crash if needed.
    ///
    /// Recovery keeps the longest prefix of complete, checksum-valid, consecutive records:
    /// a segment that ends in a torn or damaged record is cut there (with a warning naming
    /// the file and offset) and later segments are deleted.
    pub fn open(dir: &Path, options: LogOptions) -> Result<Self, LogError> {
        if options.segment_bytes == 0 {
            return Err(LogError::InvalidOptions("segment_bytes must be at least 1"));
        }
        let existed = dir.is_dir();
        std::fs::create_dir_all(dir).map_err(|source| LogError::Io {
            op: "create directory",
            path: dir.to_path_buf(),
            source,
        })?;
        if !existed {
            // The new directory's own entry must be durable, or fsynced segments in it could
            // vanish with it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                meta::sync_dir(parent).map_err(|source| LogError::Io {
                    op: "fsync directory",
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
        }

        let recovered = segment::recover::<C>(dir)?;
        let counters = Arc::new(Counters::default());
        let last_index = recovered
            .entries
            .keys()
            .next_back()
            .copied()
            .or_else(|| recovered.meta.last_purged.as_ref().map(|p| p.index));
        let writer = SharedWriter::start(
            dir.to_path_buf(),
            options.committed_flush_interval,
            options.segment_bytes,
            last_index,
            Arc::clone(&counters),
        )
        .map_err(|source| LogError::Io {
            op: "spawn background writer thread for",
            path: dir.to_path_buf(),
            source,
        })?;

        let entries = Arc::new(RwLock::new(recovered.entries));
        let durability = LogDurability {
            mark: writer.durable(),
            entries: Arc::clone(&entries),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            options,
            entries,
            segments: recovered.segments,
            meta: recovered.meta,
            writer,
            counters,
            own_id: None,
            durability,
        })
    }

    /// Lets the appends this node makes as leader, in its own term, return before their
    /// fdatasync, which runs in the background meanwhile: see [`LogDurability`], whose
    /// rules everyone acting on the log's entries must then follow. Appends from any
    /// other leader stay durable before they return.
    pub fn flush_leader_appends_in_background(&mut self, own_id: C::NodeId) {
        self.own_id = Some(own_id);
    }

    /// How far the entries are on disk.
    pub fn durability(&self) -> LogDurability<C> {
        self.durability.clone()
    }

    /// Whether `entries` are this node's own, appended as the leader of its current
    /// (committed) vote: only such entries may be flushed in the background.
    fn appended_as_leader(&self, entries: &[C::Entry]) -> bool {
        let (Some(own), Some(vote), Some(last)) = (&self.own_id, &self.meta.vote, entries.last()) else {
            return false;
        };
        vote.is_committed()
            && vote.leader_id().voted_for().as_ref() == Some(own)
            && &last.get_log_id().leader_id == vote.leader_id()
    }

    /// Appends entries and calls `done` once they are durable (or the write failed).
    ///
    /// This is the one append path: openraft's [`RaftLogStorage::append`] wraps its
    /// `LogFlushed` callback into `done`, which runs on this thread after the fdatasync
    /// that covers the entries, before this returns. Entries must continue the log
    /// without a gap.
    pub fn append_with<I, F>(&mut self, entries: I, done: F) -> Result<(), LogError>
    where
        I: IntoIterator<Item = C::Entry>,
        F: FnOnce(io::Result<()>) + Send + 'static,
    {
        self.append_inner(entries.into_iter().collect(), true).map(done)
    }

    /// Appends entries and waits until they are durable.
    ///
    /// For callers outside openraft (tests, tools) that want a plain "write and sync"; it
    /// shares [`Self::append_with`]'s path.
    pub async fn append_and_wait<I>(&mut self, entries: I) -> Result<(), LogError>
    where
        I: IntoIterator<Item = C::Entry>,
    {
        self.append_inner(entries.into_iter().collect(), true)?
            .map_err(LogError::Write)
    }

    /// A read handle sharing this log's entries.
    pub fn reader(&self) -> LogReader<C> {
        LogReader {
            entries: Arc::clone(&self.entries),
        }
    }

    /// The directory this log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options the log was opened with.
    pub fn options(&self) -> &LogOptions {
        &self.options
    }

    /// I/O counters since the log was opened.
    pub fn stats(&self) -> LogStats {
        let c = &self.counters;
        LogStats {
            append_batches: c.append_batches.load(Ordering::Relaxed),
            data_syncs: c.data_syncs.load(Ordering::Relaxed),
            meta_writes: c.meta_writes.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Encodes, places and writes `entries`, fdatasynced before this returns when `sync`:
    /// the outer error leaves the log as it was; the inner one is the write's, after
    /// which the writer refuses further writes.
    fn append_inner(&mut self, entries: Vec<C::Entry>, sync: bool) -> Result<io::Result<()>, LogError> {
        let Some(last_index) = entries.last().map(|e| e.get_log_id().index) else {
            return Ok(Ok(()));
        };
        // Check and encode everything before changing any state, so a failure leaves the log
        // as it was. Records go into one buffer; `bounds` remembers where each one is.
        let mut expected = self.next_index();
        let mut buf = Vec::new();
        let mut bounds = Vec::with_capacity(entries.len());
        for entry in &entries {
            let index = entry.get_log_id().index;
            if let Some(expected) = expected {
                if index != expected {
                    return Err(LogError::NonConsecutive { expected, got: index });
                }
            }
            expected = index.checked_add(1);
            let start = buf.len();
            encode_entry(entry, index, &mut buf)?;
            bounds.push((index, start, buf.len()));
        }

        // Place each record: at the end of the last segment, or in a new one when the last
        // is full. Records of one segment are contiguous in `buf`.
        let mut planned: Vec<(u64, bool, u64, std::ops::Range<usize>)> = Vec::new();
        for &(index, start, end) in &bounds {
            let rotate = match self.segments.iter().next_back() {
                None => true,
                Some((&first, seg)) => {
                    seg.len >= self.options.segment_bytes
                        || seg.last_index(first).and_then(|l| l.checked_add(1)) != Some(index)
                }
            };
            if rotate {
                self.segments.insert(index, Segment::default());
            }
            let Some((&first, seg)) = self.segments.iter_mut().next_back() else {
                continue; // unreachable: a segment was just ensured
            };
            let offset = seg.len;
            seg.offsets.push(offset);
            seg.len += (end - start) as u64;
            match planned.last_mut() {
                Some((segment, _, _, range)) if *segment == first => range.end = end,
                _ => planned.push((first, offset == 0, offset, start..end)),
            }
        }
        let buf = Bytes::from(buf);
        let chunks = planned
            .into_iter()
            .map(|(segment, create, offset, range)| Chunk {
                segment,
                create,
                offset,
                data: buf.slice(range),
            })
            .collect();

        {
            let mut map = self.entries.write().unwrap_or_else(PoisonError::into_inner);
            for (entry, &(index, start, end)) in entries.iter().zip(&bounds) {
                let stored = StoredEntry {
                    log_id: entry.get_log_id().clone(),
                    bytes: buf.slice(start + HEADER_LEN..end),
                };
                map.insert(index, stored);
            }
        }
        Ok(self.writer.execute(Op::Append {
            chunks,
            last_index,
            sync,
        }))
    }

    /// Index the next appended entry must have; `None` while the log is empty and nothing
    /// was ever purged (then any start index is accepted).
    fn next_index(&self) -> Option<u64> {
        let last = self
            .entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .next_back()
            .copied();
        match (last, &self.meta.last_purged) {
            (Some(index), _) => index.checked_add(1),
            (None, Some(purged)) => purged.index.checked_add(1),
            (None, None) => None,
        }
    }

    async fn truncate_inner(&mut self, index: u64) -> Result<(), LogError> {
        drop(
            self.entries
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .split_off(&index),
        );

        // Segments starting at or after `index` go entirely, newest first.
        let delete: Vec<u64> = self.segments.range(index..).rev().map(|(f, _)| *f).collect();
        for first in &delete {
            self.segments.remove(first);
        }
        // The segment holding `index` is cut at that record.
        let mut cut = None;
        if let Some((&first, seg)) = self.segments.range_mut(..index).next_back() {
            let keep = usize::try_from(index - first).unwrap_or(usize::MAX);
            if let Some(&offset) = seg.offsets.get(keep) {
                seg.offsets.truncate(keep);
                seg.len = offset;
                cut = Some((first, offset));
            }
        }
        if delete.is_empty() && cut.is_none() {
            return Ok(());
        }
        self.writer
            .execute(Op::Truncate {
                delete,
                cut,
                last_kept: index.checked_sub(1),
            })
            .map_err(LogError::Write)
    }

    async fn purge_inner(&mut self, log_id: LogId<C::NodeId>) -> Result<(), LogError> {
        if self.meta.last_purged.as_ref().is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        {
            let mut map = self.entries.write().unwrap_or_else(PoisonError::into_inner);
            *map = match log_id.index.checked_add(1) {
                Some(keep_from) => map.split_off(&keep_from),
                None => BTreeMap::new(),
            };
        }
        let purge_index = log_id.index;
        self.meta.last_purged = Some(log_id);
        let meta = self.meta.encode()?;

        // Whole segments whose every entry is purged can go, oldest first. The metadata
        // is written before the deletion, so a crash in between never shows a log that starts
        // after its purge point without saying so.
        let delete: Vec<u64> = self
            .segments
            .iter()
            .take_while(|(first, seg)| seg.last_index(**first).is_none_or(|l| l <= purge_index))
            .map(|(first, _)| *first)
            .collect();
        for first in &delete {
            self.segments.remove(first);
        }
        self.writer.execute(Op::Purge { meta, delete }).map_err(LogError::Write)
    }
}

/// Appends the framed record of `entry` to `buf`.
fn encode_entry<E: Serialize>(entry: &E, index: u64, buf: &mut Vec<u8>) -> Result<(), LogError> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_LEN]);
    if let Err(e) = bincode::serialize_into(&mut *buf, entry) {
        buf.truncate(start);
        return Err(LogError::Encode {
            what: format!("log entry {index}"),
            reason: e.to_string(),
        });
    }
    let payload = &buf[start + HEADER_LEN..];
    let Ok(len) = u32::try_from(payload.len()) else {
        let size = payload.len();
        buf.truncate(start);
        return Err(LogError::Encode {
            what: format!("log entry {index}"),
            reason: format!("{size} bytes is over the 4 GiB record limit"),
        });
    };
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Turns any range into `[start, end)`, or `None` when it is empty.
fn half_open<RB: RangeBounds<u64>>(range: &RB) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.checked_add(1),
        Bound::Excluded(e) => Some(*e),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if start >= end => None,
        _ => Some((start, end)),
    }
}

fn read_range<C, RB>(entries: &EntryMap<C>, range: &RB) -> Result<Vec<C::Entry>, LogError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
    RB: RangeBounds<u64>,
{
    let Some((start, end)) = half_open(range) else {
        return Ok(Vec::new());
    };
    let map = entries.read().unwrap_or_else(PoisonError::into_inner);
    let decode = |(_, stored): (&u64, &StoredEntry<C::NodeId>)| stored.decode();
    match end {
        Some(end) => map.range(start..end).map(decode).collect(),
        None => map.range(start..).map(decode).collect(),
    }
}

fn storage_error<NID: NodeId>(subject: ErrorSubject<NID>, verb: ErrorVerb, e: LogError) -> StorageError<NID> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

impl<C> RaftLogReader<C> for LogReader<C>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        read_range::<C, _>(&self.entries, &range).map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl<C> RaftLogReader<C> for SegmentLog<C>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        read_range::<C, _>(&self.entries, &range).map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl<C> RaftLogStorage<C> for SegmentLog<C>
where
    C: RaftTypeConfig,
    C::Entry: Clone + Serialize + DeserializeOwned,
{
    type LogReader = LogReader<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let last = self
            .entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .next_back()
            .map(|e| e.log_id.clone());
        Ok(LogState {
            last_purged_log_id: self.meta.last_purged.clone(),
            last_log_id: last.or_else(|| self.meta.last_purged.clone()),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.meta.vote = Some(vote.clone());
        let meta = self
            .meta
            .encode()
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        self.writer
            .execute(Op::SaveMeta { meta })
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, LogError::Write(e)))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self.meta.vote.clone())
    }

    async fn save_committed(&mut self, committed: Option<LogId<C::NodeId>>) -> Result<(), StorageError<C::NodeId>> {
        // A restart re-applies up to the saved id, so it never passes what is on disk.
        let committed = self.durability.durable_prefix(committed);
        if committed.is_none() || self.meta.committed >= committed {
            return Ok(());
        }
        self.meta.committed = committed;
        let meta = self
            .meta
            .encode()
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        self.writer
            .execute(Op::SaveCommitted { meta })
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, LogError::Write(e)))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self.meta.committed.clone())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<C::Entry> = entries.into_iter().collect();
        let sync = !self.appended_as_leader(&entries);
        self.append_inner(entries, sync)
            .map(|written| callback.log_io_completed(written))
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.truncate_inner(log_id.index)
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.purge_inner(log_id)
            .await
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

impl<C: RaftTypeConfig> Drop for SegmentLog<C> {
    fn drop(&mut self) {
        // Writes a committed id still waiting, so a reopen sees every write.
        self.writer.close();
    }
}
