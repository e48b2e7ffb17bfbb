//! Muster's fault suite: rounds of random faults (kill, pause, partition, restart,
//! membership change, clock jump and drift) against a three-node cluster of real
//! `muster server` processes under load, each round's history checked for
//! linearizability and the registry's invariants (see [`check`]).
//!
//! Every random choice comes from a seed: round `i` of a run with `--seed S` uses
//! seed `S + i`, and `muster-chaos --seed S+i --rounds 1` runs that round again (the
//! fault, its target and timing, and each client's choice of operations; the
//! interleaving of concurrent operations is up to the machine). A failing round
//! saves its history and findings to `target/chaos/round-<seed>.json`, which
//! `muster-chaos --check FILE` checks again.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod check;
pub mod faults;
pub mod history;
pub mod model;
pub mod round;
pub mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use muster_testkit::netns::{self, NetnsNetwork};
use serde::{Deserialize, Serialize};

use crate::check::Findings;
use crate::faults::FaultKind;
use crate::history::RoundHistory;
use crate::round::{run_round, RoundConfig};

/// Where failing rounds are saved: `MUSTER_CHAOS_OUT`, else the workspace's
/// `target/chaos`.
pub fn out_dir() -> PathBuf {
    std::env::var_os("MUSTER_CHAOS_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/chaos"))
}

/// Whether to use network namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetnsMode {
    /// When available; network faults are skipped loudly otherwise (fail instead
    /// when `MUSTER_REQUIRE_NETNS=1`).
    Auto,
    /// Loopback only.
    Off,
}

/// A run of rounds.
#[derive(Clone, Debug)]
pub struct SuiteConfig {
    /// Rounds to run.
    pub rounds: u64,
    /// Seed of the first round.
    pub seed: u64,
    /// The `muster` binary.
    pub bin: PathBuf,
    /// Faults to draw from (`None`: every kind this machine supports).
    pub faults: Option<Vec<FaultKind>>,
    /// Namespaces or not.
    pub netns: NetnsMode,
    /// Overrides of the round timing: warm-up, (min, max) hold, cool-down.
    pub timing: Option<(Duration, (Duration, Duration), Duration)>,
}

/// One round in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundSummary {
    /// Seed.
    pub seed: u64,
    /// Fault.
    pub fault: FaultKind,
    /// Findings.
    pub findings: Findings,
    /// Recovery time in seconds.
    pub recovery_s: Option<f64>,
    /// Round duration in seconds.
    pub wall_s: f64,
    /// Where the history was saved (failing rounds).
    pub saved: Option<PathBuf>,
}

/// A whole run.
#[derive(Clone, Debug, Default)]
pub struct SuiteReport {
    /// Rounds run.
    pub rounds: Vec<RoundSummary>,
    /// Faults that could not run here, with why.
    pub skipped: Vec<String>,
    /// Whether the nodes ran in network namespaces.
    pub netns: bool,
}

impl SuiteReport {
    /// Rounds with at least one anomaly.
    pub fn failed(&self) -> Vec<&RoundSummary> {
        self.rounds
            .iter()
            .filter(|r| !r.findings.anomalies.is_empty())
            .collect()
    }
}

/// A saved failing round.
#[derive(Serialize, Deserialize)]
pub struct SavedRound {
    /// Fault.
    pub fault: FaultKind,
    /// What the checks found.
    pub findings: Findings,
    /// The history.
    pub history: RoundHistory,
}

/// The faults a machine can run, the namespaces to run them in (if any), and the
/// lines announcing what was skipped.
pub type Available = (Vec<FaultKind>, Option<Arc<NetnsNetwork>>, Vec<String>);

/// Picks the faults this machine can run, announcing loudly what it cannot.
pub fn available_faults(wanted: Option<&[FaultKind]>, mode: NetnsMode) -> Result<Available> {
    let wanted: Vec<FaultKind> = wanted
        .map(<[FaultKind]>::to_vec)
        .unwrap_or_else(|| FaultKind::ALL.to_vec());
    let mut skipped = Vec::new();
    let need_netns = wanted.iter().any(|f| f.needs_netns());
    let net = if mode == NetnsMode::Auto {
        match netns::availability() {
            Ok(()) => Some(Arc::new(NetnsNetwork::create(&[1, 2, 3])?)),
            Err(e) => {
                if std::env::var(netns::REQUIRE_ENV).as_deref() == Ok("1") {
                    return Err(anyhow!("{e} and {}=1", netns::REQUIRE_ENV));
                }
                if need_netns {
                    let line = format!("SKIPPED: {e}: network faults (partitions) will not run");
                    eprintln!("\n{}\n{line}\n{}\n", "!".repeat(72), "!".repeat(72));
                    skipped.push(line);
                }
                None
            }
        }
    } else {
        None
    };
    let faketime = muster_testkit::process::faketime_library().is_some();
    if !faketime && wanted.iter().any(|f| f.needs_faketime()) {
        let line = "SKIPPED: libfaketime not found (apt-get install faketime): clock faults will not run".to_string();
        eprintln!("\n{}\n{line}\n{}\n", "!".repeat(72), "!".repeat(72));
        skipped.push(line);
    }
    let faults: Vec<FaultKind> = wanted
        .into_iter()
        .filter(|f| !f.needs_netns() || net.is_some())
        .filter(|f| !f.needs_faketime() || faketime)
        .collect();
    if faults.is_empty() {
        return Err(anyhow!("no fault can run here: {}", skipped.join("; ")));
    }
    Ok((faults, net, skipped))
}

/// Runs `config.rounds` rounds, printing one line per round, saving failing rounds.
pub async fn run_suite(config: &SuiteConfig) -> Result<SuiteReport> {
    if !config.bin.exists() {
        return Err(anyhow!(
            "no muster binary at {} (build it: cargo build -p muster, or pass --bin)",
            config.bin.display()
        ));
    }
    let (faults, net, skipped) = available_faults(config.faults.as_deref(), config.netns)?;
    let mut round_config = RoundConfig::new(config.bin.clone(), net.clone(), faults);
    if let Some((warmup, hold, cooldown)) = config.timing {
        round_config.warmup = warmup;
        round_config.hold = hold;
        round_config.cooldown = cooldown;
    }
    let mut report = SuiteReport {
        skipped,
        netns: net.is_some(),
        ..Default::default()
    };
    println!(
        "chaos: {} rounds from seed {} on {} with faults {}",
        config.rounds,
        config.seed,
        if net.is_some() {
            "network namespaces"
        } else {
            "loopback"
        },
        round_config
            .faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for i in 0..config.rounds {
        let seed = config.seed.wrapping_add(i);
        let result = match run_round(&round_config, seed).await {
            Ok(r) => r,
            Err(e) => {
                println!("round {}/{} seed {seed}: could not run: {e:#}", i + 1, config.rounds);
                let mut findings = Findings::default();
                findings.anomalies.push(check::Anomaly {
                    invariant: "harness".into(),
                    detail: format!("{e:#}"),
                });
                report.rounds.push(RoundSummary {
                    seed,
                    fault: round_config.fault_for(seed),
                    findings,
                    recovery_s: None,
                    wall_s: 0.0,
                    saved: None,
                });
                continue;
            }
        };
        let f = &result.findings;
        println!(
            "round {}/{} seed {seed} {:<18} {:>5} ops {:>5} acked {:>3} ambiguous {:>2} lost {:>2} anomalies {:>2} elections  recovered {}  ({:.1}s; {})",
            i + 1,
            config.rounds,
            result.fault.name(),
            f.ops,
            f.acked_writes,
            f.ambiguous,
            f.lost_writes,
            f.anomalies.len(),
            f.elections,
            result
                .recovery
                .map_or("never".to_string(), |d| format!("{:.2}s", d.as_secs_f64())),
            result.wall.as_secs_f64(),
            result.history.faults.first().map_or("not injected", |f| f.detail.as_str())
        );
        let mut saved = None;
        if !f.anomalies.is_empty() {
            for a in &f.anomalies {
                println!("    ANOMALY [{}] {}", a.invariant, a.detail);
            }
            let path = save(&result)?;
            println!(
                "    FAILED round seed {seed}: history saved to {}; replay with `muster-chaos --seed {seed} --rounds 1`, re-check with `muster-chaos --check {}`",
                path.display(),
                path.display()
            );
            saved = Some(path);
        }
        report.rounds.push(RoundSummary {
            seed,
            fault: result.fault,
            findings: result.findings,
            recovery_s: result.recovery.map(|d| d.as_secs_f64()),
            wall_s: result.wall.as_secs_f64(),
            saved,
        });
    }
    Ok(report)
}

fn save(result: &round::RoundResult) -> Result<PathBuf> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("round-{}.json", result.seed));
    let saved = SavedRound {
        fault: result.fault,
        findings: result.findings.clone(),
        history: result.history.clone(),
    };
    std::fs::write(&path, serde_json::to_vec(&saved)?)?;
    Ok(path)
}

/// Re-runs the checks on a saved round.
pub fn recheck(path: &Path) -> Result<Findings> {
    let saved: SavedRound = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(check::check_round(&saved.history))
}

/// The summary table.
pub fn table(report: &SuiteReport) -> String {
    let mut out = String::new();
    let mut by_fault: BTreeMap<FaultKind, (usize, usize, u64, f64)> = BTreeMap::new();
    for r in &report.rounds {
        let e = by_fault.entry(r.fault).or_default();
        e.0 += 1;
        e.1 += r.findings.anomalies.len();
        e.2 += r.findings.elections;
        e.3 = e.3.max(r.recovery_s.unwrap_or(f64::INFINITY));
    }
    let sum = |f: fn(&Findings) -> usize| report.rounds.iter().map(|r| f(&r.findings)).sum::<usize>();
    let sum_u64 = |f: fn(&Findings) -> u64| report.rounds.iter().map(|r| f(&r.findings)).sum::<u64>();
    let worst = report
        .rounds
        .iter()
        .max_by(|a, b| {
            a.recovery_s
                .unwrap_or(f64::INFINITY)
                .total_cmp(&b.recovery_s.unwrap_or(f64::INFINITY))
        })
        .map(|r| {
            format!(
                "{} (seed {}, {})",
                r.recovery_s.map_or("never".into(), |s| format!("{s:.2}s")),
                r.seed,
                r.fault
            )
        })
        .unwrap_or_else(|| "-".into());
    out.push_str(&format!(
        "\n{:<22}{:>8}{:>11}{:>11}{:>16}\n",
        "fault", "rounds", "anomalies", "elections", "worst recovery"
    ));
    out.push_str(&format!("{}\n", "-".repeat(68)));
    for (fault, (rounds, anomalies, elections, worst)) in &by_fault {
        let worst = if worst.is_finite() {
            format!("{worst:.2}s")
        } else {
            "never".into()
        };
        out.push_str(&format!(
            "{:<22}{rounds:>8}{anomalies:>11}{elections:>11}{worst:>16}\n",
            fault.name()
        ));
    }
    out.push_str(&format!("{}\n", "-".repeat(68)));
    let rows = [
        ("rounds", report.rounds.len().to_string()),
        ("failed rounds", report.failed().len().to_string()),
        ("operations", sum(|f| f.ops).to_string()),
        ("acknowledged writes", sum(|f| f.acked_writes).to_string()),
        ("ambiguous operations", sum(|f| f.ambiguous).to_string()),
        ("lost writes", sum(|f| f.lost_writes).to_string()),
        ("anomalies", sum(|f| f.anomalies.len()).to_string()),
        ("watch messages", sum(|f| f.watch_messages).to_string()),
        ("watch resets", sum(|f| f.watch_resets).to_string()),
        ("lease keep-alives", sum(|f| f.keepalives).to_string()),
        ("reads in maintenance", sum(|f| f.maintenance_reads).to_string()),
        ("elections", sum_u64(|f| f.elections).to_string()),
        ("follower lease reads", sum_u64(|f| f.follower_lease_reads).to_string()),
        (
            "keys not proven",
            report
                .rounds
                .iter()
                .map(|r| r.findings.unchecked_keys.len())
                .sum::<usize>()
                .to_string(),
        ),
        ("worst time to recover", worst),
        (
            "network",
            if report.netns {
                "namespaces".to_string()
            } else {
                "loopback".to_string()
            },
        ),
    ];
    for (k, v) in rows {
        out.push_str(&format!("{k:<26}{v}\n"));
    }
    for s in &report.skipped {
        out.push_str(&format!("{s}\n"));
    }
    for r in report.failed() {
        out.push_str(&format!(
            "FAILED seed {} ({}): {} anomalies{}\n",
            r.seed,
            r.fault,
            r.findings.anomalies.len(),
            r.saved
                .as_ref()
                .map(|p| format!(", history in {}", p.display()))
                .unwrap_or_default()
        ));
    }
    out
}
