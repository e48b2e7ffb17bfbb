//! Integration tests of the segmented Raft log: durability across reopen, truncation,
//! purging, segment rotation, torn-write recovery and acknowledgement after the fsync.

use std::collections::BTreeSet;
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_store::log::{LogError, LogOptions, SegmentLog};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftLogReader, Vote};
use serde::{Deserialize, Serialize};

/// The application data of the test type config: small, but not trivially encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Put {
    key: String,
    value: u64,
}

openraft::declare_raft_types!(
    pub TestConfig:
        D = Put,
        R = (),
        NodeId = u64,
        Node = BasicNode,
);

type Log = SegmentLog<TestConfig>;
type Ent = Entry<TestConfig>;

fn lid(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn put(term: u64, index: u64) -> Ent {
    Entry {
        log_id: lid(term, index),
        payload: EntryPayload::Normal(Put {
            key: format!("service-{index}"),
            value: index * 7 + term,
        }),
    }
}

/// Entries `range` of `term`: index 0 is a membership entry, as openraft writes it.
fn ents(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<Ent> {
    range
        .map(|i| {
            if i == 0 {
                Entry {
                    log_id: lid(term, 0),
                    payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1u64])], None)),
                }
            } else {
                put(term, i)
            }
        })
        .collect()
}

/// A comparable rendering of entries (openraft's `Entry` has no `PartialEq`).
fn ids(entries: &[Ent]) -> Vec<(u64, u64)> {
    entries
        .iter()
        .map(|e| (e.log_id.leader_id.term, e.log_id.index))
        .collect()
}

fn expect(term_of: impl Fn(u64) -> u64, range: std::ops::RangeInclusive<u64>) -> Vec<(u64, u64)> {
    range.map(|i| (term_of(i), i)).collect()
}

fn tiny(segment_bytes: u64) -> LogOptions {
    LogOptions {
        segment_bytes,
        ..LogOptions::default()
    }
}

fn open(dir: &Path, options: LogOptions) -> Log {
    SegmentLog::open(dir, options).expect("open log")
}

async fn all(log: &mut Log) -> Vec<Ent> {
    log.try_get_log_entries(..).await.expect("read entries")
}

/// Segment files in `dir` as (first index, path), sorted.
fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .expect("list dir")
        .map(|e| e.expect("dir entry").path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
            Some((digits.parse().ok()?, p))
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn append_and_read_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), LogOptions::default());

    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, None);
    assert_eq!(st.last_log_id, None);
    assert!(all(&mut log).await.is_empty());

    log.append_and_wait(ents(1, 0..=5)).await.unwrap();
    // openraft's own blocking append goes through `append` with a real `LogFlushed`.
    log.blocking_append(ents(1, 6..=9)).await.unwrap();

    assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=9));
    assert_eq!(ids(&log.try_get_log_entries(3..5).await.unwrap()), expect(|_| 1, 3..=4));
    assert_eq!(ids(&log.try_get_log_entries(..=2).await.unwrap()), expect(|_| 1, 0..=2));
    assert_eq!(ids(&log.try_get_log_entries(8..).await.unwrap()), expect(|_| 1, 8..=9));
    assert_eq!(
        ids(&log.try_get_log_entries(8..100).await.unwrap()),
        expect(|_| 1, 8..=9)
    );
    let (a, b) = (5u64, 3u64);
    assert!(log.try_get_log_entries(a..a).await.unwrap().is_empty());
    assert!(log.try_get_log_entries(a..b).await.unwrap().is_empty());
    assert!(log.try_get_log_entries(10..).await.unwrap().is_empty());

    // Every entry reads back whole, from either batch.
    let mut appended = ents(1, 0..=5);
    appended.extend(ents(1, 6..=9));
    assert_eq!(all(&mut log).await, appended);
    // The payload survives encoding exactly.
    let got = log.try_get_log_entries(4..5).await.unwrap();
    match &got[0].payload {
        EntryPayload::Normal(p) => assert_eq!(
            p,
            &Put {
                key: "service-4".into(),
                value: 29
            }
        ),
        other => panic!("unexpected payload {other:?}"),
    }

    let mut reader = log.get_log_reader().await;
    let mut reader2 = reader.clone();
    assert_eq!(
        ids(&reader.try_get_log_entries(0..3).await.unwrap()),
        expect(|_| 1, 0..=2)
    );
    assert_eq!(
        ids(&reader2.limited_get_log_entries(7, 10).await.unwrap()),
        expect(|_| 1, 7..=9)
    );

    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, None);
    assert_eq!(st.last_log_id, Some(lid(1, 9)));

    // An empty append still reports completion (and writes nothing).
    log.append_and_wait(Vec::new()).await.unwrap();

    // A gap would be a hole in the log: refused, and nothing changes.
    let err = log.append_and_wait(vec![put(1, 12)]).await.unwrap_err();
    assert!(
        matches!(err, LogError::NonConsecutive { expected: 10, got: 12 }),
        "{err}"
    );
    assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=9));

    let stats = log.stats();
    assert!(stats.append_batches >= 2);
    assert!(stats.data_syncs >= 1);
    assert!(stats.bytes_written > 0);
}

#[tokio::test]
async fn restart_keeps_entries_vote_and_committed() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut log = open(tmp.path(), LogOptions::default());
        assert_eq!(log.read_vote().await.unwrap(), None);
        assert_eq!(log.read_committed().await.unwrap(), None);
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        log.append_and_wait(ents(3, 0..=20)).await.unwrap();
        log.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
        log.save_committed(Some(lid(3, 15))).await.unwrap();
        assert_eq!(log.read_committed().await.unwrap(), Some(lid(3, 15)));
    }
    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(4, 2)));
    // The committed id is written lazily but always by the time the log is dropped.
    assert_eq!(log.read_committed().await.unwrap(), Some(lid(3, 15)));
    assert_eq!(ids(&all(&mut log).await), expect(|_| 3, 0..=20));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_log_id, Some(lid(3, 20)));
    assert_eq!(st.last_purged_log_id, None);

    // Appending after a reopen continues the same segment and survives another reopen.
    log.append_and_wait(ents(4, 21..=25)).await.unwrap();
    drop(log);
    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(
        ids(&all(&mut log).await),
        expect(|i| if i <= 20 { 3 } else { 4 }, 0..=25)
    );
    assert_eq!(segments(tmp.path()).len(), 1);
}

#[tokio::test]
async fn committed_id_is_flushed_while_running() {
    let tmp = tempfile::tempdir().unwrap();
    let options = LogOptions {
        committed_flush_interval: Duration::from_millis(10),
        ..LogOptions::default()
    };
    let mut log = open(tmp.path(), options.clone());
    log.append_and_wait(ents(1, 0..=3)).await.unwrap();
    let before = log.stats().meta_writes;
    log.save_committed(Some(lid(1, 3))).await.unwrap();
    // Written without another operation to carry it.
    for _ in 0..200 {
        if log.stats().meta_writes > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(log.stats().meta_writes, before + 1);
}

#[tokio::test]
async fn truncate_then_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let options = tiny(200);
    {
        let mut log = open(tmp.path(), options.clone());
        log.append_and_wait(ents(1, 0..=30)).await.unwrap();
        let before = segments(tmp.path());
        assert!(before.len() > 3, "expected several segments, got {before:?}");

        // Cut in the middle of a segment.
        log.truncate(lid(1, 12)).await.unwrap();
        assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=11));
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(lid(1, 11)));
        assert!(segments(tmp.path()).iter().all(|(first, _)| *first <= 11));

        // A conflicting suffix from a new leader.
        log.append_and_wait(ents(2, 12..=16)).await.unwrap();
        assert_eq!(
            ids(&all(&mut log).await),
            expect(|i| if i < 12 { 1 } else { 2 }, 0..=16)
        );

        // Truncating past the end changes nothing.
        log.truncate(lid(2, 40)).await.unwrap();
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(lid(2, 16)));
    }
    {
        let mut log = open(tmp.path(), options.clone());
        assert_eq!(
            ids(&all(&mut log).await),
            expect(|i| if i < 12 { 1 } else { 2 }, 0..=16)
        );

        // Cut exactly at the first record of a segment: that file goes away whole.
        let segs = segments(tmp.path());
        let (boundary, _) = segs[1];
        log.truncate(lid(1, boundary)).await.unwrap();
        let after = segments(tmp.path());
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(lid(1, boundary - 1))
        );
        log.append_and_wait(ents(3, boundary..=boundary + 2)).await.unwrap();
    }
    let (boundary, _) = segments(tmp.path())[1];
    let mut log = open(tmp.path(), options.clone());
    assert_eq!(
        ids(&all(&mut log).await),
        expect(|i| if i < boundary { 1 } else { 3 }, 0..=boundary + 2)
    );

    // Truncating everything leaves an empty log that accepts a new start.
    log.truncate(lid(1, 0)).await.unwrap();
    assert!(all(&mut log).await.is_empty());
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, None);
    assert!(segments(tmp.path()).is_empty());
    drop(log);
    let mut log = open(tmp.path(), options);
    assert!(all(&mut log).await.is_empty());
}

#[tokio::test]
async fn purge_then_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let options = tiny(200);
    {
        let mut log = open(tmp.path(), options.clone());
        log.append_and_wait(ents(1, 0..=30)).await.unwrap();
        let before = segments(tmp.path()).len();

        log.purge(lid(1, 17)).await.unwrap();
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(lid(1, 17)));
        assert_eq!(st.last_log_id, Some(lid(1, 30)));
        assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 18..=30));

        // Every segment whose entries are all purged is gone; the one holding 18 stays.
        let segs = segments(tmp.path());
        assert!(segs.len() < before, "{before} -> {segs:?}");
        assert!(segs[0].0 <= 18, "{segs:?}");
        if let Some((second, _)) = segs.get(1) {
            assert!(*second > 18, "{segs:?}");
        }

        // Purging less than before is a no-op.
        log.purge(lid(1, 5)).await.unwrap();
        assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(lid(1, 17)));
    }
    {
        let mut log = open(tmp.path(), options.clone());
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(lid(1, 17)));
        assert_eq!(st.last_log_id, Some(lid(1, 30)));
        assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 18..=30));
        assert!(log.try_get_log_entries(0..18).await.unwrap().is_empty());

        // Purging past the last entry (as after installing a snapshot) empties the log.
        log.purge(lid(2, 40)).await.unwrap();
        let st = log.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(lid(2, 40)));
        assert_eq!(st.last_log_id, Some(lid(2, 40)));
        assert!(all(&mut log).await.is_empty());
        assert!(segments(tmp.path()).is_empty());

        // The log goes on right after the purge point, and only there.
        assert!(log.append_and_wait(vec![put(2, 45)]).await.is_err());
        log.append_and_wait(ents(2, 41..=43)).await.unwrap();
    }
    let mut log = open(tmp.path(), options);
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(lid(2, 40)));
    assert_eq!(st.last_log_id, Some(lid(2, 43)));
    assert_eq!(ids(&all(&mut log).await), expect(|_| 2, 41..=43));
    assert_eq!(segments(tmp.path())[0].0, 41);
}

#[tokio::test]
async fn segments_left_over_by_an_interrupted_purge_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let options = tiny(200);
    let saved = {
        let mut log = open(tmp.path(), options.clone());
        log.append_and_wait(ents(1, 0..=30)).await.unwrap();
        let saved: Vec<(PathBuf, Vec<u8>)> = segments(tmp.path())
            .into_iter()
            .map(|(_, p)| {
                let bytes = fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        log.purge(lid(1, 17)).await.unwrap();
        saved
    };
    // A crash after the metadata was written but before the old segments were deleted.
    for (path, bytes) in &saved {
        if !path.exists() {
            fs::write(path, bytes).unwrap();
        }
    }
    assert_eq!(segments(tmp.path()).len(), saved.len());

    let mut log = open(tmp.path(), options);
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(lid(1, 17)));
    assert_eq!(st.last_log_id, Some(lid(1, 30)));
    assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 18..=30));
    let segs = segments(tmp.path());
    assert!(segs.len() < saved.len());
    if let Some((second, _)) = segs.get(1) {
        assert!(*second > 18, "{segs:?}");
    }
}

#[tokio::test]
async fn segments_rotate_at_the_size_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let limit = 150;
    {
        let mut log = open(tmp.path(), tiny(limit));
        // One batch that spans several segments, then one append per call.
        log.append_and_wait(ents(1, 0..=20)).await.unwrap();
        for i in 21..=40 {
            log.append_and_wait(vec![put(1, i)]).await.unwrap();
        }
        // Held in memory, each entry of the split batch is its own record's bytes.
        assert_eq!(all(&mut log).await, ents(1, 0..=40));
    }
    let segs = segments(tmp.path());
    assert!(segs.len() >= 5, "{segs:?}");
    assert_eq!(segs[0].0, 0);
    for (pos, (first, path)) in segs.iter().enumerate() {
        let len = fs::metadata(path).unwrap().len();
        if pos + 1 < segs.len() {
            // Full before the next one started, and not by more than one record.
            assert!(len >= limit, "{path:?} has {len} bytes");
            assert!(len < limit + 100, "{path:?} has {len} bytes");
            assert!(segs[pos + 1].0 > *first);
        }
    }
    let mut log = open(tmp.path(), tiny(limit));
    assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=40));
    // Entries come back whole after the reopen, including those of the batch that
    // was split across segments.
    assert_eq!(all(&mut log).await, ents(1, 0..=40));
    // Each file is named after the first entry it holds.
    for (first, _) in &segs {
        let got = log.try_get_log_entries(*first..*first + 1).await.unwrap();
        assert_eq!(got.len(), 1);
    }
}

/// Opens the log in `dir` with default options, appends `entries` and closes it:
/// the bytes of records written, which is where they end in a fresh log's segment.
async fn append_and_close(dir: &Path, entries: Vec<Ent>) -> u64 {
    let mut log = open(dir, LogOptions::default());
    log.append_and_wait(entries).await.unwrap();
    log.stats().bytes_written
}

/// Keeps the first `keep` bytes of `path` and zeros the rest, as a crash leaves a file
/// whose later writes never reached the disk (the file keeps its zeros ahead).
fn zero_after(path: &Path, keep: u64) {
    let mut bytes = fs::read(path).unwrap();
    let keep = usize::try_from(keep).unwrap();
    bytes[keep..].fill(0);
    fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn records_are_followed_by_zeros_written_ahead_and_read_back_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let records = append_and_close(tmp.path(), ents(1, 0..=9)).await;
    let (_, path) = segments(tmp.path()).pop().unwrap();
    let bytes = fs::read(&path).unwrap();
    // The file reaches well past its records, with zeros.
    assert!(bytes.len() as u64 >= records + 512 * 1024, "{} bytes", bytes.len());
    assert!(bytes[usize::try_from(records).unwrap()..].iter().all(|&b| b == 0));

    // Appends after a restart overwrite the zeros, and read back after another.
    {
        let mut log = open(tmp.path(), LogOptions::default());
        assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=9));
        log.append_and_wait(ents(2, 10..=12)).await.unwrap();
    }
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        bytes.len() as u64,
        "no growth inside the zeros"
    );
    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(
        ids(&all(&mut log).await),
        expect(|i| if i < 10 { 1 } else { 2 }, 0..=12)
    );
}

#[tokio::test]
async fn torn_last_record_is_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let good_end = {
        let mut log = open(tmp.path(), LogOptions::default());
        log.append_and_wait(ents(1, 0..=9)).await.unwrap();
        log.save_vote(&Vote::new(1, 1)).await.unwrap();
        log.stats().bytes_written
    };
    let (_, path) = segments(tmp.path()).pop().unwrap();
    append_and_close(tmp.path(), vec![put(1, 10)]).await;
    // Only five bytes of the last record reached the disk, as a crash mid-write leaves it.
    zero_after(&path, good_end + 5);

    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=9));
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(lid(1, 9)));
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, 1)));
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        good_end,
        "file cut at the torn record"
    );

    // The log continues cleanly where the good records end.
    log.append_and_wait(vec![put(2, 10)]).await.unwrap();
    drop(log);
    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(
        ids(&all(&mut log).await),
        expect(|i| if i < 10 { 1 } else { 2 }, 0..=10)
    );
}

#[tokio::test]
async fn torn_header_is_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let good_end = append_and_close(tmp.path(), ents(1, 0..=4)).await;
    let (_, path) = segments(tmp.path()).pop().unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let at = usize::try_from(good_end).unwrap();
    bytes[at..at + 3].copy_from_slice(&[0x17, 0, 0]);
    fs::write(&path, bytes).unwrap();

    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=4));
    assert_eq!(fs::metadata(&path).unwrap().len(), good_end);
}

#[tokio::test]
async fn a_record_whose_header_was_lost_is_cut_off_with_what_follows_it() {
    let tmp = tempfile::tempdir().unwrap();
    let good_end = append_and_close(tmp.path(), ents(1, 0..=4)).await;
    append_and_close(tmp.path(), ents(1, 5..=6)).await;
    // The header of record 5 never reached the disk; the rest of it did.
    let (_, path) = segments(tmp.path()).pop().unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let at = usize::try_from(good_end).unwrap();
    bytes[at..at + 8].fill(0);
    fs::write(&path, bytes).unwrap();

    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=4));
    assert_eq!(fs::metadata(&path).unwrap().len(), good_end);
    log.append_and_wait(ents(2, 5..=5)).await.unwrap();
    drop(log);
    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(ids(&all(&mut log).await), expect(|i| if i < 5 { 1 } else { 2 }, 0..=5));
}

#[tokio::test]
async fn flipped_byte_drops_the_rest_of_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let options = tiny(200);
    {
        let mut log = open(tmp.path(), options.clone());
        log.append_and_wait(ents(1, 0..=30)).await.unwrap();
    }
    let segs = segments(tmp.path());
    assert!(segs.len() >= 3);
    // Damage the last byte of the second segment (inside its last record's payload).
    let (second_first, victim) = segs[1].clone();
    let mut bytes = fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&victim, bytes).unwrap();
    let third_first = segs[2].0;

    let mut log = open(tmp.path(), options);
    // Everything before the damaged record survives; it and everything after are gone.
    let got = ids(&all(&mut log).await);
    assert_eq!(got, expect(|_| 1, 0..=third_first - 2));
    assert!(third_first - 2 >= second_first);
    let left = segments(tmp.path());
    assert_eq!(left.len(), 2, "{left:?}");
    log.append_and_wait(ents(2, third_first - 1..=third_first + 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn each_append_is_synced_and_acknowledged_in_order_before_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), LogOptions::default());
    let mut reader = log.reader();
    let order = Arc::new(Mutex::new(Vec::new()));
    for i in 0..=5u64 {
        let syncs_before = log.stats().data_syncs;
        let (done_tx, done_rx) = mpsc::channel();
        let acknowledged = Arc::clone(&order);
        log.append_with(vec![put(1, i)], move |res| {
            acknowledged.lock().unwrap().push(i);
            done_tx.send(res.is_ok()).unwrap();
        })
        .unwrap();
        // Acknowledged before append returned, after one fdatasync of its own...
        assert_eq!(done_rx.try_recv(), Ok(true));
        assert_eq!(log.stats().data_syncs, syncs_before + 1);
        // ...and readable through the log and through a reader handed out earlier.
        assert_eq!(reader.try_get_log_entries(i..=i).await.unwrap().len(), 1);
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(lid(1, i)));
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);

    drop(log);
    let mut log = open(tmp.path(), LogOptions::default());
    assert_eq!(ids(&all(&mut log).await), expect(|_| 1, 0..=5));
}

#[tokio::test]
async fn vote_waits_for_earlier_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = open(tmp.path(), LogOptions::default());
    let (done_tx, done_rx) = mpsc::channel();
    log.append_with(ents(1, 0..=3), move |res| done_tx.send(res.is_ok()).unwrap())
        .unwrap();
    log.save_vote(&Vote::new(2, 1)).await.unwrap();
    // save_vote returned, so the append made before it is already durable.
    assert_eq!(done_rx.try_recv(), Ok(true));
}

#[tokio::test]
async fn corrupt_metadata_refuses_to_open() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let mut log = open(tmp.path(), LogOptions::default());
        log.save_vote(&Vote::new(5, 1)).await.unwrap();
    }
    let meta = tmp.path().join("log-meta");
    let mut bytes = fs::read(&meta).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&meta, bytes).unwrap();
    match SegmentLog::<TestConfig>::open(tmp.path(), LogOptions::default()) {
        Err(LogError::CorruptMeta { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a log whose vote is unreadable"),
    }
}

#[tokio::test]
async fn zero_segment_size_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        SegmentLog::<TestConfig>::open(tmp.path(), tiny(0)),
        Err(LogError::InvalidOptions(_))
    ));
}

/// A log of node `own` that flushes its appends as leader in the background, with
/// `vote` saved.
async fn pipelined_log(dir: &Path, own: u64, vote: Vote<u64>) -> Log {
    let mut log = Log::open(dir, LogOptions::default()).unwrap();
    log.flush_leader_appends_in_background(own);
    log.save_vote(&vote).await.unwrap();
    log
}

#[tokio::test]
async fn the_leaders_own_appends_become_durable_in_the_background() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = pipelined_log(tmp.path(), 1, Vote::new_committed(1, 1)).await;
    let durability = log.durability();
    assert_eq!(durability.durable_index(), None);

    log.blocking_append(ents(1, 0..=9)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), durability.wait_durable(9))
        .await
        .expect("the background fdatasync never published entry 9")
        .unwrap();
    assert!(log.stats().data_syncs >= 1, "durable without an fdatasync");
    assert_eq!(durability.durable_prefix(Some(lid(1, 9))), Some(lid(1, 9)));
    assert_eq!(durability.durable_prefix(Some(lid(1, 3))), Some(lid(1, 3)));

    // Entries survive a reopen (closing the log syncs anything still waiting).
    log.blocking_append(ents(1, 10..=12)).await.unwrap();
    drop(log);
    let mut reopened = Log::open(tmp.path(), LogOptions::default()).unwrap();
    assert_eq!(ids(&all(&mut reopened).await), expect(|_| 1, 0..=12));
}

#[tokio::test]
async fn appends_from_another_leader_are_durable_before_they_return() {
    let tmp = tempfile::tempdir().unwrap();
    // Node 2 follows node 1: entries of leader 1 are synced before the callback.
    let mut log = pipelined_log(tmp.path(), 2, Vote::new_committed(1, 1)).await;
    log.blocking_append(ents(1, 0..=9)).await.unwrap();
    assert_eq!(log.durability().durable_index(), Some(9));

    // So are node 1's entries on a node that is not the leader of its vote.
    let tmp = tempfile::tempdir().unwrap();
    let mut log = pipelined_log(tmp.path(), 1, Vote::new(1, 1)).await;
    log.blocking_append(ents(1, 0..=4)).await.unwrap();
    assert_eq!(log.durability().durable_index(), Some(4));
}

#[tokio::test]
async fn a_new_vote_makes_the_leaders_earlier_appends_durable_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = pipelined_log(tmp.path(), 1, Vote::new_committed(1, 1)).await;
    let durability = log.durability();
    for batch in 0..20u64 {
        let first = batch * 5;
        log.blocking_append(ents(1, first..=first + 4)).await.unwrap();
    }
    log.save_vote(&Vote::new(2, 3)).await.unwrap();
    assert_eq!(durability.durable_index(), Some(99));
}

#[tokio::test]
async fn truncation_lowers_the_durable_index() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = pipelined_log(tmp.path(), 1, Vote::new_committed(1, 1)).await;
    let durability = log.durability();
    log.blocking_append(ents(1, 0..=9)).await.unwrap();
    log.truncate(lid(1, 5)).await.unwrap();
    assert_eq!(durability.durable_index(), Some(4));
    // A commit index beyond the durable entries stops at the last of them.
    assert_eq!(durability.durable_prefix(Some(lid(1, 9))), Some(lid(1, 4)));
    assert_eq!(durability.durable_prefix(None), None);
}
