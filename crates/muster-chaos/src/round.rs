//! One round: a fresh three-node cluster, load, one fault injected and healed,
//! recovery awaited, final state read, history checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use muster_testkit::netns::NetnsNetwork;
use muster_testkit::process::{ClusterOptions, Network, ProcessCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::check::{check_round, Findings, RECOVERY_BOUND};
use crate::faults::{self, FaultKind};
use crate::history::{FaultRecord, RoundHistory};
use crate::workload::{self, LoadConfig, Nodes};

/// How rounds run.
#[derive(Clone, Debug)]
pub struct RoundConfig {
    /// The `muster` binary.
    pub bin: PathBuf,
    /// Namespaces to run the nodes in (`None`: loopback, no network faults).
    pub netns: Option<Arc<NetnsNetwork>>,
    /// Faults to draw from.
    pub faults: Vec<FaultKind>,
    /// The load.
    pub load: LoadConfig,
    /// Load before the fault.
    pub warmup: Duration,
    /// Shortest and longest fault.
    pub hold: (Duration, Duration),
    /// Load after the heal.
    pub cooldown: Duration,
}

impl RoundConfig {
    /// Defaults for the binary at `bin`.
    pub fn new(bin: PathBuf, netns: Option<Arc<NetnsNetwork>>, faults: Vec<FaultKind>) -> Self {
        RoundConfig {
            bin,
            netns,
            faults,
            load: LoadConfig::default(),
            warmup: Duration::from_secs(2),
            hold: (Duration::from_secs(2), Duration::from_secs(5)),
            cooldown: Duration::from_secs(1),
        }
    }

    /// The fault a round with `seed` injects: the faults are taken in turn by seed,
    /// so consecutive seeds cover every kind.
    pub fn fault_for(&self, seed: u64) -> FaultKind {
        self.faults[(seed % self.faults.len() as u64) as usize]
    }
}

/// A round's outcome.
#[derive(Debug)]
pub struct RoundResult {
    /// Its seed.
    pub seed: u64,
    /// Its fault.
    pub fault: FaultKind,
    /// What the checks found.
    pub findings: Findings,
    /// Everything recorded.
    pub history: RoundHistory,
    /// Heal to one leader with every node caught up (see `RoundHistory::recovery`).
    pub recovery: Option<Duration>,
    /// How long the round took.
    pub wall: Duration,
}

/// Runs one round.
pub async fn run_round(config: &RoundConfig, seed: u64) -> Result<RoundResult> {
    let wall = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let fault = config.fault_for(seed);
    let clock_node = rng.gen_range(1..=3u64);
    let (clocks, max_clock_rate) = fault.clocks(clock_node);
    let mut options = ClusterOptions::new(3);
    options.network = match &config.netns {
        Some(n) => Network::Netns(n.clone()),
        None => Network::Loopback,
    };
    options.clocks = clocks;
    options.extra_args = [
        "--watch-progress-interval",
        "1s",
        "--watch-history",
        "300",
        "--snapshot-every",
        "400",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(n) = &config.netns {
        n.heal_all()?;
    }
    let mut cluster = ProcessCluster::start_with(&config.bin, options)
        .await
        .context("starting the cluster")?;
    let result = drive(config, seed, fault, clock_node, max_clock_rate, &mut rng, &mut cluster).await;
    if let Some(n) = &config.netns {
        let _ = n.heal_all();
    }
    if result.as_ref().map_or(true, |r| !r.anomalies.is_empty()) {
        keep_logs(&cluster, seed);
    }
    drop(cluster);
    let findings_and_history = result?;
    let (findings, history) = (findings_and_history.findings, findings_and_history.history);
    Ok(RoundResult {
        seed,
        fault,
        recovery: history.recovery.map(Duration::from_micros),
        findings,
        history,
        wall: wall.elapsed(),
    })
}

struct Driven {
    findings: Findings,
    history: RoundHistory,
    anomalies: Vec<crate::check::Anomaly>,
}

/// Copies the nodes' logs to `target/chaos/logs-<seed>/` for a failing round.
fn keep_logs(cluster: &ProcessCluster, seed: u64) {
    let to = crate::out_dir().join(format!("logs-{seed}"));
    if std::fs::create_dir_all(&to).is_err() {
        return;
    }
    for node in cluster.nodes.values() {
        let _ = std::fs::copy(&node.log, to.join(format!("node-{}.log", node.id)));
    }
}

async fn drive(
    config: &RoundConfig,
    seed: u64,
    fault: FaultKind,
    clock_node: u64,
    max_clock_rate: f64,
    rng: &mut StdRng,
    cluster: &mut ProcessCluster,
) -> Result<Driven> {
    let addrs: BTreeMap<u64, std::net::SocketAddr> = cluster.nodes.iter().map(|(id, n)| (*id, n.grpc)).collect();
    let nodes = Nodes::new(&addrs)?;
    let rec = crate::history::Recorder::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (until_tx, until_rx) = watch::channel(None::<u64>);

    let mut watchers = Vec::new();
    for w in 0..config.load.watchers {
        watchers.push(tokio::spawn(workload::watcher(
            nodes.clone(),
            rec.clone(),
            seed.wrapping_mul(31).wrapping_add(1000 + w as u64),
            until_rx.clone(),
        )));
    }
    let mut writers = Vec::new();
    for c in 0..config.load.writers {
        writers.push(tokio::spawn(workload::writer(
            nodes.clone(),
            rec.clone(),
            config.load.clone(),
            c,
            seed.wrapping_mul(31).wrapping_add(c as u64),
            stop_rx.clone(),
        )));
    }
    let mut owners = Vec::new();
    for o in 0..config.load.lease_owners {
        owners.push(tokio::spawn(workload::lease_owner(
            nodes.clone(),
            rec.clone(),
            o,
            seed.wrapping_mul(31).wrapping_add(2000 + o as u64),
            stop_rx.clone(),
        )));
    }

    tokio::time::sleep(config.warmup).await;
    let term_before = cluster.highest_term().await;
    let start = rec.now();
    let injected = faults::inject(fault, cluster, rng, clock_node).await;
    let (mut hold_min, mut hold_max) = config.hold;
    if fault.needs_netns() {
        // Partitions last past a lease TTL plus an election, so a lease renewed only
        // on the wrong side of the cut would expire on the other.
        hold_min = hold_min.max(Duration::from_millis(workload::LEASE_TTL_MS + 2_500));
        hold_max = hold_max.max(hold_min + Duration::from_millis(1_500));
    }
    let hold = rng.gen_range(hold_min..=hold_max.max(hold_min));
    tokio::time::sleep(hold).await;
    let mut history = RoundHistory {
        seed,
        nodes: addrs.keys().copied().collect(),
        keys: config
            .load
            .plain_keys()
            .into_iter()
            .chain(config.load.lease_keys())
            .collect(),
        max_clock_rate,
        ..Default::default()
    };
    let mut setup_error = None;
    // What the cluster had applied before the heal: recovery is catching up with it.
    let before_heal = cluster.highest_revision().await;
    let healed_at = Instant::now();
    match &injected {
        Ok(inj) => {
            if let Err(e) = faults::heal(inj, cluster).await {
                setup_error = Some(format!("heal failed: {e:#}"));
            }
            history.faults.push(FaultRecord {
                kind: fault.name().into(),
                detail: inj.detail.clone(),
                start,
                healed: rec.now(),
            });
        }
        Err(e) => setup_error = Some(format!("inject failed: {e:#}")),
    }

    // Recovery: one agreed leader and every node caught up with the revision the
    // cluster had before the heal, measured from the heal while the load goes on.
    let cooldown = tokio::spawn({
        let stop_tx = stop_tx.clone();
        let d = config.cooldown;
        async move {
            tokio::time::sleep(d).await;
            let _ = stop_tx.send(true);
        }
    });
    let stable = cluster
        .wait_for_caught_up(before_heal, RECOVERY_BOUND + Duration::from_secs(20))
        .await;
    let recovered_after = healed_at.elapsed();
    let _ = cooldown.await;
    let _ = stop_tx.send(true);
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(15), w).await;
    }
    for o in owners {
        if let Ok(Ok(leases)) = tokio::time::timeout(Duration::from_secs(15), o).await {
            history.leases.extend(leases);
        }
    }
    // The load is over: equal digests, for the final state.
    let stable = match stable {
        Ok(_) => cluster.wait_for_stable(Duration::from_secs(20)).await,
        Err(e) => Err(e),
    };
    match &stable {
        Ok(_) => history.recovery = Some(recovered_after.as_micros() as u64),
        Err(e) => {
            history.recovery = None;
            history.final_status.insert(0, e.to_string());
        }
    }
    history.terms = (term_before, cluster.highest_term().await);
    for (id, s) in cluster.statuses().await {
        if let Some(s) = s {
            history.final_status.insert(
                id,
                format!("{} term {} rev {} digest {}", s.role, s.term, s.revision, s.digest),
            );
        }
    }
    for id in cluster.active() {
        if let Ok(reads) = cluster.metric(id, "muster_follower_lease_reads_total").await {
            history.follower_lease_reads += reads as u64;
        }
    }
    // Final state on every node, then let the watchers catch up to it.
    let mut target = 0;
    for id in cluster.active() {
        if let Ok((instances, revision)) = workload::local_read(&nodes, id).await {
            target = target.max(revision);
            history.final_reads.push((id, instances, revision));
        }
    }
    target = target.max(cluster.highest_revision().await);
    let _ = until_tx.send(Some(target));
    for w in watchers {
        if let Ok(Ok(records)) = tokio::time::timeout(Duration::from_secs(30), w).await {
            history.watches.push(records);
        }
    }
    drop(until_tx);
    history.ops = rec.ops();
    let mut findings = check_round(&history);
    if let Some(e) = setup_error {
        findings.anomalies.push(crate::check::Anomaly {
            invariant: "harness".into(),
            detail: e,
        });
    }
    let anomalies = findings.anomalies.clone();
    Ok(Driven {
        findings,
        history,
        anomalies,
    })
}
