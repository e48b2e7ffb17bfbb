//! `muster`: run a node (`server`), a local cluster (`dev`), the HTTP gateway
//! (`gateway`), or talk to a cluster.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod config_file;
mod dev;
mod gateway;
mod healthcheck;
mod output;
mod parse;
mod server;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use muster_client::ClientTls;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, LogFormat};
use crate::commands::Ctx;

/// jemalloc, configured in .cargo/config.toml to return freed memory to the OS within
/// about a second: glibc's malloc kept the write buffers sled frees after a burst of
/// writes (a node holding 100k instances grew from ~140 to ~160 MB RSS).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    // Before clap and before any thread: the file's keys become MUSTER_* defaults.
    if let Err(e) = config_file::load_into_env(&args) {
        eprintln!("muster: {e:#}");
        return ExitCode::from(server::EXIT_BAD_CONFIG);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // A flag that cannot be parsed is a bad configuration like any other.
            let _ = e.print();
            return ExitCode::from(server::EXIT_BAD_CONFIG);
        }
    };
    init_logging(&cli);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // With the LIFO slot, a task woken by another runs right after it: each watch
    // stream that queued an event woke its connection's writer, which then sent that
    // one frame. Without it the writer runs after the other woken streams and sends
    // their frames together (and concurrent unary answers likewise). BENCHMARKS.md
    // has the measurements. `tokio_unstable` is set in .cargo/config.toml.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("muster: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. RUST_LOG sets the level: `info` by default for `server` and
/// `dev` and `gateway`, `warn` for the client commands (whose output is on stdout).
fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Server(_) | Command::Dev(_) | Command::Gateway(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let tls = || match &cli.cacert {
        Some(ca) => ClientTls::from_files(ca, cli.cert.as_deref(), cli.key.as_deref()).map(Some),
        None => Ok(None),
    };
    let ctx = || async { Ctx::new(cli.addr.clone(), tls()?, cli.json, cli.verbose).await };
    match cli.command {
        Command::Server(ref args) => return server::run(args).await,
        Command::Dev(ref args) => return dev::run(args, cli.log_format, cli.verbose).await,
        Command::Gateway(ref args) => return gateway::run(args, tls()?).await,
        Command::Register(args) => commands::register(&ctx().await?, args).await?,
        Command::Deregister(args) => commands::deregister(&ctx().await?, args).await?,
        Command::Maintenance(args) => commands::maintenance(&ctx().await?, args).await?,
        Command::Discover(args) => commands::discover(&ctx().await?, args).await?,
        Command::Services(args) => commands::services(&ctx().await?, args).await?,
        Command::Watch(args) => commands::watch(&ctx().await?, args).await?,
        Command::Cluster(command) => commands::cluster(&ctx().await?, command).await?,
        Command::Healthcheck(args) => {
            let tls = healthcheck::ProbeTls {
                ca: cli.cacert.as_deref(),
                identity: cli.cert.as_ref().zip(cli.key.as_ref()),
            };
            return Ok(healthcheck::run(&args, &tls).await);
        }
    }
    Ok(ExitCode::SUCCESS)
}
