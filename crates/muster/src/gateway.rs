//! `muster gateway`: flags → `GatewayConfig`, validated before the port is bound;
//! serve until SIGTERM or SIGINT, then let requests in flight finish within the
//! grace period.

use std::process::ExitCode;

use anyhow::Context;
use muster_client::{BreakerPolicy, ClientTls, StaticFallback};
use muster_gateway::{GatewayConfig, ListenerTls};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::cli::GatewayArgs;
use crate::server::EXIT_BAD_CONFIG;

/// Builds the gateway's configuration from the flags; a fallback file that cannot
/// be read is an error naming it. `registry_tls` comes from the global `--cacert`,
/// `--cert` and `--key`.
pub fn gateway_config(args: &GatewayArgs, registry_tls: Option<ClientTls>) -> Result<GatewayConfig, String> {
    let fallback = match &args.fallback_file {
        Some(path) => StaticFallback::from_toml_file(path).map_err(|e| format!("invalid --fallback-file: {e}"))?,
        None => StaticFallback::from_env().map_err(|e| e.to_string())?,
    };
    let namespace = if args.namespace == "default" {
        String::new()
    } else {
        args.namespace.clone()
    };
    Ok(GatewayConfig {
        nodes: args.nodes.clone(),
        registry_tls,
        namespace,
        strategy: args.strategy,
        prefer_zone: args.prefer_zone.clone(),
        breaker: BreakerPolicy {
            failure_threshold: args.breaker_failures,
            cool_down: args.breaker_cool_down,
        },
        fallback,
        max_body_bytes: args.max_body_bytes,
        upstream_timeout: args.upstream_timeout,
        connect_timeout: args.connect_timeout,
        max_services: args.max_services,
        max_tunnels: args.max_tunnels,
        listener_tls: args
            .tls_cert
            .clone()
            .zip(args.tls_key.clone())
            .map(|(cert, key)| ListenerTls { cert, key }),
    })
}

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn run(args: &GatewayArgs, registry_tls: Option<ClientTls>) -> anyhow::Result<ExitCode> {
    let config =
        match gateway_config(args, registry_tls).and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string())) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("muster gateway: {e}");
                return Ok(ExitCode::from(EXIT_BAD_CONFIG));
            }
        };
    // An unusable certificate or key is a configuration error, found before binding.
    if let Some(Err(e)) = config.listener_tls.as_ref().map(muster_gateway::listener_acceptor) {
        eprintln!("muster gateway: {e}");
        return Ok(ExitCode::from(EXIT_BAD_CONFIG));
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let mut server = tokio::spawn(muster_gateway::serve(listener, config, async {
        let _ = stopped.await;
    }));
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        result = &mut server => {
            result.context("the gateway task failed")??;
            return Ok(ExitCode::SUCCESS);
        }
    };
    tracing::info!(signal = which, grace = ?args.shutdown_grace, "stopping");
    let _ = stop.send(());
    match tokio::time::timeout(args.shutdown_grace, &mut server).await {
        Ok(result) => result.context("the gateway task failed")??,
        Err(_) => {
            tracing::warn!("requests still in flight after the grace period; closing them");
            server.abort();
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(extra: &[&str]) -> GatewayArgs {
        let mut argv = vec!["muster", "gateway"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Gateway(args) => *args,
            other => panic!("expected gateway, got {other:?}"),
        }
    }

    fn gateway_config_of(args: &GatewayArgs) -> Result<GatewayConfig, String> {
        gateway_config(args, None)
    }

    #[test]
    fn the_default_flags_make_a_valid_configuration() {
        let config = gateway_config_of(&args(&[])).unwrap();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.namespace, "");
        assert_eq!(config.nodes.len(), 3);
    }

    #[test]
    fn flags_reach_the_configuration_and_bad_values_are_named() {
        let config = gateway_config_of(&args(&[
            "--namespace",
            "prod",
            "--breaker-failures",
            "2",
            "--max-body-bytes",
            "1024",
        ]))
        .unwrap();
        assert_eq!(config.namespace, "prod");
        assert_eq!(config.breaker.failure_threshold, 2);
        assert_eq!(config.max_body_bytes, 1024);

        let bad = gateway_config_of(&args(&["--namespace", "Prod_1"])).unwrap();
        assert_eq!(bad.validate().unwrap_err().field, "namespace");
        let err = gateway_config_of(&args(&["--fallback-file", "/nonexistent/fallback.toml"])).unwrap_err();
        assert!(err.contains("--fallback-file"), "{err}");
    }
}
