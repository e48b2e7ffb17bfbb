//! `muster server`: flags → `NodeConfig`, validated before any port is bound; run
//! until SIGTERM or SIGINT, then shut down gracefully.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use muster_server::tls::{NodeTls, TlsSettings};
use muster_server::{Listeners, Node, NodeConfig};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::ServerArgs;

/// Exit code for a command line or configuration that cannot work (EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// The node id: `--id`, or the host name's trailing ordinal plus one.
pub fn node_id(args: &ServerArgs) -> Result<u64, String> {
    if let Some(id) = args.id {
        return Ok(id);
    }
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default();
    id_from_hostname(&hostname)
}

/// `muster-0` → 1, `muster-12` → 13.
pub fn id_from_hostname(hostname: &str) -> Result<u64, String> {
    let short = hostname.split('.').next().unwrap_or(hostname);
    short
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u64>().ok())
        .map(|n| n + 1)
        .ok_or_else(|| {
            format!("--id-from-hostname: host name {hostname:?} does not end in -<ordinal> (e.g. muster-0); give --id instead")
        })
}

/// Builds the node's configuration from the flags (`id` from [`node_id`]).
pub fn node_config(args: &ServerArgs, id: u64) -> NodeConfig {
    let mut config = NodeConfig::new(
        id,
        args.data_dir.clone(),
        args.grpc_addr,
        args.peer_addr,
        args.http_addr,
    );
    if let Some(cluster) = &args.initial_cluster {
        config.initial_cluster = cluster.0.clone();
    }
    config.join = args.join.clone();
    config.advertise_peer_addr = args.advertise_peer_addr.clone();
    if let Some(ms) = args.heartbeat_ms {
        config.raft.heartbeat = Duration::from_millis(ms);
    }
    if let Some(ms) = args.election_timeout_min_ms {
        config.raft.election_min = Duration::from_millis(ms);
    }
    if let Some(ms) = args.election_timeout_max_ms {
        config.raft.election_max = Duration::from_millis(ms);
    }
    if let Some(on) = args.follower_read_leases {
        config.raft.follower_read_leases = on;
    }
    if let Some(n) = args.snapshot_every {
        config.raft.snapshot_every = n;
    }
    if let Some(n) = args.keep_behind_snapshot {
        config.raft.keep_behind_snapshot = n;
    }
    if let Some(rate) = args.lease_expiry_rate {
        config.leases.expiry_rate = rate;
    }
    if let Some(floor) = args.lease_expiry_floor {
        config.leases.expiry_floor_per_sec = floor;
    }
    if let Some(n) = args.watch_history {
        config.watch.history = n;
    }
    if let Some(n) = args.watch_queue {
        config.watch.queue = n;
    }
    if let Some(d) = args.watch_progress_interval {
        config.watch.progress_interval = d;
    }
    if let Some(n) = args.max_message_bytes {
        config.max_message_bytes = n;
    }
    if let Some(n) = args.state_cache_bytes {
        config.state_cache_bytes = n;
    }
    if let Some(level) = args.command_level {
        config.command_level = level;
    }
    if let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        config.tls = Some(TlsSettings {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            require_client_certs: args.tls_client_auth,
        });
    }
    config
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn run(args: &ServerArgs) -> anyhow::Result<ExitCode> {
    let id = match node_id(args) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("muster server: invalid configuration: {e}");
            return Ok(ExitCode::from(EXIT_BAD_CONFIG));
        }
    };
    let config = node_config(args, id);
    if let Err(e) = config.validate() {
        eprintln!("muster server: {e}");
        return Ok(ExitCode::from(EXIT_BAD_CONFIG));
    }
    // Unusable TLS files are a configuration error, found before any port is bound.
    if let Some(Err(e)) = config.tls.as_ref().map(NodeTls::load) {
        eprintln!("muster server: {e}");
        return Ok(ExitCode::from(EXIT_BAD_CONFIG));
    }
    // Signal handlers first, so a SIGTERM during start-up is not lost.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    tracing::info!(
        id = config.id,
        grpc = %config.grpc_addr,
        peer = %config.peer_addr,
        http = %config.http_addr,
        data_dir = %config.data_dir.display(),
        "starting node"
    );
    let listeners = Listeners::bind(&config).await.with_context(|| {
        format!(
            "binding gRPC {}, peer {} and HTTP {}",
            config.grpc_addr, config.peer_addr, config.http_addr
        )
    })?;
    let handle = Node::start(config, listeners).await.context("starting the node")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let which = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            // SIGHUP: read the TLS files again (certificate rotation).
            _ = hup.recv() => handle.core().request_tls_reload(),
        }
    };
    tracing::info!(signal = which, "stopping");
    handle.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn node_config_of(args: &ServerArgs) -> NodeConfig {
        node_config(args, node_id(args).unwrap())
    }

    #[test]
    fn the_id_comes_from_a_statefulset_ordinal() {
        assert_eq!(id_from_hostname("muster-0"), Ok(1));
        assert_eq!(id_from_hostname("muster-2.muster-peer.default.svc"), Ok(3));
        assert!(id_from_hostname("muster").unwrap_err().contains("--id"));
    }

    fn server_args(extra: &[&str]) -> ServerArgs {
        let mut argv = vec!["muster", "server", "--id", "1", "--data-dir", "/tmp/x"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Server(args) => *args,
            other => panic!("expected server, got {other:?}"),
        }
    }

    #[test]
    fn flags_left_out_keep_the_servers_defaults() {
        let config = node_config_of(&server_args(&["--initial-cluster", "1=127.0.0.1:7300"]));
        let defaults = NodeConfig::new(
            1,
            "/tmp/x".into(),
            "0.0.0.0:7100".parse().unwrap(),
            "0.0.0.0:7300".parse().unwrap(),
            "0.0.0.0:8500".parse().unwrap(),
        );
        assert_eq!(config.raft.heartbeat, defaults.raft.heartbeat);
        assert!(config.raft.follower_read_leases);
        assert_eq!(config.leases.expiry_rate, defaults.leases.expiry_rate);
        assert_eq!(config.http_addr, defaults.http_addr);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn timing_flags_reach_the_config() {
        let config = node_config_of(&server_args(&[
            "--initial-cluster",
            "1=127.0.0.1:7300",
            "--heartbeat-ms",
            "50",
            "--election-timeout-min-ms",
            "300",
            "--election-timeout-max-ms",
            "600",
            "--lease-expiry-rate",
            "0.5",
            "--snapshot-every",
            "5000",
            "--keep-behind-snapshot",
            "100",
            "--follower-read-leases",
            "false",
        ]));
        assert!(!config.raft.follower_read_leases);
        assert_eq!(config.raft.snapshot_every, 5000);
        assert_eq!(config.raft.keep_behind_snapshot, 100);
        assert_eq!(config.raft.heartbeat, Duration::from_millis(50));
        assert_eq!(config.raft.election_min, Duration::from_millis(300));
        assert_eq!(config.raft.election_max, Duration::from_millis(600));
        assert_eq!(config.leases.expiry_rate, 0.5);
    }

    #[test]
    fn the_command_level_flag_pins_the_level_and_one_this_build_lacks_fails_validation() {
        let args = |level: &str| server_args(&["--initial-cluster", "1=127.0.0.1:7300", "--command-level", level]);
        let pinned = node_config_of(&args("1"));
        assert_eq!(pinned.command_level, 1);
        assert!(pinned.validate().is_ok());
        for bad in ["0", "99"] {
            assert_eq!(
                node_config_of(&args(bad)).validate().unwrap_err().field,
                "command-level"
            );
        }
    }

    #[test]
    fn a_node_missing_from_its_initial_cluster_fails_validation() {
        let config = node_config_of(&server_args(&["--initial-cluster", "2=127.0.0.1:7301"]));
        assert_eq!(config.validate().unwrap_err().field, "initial-cluster");
    }
}
