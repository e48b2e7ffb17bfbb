//! The short fixed-seed fault set `make test` runs: a few rounds of loopback faults
//! (kill, pause, restart, membership change, clock), plus partitions when network
//! namespaces are available (announced loudly when not).
//!
//! Needs the `muster` binary: `MUSTER_BIN`, else `target/debug/muster` (built by
//! `make test` before the tests run).

use std::path::PathBuf;
use std::time::Duration;

use muster_chaos::faults::FaultKind;
use muster_chaos::{run_suite, table, NetnsMode, SuiteConfig};

fn muster_bin() -> PathBuf {
    std::env::var_os("MUSTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/debug/muster")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_seed_set_of_faults_finds_no_anomaly() {
    let bin = muster_bin();
    assert!(
        bin.exists(),
        "no muster binary at {}: run `cargo build -p muster` first (make test does) or set MUSTER_BIN",
        bin.display()
    );
    let faults = vec![
        FaultKind::KillLeader,
        FaultKind::LeaderIsolated,
        FaultKind::Pause,
        FaultKind::MinorityPartition,
        FaultKind::MemberReadded,
        FaultKind::ClockFast,
    ];
    let config = SuiteConfig {
        rounds: 6,
        // Seeds 0..6 take the faults above in turn (fewer when some cannot run here).
        seed: 0,
        bin,
        faults: Some(faults),
        netns: NetnsMode::Auto,
        timing: Some((
            Duration::from_millis(1500),
            (Duration::from_secs(2), Duration::from_secs(3)),
            Duration::from_secs(1),
        )),
    };
    let report = run_suite(&config).await.expect("suite runs");
    println!("{}", table(&report));
    let failed = report.failed();
    assert!(
        failed.is_empty(),
        "anomalies in rounds {:?}: {:#?}",
        failed.iter().map(|r| r.seed).collect::<Vec<_>>(),
        failed.iter().map(|r| &r.findings.anomalies).collect::<Vec<_>>()
    );
}
