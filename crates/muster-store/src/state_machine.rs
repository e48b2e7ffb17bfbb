//! The registry state machine: the in-memory [`Registry`] that serves reads, kept in
//! step with a sled database on disk, and snapshots written to fsynced files.
//!
//! Each `apply` call records the instances and leases it changed in a pending sled
//! batch; a thread of its own writes the batch to sled, with `last_applied`, the
//! membership and the counters, once it holds [`WriteBatching::max_commands`] commands
//! or its oldest change is [`WriteBatching::max_age`] old; it is also written before a
//! snapshot is built and when the store is dropped (see `writer.rs`). So the database
//! always holds a consistent point. sled is not fsynced per batch: after a crash it
//! may be behind, and openraft re-applies the committed entries above its
//! `last_applied` from the fsynced log (which keeps every entry since the last
//! snapshot, and a snapshot is only built once the pending batch is in sled).
//! Snapshots, which allow that log to be purged, are fsynced files, and on open a
//! snapshot newer than sled is loaded into it.
//!
//! Why the batch waits: sled rolls its I/O buffer twice for every batch it applies,
//! each roll a write and a `sync_file_range` on its threads, so one sled batch per
//! Raft apply made sled the largest cost of a write on every node. Why a thread
//! writes it: a batch of a thousand commands written on openraft's apply task held
//! up the answers of every write applied after it.

mod writer;

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use self::writer::StateWriter;
pub use self::writer::{WriteBatching, PENDING_MAX_AGE, PENDING_MAX_COMMANDS};

use muster_core::registry::Applied;
use muster_core::{Event, EventKind, Instance, InstanceKey, Lease, Registry, RegistrySnapshot, Revision};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::types::{LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const SNAPSHOT_FILE: &str = "current.snap";
const KEY_LAST_APPLIED: &[u8] = b"m/last_applied";
const KEY_MEMBERSHIP: &[u8] = b"m/membership";
const KEY_COUNTERS: &[u8] = b"m/counters";
/// The layout version of the state database (a big-endian `u32`).
const KEY_FORMAT: &[u8] = b"m/format";
const PREFIX_INSTANCE: &[u8] = b"i/";
const PREFIX_LEASE: &[u8] = b"l/";
/// A forwarding session's `(answered_below, last_revision)`; its results are stored
/// apart, under `PREFIX_FORWARD_RESULT`.
const PREFIX_FORWARD_SESSION: &[u8] = b"f/";
/// A forwarded write's result: session id and number, both big-endian.
const PREFIX_FORWARD_RESULT: &[u8] = b"r/";
/// How long opening waits for sled's lock on the database: when a store is dropped,
/// the sled threads that wrote its last buffers let go of the file a moment later.
const DB_LOCK_WAIT: Duration = Duration::from_secs(2);

/// The layout of the state database this build writes and reads: its keys and the
/// encoding of the values under them. A database without a format key was written
/// before the key existed, in this same layout, and gets it when opened. A build
/// whose layout changes raises this and converts older databases as it opens them;
/// an older build refuses a database of a newer format instead of misreading it.
pub const STATE_FORMAT: u32 = 1;

/// The encoding of a snapshot's registry image (what the snapshot file holds and
/// openraft sends to peers) this build writes and reads. Every image ends with a
/// trailer: 8 bytes of magic (`\0MUSTER\x01`) then this number (a big-endian `u32`). An
/// image without one was written before the trailer existed, in format 1's
/// encoding. A build whose image encoding changes raises this; an older build
/// refuses an image of a newer format, naming both, instead of misreading it.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// Marks the snapshot image trailer. A trailer and not a header: builds from before
/// it decode an image with bincode, which ignores bytes after what it decodes, so
/// they read images of format 1 from newer builds in a rolling upgrade.
const SNAPSHOT_TRAILER_MAGIC: &[u8; 8] = b"\0MUSTER\x01";
/// The trailer's length: the magic and the format.
const SNAPSHOT_TRAILER_LEN: usize = SNAPSHOT_TRAILER_MAGIC.len() + 4;

/// The trailer ending an image of format [`SNAPSHOT_FORMAT`].
fn snapshot_trailer() -> [u8; SNAPSHOT_TRAILER_LEN] {
    let mut trailer = [0; SNAPSHOT_TRAILER_LEN];
    trailer[..SNAPSHOT_TRAILER_MAGIC.len()].copy_from_slice(SNAPSHOT_TRAILER_MAGIC);
    trailer[SNAPSHOT_TRAILER_MAGIC.len()..].copy_from_slice(&SNAPSHOT_FORMAT.to_be_bytes());
    trailer
}

/// A snapshot image's encoded registry and its format: the bytes before the
/// trailer and the format it states, or the whole image and format 1 when it has
/// no trailer.
fn split_snapshot_image(data: &[u8]) -> (&[u8], u32) {
    let Some(body_len) = data.len().checked_sub(SNAPSHOT_TRAILER_LEN) else {
        return (data, 1);
    };
    let (body, trailer) = data.split_at(body_len);
    let (magic, format) = trailer.split_at(SNAPSHOT_TRAILER_MAGIC.len());
    match (magic == SNAPSHOT_TRAILER_MAGIC, <[u8; 4]>::try_from(format)) {
        (true, Ok(format)) => (body, u32::from_be_bytes(format)),
        _ => (data, 1),
    }
}

/// The encoded registry of a snapshot image this build can read, or why not.
fn readable_snapshot_image(data: &[u8]) -> Result<&[u8], StateError> {
    match split_snapshot_image(data) {
        (body, SNAPSHOT_FORMAT) => Ok(body),
        (_, found) => Err(StateError::UnsupportedSnapshotFormat {
            found,
            supported: SNAPSHOT_FORMAT,
        }),
    }
}

/// Receives the events of every apply, in revision order, while the registry's write
/// lock is held (so a reader that takes the read lock sees a state consistent with
/// the events delivered so far).
pub trait EventSink: Send + Sync + 'static {
    /// Events just applied, and the revision after them.
    fn publish(&self, events: &[Event], revision: Revision);
    /// The whole state was replaced (startup, snapshot install): history before
    /// `revision` is gone.
    fn reset(&self, revision: Revision);
}

/// What the rest of the node reads: the registry and its applied revision.
pub struct SharedState {
    registry: RwLock<Registry>,
    revision: watch::Sender<Revision>,
    sink: Arc<dyn EventSink>,
}

impl SharedState {
    /// Read access to the registry. Hold it briefly: applies wait for it.
    pub fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The applied revision, and a way to wait for it to reach a value.
    pub fn revision(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    /// The applied revision now.
    pub fn current_revision(&self) -> Revision {
        *self.revision.borrow()
    }
}

/// The snapshot file: metadata and the registry image.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The openraft state machine backed by sled.
pub struct StateMachineStore {
    shared: Arc<SharedState>,
    db: sled::Db,
    snapshot_dir: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Changes applied in memory and not yet written to sled, and their writer.
    writer: StateWriter,
    /// Dropped with the store: lets the owner wait until the database is closed.
    open_marker: Arc<()>,
    /// The Raft log's durability, when the log flushes the leader's appends in the
    /// background: entries are applied only once they are on disk there.
    log_durability: Option<crate::LogDurability<TypeConfig>>,
    /// What else entries wait for before they are applied (see [`ApplyGate`]).
    apply_gate: Option<Arc<dyn ApplyGate>>,
}

/// Something entries wait for before this node applies them, beyond being
/// committed and on its disk. The server's read lease table is one: a leader applies
/// (and so may show in a read) no entry before every follower holding a read lease
/// has appended it, since such a follower answers linearizable reads from what it
/// has appended.
pub trait ApplyGate: Send + Sync + 'static {
    /// Resolves once entries up to `index` may be applied.
    fn ready(&self, index: u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

/// Builds snapshots from a point-in-time image of the registry.
pub struct SnapshotBuilder {
    image: RegistrySnapshot,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot_dir: PathBuf,
}

/// A state machine storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed.
    #[error("state database: {0}")]
    Db(#[from] sled::Error),
    /// A stored value could not be encoded or decoded.
    #[error("state encoding: {0}")]
    Codec(#[from] bincode::Error),
    /// A file operation failed.
    #[error("state file: {0}")]
    Io(#[from] std::io::Error),
    /// An earlier write of applied changes failed: the database no longer follows the
    /// log, so nothing more is applied (a restart re-applies the log).
    #[error("an earlier write to the state database failed: {0}")]
    WriteFailed(String),
    /// The state database is in a format this build cannot read: written by a newer
    /// build, or not a state database of Muster's.
    #[error(
        "the state database at {path} is in format {found}, and this build reads format {supported}: \
         run a build that reads format {found} (the one that wrote it, or newer)"
    )]
    UnsupportedFormat {
        /// The database directory.
        path: PathBuf,
        /// The format its format key states (or 0 when the key is unreadable).
        found: u32,
        /// [`STATE_FORMAT`].
        supported: u32,
    },
    /// A snapshot image is in a format this build cannot read: sent or written by a
    /// newer build.
    #[error(
        "the snapshot is in format {found}, and this build reads format {supported}: \
         upgrade this node to a build that reads format {found}"
    )]
    UnsupportedSnapshotFormat {
        /// The format the image's trailer states.
        found: u32,
        /// [`SNAPSHOT_FORMAT`].
        supported: u32,
    },
}

impl From<StateError> for StorageError {
    fn from(e: StateError) -> Self {
        sm_err(ErrorVerb::Write, e)
    }
}

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageError::from_io_error(ErrorSubject::StateMachine, verb, std::io::Error::other(e.to_string()))
}

fn snap_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageError::from_io_error(ErrorSubject::Snapshot(None), verb, std::io::Error::other(e.to_string()))
}

fn instance_key_bytes(key: &InstanceKey) -> Vec<u8> {
    let mut k = PREFIX_INSTANCE.to_vec();
    k.extend_from_slice(key.namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(key.service.as_bytes());
    k.push(0);
    k.extend_from_slice(key.instance_id.as_bytes());
    k
}

fn lease_key_bytes(id: u64) -> Vec<u8> {
    let mut k = PREFIX_LEASE.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn forward_session_key_bytes(session: u64) -> Vec<u8> {
    let mut k = PREFIX_FORWARD_SESSION.to_vec();
    k.extend_from_slice(&session.to_be_bytes());
    k
}

fn forward_result_key_bytes(session: u64, seq: u64) -> Vec<u8> {
    let mut k = PREFIX_FORWARD_RESULT.to_vec();
    k.extend_from_slice(&session.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The session and number a forwarded result's key names.
fn forward_result_key_parts(key: &[u8]) -> Option<(u64, u64)> {
    let rest = key.strip_prefix(PREFIX_FORWARD_RESULT)?;
    let session = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
    Some((session, seq))
}

/// Writes `bytes` to `dir/name` durably: temp file, fsync, rename, fsync the directory.
pub fn write_file_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    write_durably_with(dir, name, |w| w.write_all(bytes))
}

/// Like [`write_file_durably`], with the content produced by `fill` straight into
/// the (buffered) file, so a large snapshot is not encoded into memory first.
fn write_durably_with(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut w = std::io::BufWriter::new(fs::File::create(&tmp)?);
    fill(&mut w)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

/// Encodes a snapshot file straight into `w`: the same bytes as bincode of
/// `SnapshotFile { meta, data: bincode(image) + trailer }`, without ever holding the
/// encoded image in memory (at 100k instances it is tens of megabytes).
fn write_snapshot_file(w: &mut impl Write, meta: &SnapshotMeta, image: &RegistrySnapshot) -> bincode::Result<()> {
    bincode::serialize_into(&mut *w, meta)?;
    // `data` is a byte vector: bincode writes its length as a u64, then the bytes.
    let data_len = bincode::serialized_size(image)? + SNAPSHOT_TRAILER_LEN as u64;
    bincode::serialize_into(&mut *w, &data_len)?;
    bincode::serialize_into(&mut *w, image)?;
    w.write_all(&snapshot_trailer())?;
    Ok(())
}

/// Writes the snapshot file durably on a blocking thread and hands it back.
async fn save_snapshot_file(dir: PathBuf, file: SnapshotFile) -> Result<SnapshotFile, StorageError> {
    tokio::task::spawn_blocking(move || {
        write_durably_with(&dir, SNAPSHOT_FILE, |w| {
            bincode::serialize_into(w, &file).map_err(std::io::Error::other)
        })
        .map(|()| file)
    })
    .await
    .map_err(|e| snap_err(ErrorVerb::Write, e))?
    .map_err(|e| snap_err(ErrorVerb::Write, e))
}

/// Opens the sled database, waiting up to [`DB_LOCK_WAIT`] while its lock is held
/// (by the threads of a store just dropped; a second process holds it for longer).
/// sled (pinned at 0.34.7) reports a held lock only as an I/O error with this text.
/// Checks the format key of the state database at `path`, writing it (durably) into
/// a database that has none: a new one, or one written before the key existed.
fn check_format(db: &sled::Db, path: &Path) -> Result<(), StateError> {
    match db.get(KEY_FORMAT)? {
        Some(v) => {
            let found = <[u8; 4]>::try_from(v.as_ref()).map_or(0, u32::from_be_bytes);
            if found == STATE_FORMAT {
                Ok(())
            } else {
                Err(StateError::UnsupportedFormat {
                    path: path.to_path_buf(),
                    found,
                    supported: STATE_FORMAT,
                })
            }
        }
        None => {
            db.insert(KEY_FORMAT, &STATE_FORMAT.to_be_bytes())?;
            db.flush()?;
            Ok(())
        }
    }
}

fn open_db(config: &sled::Config) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + DB_LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return opened,
        }
    }
}

impl StateMachineStore {
    /// Opens (or creates) the state machine under `dir`, loading the registry into
    /// memory. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64, sink: Arc<dyn EventSink>) -> Result<Self, StateError> {
        Self::open_with(dir, cache_bytes, WriteBatching::default(), sink)
    }

    /// [`StateMachineStore::open`] with applied changes written to sled as `batching` says.
    pub fn open_with(
        dir: &Path,
        cache_bytes: u64,
        batching: WriteBatching,
        sink: Arc<dyn EventSink>,
    ) -> Result<Self, StateError> {
        let snapshot_dir = dir.join("snapshots");
        fs::create_dir_all(&snapshot_dir)?;
        let db_path = dir.join("state");
        let db = open_db(
            &sled::Config::new()
                .path(&db_path)
                .cache_capacity(cache_bytes)
                .flush_every_ms(Some(200)),
        )?;
        check_format(&db, &db_path)?;
        let (revision, _) = watch::channel(0);
        let mut store = StateMachineStore {
            shared: Arc::new(SharedState {
                registry: RwLock::new(Registry::new()),
                revision,
                sink,
            }),
            writer: StateWriter::start(db.clone(), batching)?,
            db,
            snapshot_dir,
            last_applied: None,
            membership: StoredMembership::default(),
            open_marker: Arc::new(()),
            log_durability: None,
            apply_gate: None,
        };
        store.load_from_db()?;
        if let Some(file) = store.read_snapshot_file()? {
            if file.meta.last_log_id > store.last_applied {
                tracing::info!(
                    snapshot = ?file.meta.last_log_id,
                    applied = ?store.last_applied,
                    "state on disk is behind the snapshot; loading the snapshot"
                );
                store.replace_state(&file.meta, &file.data)?;
            }
        }
        let revision = store.shared.read().revision();
        store.shared.revision.send_replace(revision);
        store.shared.sink.reset(revision);
        Ok(store)
    }

    /// Applies no entry before `log` has it on disk: required once the log flushes the
    /// leader's appends in the background (see [`crate::LogDurability`]).
    pub fn apply_only_durable_entries(&mut self, log: crate::LogDurability<TypeConfig>) {
        self.log_durability = Some(log);
    }

    /// Applies no entry before `gate` is ready for it (see [`ApplyGate`]).
    pub fn apply_after(&mut self, gate: Arc<dyn ApplyGate>) {
        self.apply_gate = Some(gate);
    }

    /// Upgradable while the store (and its sled database) is open; a node that
    /// restarts in the same process waits for it to be released before reopening.
    pub fn open_marker(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.open_marker)
    }

    /// The last applied log id as the state database holds it: behind
    /// `applied_state` while applied changes are pending (see the module docs).
    pub fn written_applied(&self) -> Result<Option<LogId>, StateError> {
        match self.db.get(KEY_LAST_APPLIED)? {
            Some(v) => Ok(bincode::deserialize(&v)?),
            None => Ok(None),
        }
    }

    /// The state the rest of the node reads.
    pub fn shared(&self) -> Arc<SharedState> {
        self.shared.clone()
    }

    fn load_from_db(&mut self) -> Result<(), StateError> {
        let mut registry = Registry::new();
        for item in self.db.scan_prefix(PREFIX_LEASE) {
            let (_, v) = item?;
            let lease: Lease = bincode::deserialize(&v)?;
            registry.load_lease(lease);
        }
        for item in self.db.scan_prefix(PREFIX_INSTANCE) {
            let (_, v) = item?;
            let instance: Instance = bincode::deserialize(&v)?;
            registry.load_instance(instance);
        }
        for item in self.db.scan_prefix(PREFIX_FORWARD_SESSION) {
            let (k, v) = item?;
            let id = k.strip_prefix(PREFIX_FORWARD_SESSION).and_then(|id| id.try_into().ok());
            if let Some(id) = id.map(u64::from_be_bytes) {
                let (answered_below, last_revision): (u64, u64) = bincode::deserialize(&v)?;
                registry.load_forward_session(id, answered_below, last_revision);
            }
        }
        for item in self.db.scan_prefix(PREFIX_FORWARD_RESULT) {
            let (k, v) = item?;
            if let Some((session, seq)) = forward_result_key_parts(&k) {
                registry.load_forward_result(session, seq, bincode::deserialize(&v)?);
            }
        }
        if let Some(v) = self.db.get(KEY_COUNTERS)? {
            let (revision, next_lease): (u64, u64) = bincode::deserialize(&v)?;
            registry.load_counters(revision, next_lease);
        }
        self.last_applied = self.written_applied()?;
        if let Some(v) = self.db.get(KEY_MEMBERSHIP)? {
            self.membership = bincode::deserialize(&v)?;
        }
        *self.shared.registry.write().unwrap_or_else(|p| p.into_inner()) = registry;
        Ok(())
    }

    fn read_snapshot_file(&self) -> Result<Option<SnapshotFile>, StateError> {
        let path = self.snapshot_dir.join(SNAPSHOT_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let file: SnapshotFile = bincode::deserialize(&bytes)?;
        Ok(Some(file))
    }

    /// Replaces the whole state with a snapshot image, in memory and in sled.
    fn replace_state(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StateError> {
        let image: RegistrySnapshot = bincode::deserialize(readable_snapshot_image(data)?)?;
        // The image replaces whatever was applied and not yet written.
        let _no_writes = self.writer.discard_pending();
        let mut batch = sled::Batch::default();
        for item in self.db.iter().keys() {
            batch.remove(item?);
        }
        batch.insert(KEY_FORMAT, &STATE_FORMAT.to_be_bytes());
        for instance in &image.instances {
            let bytes = bincode::serialize(instance)?;
            batch.insert(instance_key_bytes(&instance.key()), bytes);
        }
        for lease in &image.leases {
            let bytes = bincode::serialize(lease)?;
            batch.insert(lease_key_bytes(lease.id), bytes);
        }
        for session in &image.forward_sessions {
            batch.insert(
                forward_session_key_bytes(session.id),
                bincode::serialize(&(session.answered_below, session.last_revision))?,
            );
            for (seq, result) in &session.results {
                batch.insert(forward_result_key_bytes(session.id, *seq), bincode::serialize(result)?);
            }
        }
        let revision = image.revision;
        let counters = (image.revision, image.next_lease_id);
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        batch.insert(KEY_LAST_APPLIED, bincode::serialize(&self.last_applied)?);
        batch.insert(KEY_MEMBERSHIP, bincode::serialize(&self.membership)?);
        batch.insert(KEY_COUNTERS, bincode::serialize(&counters)?);
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        let mut registry = self.shared.registry.write().unwrap_or_else(|p| p.into_inner());
        *registry = Registry::from_snapshot(image);
        self.shared.revision.send_replace(revision);
        self.shared.sink.reset(revision);
        Ok(())
    }

    fn persist(batch: &mut sled::Batch, applied: &Applied, registry: &Registry) -> Result<(), StateError> {
        for event in &applied.events {
            match &event.kind {
                EventKind::Put(instance) => {
                    let bytes = bincode::serialize(&**instance)?;
                    batch.insert(instance_key_bytes(&instance.key()), bytes);
                }
                EventKind::Delete { key, .. } => batch.remove(instance_key_bytes(key)),
            }
        }
        for id in &applied.leases_changed {
            match registry.lease(*id) {
                Some(lease) => {
                    let bytes = bincode::serialize(lease)?;
                    batch.insert(lease_key_bytes(*id), bytes);
                }
                None => batch.remove(lease_key_bytes(*id)),
            }
        }
        let sessions = registry.forward_sessions();
        // A batch of forwarded writes names its session once per write.
        let mut changed = applied.sessions_changed.sessions.clone();
        changed.sort_unstable();
        changed.dedup();
        for id in changed {
            match sessions.get(id) {
                Some(session) => batch.insert(
                    forward_session_key_bytes(id),
                    bincode::serialize(&(session.answered_below, session.last_revision))?,
                ),
                None => batch.remove(forward_session_key_bytes(id)),
            }
        }
        for &(session, seq) in &applied.sessions_changed.results {
            match sessions.result(session, seq) {
                Some(result) => batch.insert(forward_result_key_bytes(session, seq), bincode::serialize(result)?),
                None => batch.remove(forward_result_key_bytes(session, seq)),
            }
        }
        Ok(())
    }
}

impl Drop for StateMachineStore {
    /// Writes what is pending and flushes sled, so a node that stops cleanly restarts
    /// without re-applying entries.
    fn drop(&mut self) {
        let written = self.writer.close().and_then(|()| Ok(self.db.flush().map(drop)?));
        if let Err(e) = written {
            tracing::warn!(error = %e, "writing the state database at close failed; the log will be re-applied");
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Encodes the image straight into the snapshot file.
    ///
    /// The [`Snapshot`] handed back carries the metadata and no data: openraft 0.9
    /// keeps only the metadata of a snapshot it asked to build (its state machine
    /// worker answers `BuildSnapshot(snapshot.meta)` and drops the rest), and reads the
    /// data through [`RaftStateMachine::get_current_snapshot`] when a follower needs
    /// it. Encoding into memory first held a second copy of the whole registry.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let snapshot_id = match self.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, self.image.revision),
            None => format!("0-0-{}", self.image.revision),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let image = std::mem::take(&mut self.image);
        let dir = self.snapshot_dir.clone();
        let file_meta = meta.clone();
        tokio::task::spawn_blocking(move || {
            write_durably_with(&dir, SNAPSHOT_FILE, |w| {
                write_snapshot_file(w, &file_meta, &image).map_err(std::io::Error::other)
            })
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?
        .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot written");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<muster_core::ApplyResult>, StorageError>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<openraft::Entry<TypeConfig>> = entries.into_iter().collect();
        if let (Some(log), Some(last)) = (&self.log_durability, entries.last()) {
            // The leader may count itself in an entry's quorum before its own disk has
            // it; no answer or read may see the entry until it does.
            log.wait_durable(last.log_id.index)
                .await
                .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        }
        if let (Some(gate), Some(last)) = (self.apply_gate.clone(), entries.last()) {
            gate.ready(last.log_id.index).await;
        }
        let mut results = Vec::new();
        let mut events = Vec::new();
        let shared = self.shared.clone();
        let mut registry = shared.registry.write().unwrap_or_else(|p| p.into_inner());
        self.writer.stage(|pending| {
            for entry in entries {
                self.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(registry.nothing()),
                    EntryPayload::Normal(command) => {
                        let applied = registry.apply(&command);
                        Self::persist(&mut pending.batch, &applied, &registry)?;
                        pending.commands += 1;
                        events.extend(applied.events);
                        results.push(applied.result);
                    }
                    EntryPayload::Membership(membership) => {
                        self.membership = StoredMembership::new(Some(entry.log_id), membership);
                        pending.set_membership(self.membership.clone());
                        results.push(registry.nothing());
                    }
                }
            }
            // Blank and membership entries move `last_applied` too.
            pending.set_position(self.last_applied, (registry.revision(), registry.next_lease_id()));
            Ok(())
        })?;
        let revision = registry.revision();
        if !events.is_empty() {
            shared.sink.publish(&events, revision);
        }
        drop(registry);
        shared.revision.send_replace(revision);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Write and flush sled first: the log below this snapshot may be purged once it
        // exists.
        if let Err(e) = self.writer.write_now() {
            tracing::warn!(error = %e, "writing applied changes to the state database before a snapshot failed");
        }
        if let Err(e) = self.db.flush_async().await {
            tracing::warn!(error = %e, "flushing the state database before a snapshot failed");
        }
        SnapshotBuilder {
            image: self.shared.read().to_snapshot(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        // Refused before it replaces the current snapshot file.
        readable_snapshot_image(snapshot.get_ref()).map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let file = save_snapshot_file(
            self.snapshot_dir.clone(),
            SnapshotFile {
                meta: meta.clone(),
                data: snapshot.into_inner(),
            },
        )
        .await?;
        self.replace_state(meta, &file.data)?;
        tracing::info!(snapshot = %meta.snapshot_id, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.read_snapshot_file()?.map(|file| Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(file.data)),
        }))
    }
}
