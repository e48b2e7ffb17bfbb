//! What a round records: every client operation with its call time, return time and
//! result; every message every watcher received; every lease keep-alive; the faults
//! and the final state. Saved as JSON under `target/chaos/` when a round fails, so
//! the checks can be re-run on it (`muster-chaos --check FILE`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Microseconds since the round started (one clock for every client).
pub type Micros = u64;

/// An instance as a read or a watch saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Seen {
    /// Instance id (the key; all instances are in one service).
    pub key: String,
    /// The unique value written (metadata `v`).
    pub value: String,
    /// Revision of its last change.
    pub mod_revision: u64,
    /// Its lease (0: none).
    pub lease_id: u64,
    /// In maintenance.
    #[serde(default)]
    pub maintenance: bool,
}

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Register `key` with `value`; with a lease when `lease` (granted in the same
    /// request when `lease_id` is 0).
    Register {
        /// Instance id.
        key: String,
        /// Unique value.
        value: String,
        /// Attached to a lease.
        leased: bool,
        /// The lease asked for (0: grant one with the registration, or none).
        lease_id: u64,
    },
    /// Deregister `key`.
    Deregister {
        /// Instance id.
        key: String,
    },
    /// Grant a lease.
    GrantLease,
    /// Revoke `lease_id`, to which `key` is attached.
    Revoke {
        /// Instance id attached.
        key: String,
        /// The lease.
        lease_id: u64,
    },
    /// Put `key` in maintenance (`enable`) or end its maintenance.
    SetMaintenance {
        /// Instance id.
        key: String,
        /// Enter (true) or end (false).
        enable: bool,
    },
    /// Linearizable discovery of the whole service.
    Read,
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Done; for a registration, the lease attached (0: none).
    Ok {
        /// The lease id granted or attached (0: none).
        lease_id: u64,
        /// The revision the write produced.
        revision: u64,
    },
    /// Revoked, with the number of instances removed.
    Revoked {
        /// Instances removed.
        removed: u32,
    },
    /// NOT_FOUND (deregister of an absent key, revoke of an unknown lease).
    NotFound,
    /// A discovery's answer.
    Read {
        /// Instances found, by key.
        instances: Vec<Seen>,
        /// Revision of the service's last change (the state's revision).
        service_revision: u64,
        /// The node's revision in the header.
        revision: u64,
    },
    /// Failed without effect (refused before it was sent, or rejected).
    Failed {
        /// Status or transport error.
        error: String,
    },
    /// No definite answer: it may or may not have taken effect.
    Unknown {
        /// What happened.
        error: String,
    },
}

/// One operation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpRecord {
    /// Client number.
    pub client: usize,
    /// Node it was sent to.
    pub node: u64,
    /// Call time.
    pub call: Micros,
    /// Return time.
    pub ret: Micros,
    /// The request.
    pub request: Request,
    /// The response.
    pub response: Response,
}

/// One message on a watch stream (or a reconnection).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WatchItem {
    /// The watcher (re)connected to `node` asking for events from `start`.
    Connect {
        /// Node.
        node: u64,
        /// Start revision asked for.
        start: u64,
    },
    /// The stream ended or failed.
    Disconnect {
        /// Why.
        error: String,
    },
    /// A put.
    Put {
        /// Event revision.
        revision: u64,
        /// The instance.
        instance: Seen,
    },
    /// A delete.
    Delete {
        /// Event revision.
        revision: u64,
        /// Instance id.
        key: String,
        /// Reason (protobuf `DeleteReason` value).
        reason: i32,
    },
    /// A reset with the full state.
    Reset {
        /// Its revision.
        revision: u64,
        /// Every instance.
        instances: Vec<Seen>,
    },
    /// A progress bookmark.
    Progress {
        /// Its revision.
        revision: u64,
    },
}

/// A watch message with its arrival time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchRecord {
    /// Arrival time.
    pub at: Micros,
    /// The message.
    pub item: WatchItem,
}

/// One keep-alive of a lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeepAliveRecord {
    /// The lease.
    pub lease_id: u64,
    /// Node asked.
    pub node: u64,
    /// Sent.
    pub call: Micros,
    /// Answered (or gave up).
    pub ret: Micros,
    /// TTL renewed: `Some(0)` the lease is gone, `None` no answer.
    pub ttl_ms: Option<u64>,
}

/// The life of one lease as its owner saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Owner number.
    pub owner: usize,
    /// Lease id.
    pub lease_id: u64,
    /// Its TTL.
    pub ttl_ms: u64,
    /// The instance attached.
    pub key: String,
    /// When the registration that granted or attached it was sent (its first
    /// renewal, as far as the owner knows).
    pub granted: Micros,
    /// When the owner let it go (revoked or abandoned it), if it did; a lease found
    /// lost is not let go.
    pub released_at: Option<Micros>,
    /// Every keep-alive.
    pub keepalives: Vec<KeepAliveRecord>,
}

/// A fault as injected.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRecord {
    /// Its name.
    pub kind: String,
    /// What exactly (nodes, offsets).
    pub detail: String,
    /// Injected at.
    pub start: Micros,
    /// Healed at.
    pub healed: Micros,
}

/// Everything one round recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundHistory {
    /// The round's seed.
    pub seed: u64,
    /// Node ids.
    pub nodes: Vec<u64>,
    /// Instance keys a read covers.
    pub keys: Vec<String>,
    /// The faults.
    pub faults: Vec<FaultRecord>,
    /// Fastest clock rate of any node (leases expire that much sooner).
    pub max_clock_rate: f64,
    /// Client operations.
    pub ops: Vec<OpRecord>,
    /// Watch streams, one list per watcher.
    pub watches: Vec<Vec<WatchRecord>>,
    /// Leases.
    pub leases: Vec<LeaseRecord>,
    /// After recovery: `(node, instances, revision)` of a local read on every node.
    pub final_reads: Vec<(u64, Vec<Seen>, u64)>,
    /// Time from heal to one agreed leader with every node caught up with the
    /// revision reached before the heal (None: never, or no equal digests after the
    /// load).
    pub recovery: Option<Micros>,
    /// Digest status after recovery, per node (for reports).
    pub final_status: BTreeMap<u64, String>,
    /// Linearizable reads followers answered under a read lease, summed over the
    /// nodes running at the end (a node restarted in the round counts from then).
    #[serde(default)]
    pub follower_lease_reads: u64,
    /// The highest Raft term any node stated just before the fault, and once the
    /// round was over: the difference is how many elections the round cost.
    #[serde(default)]
    pub terms: (u64, u64),
}

/// The shared clock and sinks the workload records into.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    ops: Arc<Mutex<Vec<OpRecord>>>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        Recorder {
            start: Instant::now(),
            ops: Arc::default(),
        }
    }

    /// Microseconds since the start.
    pub fn now(&self) -> Micros {
        self.start.elapsed().as_micros() as Micros
    }

    /// Records one operation.
    pub fn record(&self, op: OpRecord) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// Every operation so far.
    pub fn ops(&self) -> Vec<OpRecord> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}
