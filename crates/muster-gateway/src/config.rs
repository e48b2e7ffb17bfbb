//! What the gateway needs to run, validated before any port is bound.

use std::time::Duration;

use muster_client::{BreakerPolicy, ClientTls, PickStrategy, StaticFallback};

/// Largest request body that is held in memory so that an idempotent request can
/// be sent again to another instance. Larger (or unsized) bodies are streamed once.
pub const REPLAYABLE_BODY_BYTES: u64 = 64 * 1024;

/// The gateway's configuration. Field names in [`ConfigError`] are the flag names
/// of `muster gateway`.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// gRPC addresses (`host:port`) of Muster nodes; any of them serves.
    pub nodes: Vec<String>,
    /// TLS to the Muster nodes (nodes started with `--tls-cert`); plain TCP when
    /// `None`.
    pub registry_tls: Option<ClientTls>,
    /// Namespace of the proxied services (empty: `default`).
    pub namespace: String,
    /// How requests are spread over a service's instances.
    pub strategy: PickStrategy,
    /// Prefer instances of this zone while any of them is usable.
    pub prefer_zone: Option<String>,
    /// Per-instance circuit breakers (connection failures and 502/503/504 answers
    /// count as failures).
    pub breaker: BreakerPolicy,
    /// Addresses for services the registry has never answered for.
    pub fallback: StaticFallback,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: u64,
    /// How long an upstream instance may take to send its response headers; after
    /// that the client gets 504. The response body, once started, is not timed.
    pub upstream_timeout: Duration,
    /// Time allowed to open a TCP connection to an instance.
    pub connect_timeout: Duration,
    /// Most services followed at once (each has a watch on the registry); a
    /// request for one more gets 503.
    pub max_services: usize,
    /// Most upgraded connections (WebSocket and other `Upgrade` protocols) relayed at
    /// once; an upgrade request beyond them gets 503.
    pub max_tunnels: usize,
    /// TLS on the gateway's own listener (HTTPS, HTTP/2 by ALPN); plain HTTP and
    /// h2c when `None`.
    pub listener_tls: Option<ListenerTls>,
}

/// The certificate and key the gateway serves, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerTls {
    /// The certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            nodes: vec!["127.0.0.1:7100".into()],
            registry_tls: None,
            namespace: String::new(),
            strategy: PickStrategy::RoundRobin,
            prefer_zone: None,
            breaker: BreakerPolicy::default(),
            fallback: StaticFallback::none(),
            max_body_bytes: 10 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            max_services: 1024,
            max_tunnels: 10_000,
            listener_tls: None,
        }
    }
}

/// A configuration that cannot work: which setting, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid --{field}: {reason}")]
pub struct ConfigError {
    /// The setting, spelled as the `muster gateway` flag (`max-body-bytes`).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }
}

impl GatewayConfig {
    /// Checks every setting; the first bad one is named in the error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nodes: Vec<&str> = self.nodes.iter().map(|n| n.trim()).filter(|n| !n.is_empty()).collect();
        if nodes.is_empty() {
            return Err(ConfigError::new("nodes", "at least one node address is needed"));
        }
        for node in nodes {
            let bare = node.split_once("://").map_or(node, |(_, rest)| rest);
            match bare.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => {
                    return Err(ConfigError::new(
                        "nodes",
                        format!("{node:?} is not HOST:PORT (e.g. 127.0.0.1:7100)"),
                    ))
                }
            }
        }
        muster_core::validate::namespace(&self.namespace).map_err(|e| ConfigError::new("namespace", e.reason))?;
        if let Some(zone) = &self.prefer_zone {
            if zone.trim().is_empty() {
                return Err(ConfigError::new("prefer-zone", "must not be empty"));
            }
        }
        if self.breaker.failure_threshold > 0 && self.breaker.cool_down.is_zero() {
            return Err(ConfigError::new(
                "breaker-cool-down",
                "must be longer than 0 while breakers are on (--breaker-failures 0 turns them off)",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new("max-body-bytes", "must be at least 1"));
        }
        if self.upstream_timeout.is_zero() {
            return Err(ConfigError::new("upstream-timeout", "must be longer than 0"));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new("connect-timeout", "must be longer than 0"));
        }
        if self.max_services == 0 {
            return Err(ConfigError::new("max-services", "must be at least 1"));
        }
        if self.max_tunnels == 0 {
            return Err(ConfigError::new("max-tunnels", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_is_valid() {
        assert_eq!(GatewayConfig::default().validate(), Ok(()));
    }

    #[test]
    fn each_bad_setting_is_named() {
        let bad = |change: fn(&mut GatewayConfig)| {
            let mut config = GatewayConfig::default();
            change(&mut config);
            config.validate().unwrap_err().field
        };
        assert_eq!(bad(|c| c.nodes = vec![]), "nodes");
        assert_eq!(bad(|c| c.nodes = vec!["localhost".into()]), "nodes");
        assert_eq!(bad(|c| c.nodes = vec!["127.0.0.1:0".into()]), "nodes");
        assert_eq!(bad(|c| c.namespace = "Not_A_Label".into()), "namespace");
        assert_eq!(bad(|c| c.prefer_zone = Some(" ".into())), "prefer-zone");
        assert_eq!(bad(|c| c.breaker.cool_down = Duration::ZERO), "breaker-cool-down");
        assert_eq!(bad(|c| c.max_body_bytes = 0), "max-body-bytes");
        assert_eq!(bad(|c| c.upstream_timeout = Duration::ZERO), "upstream-timeout");
        assert_eq!(bad(|c| c.max_services = 0), "max-services");
        assert_eq!(bad(|c| c.max_tunnels = 0), "max-tunnels");
    }

    #[test]
    fn the_error_names_the_flag() {
        let config = GatewayConfig {
            max_body_bytes: 0,
            ..GatewayConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().to_string(),
            "invalid --max-body-bytes: must be at least 1"
        );
    }
}
