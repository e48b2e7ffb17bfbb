//! Node configuration. Only the binary reads flags, environment and files; the
//! server takes this plain struct, validated before any port is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything a node needs to run.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id (> 0), unique in the cluster.
    pub id: u64,
    /// Where the Raft log, the state database and snapshots live.
    pub data_dir: PathBuf,
    /// Client gRPC API address.
    pub grpc_addr: SocketAddr,
    /// Peer (Raft) gRPC address; other nodes dial the address listed for this node
    /// in `initial_cluster`, or `advertise_peer_addr`.
    pub peer_addr: SocketAddr,
    /// HTTP address (health, later REST and Consul API).
    pub http_addr: SocketAddr,
    /// The peer address other nodes use to reach this one (defaults to `peer_addr`).
    pub advertise_peer_addr: Option<String>,
    /// Members of a new cluster: node id → peer address (`host:port`). Every member
    /// is started with the same map and they form the cluster by themselves.
    pub initial_cluster: BTreeMap<u64, String>,
    /// Client gRPC address of an existing node to ask for membership (as a learner).
    pub join: Option<String>,
    /// Raft timing.
    pub raft: RaftTiming,
    /// Lease keeper settings.
    pub leases: LeaseSettings,
    /// Watch settings.
    pub watch: WatchSettings,
    /// Largest gRPC message accepted or sent on the client API, in bytes.
    pub max_message_bytes: usize,
    /// sled page cache, in bytes.
    pub state_cache_bytes: u64,
    /// The command level this node states to its peers (see
    /// [`crate::member_levels`]): this build's [`muster_core::COMMAND_LEVEL`], or a
    /// lower one to keep the cluster's log readable by an older build (a node can then
    /// be rolled back); commands above it are refused.
    pub command_level: u32,
    /// TLS on every port and peer connection (see [`crate::tls`]); plain TCP when
    /// `None`.
    pub tls: Option<crate::tls::TlsSettings>,
}

/// Raft timing, tuned for fsynced appends.
#[derive(Clone, Debug)]
pub struct RaftTiming {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Lowest election timeout.
    pub election_min: Duration,
    /// Highest election timeout.
    pub election_max: Duration,
    /// Build a snapshot after this many log entries, or this many revisions (an
    /// entry may carry a batch of writes), since the last one.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot (for slow followers).
    pub keep_behind_snapshot: u64,
    /// Whether followers answer linearizable reads under a read lease from the
    /// leader instead of asking it for a read index (`crate::read_lease`).
    pub follower_read_leases: bool,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            // Fsynced appends take well under a millisecond here, so a 50 ms heartbeat
            // leaves room for a 200-400 ms election timeout. A follower that accepted a
            // leader campaigns only after the maximum (its promise not to vote for
            // another) plus a random timeout without hearing from it: 600-800 ms, so
            // writes succeed again within a second of losing the leader (benchmarked:
            // 0.77-0.87 s, against 1.08-1.23 s at 300-600 ms).
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(200),
            election_max: Duration::from_millis(400),
            // Every un-purged entry is also held in memory (encoded, a few hundred
            // bytes each), and since writes are batched an entry may carry many
            // commands, so snapshots also come by revision. A snapshot encodes the
            // whole registry: at 2,000 it cost 28 % of the leader's CPU under a steady
            // register load (200 clients, tens of thousands of instances). At 20,000
            // a node with 100k instances stayed at 144-147 MB and restarted in under
            // a second (BENCHMARKS.md).
            snapshot_every: 20_000,
            keep_behind_snapshot: 500,
            follower_read_leases: true,
        }
    }
}

/// How the leader keeps and expires leases.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// How often the leader looks for expired leases.
    pub tick: Duration,
    /// How often the leader checkpoints remaining TTLs of starving leases.
    pub checkpoint_interval: Duration,
    /// Most leases expired per second, as a share of all leases (0.1 = 10 %).
    pub expiry_rate: f64,
    /// Leases that may always be expired per second, whatever the share.
    pub expiry_floor_per_sec: u32,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            tick: Duration::from_millis(100),
            checkpoint_interval: Duration::from_secs(1),
            expiry_rate: 0.1,
            expiry_floor_per_sec: 100,
        }
    }
}

/// Watch hub settings.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// Events kept for replay.
    pub history: usize,
    /// Events a watcher may fall behind before it gets a `Reset`.
    pub queue: usize,
    /// How often idle watchers get a progress notification.
    pub progress_interval: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            history: 10_000,
            queue: 1_024,
            progress_interval: Duration::from_secs(5),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The flag at fault, without dashes.
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub reason: String,
}

impl NodeConfig {
    /// A configuration with defaults for everything but identity and addresses.
    pub fn new(
        id: u64,
        data_dir: PathBuf,
        grpc_addr: SocketAddr,
        peer_addr: SocketAddr,
        http_addr: SocketAddr,
    ) -> Self {
        NodeConfig {
            id,
            data_dir,
            grpc_addr,
            peer_addr,
            http_addr,
            advertise_peer_addr: None,
            initial_cluster: BTreeMap::new(),
            join: None,
            raft: RaftTiming::default(),
            leases: LeaseSettings::default(),
            watch: WatchSettings::default(),
            max_message_bytes: 4 * 1024 * 1024,
            // Reads are served from the in-memory registry; sled is only written in
            // the apply path and scanned at start-up, so its cache holds little that
            // is read again.
            state_cache_bytes: 8 * 1024 * 1024,
            command_level: muster_core::COMMAND_LEVEL,
            tls: None,
        }
    }

    /// The address other nodes use to reach this node's peer port.
    pub fn advertised_peer_addr(&self) -> String {
        self.advertise_peer_addr
            .clone()
            .or_else(|| self.initial_cluster.get(&self.id).cloned())
            .unwrap_or_else(|| self.peer_addr.to_string())
    }

    /// Checks the configuration before anything is bound or written.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError {
                field: "id",
                reason: "node ids start at 1".into(),
            });
        }
        if !self.initial_cluster.is_empty() && !self.initial_cluster.contains_key(&self.id) {
            return Err(ConfigError {
                field: "initial-cluster",
                reason: format!(
                    "this node's id {} is not in the list ({}); add `{}=HOST:PEERPORT` or fix --id",
                    self.id,
                    self.initial_cluster
                        .keys()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    self.id
                ),
            });
        }
        if self.initial_cluster.is_empty() && self.join.is_none() {
            return Err(ConfigError {
                field: "initial-cluster",
                reason: "give --initial-cluster for a new cluster (use `1=HOST:PEERPORT` for a single node) or --join to join an existing one".into(),
            });
        }
        if !self.initial_cluster.is_empty() && self.join.is_some() {
            return Err(ConfigError {
                field: "join",
                reason: "--join and --initial-cluster exclude each other: a joining node gets its membership from the cluster".into(),
            });
        }
        if self.raft.election_min <= self.raft.heartbeat * 3 || self.raft.election_max <= self.raft.election_min {
            return Err(ConfigError {
                field: "election-timeout",
                reason: "the election timeout must exceed three heartbeats and max must exceed min".into(),
            });
        }
        if !(1..=muster_core::COMMAND_LEVEL).contains(&self.command_level) {
            return Err(ConfigError {
                field: "command-level",
                reason: format!(
                    "this build knows command levels 1 to {}, got {}",
                    muster_core::COMMAND_LEVEL,
                    self.command_level
                ),
            });
        }
        if !(self.leases.expiry_rate > 0.0 && self.leases.expiry_rate <= 1.0) {
            return Err(ConfigError {
                field: "lease-expiry-rate",
                reason: "must be a share in (0, 1], e.g. 0.1 for 10 % of leases per second".into(),
            });
        }
        Ok(())
    }
}
