//! The faults a round injects, and how each is healed.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use muster_testkit::process::{Clock, ProcessCluster};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Every kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// SIGKILL the leader; restart it at heal.
    KillLeader,
    /// SIGKILL a follower; restart it at heal.
    KillFollower,
    /// SIGSTOP a node (the leader half the time); SIGCONT at heal.
    Pause,
    /// Cut one node (a follower or the leader, at random) from the other two.
    MinorityPartition,
    /// Cut two nodes from each other; the third still sees both (each side believes
    /// it has a majority: Jepsen's "majorities ring" for three nodes).
    MajorityRing,
    /// Cut the leader from both followers; clients still reach it.
    LeaderIsolated,
    /// SIGKILL every node at once and start them all again.
    RestartAll,
    /// Remove a follower from the membership, wipe it, and add it back empty
    /// (`--join`, then promote) at heal.
    MemberReadded,
    /// Step one node's wall clock forward by minutes, and back at heal.
    ClockJump,
    /// Run one node's clocks at twice real speed for the whole round, and kill the
    /// leader so that fast node likely takes over.
    ClockFast,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::KillLeader,
        FaultKind::KillFollower,
        FaultKind::Pause,
        FaultKind::MinorityPartition,
        FaultKind::MajorityRing,
        FaultKind::LeaderIsolated,
        FaultKind::RestartAll,
        FaultKind::MemberReadded,
        FaultKind::ClockJump,
        FaultKind::ClockFast,
    ];

    /// Whether the fault needs network namespaces.
    pub fn needs_netns(self) -> bool {
        matches!(
            self,
            FaultKind::MinorityPartition | FaultKind::MajorityRing | FaultKind::LeaderIsolated
        )
    }

    /// Whether the fault needs libfaketime.
    pub fn needs_faketime(self) -> bool {
        matches!(self, FaultKind::ClockJump | FaultKind::ClockFast)
    }

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillFollower => "kill-follower",
            FaultKind::Pause => "pause",
            FaultKind::MinorityPartition => "minority-partition",
            FaultKind::MajorityRing => "majority-ring",
            FaultKind::LeaderIsolated => "leader-isolated",
            FaultKind::RestartAll => "restart-all",
            FaultKind::MemberReadded => "member-readded",
            FaultKind::ClockJump => "clock-jump",
            FaultKind::ClockFast => "clock-fast",
        }
    }

    /// The clocks the round's cluster must start with for this fault, and the
    /// fastest clock rate that will run.
    pub fn clocks(self, node: u64) -> (BTreeMap<u64, Clock>, f64) {
        match self {
            FaultKind::ClockJump => ([(node, Clock::Adjustable)].into(), 1.0),
            FaultKind::ClockFast => ([(node, Clock::Rate(FAST_RATE))].into(), FAST_RATE),
            _ => (BTreeMap::new(), 1.0),
        }
    }
}

/// How fast a `clock-fast` node's clocks run.
pub const FAST_RATE: f64 = 2.0;

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown fault {s:?}; one of {}", names.join(", "))
        })
    }
}

/// What an injected fault needs to be healed.
#[derive(Debug)]
pub struct Injected {
    /// The kind.
    pub kind: FaultKind,
    /// Nodes it targets.
    pub nodes: Vec<u64>,
    /// Human-readable detail.
    pub detail: String,
}

/// Names node `id` with its role, for a fault's detail.
fn role(id: u64, leader: Option<u64>) -> String {
    match leader {
        Some(l) if l == id => format!("leader {id}"),
        Some(_) => format!("follower {id}"),
        None => format!("node {id}"),
    }
}

async fn leader(cluster: &ProcessCluster) -> Option<u64> {
    cluster.wait_for_leader(Duration::from_secs(5)).await.ok()
}

fn pick(rng: &mut StdRng, from: &[u64]) -> Result<u64> {
    if from.is_empty() {
        return Err(anyhow!("no node to pick from"));
    }
    Ok(from[rng.gen_range(0..from.len())])
}

async fn follower(cluster: &ProcessCluster, rng: &mut StdRng) -> Result<u64> {
    let leader = leader(cluster).await;
    let followers: Vec<u64> = cluster.active().into_iter().filter(|i| Some(*i) != leader).collect();
    pick(rng, &followers)
}

/// Injects `kind`; `clock_node` is the node started with a faked clock (if the kind
/// has one).
pub async fn inject(
    kind: FaultKind,
    cluster: &mut ProcessCluster,
    rng: &mut StdRng,
    clock_node: u64,
) -> Result<Injected> {
    let (nodes, detail) = match kind {
        FaultKind::KillLeader => {
            let l = match leader(cluster).await {
                Some(l) => l,
                None => pick(rng, &cluster.active())?,
            };
            cluster.kill9(l)?;
            (vec![l], format!("kill -9 leader {l}"))
        }
        FaultKind::KillFollower => {
            let f = follower(cluster, rng).await?;
            cluster.kill9(f)?;
            (vec![f], format!("kill -9 follower {f}"))
        }
        FaultKind::Pause => {
            let leader = leader(cluster).await;
            let target = match (rng.gen_bool(0.5), leader) {
                (true, Some(l)) => l,
                _ => pick(rng, &cluster.active())?,
            };
            cluster.signal(target, Signal::SIGSTOP)?;
            (vec![target], format!("SIGSTOP {}", role(target, leader)))
        }
        FaultKind::MinorityPartition => {
            let leader = leader(cluster).await;
            let x = pick(rng, &cluster.active())?;
            net(cluster)?.isolate(x)?;
            (vec![x], format!("{} cut from the others", role(x, leader)))
        }
        FaultKind::MajorityRing => {
            let ids = cluster.active();
            let middle = pick(rng, &ids)?;
            let ends: Vec<u64> = ids.into_iter().filter(|i| *i != middle).collect();
            let [a, b] = ends[..] else {
                return Err(anyhow!("majority ring needs three nodes"));
            };
            net(cluster)?.cut(a, b)?;
            (vec![a, b], format!("{a} and {b} cut; {middle} sees both"))
        }
        FaultKind::LeaderIsolated => {
            let l = match leader(cluster).await {
                Some(l) => l,
                None => pick(rng, &cluster.active())?,
            };
            net(cluster)?.isolate(l)?;
            (vec![l], format!("leader {l} cut from the followers"))
        }
        FaultKind::RestartAll => {
            let ids = cluster.running();
            for id in &ids {
                cluster.kill9(*id)?;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            for id in &ids {
                cluster.restart(*id)?;
            }
            (ids, "kill -9 all, restart all".into())
        }
        FaultKind::MemberReadded => {
            let f = follower(cluster, rng).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let via = leader(cluster).await.unwrap_or(f);
                match cluster.remove_member(via, f).await {
                    Ok(_) => break,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(error = %e, "remove member: retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e.context(format!("removing node {f}"))),
                }
            }
            cluster.kill9(f)?;
            (vec![f], format!("node {f} removed, wiped"))
        }
        FaultKind::ClockJump => {
            let secs = rng.gen_range(60..600);
            cluster.set_clock_offset(clock_node, secs)?;
            (vec![clock_node], format!("node {clock_node} wall clock +{secs}s"))
        }
        FaultKind::ClockFast => {
            let l = leader(cluster).await;
            match l {
                Some(l) if l != clock_node => {
                    cluster.kill9(l)?;
                    (
                        vec![clock_node, l],
                        format!("node {clock_node} at x{FAST_RATE}; leader {l} killed"),
                    )
                }
                _ => (vec![clock_node], format!("node {clock_node} at x{FAST_RATE} (leader)")),
            }
        }
    };
    Ok(Injected { kind, nodes, detail })
}

fn net(cluster: &ProcessCluster) -> Result<&muster_testkit::netns::NetnsNetwork> {
    cluster
        .netns()
        .map(|n| &**n)
        .context("this fault needs network namespaces")
}

/// Heals what [`inject`] did.
pub async fn heal(injected: &Injected, cluster: &mut ProcessCluster) -> Result<()> {
    match injected.kind {
        FaultKind::KillLeader | FaultKind::KillFollower => {
            for id in &injected.nodes {
                cluster.restart(*id)?;
            }
        }
        FaultKind::ClockFast => {
            for id in injected.nodes.iter().skip(1) {
                cluster.restart(*id)?;
            }
        }
        FaultKind::Pause => {
            for id in &injected.nodes {
                cluster.signal(*id, Signal::SIGCONT)?;
            }
        }
        FaultKind::MinorityPartition | FaultKind::MajorityRing | FaultKind::LeaderIsolated => {
            net(cluster)?.heal_all()?;
        }
        FaultKind::RestartAll => {}
        FaultKind::MemberReadded => {
            let f = injected.nodes[0];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let via = loop {
                if let Some(l) = leader(cluster).await {
                    break l;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(anyhow!("no leader to add node {f} back through"));
                }
            };
            cluster.rejoin(f, via)?;
            // The node joins as a learner by itself; then promote it.
            loop {
                let via = leader(cluster).await.unwrap_or(via);
                let learner = cluster
                    .members(via)
                    .await
                    .map(|m| m.members.iter().any(|m| m.node_id == f))
                    .unwrap_or(false);
                if learner && cluster.promote(via, f).await.is_ok() {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(anyhow!("node {f} was not added back within 10s"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        FaultKind::ClockJump => {
            cluster.set_clock_offset(injected.nodes[0], 0)?;
        }
    }
    Ok(())
}
