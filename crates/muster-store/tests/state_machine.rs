//! Tests of the sled state machine: a snapshot written straight to its file reads back
//! as the registry it was taken from and installs on another store; applied changes
//! reach sled in batches, before a snapshot and when the store closes.

use std::collections::BTreeMap;
use std::sync::Arc;

use muster_core::{Command, Event, InstanceSpec, Registry, RegistrySnapshot, Revision};
use muster_store::types::{SnapshotMeta, TypeConfig};
use muster_store::{EventSink, StateError, StateMachineStore, WriteBatching, SNAPSHOT_FORMAT, STATE_FORMAT};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};
use serde::Deserialize;

struct NoSink;

impl EventSink for NoSink {
    fn publish(&self, _events: &[Event], _revision: Revision) {}
    fn reset(&self, _revision: Revision) {}
}

/// The layout of the snapshot file, as `state_machine.rs` defines it.
#[derive(Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

fn register(index: u64, i: usize, lease: Option<u64>) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Register {
            spec: InstanceSpec {
                service: format!("svc-{}", i % 3),
                instance_id: format!("i-{i}"),
                address: "10.0.0.1".into(),
                port: 8080,
                metadata: BTreeMap::from([("zone".to_string(), "a".to_string()), ("v".to_string(), i.to_string())])
                    .into_iter()
                    .collect(),
                lease_id: lease,
                ..Default::default()
            },
            grant_ttl_ms: None,
            now_ms: 1_000 + index,
        }),
    }
}

/// `register(index, i, None)` as write `seq` of a follower's forwarding session.
fn forwarded(index: u64, i: usize, seq: u64, answered_below: u64) -> Entry<TypeConfig> {
    let EntryPayload::Normal(command) = register(index, i, None).payload else {
        unreachable!("register builds a normal entry");
    };
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::Forwarded {
            session: 77,
            seq,
            answered_below,
            command: Box::new(command),
        }),
    }
}

fn grant(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::GrantLease {
            lease_id: 0,
            ttl_ms: 60_000,
            now_ms: 1_000,
        }),
    }
}

#[tokio::test]
async fn a_built_snapshot_reads_back_and_installs_as_the_same_registry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sm = StateMachineStore::open(&dir.path().join("a"), 1 << 20, Arc::new(NoSink)).expect("open");
    let mut entries = vec![grant(1)];
    entries.extend((0..50).map(|i| register(i as u64 + 2, i, (i % 2 == 0).then_some(1))));
    // Forwarded writes whose results are remembered travel in the snapshot too.
    entries.extend((0..5).map(|seq| forwarded(seq + 52, 50 + seq as usize, seq, 0)));
    sm.apply(entries).await.expect("apply");
    let expected: Registry = sm.shared().read().clone();
    assert_eq!(expected.forward_sessions().get(77).map(|s| s.results.len()), Some(5));

    let built = sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(56));

    // The current snapshot is the file just written: its image is the registry.
    let current = sm.get_current_snapshot().await.expect("read").expect("a snapshot");
    assert_eq!(current.meta, built.meta);
    let bytes = current.snapshot.into_inner();
    let image: RegistrySnapshot = bincode::deserialize(&bytes).expect("image decodes");
    assert_eq!(image, expected.to_snapshot());
    assert_eq!(Registry::from_snapshot(image).digest(), expected.digest());

    // The file itself is `SnapshotFile { meta, data }` in bincode.
    let file = std::fs::read(dir.path().join("a/snapshots/current.snap")).expect("snapshot file");
    let file: SnapshotFile = bincode::deserialize(&file).expect("file decodes");
    assert_eq!(file.meta, built.meta);
    assert_eq!(file.data, bytes);

    // Another store installs it and holds the same state, also after reopening.
    let other_dir = dir.path().join("b");
    {
        let mut other = StateMachineStore::open(&other_dir, 1 << 20, Arc::new(NoSink)).expect("open");
        other
            .install_snapshot(&current.meta, Box::new(std::io::Cursor::new(bytes)))
            .await
            .expect("install");
        assert_eq!(other.shared().read().digest(), expected.digest());
    }
    let reopened = StateMachineStore::open(&other_dir, 1 << 20, Arc::new(NoSink)).expect("reopen");
    assert_eq!(reopened.shared().read().digest(), expected.digest());
    assert_eq!(reopened.shared().read().lease_instances(1).len(), 25);
    assert_eq!(reopened.shared().read().forward_sessions(), expected.forward_sessions());
}

#[tokio::test]
async fn a_forwarded_write_applied_before_a_restart_is_not_applied_again_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, expected) = {
        let mut sm = StateMachineStore::open(dir.path(), 1 << 20, Arc::new(NoSink)).expect("open");
        let results = sm
            .apply(vec![
                forwarded(1, 0, 0, 0),
                forwarded(2, 1, 1, 0),
                forwarded(3, 2, 2, 1),
            ])
            .await
            .expect("apply");
        (results, sm.shared().read().clone())
    };
    // Write 0 was answered (the third says so): only 1 and 2 are remembered.
    let session = expected.forward_sessions().get(77).expect("session");
    assert_eq!(session.results.keys().copied().collect::<Vec<_>>(), vec![1, 2]);

    let mut sm = StateMachineStore::open(dir.path(), 1 << 20, Arc::new(NoSink)).expect("reopen");
    assert_eq!(sm.shared().read().digest(), expected.digest());
    assert_eq!(sm.shared().read().forward_sessions(), expected.forward_sessions());
    // Sent again after the restart, write 2 answers its first result and changes
    // nothing; write 0 is stale and answers nothing.
    let again = sm
        .apply(vec![forwarded(4, 2, 2, 1), forwarded(5, 0, 0, 0)])
        .await
        .expect("apply again");
    assert_eq!(again[0], first[2]);
    assert_eq!(again[1].outcome, muster_core::Outcome::Nothing);
    assert_eq!(sm.shared().read().revision(), expected.revision());
    assert_eq!(sm.shared().read().instance_count(), 3);
}

/// Waits until the state database holds `index` as its last applied entry.
fn await_written(sm: &StateMachineStore, index: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let written = sm.written_applied().expect("read").map(|l| l.index);
        if written == Some(index) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "written {written:?}, expected {index}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[tokio::test]
async fn applied_changes_reach_the_database_in_batches_before_a_snapshot_and_at_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index_of = |id: Option<muster_store::types::LogId>| id.map(|l| l.index);
    // Age long enough never to come due here: only size, snapshots and close write.
    let by_size_only = WriteBatching {
        max_commands: 64,
        max_age: std::time::Duration::from_secs(3600),
    };
    {
        let mut sm = StateMachineStore::open_with(dir.path(), 1 << 20, by_size_only, Arc::new(NoSink)).expect("open");
        sm.apply((1..=10).map(|i| register(i, i as usize, None)))
            .await
            .expect("apply");
        // Applied in memory, not yet in sled.
        assert_eq!(index_of(sm.applied_state().await.expect("applied").0), Some(10));
        assert_eq!(sm.written_applied().expect("read"), None);

        // A snapshot may let the log below it go: the pending changes are written first.
        sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
        assert_eq!(index_of(sm.written_applied().expect("read")), Some(10));

        // A batch of max_commands commands is written by the writer thread.
        let last = 10 + by_size_only.max_commands as u64;
        sm.apply((11..=last).map(|i| register(i, i as usize, None)))
            .await
            .expect("apply");
        await_written(&sm, last);
        sm.apply(vec![register(last + 1, last as usize + 1, None)])
            .await
            .expect("apply");
        assert_eq!(index_of(sm.written_applied().expect("read")), Some(last));
    }
    // Closing the store wrote the rest: reopened, sled holds every change.
    let last = 11 + by_size_only.max_commands as u64;
    let mut sm = StateMachineStore::open(dir.path(), 1 << 20, Arc::new(NoSink)).expect("reopen");
    assert_eq!(index_of(sm.written_applied().expect("read")), Some(last));
    assert_eq!(index_of(sm.applied_state().await.expect("applied").0), Some(last));
    assert_eq!(sm.shared().read().instance_count(), last as usize);

    // With the default batching, a change left alone is written once it has waited
    // max_age, with no further apply to prompt it.
    sm.apply(vec![register(last + 1, last as usize + 1, None)])
        .await
        .expect("apply");
    await_written(&sm, last + 1);
}

/// A gate that opens up to the index it is told.
struct Gate {
    open_to: tokio::sync::watch::Sender<u64>,
}

impl muster_store::ApplyGate for Gate {
    fn ready(&self, index: u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        let mut open_to = self.open_to.subscribe();
        Box::pin(async move {
            let _ = open_to.wait_for(|open| *open >= index).await;
        })
    }
}

#[tokio::test]
async fn entries_wait_for_the_apply_gate_and_nothing_of_them_shows_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sm = StateMachineStore::open(&dir.path().join("gated"), 1 << 20, Arc::new(NoSink)).expect("open");
    let gate = Arc::new(Gate {
        open_to: tokio::sync::watch::Sender::new(1),
    });
    sm.apply_after(gate.clone());
    let shared = sm.shared();
    sm.apply(vec![register(1, 0, None)]).await.expect("apply 1");
    assert_eq!(shared.read().instance_count(), 1);

    let applying = tokio::spawn(async move {
        sm.apply(vec![register(2, 1, None), register(3, 2, None)])
            .await
            .expect("apply 2-3");
        sm
    });
    tokio::task::yield_now().await;
    gate.open_to.send_replace(2);
    tokio::task::yield_now().await;
    assert!(!applying.is_finished(), "applied before the gate reached index 3");
    assert_eq!(shared.read().instance_count(), 1, "nothing of the batch shows yet");
    gate.open_to.send_replace(3);
    let _sm = tokio::time::timeout(std::time::Duration::from_secs(5), applying)
        .await
        .expect("applied once the gate opened")
        .expect("task");
    assert_eq!(shared.read().instance_count(), 3);
}

/// The state database in `dir`, opened with sled directly once the store or sled
/// handle that had it open has let go of its lock (its threads end after the drop).
fn open_sled(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(dir.join("state")) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            opened => return opened.expect("open sled"),
        }
    }
}

/// The format key of the state database in `dir`, read with sled directly.
fn stored_format(dir: &std::path::Path) -> Option<Vec<u8>> {
    open_sled(dir).get(b"m/format").expect("read").map(|v| v.to_vec())
}

fn set_stored_format(dir: &std::path::Path, value: Option<&[u8]>) {
    let db = open_sled(dir);
    match value {
        Some(v) => db.insert(b"m/format", v).map(drop),
        None => db.remove(b"m/format").map(drop),
    }
    .expect("write");
    db.flush().expect("flush");
}

#[tokio::test]
async fn the_state_database_states_its_format_and_one_of_another_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = {
        let mut sm = StateMachineStore::open(dir.path(), 1 << 20, Arc::new(NoSink)).expect("open");
        sm.apply(vec![grant(1), register(2, 0, Some(1))]).await.expect("apply");
        sm.shared().read().digest()
    };
    assert_eq!(stored_format(dir.path()), Some(STATE_FORMAT.to_be_bytes().to_vec()));

    // A database from before the key existed has the same layout: it opens, whole,
    // and gets the key.
    set_stored_format(dir.path(), None);
    {
        let sm = StateMachineStore::open(dir.path(), 1 << 20, Arc::new(NoSink)).expect("open without the key");
        assert_eq!(sm.shared().read().digest(), expected);
    }
    assert_eq!(stored_format(dir.path()), Some(STATE_FORMAT.to_be_bytes().to_vec()));

    // A newer format is refused, naming both formats and the database; so is a key
    // that is not a format at all. Nothing is changed by the refusal.
    for (stored, found) in [
        ((STATE_FORMAT + 1).to_be_bytes().to_vec(), STATE_FORMAT + 1),
        (b"x".to_vec(), 0),
    ] {
        set_stored_format(dir.path(), Some(&stored));
        let error = match StateMachineStore::open(dir.path(), 1 << 20, Arc::new(NoSink)) {
            Err(e) => e,
            Ok(_) => panic!("opened a database of format {found}"),
        };
        let message = error.to_string();
        match error {
            StateError::UnsupportedFormat {
                found: f,
                supported,
                path,
            } => {
                assert_eq!((f, supported), (found, STATE_FORMAT));
                assert_eq!(path, dir.path().join("state"));
            }
            e => panic!("unexpected error {e}"),
        }
        assert!(
            message.contains(&format!("format {found}")) && message.contains(&format!("reads format {STATE_FORMAT}")),
            "{message}"
        );
        assert_eq!(stored_format(dir.path()), Some(stored));
    }
}

#[tokio::test]
async fn a_state_installed_from_a_snapshot_keeps_the_format_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut source = StateMachineStore::open(&dir.path().join("a"), 1 << 20, Arc::new(NoSink)).expect("open");
    source
        .apply(vec![grant(1), register(2, 0, Some(1))])
        .await
        .expect("apply");
    source
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");
    let current = source.get_current_snapshot().await.expect("read").expect("a snapshot");
    let target = dir.path().join("b");
    {
        let mut other = StateMachineStore::open(&target, 1 << 20, Arc::new(NoSink)).expect("open");
        other
            .install_snapshot(&current.meta, current.snapshot)
            .await
            .expect("install");
    }
    assert_eq!(stored_format(&target), Some(STATE_FORMAT.to_be_bytes().to_vec()));
}

/// A store with a few applied entries and a snapshot built of them, and the
/// snapshot's image as openraft would send it to a peer.
async fn store_with_snapshot(dir: &std::path::Path) -> (StateMachineStore, SnapshotMeta, Vec<u8>) {
    let mut sm = StateMachineStore::open(dir, 1 << 20, Arc::new(NoSink)).expect("open");
    sm.apply(vec![grant(1), register(2, 0, Some(1)), register(3, 1, None)])
        .await
        .expect("apply");
    sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let current = sm.get_current_snapshot().await.expect("read").expect("a snapshot");
    (sm, current.meta, current.snapshot.into_inner())
}

/// The format trailer ending a snapshot image: 8 bytes of magic, then the format.
const TRAILER_LEN: usize = 12;

#[tokio::test]
async fn a_snapshot_image_states_its_format_and_older_readers_still_decode_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sm, _, image) = store_with_snapshot(&dir.path().join("a")).await;
    let (body, trailer) = image.split_at(image.len() - TRAILER_LEN);
    assert_eq!(&trailer[..8], b"\0MUSTER\x01");
    assert_eq!(trailer[8..], SNAPSHOT_FORMAT.to_be_bytes());
    // A build from before the trailer decodes the image with bincode, which stops
    // at the end of the registry: it reads the same registry as from the bare image.
    let decoded: RegistrySnapshot = bincode::deserialize(&image).expect("decodes with the trailer");
    let bare: RegistrySnapshot = bincode::deserialize(body).expect("decodes without it");
    assert_eq!(decoded, bare);
    assert_eq!(decoded, sm.shared().read().to_snapshot());
}

#[tokio::test]
async fn a_snapshot_image_from_before_the_format_trailer_installs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sm, meta, image) = store_with_snapshot(&dir.path().join("a")).await;
    let expected = sm.shared().read().digest();
    let legacy = image[..image.len() - TRAILER_LEN].to_vec();
    let mut other = StateMachineStore::open(&dir.path().join("b"), 1 << 20, Arc::new(NoSink)).expect("open");
    other
        .install_snapshot(&meta, Box::new(std::io::Cursor::new(legacy)))
        .await
        .expect("a legacy image installs");
    assert_eq!(other.shared().read().digest(), expected);
}

#[tokio::test]
async fn a_snapshot_image_of_a_newer_format_is_refused_and_the_current_snapshot_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, meta, image) = store_with_snapshot(&dir.path().join("a")).await;
    let target = dir.path().join("b");
    let (mut other, _, own_image) = store_with_snapshot(&target).await;
    let before = other.shared().read().digest();
    let mut newer = image.clone();
    let at = newer.len() - 4;
    newer[at..].copy_from_slice(&(SNAPSHOT_FORMAT + 1).to_be_bytes());
    let refused = other
        .install_snapshot(&meta, Box::new(std::io::Cursor::new(newer)))
        .await
        .expect_err("an image of a newer format");
    let text = refused.to_string();
    assert!(
        text.contains(&format!("format {}", SNAPSHOT_FORMAT + 1))
            && text.contains(&format!("format {SNAPSHOT_FORMAT}")),
        "{text}"
    );
    // Nothing was replaced: the state, and the snapshot file a restart would load.
    assert_eq!(other.shared().read().digest(), before);
    let kept = other.get_current_snapshot().await.expect("read").expect("a snapshot");
    assert_eq!(kept.snapshot.into_inner(), own_image);
    drop(other);
    let reopened = StateMachineStore::open(&target, 1 << 20, Arc::new(NoSink)).expect("reopen");
    assert_eq!(reopened.shared().read().digest(), before);
}
