//! Prometheus metrics (`muster_*`), exposed at `/metrics`.
//!
//! Served as OpenMetrics to scrapers that ask for it and as the classic Prometheus
//! text format (0.0.4) otherwise, which is what `promtool check metrics` reads.
//! Request metrics carry bounded labels only: the route template (never the raw
//! path) for HTTP, and the method name for gRPC only when the method exists.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::node::NodeCore;

/// Latency buckets in seconds: 250 µs to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Labels of a gRPC request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `/package.Service/Method`, or `unknown`.
    pub method: String,
    /// gRPC status code name (`OK`, `NotFound`, ...).
    pub code: String,
}

/// Labels of a gRPC latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcMethodLabels {
    /// `/package.Service/Method`, or `unknown`.
    pub method: String,
}

/// Labels of an HTTP request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Request method (`GET`, ...; `other` for non-standard ones).
    pub method: String,
    /// The matched route template (`/v1/registry/services/{service}/instances`), or
    /// `unmatched`.
    pub route: String,
    /// Response status code.
    pub status: String,
}

/// Labels of an HTTP latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRouteLabels {
    /// Request method.
    pub method: String,
    /// The matched route template, or `unmatched`.
    pub route: String,
}

/// Labels of a failed call to a peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerCallLabels {
    /// The peer's node id.
    pub peer: u64,
    /// `append`, `vote` or `snapshot`.
    pub rpc: &'static str,
    /// `deadline` (no answer in time), `unreachable` (no connection, or it was
    /// refused, reset or closed) or `error` (any other failure).
    pub failure: &'static str,
}

/// Labels of a per-peer metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's node id.
    pub peer: u64,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    /// Methods the client gRPC port serves (the label values allowed).
    grpc_methods: HashSet<String>,
    /// gRPC requests answered, by method and status code.
    pub grpc_requests: Family<GrpcLabels, Counter>,
    /// gRPC time to response headers, by method.
    pub grpc_duration: HistogramFamily<GrpcMethodLabels>,
    /// HTTP requests answered, by method, route and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// HTTP time to response headers, by method and route.
    pub http_duration: HistogramFamily<HttpRouteLabels>,
    /// Writes this node forwarded to the leader.
    pub forwarded_writes: Counter,
    /// Forwarded writes attempted again (forwarded, or proposed here) after an
    /// attempt that got no answer; each is still applied once (forwarding sessions).
    pub forwarded_write_retries: Counter,
    /// gRPC Discover answers built from instances encoded for an earlier read.
    pub discover_cache_hits: Counter,
    /// gRPC Discover answers whose instances were encoded for this read.
    pub discover_cache_misses: Counter,
    /// Commands per Raft entry when concurrent writes were batched.
    pub write_batch_size: Histogram,
    /// Writes proposed alone by their own request (nothing queued, a slot free).
    pub lone_writes: Counter,
    /// Leases expired by this node as leader.
    pub lease_expirations: Counter,
    /// Expiries deferred by the rate limit.
    pub lease_expiry_throttled: Counter,
    /// Leases whose checkpoint (time left while nobody renews them) this node
    /// recorded or cleared as leader.
    pub lease_checkpoints: Counter,
    /// Linearizable readers served by each read index this node obtained (here or
    /// from the leader).
    pub read_index_batch_size: Histogram,
    /// Read indexes this node gave as leader from its leader lease (no heartbeat round).
    pub lease_reads: Counter,
    /// Heartbeat rounds confirming a read index that this leader ran again because
    /// too few followers answered the one before.
    pub read_index_quorum_retries: Counter,
    /// Linearizable reads this node answered as a follower under its read lease.
    pub follower_lease_reads: Counter,
    /// Read leases this node obtained from the leader as a follower.
    pub read_leases_held: Counter,
    /// Read lease requests this node sent to the leader as a follower, granted or not.
    pub read_lease_requests: Counter,
    /// Read leases this node granted to followers as leader.
    pub read_leases_granted: Counter,
    /// Heartbeats this leader sent to keep its lease ahead of the read leases it grants.
    pub leader_lease_heartbeats: Counter,
    /// Watch streams open now (gRPC and SSE).
    pub watchers: Gauge,
    /// Watch events sent.
    pub watch_events_sent: Counter,
    /// Resets sent to watchers (fell behind, or history compacted).
    pub watch_resets: Counter,
    /// Heartbeats sent as soon as this leader's disk had a commit index it had held
    /// back from its followers.
    pub held_commits_resent: Counter,
    /// Raft calls to peers that failed, by peer, call and failure. openraft pauses
    /// a peer's replication after each (see `crate::network::retry_pauses`).
    pub peer_call_failures: Family<PeerCallLabels, Counter>,
    /// Appends to a peer refused before they were sent because they carried more
    /// than the link to it delivers within the append deadline; openraft sends the
    /// entries that fit instead (`crate::append_budget`).
    pub peer_appends_cut: Family<PeerLabels, Counter>,
    /// Pre-vote rounds that found no quorum ready to elect, so elections stayed
    /// held back (`crate::pre_vote`).
    pub elections_held_back: Counter,
    /// 1 while a quorum would join an election this node starts.
    pub elections_allowed: Gauge,
    /// Elections this node started itself because openraft's timer had not run out
    /// when it normally would (`crate::pre_vote`).
    pub elections_started_here: Counter,
    /// TLS configurations made again from changed (or, on request, unchanged)
    /// files (`crate::tls`).
    pub tls_reloads: Counter,
    /// Attempts to reload TLS files that failed (the configuration in use stayed).
    pub tls_reload_failures: Counter,
    /// Raft term.
    pub raft_term: Gauge,
    /// Known leader id (0: none).
    pub raft_leader: Gauge,
    /// 1 when this node is the leader.
    pub raft_is_leader: Gauge,
    /// Last log index.
    pub raft_last_log_index: Gauge,
    /// Highest commit index this node knows.
    pub raft_commit_index: Gauge,
    /// Applied log index.
    pub raft_applied_index: Gauge,
    /// Committed entries not yet applied here.
    pub raft_apply_lag: Gauge,
    /// 1 when `/readyz` answers ready.
    pub ready: Gauge,
    /// Applied revision.
    pub revision: Gauge,
    /// Instances registered.
    pub instances: Gauge,
    /// Services with instances.
    pub services: Gauge,
    /// Leases.
    pub leases: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("muster");
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let m = $metric;
                registry.register($name, $help, m.clone());
                m
            }};
        }
        Metrics {
            grpc_methods: grpc_methods(),
            grpc_requests: reg!(
                "grpc_requests",
                "Client gRPC requests answered, by method and status code",
                Family::default()
            ),
            grpc_duration: reg!(
                "grpc_request_duration_seconds",
                "Client gRPC time to response headers, by method",
                HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram)
            ),
            http_requests: reg!(
                "http_requests",
                "HTTP requests answered, by method, route and status",
                Family::default()
            ),
            http_duration: reg!(
                "http_request_duration_seconds",
                "HTTP time to response headers, by method and route",
                HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram)
            ),
            forwarded_writes: reg!("forwarded_writes", "Writes forwarded to the leader", Counter::default()),
            forwarded_write_retries: reg!(
                "forwarded_write_retries",
                "Forwarded writes attempted again after an attempt that got no answer (each is still applied once)",
                Counter::default()
            ),
            discover_cache_hits: reg!(
                "discover_cache_hits",
                "gRPC Discover answers built from instances encoded for an earlier read",
                Counter::default()
            ),
            discover_cache_misses: reg!(
                "discover_cache_misses",
                "gRPC Discover answers whose instances were encoded for this read",
                Counter::default()
            ),
            write_batch_size: reg!(
                "write_batch_size",
                "Commands per Raft entry when concurrent writes were batched (batches of two or more)",
                Histogram::new([2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0])
            ),
            lone_writes: reg!(
                "lone_writes",
                "Writes proposed alone by their own request (nothing queued, a slot free), not through the write batcher",
                Counter::default()
            ),
            read_index_batch_size: reg!(
                "read_index_batch_size",
                "Linearizable readers served by each read index this node obtained",
                Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
            ),
            lease_expirations: reg!(
                "lease_expirations",
                "Leases expired by this node as leader",
                Counter::default()
            ),
            lease_expiry_throttled: reg!(
                "lease_expiry_throttled",
                "Lease expiries deferred by the expiry rate limit",
                Counter::default()
            ),
            lease_reads: reg!(
                "lease_reads",
                "Read indexes given as leader from the leader lease, without a heartbeat round",
                Counter::default()
            ),
            read_index_quorum_retries: reg!(
                "read_index_quorum_retries",
                "Heartbeat rounds confirming a read index run again as leader because too few followers answered the one before",
                Counter::default()
            ),
            lease_checkpoints: reg!(
                "lease_checkpoints",
                "Leases whose checkpoint (time left while nobody renews them) this node recorded or cleared as leader",
                Counter::default()
            ),
            follower_lease_reads: reg!(
                "follower_lease_reads",
                "Linearizable reads answered as a follower under a read lease, without asking the leader",
                Counter::default()
            ),
            read_leases_held: reg!(
                "read_leases_held",
                "Read leases obtained from the leader as a follower",
                Counter::default()
            ),
            read_lease_requests: reg!(
                "read_lease_requests",
                "Read lease requests sent to the leader as a follower, granted or not",
                Counter::default()
            ),
            read_leases_granted: reg!(
                "read_leases_granted",
                "Read leases granted to followers as leader",
                Counter::default()
            ),
            leader_lease_heartbeats: reg!(
                "leader_lease_heartbeats",
                "Heartbeats sent as leader to keep the leader lease ahead of granted read leases",
                Counter::default()
            ),
            watchers: reg!("watchers", "Open watch streams (gRPC and SSE)", Gauge::default()),
            watch_events_sent: reg!("watch_events_sent", "Watch events sent to clients", Counter::default()),
            watch_resets: reg!("watch_resets", "Resets sent to watchers", Counter::default()),
            held_commits_resent: reg!(
                "held_commits_resent",
                "Heartbeats sent as soon as the leader's disk had a commit index held back from followers",
                Counter::default()
            ),
            peer_call_failures: reg!(
                "peer_call_failures",
                "Raft calls to peers (append, vote, snapshot) that failed, by peer and failure (deadline, unreachable, error)",
                Family::default()
            ),
            peer_appends_cut: reg!(
                "peer_appends_cut",
                "Appends to a peer cut to the entries the link to it delivers within the append deadline, by peer",
                Family::default()
            ),
            elections_held_back: reg!(
                "elections_held_back",
                "Pre-vote rounds that found no quorum ready to elect, so elections stayed held back",
                Counter::default()
            ),
            elections_allowed: reg!(
                "elections_allowed",
                "1 while a quorum would join an election this node starts",
                Gauge::default()
            ),
            elections_started_here: reg!(
                "elections_started_here",
                "Elections started by the pre-vote loop because openraft's timer had not run out when it normally would",
                Counter::default()
            ),
            tls_reloads: reg!(
                "tls_reloads",
                "TLS configurations made again from the certificate, key and CA files",
                Counter::default()
            ),
            tls_reload_failures: reg!(
                "tls_reload_failures",
                "Reloads of the TLS files that failed; the configuration in use stayed",
                Counter::default()
            ),
            raft_term: reg!("raft_term", "Current Raft term", Gauge::default()),
            raft_leader: reg!("raft_leader_id", "Known leader id, 0 when none", Gauge::default()),
            raft_is_leader: reg!("raft_is_leader", "1 when this node is the leader", Gauge::default()),
            raft_last_log_index: reg!("raft_last_log_index", "Last Raft log index", Gauge::default()),
            raft_commit_index: reg!(
                "raft_commit_index",
                "Highest Raft commit index this node knows",
                Gauge::default()
            ),
            raft_applied_index: reg!("raft_applied_index", "Applied Raft log index", Gauge::default()),
            raft_apply_lag: reg!(
                "raft_apply_lag_entries",
                "Committed Raft entries not yet applied on this node",
                Gauge::default()
            ),
            ready: reg!(
                "ready",
                "1 when the node is ready to serve (see /readyz)",
                Gauge::default()
            ),
            revision: reg!("revision", "Applied registry revision", Gauge::default()),
            instances: reg!("instances", "Registered instances", Gauge::default()),
            services: reg!("services", "Services with at least one instance", Gauge::default()),
            leases: reg!("leases", "Leases", Gauge::default()),
            registry,
        }
    }

    /// Records one answered gRPC request. `path` is the request path; methods this
    /// node does not serve are counted as `unknown`, so clients cannot grow the label
    /// set.
    pub fn observe_grpc(&self, path: &str, code: &str, elapsed: Duration) {
        let method = if self.grpc_methods.contains(path) {
            path.to_string()
        } else {
            "unknown".to_string()
        };
        self.grpc_requests
            .get_or_create(&GrpcLabels {
                method: method.clone(),
                code: code.to_string(),
            })
            .inc();
        self.grpc_duration
            .get_or_create(&GrpcMethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one answered HTTP request; `route` is the matched route template.
    pub fn observe_http(&self, method: &http::Method, route: Option<&str>, status: u16, elapsed: Duration) {
        let method = match *method {
            http::Method::GET
            | http::Method::HEAD
            | http::Method::POST
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::PATCH
            | http::Method::OPTIONS => method.as_str().to_string(),
            _ => "other".to_string(),
        };
        let route = route.unwrap_or("unmatched").to_string();
        self.http_requests
            .get_or_create(&HttpLabels {
                method: method.clone(),
                route: route.clone(),
                status: status.to_string(),
            })
            .inc();
        self.http_duration
            .get_or_create(&HttpRouteLabels { method, route })
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics exposition (`application/openmetrics-text; version=1.0.0`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// The classic Prometheus text exposition (`text/plain; version=0.0.4`).
    pub fn render_text(&self) -> String {
        openmetrics_to_text(&self.render())
    }
}

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4: a counter family is
/// named with its `_total` suffix in `# HELP` and `# TYPE`, and the `# UNIT` and
/// `# EOF` lines, which 0.0.4 lacks, are dropped. Samples are the same in both.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|rest| ("# HELP ", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
        if let Some((kind, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(kind);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(tail);
                out.push('\n');
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Every `/package.Service/Method` path the client gRPC port serves.
fn grpc_methods() -> HashSet<String> {
    use prost::Message;
    let mut methods = HashSet::new();
    for set in [muster_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    let prefix = if package.is_empty() {
                        String::new()
                    } else {
                        format!("{package}.")
                    };
                    methods.insert(format!("/{prefix}{service_name}/{}", method.name.unwrap_or_default()));
                }
            }
        }
    }
    methods.insert("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
    methods
}

/// Copies Raft and registry figures into the gauges (each second, and before each
/// scrape so a scrape is never a second stale).
pub fn refresh_gauges(core: &NodeCore) {
    let status = core.status();
    let metrics = &core.metrics;
    metrics.raft_term.set(status.term as i64);
    metrics.raft_leader.set(status.leader.unwrap_or(0) as i64);
    metrics.raft_is_leader.set(i64::from(status.role == "leader"));
    metrics.raft_last_log_index.set(status.last_log_index as i64);
    metrics.raft_commit_index.set(status.commit_index as i64);
    metrics.raft_applied_index.set(status.applied_index as i64);
    metrics.raft_apply_lag.set(status.lag as i64);
    metrics.ready.set(i64::from(status.ready));
    let registry = core.shared.read();
    metrics.revision.set(registry.revision() as i64);
    metrics.instances.set(registry.instance_count() as i64);
    metrics.services.set(registry.service_count() as i64);
    metrics.leases.set(registry.lease_count() as i64);
}

/// Refreshes the gauges once a second until the node stops.
pub async fn run_raft_gauges(core: Arc<NodeCore>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        refresh_gauges(&core);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_the_classic_text_format() {
        let m = Metrics::new();
        m.forwarded_writes.inc();
        let text = m.render_text();
        assert!(text.contains("# TYPE muster_forwarded_writes_total counter\n"));
        assert!(text.contains("# HELP muster_forwarded_writes_total "));
        assert!(text.contains("muster_forwarded_writes_total 1\n"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn unknown_grpc_methods_share_one_label() {
        let m = Metrics::new();
        m.observe_grpc("/muster.v1.Registry/Register", "Ok", Duration::from_millis(1));
        m.observe_grpc(
            "/muster.v1.Registry/NoSuchMethod",
            "Unimplemented",
            Duration::from_millis(1),
        );
        m.observe_grpc("/x/y", "Unimplemented", Duration::from_millis(1));
        let text = m.render_text();
        assert!(text.contains(r#"method="/muster.v1.Registry/Register""#));
        assert!(!text.contains("NoSuchMethod"));
        assert!(text.contains(r#"muster_grpc_requests_total{method="unknown",code="Unimplemented"} 2"#));
    }
}
