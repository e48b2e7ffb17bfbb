//! Prometheus metrics (`muster_*`), exposed at `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::node::NodeCore;

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    /// Writes this node forwarded to the leader.
    pub forwarded_writes: Counter,
    /// Leases expired by this node as leader.
    pub lease_expirations: Counter,
    /// Expiries deferred by the rate limit.
    pub lease_expiry_throttled: Counter,
    /// Watch streams open now.
    pub watchers: Gauge,
    /// Watch events sent.
    pub watch_events_sent: Counter,
    /// Resets sent to watchers (fell behind, or history compacted).
    pub watch_resets: Counter,
    /// Raft term.
    pub raft_term: Gauge,
    /// Known leader id (0: none).
    pub raft_leader: Gauge,
    /// Last log index.
    pub raft_last_log_index: Gauge,
    /// Applied log index.
    pub raft_applied_index: Gauge,
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
            forwarded_writes: reg!("forwarded_writes", "Writes forwarded to the leader", Counter::default()),
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
            watchers: reg!("watchers", "Open watch streams", Gauge::default()),
            watch_events_sent: reg!("watch_events_sent", "Watch events sent to clients", Counter::default()),
            watch_resets: reg!("watch_resets", "Resets sent to watchers", Counter::default()),
            raft_term: reg!("raft_term", "Current Raft term", Gauge::default()),
            raft_leader: reg!("raft_leader_id", "Known leader id, 0 when none", Gauge::default()),
            raft_last_log_index: reg!("raft_last_log_index", "Last Raft log index", Gauge::default()),
            raft_applied_index: reg!("raft_applied_index", "Applied Raft log index", Gauge::default()),
            revision: reg!("revision", "Applied registry revision", Gauge::default()),
            instances: reg!("instances", "Registered instances", Gauge::default()),
            services: reg!("services", "Services with at least one instance", Gauge::default()),
            leases: reg!("leases", "Leases", Gauge::default()),
            registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Copies Raft and registry figures into gauges once a second.
pub async fn run_raft_gauges(core: Arc<NodeCore>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let m = core.raft.metrics().borrow().clone();
        let metrics = &core.metrics;
        metrics.raft_term.set(m.current_term as i64);
        metrics.raft_leader.set(m.current_leader.unwrap_or(0) as i64);
        metrics.raft_last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
        metrics
            .raft_applied_index
            .set(m.last_applied.map_or(0, |l| l.index) as i64);
        let registry = core.shared.read();
        metrics.revision.set(registry.revision() as i64);
        metrics.instances.set(registry.instance_count() as i64);
        metrics.services.set(registry.service_count() as i64);
        metrics.leases.set(registry.lease_count() as i64);
    }
}
