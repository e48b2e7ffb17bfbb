//! `muster-chaos`: rounds of random faults against real `muster server` processes,
//! checked for linearizability and invariants. See `make chaos` and the README's
//! "Fault suite" section.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use muster_chaos::faults::FaultKind;
use muster_chaos::{recheck, run_suite, table, NetnsMode, SuiteConfig};

/// Fault suite for Muster.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Rounds to run.
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Seed of the first round (round i uses seed + i); random when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// The `muster` binary [default: `muster` beside this program].
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Only these faults (comma-separated names, e.g. kill-leader,pause).
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<FaultKind>>,
    /// Run on loopback even when network namespaces are available.
    #[arg(long)]
    no_netns: bool,
    /// Seconds the shortest and the longest fault last.
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [2, 5])]
    hold: Vec<u64>,
    /// Re-check a saved round (target/chaos/round-SEED.json) instead of running.
    #[arg(long)]
    check: Option<PathBuf>,
}

fn default_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("muster")))
        .unwrap_or_else(|| PathBuf::from("target/release/muster"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(path) = args.check {
        let findings = recheck(&path)?;
        println!(
            "{}: {} ops, {} acknowledged writes, {} lost, {} anomalies",
            path.display(),
            findings.ops,
            findings.acked_writes,
            findings.lost_writes,
            findings.anomalies.len()
        );
        for a in &findings.anomalies {
            println!("    ANOMALY [{}] {}", a.invariant, a.detail);
        }
        return Ok(if findings.anomalies.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() % 1_000_000)
    });
    let config = SuiteConfig {
        rounds: args.rounds,
        seed,
        bin: args.bin.unwrap_or_else(default_bin),
        faults: args.faults,
        netns: if args.no_netns { NetnsMode::Off } else { NetnsMode::Auto },
        timing: Some((
            Duration::from_secs(2),
            (
                Duration::from_secs(args.hold[0]),
                Duration::from_secs(args.hold[1].max(args.hold[0])),
            ),
            Duration::from_secs(1),
        )),
    };
    // Ctrl-C ends the run cleanly, so namespaces and processes are removed.
    let report = tokio::select! {
        r = run_suite(&config) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted");
            return Ok(ExitCode::from(130));
        }
    };
    print!("{}", table(&report));
    Ok(if report.failed().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
