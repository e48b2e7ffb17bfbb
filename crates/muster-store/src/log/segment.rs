//! Segment bookkeeping and crash recovery.
//!
//! Recovery reads every segment in index order and keeps the longest prefix of good records:
//! complete, checksum-valid, and consecutive in log index. The first record that is not (a
//! write cut short by a crash, or damage) ends the log: the file is cut there and every later
//! segment is deleted. Raft allows this because a record no other node relies on may be
//! lost: a follower's records are fsynced before their callback runs, and the leader's own
//! records, fsynced in the background, are acted on only once durable (see
//! `super::LogDurability`), so only such records can be torn (unless the disk itself lies).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use openraft::{LogId, RaftLogId, RaftTypeConfig};
use serde::de::DeserializeOwned;

use super::meta::{sync_dir, Meta, META_TMP_FILE};
use super::record::{decode_record, parse_segment_file_name, segment_path, Decoded};
use super::writer::remove_if_exists;
use super::LogError;
use super::StoredEntry;

/// What the front end knows about one segment file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Segment {
    /// Length of the file's records.
    pub(crate) len: u64,
    /// Byte offset of each record; the record at position `i` holds index `first + i`.
    pub(crate) offsets: Vec<u64>,
}

impl Segment {
    /// Index of the last record, given the segment's first index.
    pub(crate) fn last_index(&self, first: u64) -> Option<u64> {
        let count = u64::try_from(self.offsets.len()).ok()?;
        count.checked_sub(1).map(|n| first + n)
    }
}

/// The log state rebuilt from disk.
pub(crate) struct Recovered<C: RaftTypeConfig> {
    pub(crate) meta: Meta<C::NodeId>,
    /// Entries above the last purged index.
    pub(crate) entries: BTreeMap<u64, StoredEntry<C::NodeId>>,
    /// Segments left on disk, by first index.
    pub(crate) segments: BTreeMap<u64, Segment>,
}

/// Rebuilds the log from the files in `dir`, repairing a torn tail.
pub(crate) fn recover<C>(dir: &Path) -> Result<Recovered<C>, LogError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    remove_if_exists(&dir.join(META_TMP_FILE)).map_err(|source| LogError::Io {
        op: "remove stale temporary metadata",
        path: dir.join(META_TMP_FILE),
        source,
    })?;
    let mut meta = Meta::<C::NodeId>::load(dir)?;
    let purged = meta.last_purged.as_ref().map(|id| id.index);

    let files = list_segments(dir)?;
    let mut entries = BTreeMap::new();
    let mut segments = BTreeMap::new();
    let mut to_delete: Vec<PathBuf> = Vec::new();
    let mut prev: Option<u64> = None;

    for (pos, (first, path)) in files.iter().enumerate() {
        let bytes = fs::read(path).map_err(|source| LogError::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
        let mut seg = Segment::default();
        let mut offset = 0usize;
        let mut stop: Option<String> = None;
        loop {
            match decode_record(&bytes, offset) {
                Decoded::End => {
                    // Past the records only the zeros written ahead of them: anything
                    // else is a write torn by a crash, cut off like a bad record.
                    if bytes.get(offset..).is_some_and(|rest| rest.iter().any(|&b| b != 0)) {
                        stop = Some("bytes other than zeros after the last record".to_string());
                    }
                    break;
                }
                Decoded::Bad(bad) => {
                    stop = Some(bad.to_string());
                    break;
                }
                Decoded::Record { payload, next } => {
                    // The checksum matched, so these are the bytes we wrote: failing to decode
                    // them is a format mismatch, not a torn write, and cutting the log would
                    // destroy acknowledged entries. Refuse to open instead.
                    let entry: C::Entry = bincode::deserialize(payload).map_err(|e| LogError::Undecodable {
                        path: path.clone(),
                        offset: offset as u64,
                        reason: e.to_string(),
                    })?;
                    let index = entry.get_log_id().index;
                    let expected = match prev {
                        Some(p) => p.checked_add(1),
                        None => Some(*first),
                    };
                    let named_ok = !seg.offsets.is_empty() || index == *first;
                    if Some(index) != expected || !named_ok {
                        stop = Some(format!(
                            "entry index {index} where {} was expected",
                            expected.map_or("none".to_string(), |e| e.to_string())
                        ));
                        break;
                    }
                    seg.offsets.push(offset as u64);
                    prev = Some(index);
                    if purged.is_none_or(|p| index > p) {
                        let stored = StoredEntry {
                            log_id: entry.get_log_id().clone(),
                            bytes: bytes::Bytes::copy_from_slice(payload),
                        };
                        entries.insert(index, stored);
                    }
                    offset = next;
                }
            }
        }
        seg.len = offset as u64;

        if let Some(reason) = stop {
            tracing::warn!(
                file = %path.display(),
                offset,
                reason = %reason,
                "raft log segment ends in a bad record; truncating it there and dropping later segments"
            );
            if seg.offsets.is_empty() {
                to_delete.push(path.clone());
            } else {
                cut_file(path, seg.len)?;
                segments.insert(*first, seg);
            }
            for (_, later) in &files[pos + 1..] {
                tracing::warn!(file = %later.display(), "deleting raft log segment after a bad record");
                to_delete.push(later.clone());
            }
            break;
        }
        if seg.offsets.is_empty() {
            // Created but never written (a crash right after rotation): nothing to keep.
            to_delete.push(path.clone());
        } else {
            segments.insert(*first, seg);
        }
    }

    // Segments whose entries are all purged are left over from a purge the crash cut short.
    if let Some(p) = purged {
        let done: Vec<u64> = segments
            .iter()
            .filter(|(first, seg)| seg.last_index(**first).is_some_and(|last| last <= p))
            .map(|(first, _)| *first)
            .collect();
        for first in done {
            segments.remove(&first);
            to_delete.push(segment_path(dir, first));
        }
    }
    // Delete newest first so that a crash here still leaves a prefix.
    to_delete.sort();
    for path in to_delete.iter().rev() {
        remove_if_exists(path).map_err(|source| LogError::Io {
            op: "remove",
            path: path.clone(),
            source,
        })?;
    }
    if !to_delete.is_empty() {
        sync_dir(dir).map_err(|source| LogError::Io {
            op: "fsync directory",
            path: dir.to_path_buf(),
            source,
        })?;
    }

    // With entries purged, the log must go on right after the purge point; a gap there means
    // a segment holding unpurged entries was lost, and openraft would read a hole as valid.
    if let (Some(p), Some(&first)) = (&meta.last_purged, entries.keys().next()) {
        if first != p.index + 1 {
            return Err(LogError::Hole {
                last_purged: p.index,
                first_entry: first,
            });
        }
    }

    // The committed id is only written after the entries it covers are fsynced, so it can
    // only be ahead of the log if the disk lost acknowledged writes. Openraft would then fail
    // to re-apply entries it cannot read; clamp and say so.
    let last: Option<LogId<C::NodeId>> = entries
        .values()
        .next_back()
        .map(|e| e.log_id.clone())
        .or_else(|| meta.last_purged.clone());
    if meta.committed > last {
        tracing::warn!(
            committed = ?meta.committed,
            last_log_id = ?last,
            "raft log: committed log id is past the last entry on disk; lowering it"
        );
        meta.committed = last;
    }

    Ok(Recovered {
        meta,
        entries,
        segments,
    })
}

/// Segment files in `dir`, sorted by first index.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let read_dir = fs::read_dir(dir).map_err(|source| LogError::Io {
        op: "list",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for item in read_dir {
        let item = item.map_err(|source| LogError::Io {
            op: "list",
            path: dir.to_path_buf(),
            source,
        })?;
        let name = item.file_name();
        if let Some(first) = name.to_str().and_then(parse_segment_file_name) {
            out.push((first, item.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Cuts a segment at `len` and makes the new length durable.
fn cut_file(path: &Path, len: u64) -> Result<(), LogError> {
    let io = |op: &'static str| {
        move |source| LogError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = OpenOptions::new().write(true).open(path).map_err(io("open"))?;
    file.set_len(len).map_err(io("truncate"))?;
    file.sync_all().map_err(io("fsync"))
}
