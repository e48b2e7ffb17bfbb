//! Prometheus metrics (`muster_gateway_*`), exposed at `/gateway/metrics` in the
//! classic text format (0.0.4) that `promtool check metrics` reads.
//!
//! The `service` label is bounded: it is a valid service name the gateway
//! follows (at most `max_services` of them), or `invalid` for requests whose
//! path does not name one.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds: 500 µs to 30 s.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Labels of a request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The service, or `invalid`.
    pub service: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub class: String,
}

/// Labels of per-service metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// The service.
    pub service: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Requests answered (by an instance or by the gateway), by service and class.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from sending a request to an instance to its response headers.
    pub upstream_duration: HistogramFamily<ServiceLabels>,
    /// Requests sent again to another instance after a connection failure.
    pub retries: Family<ServiceLabels, Counter>,
    /// Requests answered 503 because no instance could be picked.
    pub no_instance: Family<ServiceLabels, Counter>,
    /// Circuit breakers opened by failures the gateway reported.
    pub breaker_opens: Family<ServiceLabels, Counter>,
    /// Services followed (one resolver and one watch each).
    pub services: Gauge,
    /// Upgraded connections (WebSocket and other `Upgrade` protocols) relayed now.
    pub tunnels: Gauge,
    /// Upgraded connections relayed, by service, since the gateway started.
    pub tunnels_opened: Family<ServiceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn service(name: &str) -> ServiceLabels {
    ServiceLabels {
        service: name.to_string(),
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("muster_gateway");
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let m = $metric;
                registry.register($name, $help, m.clone());
                m
            }};
        }
        Metrics {
            requests: reg!(
                "requests",
                "Requests answered, by service and status class",
                Family::default()
            ),
            upstream_duration: reg!(
                "upstream_duration_seconds",
                "Time from sending a request to an instance to its response headers, by service",
                HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram)
            ),
            retries: reg!(
                "retries",
                "Requests sent again to another instance after a connection failure",
                Family::default()
            ),
            no_instance: reg!(
                "no_instance",
                "Requests answered 503 because no instance could be picked",
                Family::default()
            ),
            breaker_opens: reg!(
                "breaker_opens",
                "Circuit breakers opened by failures the gateway reported",
                Family::default()
            ),
            services: reg!(
                "services",
                "Services followed (one registry watch each)",
                Gauge::default()
            ),
            tunnels: reg!(
                "tunnels",
                "Upgraded connections (WebSocket and other Upgrade protocols) relayed now",
                Gauge::default()
            ),
            tunnels_opened: reg!(
                "tunnels_opened",
                "Upgraded connections relayed, by service",
                Family::default()
            ),
            registry,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, service_name: &str, status: u16) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "1xx",
        };
        self.requests
            .get_or_create(&RequestLabels {
                service: service_name.to_string(),
                class: class.to_string(),
            })
            .inc();
    }

    /// Records the time an instance took to answer.
    pub fn upstream(&self, service_name: &str, elapsed: Duration) {
        self.upstream_duration
            .get_or_create(&service(service_name))
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a retry on another instance.
    pub fn retry(&self, service_name: &str) {
        self.retries.get_or_create(&service(service_name)).inc();
    }

    /// Counts a 503 for want of an instance.
    pub fn no_instance(&self, service_name: &str) {
        self.no_instance.get_or_create(&service(service_name)).inc();
    }

    /// Counts an upgraded connection that opened; [`Metrics::tunnels`] counts it
    /// until it closes.
    pub fn tunnel_opened(&self, service_name: &str) {
        self.tunnels_opened.get_or_create(&service(service_name)).inc();
        self.tunnels.inc();
    }

    /// Counts a breaker that opened.
    pub fn breaker_opened(&self, service_name: &str) {
        self.breaker_opens.get_or_create(&service(service_name)).inc();
    }

    /// The classic Prometheus text exposition (`text/plain; version=0.0.4`).
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        muster_server::metrics::openmetrics_to_text(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_the_text_format() {
        let metrics = Metrics::new();
        metrics.request("web", 204);
        metrics.retry("web");
        let text = metrics.render_text();
        assert!(text.contains("# TYPE muster_gateway_requests_total counter"), "{text}");
        assert!(
            text.contains(r#"muster_gateway_requests_total{service="web",class="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"muster_gateway_retries_total{service="web"} 1"#),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }
}
