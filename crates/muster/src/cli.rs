//! The command line: every flag, its environment variable and its default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::parse::{
    parse_duration, parse_initial_cluster, parse_key_value, parse_listen, parse_port_name, parse_strategy,
    InitialCluster,
};

/// Muster: a Raft-replicated service registry.
#[derive(Debug, Parser)]
#[command(name = "muster", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Node(s) to talk to, as HOST:PORT of their gRPC API; a comma-separated list
    /// lets the client fail over between them.
    #[arg(
        long,
        global = true,
        env = "MUSTER_ADDR",
        default_value = "127.0.0.1:7100",
        value_delimiter = ','
    )]
    pub addr: Vec<String>,

    /// PEM certificate(s) of the CA that signs the nodes' certificates: talk TLS to
    /// the nodes (see `muster server --tls-cert`).
    #[arg(long, global = true, env = "MUSTER_CACERT")]
    pub cacert: Option<PathBuf>,

    /// PEM client certificate, for nodes started with --tls-client-auth.
    #[arg(long, global = true, env = "MUSTER_CERT", requires_all = ["key", "cacert"])]
    pub cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, global = true, env = "MUSTER_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Print JSON instead of tables.
    #[arg(long, global = true, env = "MUSTER_JSON")]
    pub json: bool,

    /// Print more (e.g. progress notifications in `watch`).
    #[arg(long, short, global = true, env = "MUSTER_VERBOSE")]
    pub verbose: bool,

    /// Log format on stderr (the level comes from RUST_LOG).
    #[arg(long, global = true, env = "MUSTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Server(Box<ServerArgs>),
    /// Start a local cluster of child `muster server` processes on loopback.
    Dev(DevArgs),
    /// Run the HTTP gateway: `/{service}/{path}` is proxied to an instance of the service.
    Gateway(Box<GatewayArgs>),
    /// Register an instance (with --ttl: keep it alive until Ctrl-C, then deregister).
    Register(RegisterArgs),
    /// Remove an instance.
    Deregister(DeregisterArgs),
    /// Put an instance in maintenance (discovery skips it, it stays registered), or
    /// take it out with --off.
    Maintenance(MaintenanceArgs),
    /// List the instances of a service.
    Discover(DiscoverArgs),
    /// List services with instance counts.
    Services(ServicesArgs),
    /// Print change events as they happen.
    Watch(WatchArgs),
    /// Cluster status and membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Exit 0 when a node's HTTP health endpoint answers 200 (container HEALTHCHECK).
    Healthcheck(HealthcheckArgs),
}

/// `muster healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The URL to probe (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8500/healthz")]
    pub url: String,

    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// `muster server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// This node's id (> 0), unique in the cluster.
    #[arg(long, env = "MUSTER_ID", required_unless_present = "id_from_hostname")]
    pub id: Option<u64>,

    /// Derive the id from the host name's trailing ordinal, as a Kubernetes
    /// StatefulSet names its pods: `muster-0` is node 1, `muster-2` node 3.
    #[arg(long, env = "MUSTER_ID_FROM_HOSTNAME", conflicts_with = "id")]
    pub id_from_hostname: bool,

    /// Directory for the Raft log, the state database and snapshots.
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Address of the client gRPC API.
    #[arg(long, env = "MUSTER_GRPC_ADDR", default_value = "0.0.0.0:7100")]
    pub grpc_addr: SocketAddr,

    /// Address of the peer (Raft) API.
    #[arg(long, env = "MUSTER_PEER_ADDR", default_value = "0.0.0.0:7300")]
    pub peer_addr: SocketAddr,

    /// Address of the HTTP API (/health).
    #[arg(long, env = "MUSTER_HTTP_ADDR", default_value = "0.0.0.0:8500")]
    pub http_addr: SocketAddr,

    /// Members of a new cluster, `ID=HOST:PEERPORT,...`; every member gets the same list.
    #[arg(long, env = "MUSTER_INITIAL_CLUSTER", value_parser = parse_initial_cluster)]
    pub initial_cluster: Option<InitialCluster>,

    /// gRPC address (HOST:PORT) of a node of an existing cluster to join as a learner.
    #[arg(long, env = "MUSTER_JOIN")]
    pub join: Option<String>,

    /// Peer address other nodes use to reach this one (default: this node's entry
    /// in --initial-cluster, else --peer-addr).
    #[arg(long, env = "MUSTER_ADVERTISE_PEER_ADDR")]
    pub advertise_peer_addr: Option<String>,

    /// Leader heartbeat interval in milliseconds [default: 50].
    #[arg(long, env = "MUSTER_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,

    /// Lowest election timeout in milliseconds [default: 200].
    #[arg(long, env = "MUSTER_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,

    /// Highest election timeout in milliseconds [default: 400].
    #[arg(long, env = "MUSTER_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,

    /// Whether followers answer linearizable reads under a read lease from the
    /// leader, without asking it for each batch of reads [default: true].
    #[arg(long, env = "MUSTER_FOLLOWER_READ_LEASES")]
    pub follower_read_leases: Option<bool>,

    /// Build a snapshot after this many log entries or revisions [default: 20000].
    #[arg(long, env = "MUSTER_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,

    /// Log entries kept behind a snapshot, for followers slightly behind [default: 500].
    #[arg(long, env = "MUSTER_KEEP_BEHIND_SNAPSHOT")]
    pub keep_behind_snapshot: Option<u64>,

    /// Most leases expired per second, as a share of all leases [default: 0.1].
    #[arg(long, env = "MUSTER_LEASE_EXPIRY_RATE")]
    pub lease_expiry_rate: Option<f64>,

    /// Leases that may always be expired per second, whatever the share [default: 100].
    #[arg(long, env = "MUSTER_LEASE_EXPIRY_FLOOR")]
    pub lease_expiry_floor: Option<u32>,

    /// Events kept for watch replay [default: 10000].
    #[arg(long, env = "MUSTER_WATCH_HISTORY")]
    pub watch_history: Option<usize>,

    /// Events a watcher may fall behind before it gets a reset [default: 1024].
    #[arg(long, env = "MUSTER_WATCH_QUEUE")]
    pub watch_queue: Option<usize>,

    /// Interval of progress notifications to idle watchers, e.g. `5s` [default: 5s].
    #[arg(long, env = "MUSTER_WATCH_PROGRESS_INTERVAL", value_parser = parse_duration)]
    pub watch_progress_interval: Option<Duration>,

    /// Largest gRPC message on the client API, in bytes [default: 4194304].
    #[arg(long, env = "MUSTER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,

    /// Page cache of the state database, in bytes [default: 8388608].
    #[arg(long, env = "MUSTER_STATE_CACHE_BYTES")]
    pub state_cache_bytes: Option<u64>,

    /// Command level to state to peers: lower than this build's own [default: 2,
    /// the newest] to keep commands the previous release cannot read (level 2:
    /// maintenance) out of the log while a rollback may still come.
    #[arg(long, env = "MUSTER_COMMAND_LEVEL")]
    pub command_level: Option<u32>,

    /// PEM certificate chain of this node. With it, the gRPC, HTTP and peer ports
    /// speak TLS only, and peers must present a certificate from --tls-ca. It needs
    /// the server and client usages and the names the node is reached at.
    #[arg(long, env = "MUSTER_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "MUSTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate(s) of the CA that signs the nodes' (and clients')
    /// certificates.
    #[arg(long, env = "MUSTER_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,

    /// Require clients of the gRPC and HTTP ports to present a certificate from
    /// --tls-ca.
    #[arg(long, env = "MUSTER_TLS_CLIENT_AUTH", requires = "tls_cert")]
    pub tls_client_auth: bool,

    /// TOML file with any of these flags as keys (`grpc-addr = "0.0.0.0:7100"`);
    /// flags and MUSTER_* variables take precedence over it.
    #[arg(long, env = "MUSTER_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `muster dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Keep the nodes' data under DIR/node-N (default: a temporary directory,
    /// removed on exit).
    #[arg(long, env = "MUSTER_DEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// How many nodes to start (node N listens on gRPC 7100+N-1, peer 7300+N-1,
    /// HTTP 8500+N-1).
    #[arg(long, env = "MUSTER_DEV_NODES", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub nodes: u16,
}

/// `muster gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// gRPC addresses (HOST:PORT) of Muster nodes, comma-separated; any of them serves.
    #[arg(
        long,
        env = "MUSTER_GATEWAY_NODES",
        default_value = "127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102",
        value_delimiter = ','
    )]
    pub nodes: Vec<String>,

    /// Address the gateway serves HTTP on (`:8080` means every interface).
    #[arg(long, env = "MUSTER_GATEWAY_LISTEN", default_value = "0.0.0.0:8080", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Namespace of the proxied services.
    #[arg(long, env = "MUSTER_GATEWAY_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// How requests are spread over instances: round_robin, weighted or random.
    #[arg(long, env = "MUSTER_GATEWAY_STRATEGY", default_value = "round_robin", value_parser = parse_strategy)]
    pub strategy: muster_client::PickStrategy,

    /// Prefer instances in this zone while any of them is usable.
    #[arg(long, env = "MUSTER_GATEWAY_PREFER_ZONE")]
    pub prefer_zone: Option<String>,

    /// Failures in a row (connection failures, 502/503/504) that open an instance's
    /// circuit breaker; 0 turns breakers off.
    #[arg(long, env = "MUSTER_GATEWAY_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,

    /// How long an open breaker skips its instance before one trial request, e.g. `10s`.
    #[arg(long, env = "MUSTER_GATEWAY_BREAKER_COOL_DOWN", default_value = "10s", value_parser = parse_duration)]
    pub breaker_cool_down: Duration,

    /// TOML file of `service = ["host:port", ...]` used for services the registry has
    /// never answered for (without it: the MUSTER_FALLBACK_* variables).
    #[arg(long, env = "MUSTER_GATEWAY_FALLBACK_FILE")]
    pub fallback_file: Option<PathBuf>,

    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, env = "MUSTER_GATEWAY_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: u64,

    /// How long an instance may take to send its response headers (then 504), e.g. `30s`.
    #[arg(long, env = "MUSTER_GATEWAY_UPSTREAM_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,

    /// Time allowed to open a connection to an instance, e.g. `2s`.
    #[arg(long, env = "MUSTER_GATEWAY_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Most services followed at once (one registry watch each); more get 503.
    #[arg(long, env = "MUSTER_GATEWAY_MAX_SERVICES", default_value_t = 1024)]
    pub max_services: usize,

    /// Most upgraded connections (WebSocket) relayed at once; more get 503.
    #[arg(long, env = "MUSTER_GATEWAY_MAX_TUNNELS", default_value_t = 10_000)]
    pub max_tunnels: usize,

    /// PEM certificate chain the gateway serves: HTTPS (and HTTP/2 by ALPN) instead
    /// of plain HTTP on --listen.
    #[arg(long, env = "MUSTER_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "MUSTER_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// After SIGTERM or SIGINT, how long requests in flight may take to finish.
    #[arg(long, env = "MUSTER_GATEWAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// Where an instance lives, shared by commands that name one.
#[derive(Debug, Args)]
pub struct NamespaceArg {
    /// Namespace.
    #[arg(long, short = 'n', env = "MUSTER_NAMESPACE", default_value = "default")]
    pub namespace: String,
}

/// `muster register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Service name.
    pub service: String,

    /// Instance id, unique within the service.
    #[arg(long)]
    pub id: String,

    /// Host name or IP address clients connect to.
    #[arg(long)]
    pub address: String,

    /// Main port.
    #[arg(long)]
    pub port: u16,

    /// A named extra port, NAME=PORT (repeatable), e.g. `health=8081`.
    #[arg(long = "named-port", value_name = "NAME=PORT", value_parser = parse_port_name)]
    pub named_ports: Vec<(String, u16)>,

    /// A tag (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,

    /// Metadata, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub meta: Vec<(String, String)>,

    /// Zone.
    #[arg(long)]
    pub zone: Option<String>,

    /// Relative weight for weighted picking (default 100).
    #[arg(long)]
    pub weight: Option<u32>,

    /// Initial health.
    #[arg(long, value_enum, default_value_t = HealthArg::Passing)]
    pub health: HealthArg,

    /// Keep the instance on a lease of this TTL (e.g. `10s`) until Ctrl-C, then
    /// deregister it.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,

    #[command(flatten)]
    pub ns: NamespaceArg,
}

/// A health state on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HealthArg {
    /// Serving normally.
    Passing,
    /// Serving, degraded.
    Warning,
    /// Not serving.
    Critical,
}

impl From<HealthArg> for muster_core::Health {
    fn from(h: HealthArg) -> Self {
        match h {
            HealthArg::Passing => muster_core::Health::Passing,
            HealthArg::Warning => muster_core::Health::Warning,
            HealthArg::Critical => muster_core::Health::Critical,
        }
    }
}

/// `muster deregister`.
#[derive(Debug, Args)]
pub struct DeregisterArgs {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub id: String,
    #[command(flatten)]
    pub ns: NamespaceArg,
}

/// `muster maintenance`.
#[derive(Debug, Args)]
pub struct MaintenanceArgs {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// Why (shown to whoever looks at the instance).
    #[arg(long, conflicts_with = "off")]
    pub reason: Option<String>,
    /// End maintenance: the instance gets back the health it would have had.
    #[arg(long)]
    pub off: bool,
    #[command(flatten)]
    pub ns: NamespaceArg,
}

/// `muster discover`.
#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// Service name.
    pub service: String,

    /// Only instances with this tag (repeatable: all must match).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,

    /// Only instances in this zone.
    #[arg(long)]
    pub zone: Option<String>,

    /// Only passing instances.
    #[arg(long, conflicts_with = "health")]
    pub healthy: bool,

    /// Only instances in these health states (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub health: Vec<HealthArg>,

    /// Confirm leadership through a quorum before reading.
    #[arg(long)]
    pub linearizable: bool,

    /// Wait until the answering node has applied this revision.
    #[arg(long)]
    pub min_revision: Option<u64>,

    #[command(flatten)]
    pub ns: NamespaceArg,
}

/// `muster services`.
#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// Only this namespace (default: every namespace).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,

    /// Confirm leadership through a quorum before reading.
    #[arg(long)]
    pub linearizable: bool,
}

/// `muster watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this service (default: every service).
    pub service: Option<String>,

    /// Replay every event from this revision (default: from now on).
    #[arg(long = "from", value_name = "REV", default_value_t = 0)]
    pub from: u64,

    /// Only this namespace (default: every namespace).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
}

/// `muster cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Status of the node(s) given with --addr.
    Status,
    /// Members of the cluster.
    Members,
    /// Add a node as a learner (it catches up without voting).
    AddLearner {
        /// The new node's id.
        id: u64,
        /// The new node's peer address, HOST:PORT.
        peer_addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// The learner's id.
        id: u64,
    },
    /// Remove a node from the cluster.
    Remove {
        /// The node's id.
        id: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn server_flags_parse_into_args() {
        let cli = Cli::try_parse_from([
            "muster",
            "server",
            "--id",
            "2",
            "--data-dir",
            "/tmp/n2",
            "--initial-cluster",
            "1=127.0.0.1:7300,2=127.0.0.1:7301",
            "--heartbeat-ms",
            "50",
        ])
        .unwrap();
        let Command::Server(args) = cli.command else {
            panic!("expected server")
        };
        assert_eq!(args.id, Some(2));
        assert_eq!(args.grpc_addr, "0.0.0.0:7100".parse().unwrap());
        assert_eq!(args.initial_cluster.unwrap().0.len(), 2);
        assert_eq!(args.heartbeat_ms, Some(50));
    }

    #[test]
    fn register_takes_repeated_tags_and_metadata() {
        let cli = Cli::try_parse_from([
            "muster",
            "register",
            "orders",
            "--id",
            "o1",
            "--address",
            "10.0.0.1",
            "--port",
            "8080",
            "--tag",
            "v1",
            "--tag",
            "canary",
            "--meta",
            "version=1.2",
            "--meta",
            "url=http://x/?a=b",
            "--ttl",
            "10s",
        ])
        .unwrap();
        let Command::Register(args) = cli.command else {
            panic!("expected register")
        };
        assert_eq!(args.tags, vec!["v1", "canary"]);
        assert_eq!(args.meta[1], ("url".to_string(), "http://x/?a=b".to_string()));
        assert_eq!(args.ttl, Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_comma_separated_addr_is_a_list_of_nodes() {
        let cli = Cli::try_parse_from(["muster", "services", "--addr", "127.0.0.1:7100,127.0.0.1:7101"]).unwrap();
        assert_eq!(cli.addr, vec!["127.0.0.1:7100", "127.0.0.1:7101"]);
    }

    #[test]
    fn gateway_flags_parse_and_default_to_the_dev_cluster() {
        let cli = Cli::try_parse_from(["muster", "gateway", "--listen", ":9090", "--strategy", "weighted"]).unwrap();
        let Command::Gateway(args) = cli.command else {
            panic!("expected gateway")
        };
        assert_eq!(args.listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(args.strategy, muster_client::PickStrategy::Weighted);
        assert_eq!(args.nodes, ["127.0.0.1:7100", "127.0.0.1:7101", "127.0.0.1:7102"]);
        assert_eq!(args.breaker_cool_down, Duration::from_secs(10));
    }

    #[test]
    fn a_bad_gateway_flag_is_refused_naming_it() {
        for (flag, value) in [
            ("--strategy", "bogus"),
            ("--listen", "nowhere"),
            ("--upstream-timeout", "5"),
            ("--max-body-bytes", "lots"),
        ] {
            let err = Cli::try_parse_from(["muster", "gateway", flag, value]).unwrap_err();
            assert!(err.to_string().contains(flag), "{flag}: {err}");
        }
    }

    #[test]
    fn a_bad_ttl_is_refused_naming_the_flag() {
        let err = Cli::try_parse_from([
            "muster",
            "register",
            "orders",
            "--id",
            "o1",
            "--address",
            "h",
            "--port",
            "1",
            "--ttl",
            "ten",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--ttl"), "{err}");
    }
}
