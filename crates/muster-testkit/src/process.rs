//! A cluster of real `muster server` processes, each with its own data directory,
//! that tests can kill with SIGKILL, pause with SIGSTOP, restart, remove and add
//! back, run under a faked clock (libfaketime), and — when started on a
//! [`NetnsNetwork`] — cut off from each other.
//!
//! On loopback ([`Network::Loopback`]) every node binds free ports on 127.0.0.1. In
//! namespaces ([`Network::Netns`]) node `N` runs under `ip netns exec` and binds
//! `10.77.S.N:7100` (gRPC), `:7300` (peers) and `:8500` (HTTP).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use muster_proto::v1 as pb;
use muster_proto::v1::cluster_client::ClusterClient;
use muster_proto::v1::registry_client::RegistryClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};

use crate::netns::NetnsNetwork;

/// How long a harness RPC (status, members) may take before the node counts as
/// unreachable: a paused or cut-off node must not hang the harness.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the nodes' sockets live.
#[derive(Clone, Debug, Default)]
pub enum Network {
    /// Free ports on 127.0.0.1; no network faults.
    #[default]
    Loopback,
    /// One network namespace per node on a shared bridge; see [`crate::netns`].
    Netns(Arc<NetnsNetwork>),
}

/// A faked clock for one node, through libfaketime (`LD_PRELOAD`).
#[derive(Clone, Debug, PartialEq)]
pub enum Clock {
    /// The wall clock is offset by what [`ProcessCluster::set_clock_offset`] last
    /// wrote (read from a file, so it can jump while the node runs). The monotonic
    /// clock is left alone, as a real wall-clock step (NTP, an operator) would.
    Adjustable,
    /// Both clocks run at `rate` times real speed (e.g. 2.0) from the node's start.
    Rate(f64),
}

/// The libfaketime library to preload: `MUSTER_FAKETIME_LIB`, or Debian's
/// (`apt-get install faketime`). The multi-threaded build is preferred.
pub fn faketime_library() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MUSTER_FAKETIME_LIB") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// How to start a [`ProcessCluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of nodes (ids 1..=nodes).
    pub nodes: u64,
    /// Loopback or namespaces.
    pub network: Network,
    /// Faked clocks by node id.
    pub clocks: BTreeMap<u64, Clock>,
    /// Extra `muster server` arguments for every node.
    pub extra_args: Vec<String>,
    /// How long to wait for the first leader.
    pub leader_timeout: Duration,
}

impl ClusterOptions {
    /// `nodes` nodes on loopback, no faked clocks.
    pub fn new(nodes: u64) -> Self {
        ClusterOptions {
            nodes,
            network: Network::Loopback,
            clocks: BTreeMap::new(),
            extra_args: Vec::new(),
            leader_timeout: Duration::from_secs(20),
        }
    }
}

/// One `muster server` process.
pub struct ProcessNode {
    /// Node id.
    pub id: u64,
    /// Client gRPC address.
    pub grpc: SocketAddr,
    /// Peer address.
    pub peer: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Where its output goes.
    pub log: PathBuf,
    /// Its namespace, when on a [`NetnsNetwork`].
    pub netns: Option<String>,
    /// Its faked clock, if any (applies from the next start).
    pub clock: Option<Clock>,
    /// `Some(grpc addr)`: starts with `--join` instead of `--initial-cluster` (a node
    /// removed and added back).
    pub join: Option<String>,
    paused: bool,
    child: Option<Child>,
}

impl ProcessNode {
    fn faketime_file(&self) -> PathBuf {
        self.data_dir.with_extension("faketime")
    }
}

/// A cluster of server processes.
pub struct ProcessCluster {
    bin: PathBuf,
    initial_cluster: String,
    extra_args: Vec<String>,
    /// Nodes by id.
    pub nodes: BTreeMap<u64, ProcessNode>,
    dir: TempDir,
    // Dropped after the processes are killed (see `Drop`).
    network: Network,
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// A channel to `addr` whose connection attempt gives up after two seconds, and
/// whose calls too when `bounded`.
pub async fn channel(addr: SocketAddr, bounded: bool) -> Result<Channel> {
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(RPC_TIMEOUT);
    if bounded {
        endpoint = endpoint.timeout(RPC_TIMEOUT);
    }
    Ok(endpoint.connect().await?)
}

impl ProcessCluster {
    /// Starts `n` server processes of the binary at `bin` forming one cluster on
    /// loopback.
    pub async fn start(bin: &Path, n: u64) -> Result<Self> {
        Self::start_with(bin, ClusterOptions::new(n)).await
    }

    /// Starts a cluster as `options` say and waits for a leader.
    ///
    /// On loopback, ports are found free and released before the servers bind
    /// them, so another test's connection can take one meanwhile; a start that
    /// failed because a node could not bind is tried again (three times at most)
    /// on fresh ports. Any other failure names the nodes that exited, with the end
    /// of their logs.
    pub async fn start_with(bin: &Path, options: ClusterOptions) -> Result<Self> {
        let mut attempt = 1;
        loop {
            let (mut cluster, started) = Self::start_once(bin, options.clone()).await?;
            let Err(e) = started else {
                return Ok(cluster);
            };
            let exited = cluster.exited_logs();
            let port_lost = exited.iter().any(|(_, log)| log.contains("in use"));
            if port_lost && matches!(options.network, Network::Loopback) && attempt < 3 {
                attempt += 1;
                tracing::warn!("a node lost its port before binding it; starting the cluster again");
                continue;
            }
            let report: String = exited
                .iter()
                .map(|(id, log)| format!("\n--- node {id} exited; its log ends:\n{log}"))
                .collect();
            return Err(e.context(format!("starting the cluster{report}")));
        }
    }

    /// The nodes whose process has exited, with the last lines of their logs.
    fn exited_logs(&mut self) -> Vec<(u64, String)> {
        let mut exited = Vec::new();
        for node in self.nodes.values_mut() {
            let gone = node.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if gone {
                let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                exited.push((node.id, tail));
            }
        }
        exited
    }

    /// One attempt of [`ProcessCluster::start_with`]: the cluster, and whether a
    /// leader was agreed on.
    async fn start_once(bin: &Path, options: ClusterOptions) -> Result<(Self, Result<u64>)> {
        let dir = tempfile::tempdir()?;
        let mut nodes = BTreeMap::new();
        for id in 1..=options.nodes {
            let (grpc, peer, http, netns) = match &options.network {
                Network::Loopback => (free_port()?, free_port()?, free_port()?, None),
                Network::Netns(net) => {
                    let node = net.add_node(id)?;
                    let ip = IpAddr::V4(node.ip);
                    (
                        SocketAddr::new(ip, 7100),
                        SocketAddr::new(ip, 7300),
                        SocketAddr::new(ip, 8500),
                        Some(node.namespace),
                    )
                }
            };
            nodes.insert(
                id,
                ProcessNode {
                    id,
                    grpc,
                    peer,
                    http,
                    data_dir: dir.path().join(format!("node-{id}")),
                    log: dir.path().join(format!("node-{id}.log")),
                    netns,
                    clock: options.clocks.get(&id).cloned(),
                    join: None,
                    paused: false,
                    child: None,
                },
            );
        }
        let initial_cluster = nodes
            .values()
            .map(|n| format!("{}={}", n.id, n.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = ProcessCluster {
            bin: bin.to_path_buf(),
            initial_cluster,
            extra_args: options.extra_args,
            nodes,
            dir,
            network: options.network,
        };
        for id in 1..=options.nodes {
            cluster.spawn(id)?;
        }
        let mut leader = cluster.wait_for_leader(options.leader_timeout).await;
        // A leader is agreed once the nodes have bound their ports, but a node that
        // could not bind does not stop the others from electing one, and its ports
        // may be answered by another test's node, which then seems to agree.
        let exited: Vec<u64> = cluster.exited_logs().into_iter().map(|(id, _)| id).collect();
        if leader.is_ok() && !exited.is_empty() {
            leader = Err(anyhow!("nodes {exited:?} exited while the others elected a leader"));
        }
        Ok((cluster, leader))
    }

    /// The directory holding data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The namespaces the nodes run in, if any.
    pub fn netns(&self) -> Option<&Arc<NetnsNetwork>> {
        match &self.network {
            Network::Netns(net) => Some(net),
            Network::Loopback => None,
        }
    }

    fn node(&self, id: u64) -> Result<&ProcessNode> {
        self.nodes.get(&id).with_context(|| format!("no node {id}"))
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let faketime = faketime_library();
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?;
        std::fs::create_dir_all(self.dir.path())?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut command = match &node.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        command
            .arg("server")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--grpc-addr", &node.grpc.to_string()])
            .args(["--peer-addr", &node.peer.to_string()])
            .args(["--http-addr", &node.http.to_string()]);
        match &node.join {
            Some(via) => command.args(["--join", via]),
            None => command.args(["--initial-cluster", &self.initial_cluster]),
        };
        command.args(&self.extra_args);
        if let Some(clock) = &node.clock {
            let lib = faketime.context("a faked clock needs libfaketime (apt-get install faketime)")?;
            command.env("LD_PRELOAD", lib);
            match clock {
                Clock::Adjustable => {
                    let file = node.faketime_file();
                    if !file.exists() {
                        std::fs::write(&file, "+0\n")?;
                    }
                    command
                        .env("FAKETIME_TIMESTAMP_FILE", file)
                        .env("FAKETIME_CACHE_DURATION", "1")
                        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
                }
                Clock::Rate(rate) => {
                    command.env("FAKETIME", format!("+0 x{rate}"));
                }
            }
        }
        let child = command
            .env(
                "RUST_LOG",
                std::env::var("MUSTER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// Ids of nodes whose process runs (paused or not).
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Ids of nodes whose process runs and is not paused.
    pub fn active(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some() && !n.paused)
            .map(|n| n.id)
            .collect()
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(Child::id)
    }

    /// Kills node `id` with SIGKILL and reaps it.
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(mut child) = node.child.take() {
                child.kill()?;
                child.wait()?;
            }
            node.paused = false;
        }
        Ok(())
    }

    /// Sends a signal to node `id`; SIGSTOP and SIGCONT also mark it paused or not.
    pub fn signal(&mut self, id: u64, signal: Signal) -> Result<()> {
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?;
        let child = node.child.as_ref().context("node not running")?;
        kill(Pid::from_raw(child.id() as i32), signal)?;
        match signal {
            Signal::SIGSTOP => node.paused = true,
            Signal::SIGCONT => node.paused = false,
            _ => {}
        }
        Ok(())
    }

    /// Stops node `id` with SIGTERM and waits for it to exit.
    pub fn terminate(&mut self, id: u64) -> Result<std::process::ExitStatus> {
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?;
        let mut child = node.child.take().context("node not running")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        if node.paused {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            node.paused = false;
        }
        Ok(child.wait()?)
    }

    /// Starts node `id` again from its data directory.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        self.spawn(id)
    }

    /// Sets the faked clock node `id` gets at its next start (`None`: the real one).
    pub fn set_clock(&mut self, id: u64, clock: Option<Clock>) -> Result<()> {
        self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?.clock = clock;
        Ok(())
    }

    /// Steps the wall clock of a node started with [`Clock::Adjustable`] to
    /// `offset_secs` from real time; the node sees the jump within a second.
    pub fn set_clock_offset(&self, id: u64, offset_secs: i64) -> Result<()> {
        let node = self.node(id)?;
        if node.clock != Some(Clock::Adjustable) {
            return Err(anyhow!("node {id} does not run with an adjustable clock"));
        }
        std::fs::write(node.faketime_file(), format!("{offset_secs:+}s\n"))?;
        Ok(())
    }

    /// Kills node `id`, wipes its data directory and starts it empty with `--join`
    /// through node `via`: after [`Self::remove_member`], the way an operator adds a
    /// replaced machine back. Promote it with [`Self::promote`] once it is a learner.
    pub fn rejoin(&mut self, id: u64, via: u64) -> Result<()> {
        self.kill9(id)?;
        let via_addr = self.node(via)?.grpc.to_string();
        let node = self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))?;
        if node.data_dir.exists() {
            std::fs::remove_dir_all(&node.data_dir)?;
        }
        node.join = Some(via_addr);
        self.spawn(id)
    }

    /// The client API address of node `id`.
    pub fn grpc_addr(&self, id: u64) -> Result<SocketAddr> {
        Ok(self.node(id)?.grpc)
    }

    /// The value of `series` (see [`crate::metric_value`]) in node `id`'s metrics,
    /// scraped from its HTTP port. Counters start again at 0 when a node restarts.
    pub async fn metric(&self, id: u64, series: &str) -> Result<f64> {
        let url = format!("http://{}/metrics", self.node(id)?.http);
        let text = reqwest::Client::builder()
            .timeout(RPC_TIMEOUT)
            .build()?
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(crate::metric_value(&text, series))
    }

    /// A Registry client for node `id` (connecting times out; calls wait for the
    /// server's answer).
    pub async fn registry(&self, id: u64) -> Result<RegistryClient<Channel>> {
        Ok(RegistryClient::new(channel(self.node(id)?.grpc, false).await?))
    }

    /// A Cluster client for node `id` (connect and calls time out, so a paused or
    /// cut-off node cannot hang the harness).
    pub async fn cluster(&self, id: u64) -> Result<ClusterClient<Channel>> {
        Ok(ClusterClient::new(channel(self.node(id)?.grpc, true).await?))
    }

    /// The status of node `id`.
    pub async fn status(&self, id: u64) -> Result<pb::StatusResponse> {
        let mut c = self.cluster(id).await?;
        Ok(c.status(pb::StatusRequest {}).await?.into_inner())
    }

    /// Statuses of every active node, `None` for those that did not answer.
    pub async fn statuses(&self) -> BTreeMap<u64, Option<pb::StatusResponse>> {
        let ids = self.active();
        let answers = futures::future::join_all(ids.iter().map(|id| self.status(*id))).await;
        ids.into_iter().zip(answers.into_iter().map(Result::ok)).collect()
    }

    /// Removes node `id` from the membership, asking node `via`.
    pub async fn remove_member(&self, via: u64, id: u64) -> Result<pb::MembershipResponse> {
        let mut c = self.cluster(via).await?;
        Ok(c.remove_member(pb::RemoveMemberRequest { node_id: id })
            .await?
            .into_inner())
    }

    /// Promotes learner `id` to voter, asking node `via`.
    pub async fn promote(&self, via: u64, id: u64) -> Result<pb::MembershipResponse> {
        let mut c = self.cluster(via).await?;
        Ok(c.promote(pb::PromoteRequest { node_id: id }).await?.into_inner())
    }

    /// The members as node `via` sees them.
    pub async fn members(&self, via: u64) -> Result<pb::MembersResponse> {
        let mut c = self.cluster(via).await?;
        Ok(c.members(pb::MembersRequest {}).await?.into_inner())
    }

    /// The leader every active node agrees on, waiting up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let statuses = self.statuses().await;
            let leaders: Vec<Option<u64>> = statuses
                .values()
                .map(|s| s.as_ref().filter(|s| s.leader_known).map(|s| s.leader_id))
                .collect();
            if let Some(Some(l)) = leaders.first().copied() {
                if self.active().contains(&l) && leaders.iter().all(|x| *x == Some(l)) {
                    return Ok(l);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!(
                    "no agreed leader within {timeout:?}: {leaders:?}; logs in {}",
                    self.dir().display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until exactly one active node says it is the leader, every active node
    /// names it, and every active node reports the same digest. Answers
    /// `(leader, digest)`.
    pub async fn wait_for_stable(&self, timeout: Duration) -> Result<(u64, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let statuses = self.statuses().await;
            let answered: Vec<&pb::StatusResponse> = statuses.values().flatten().collect();
            if answered.len() == statuses.len() && !answered.is_empty() {
                let leaders: Vec<u64> = answered
                    .iter()
                    .filter(|s| s.role == "leader")
                    .map(|s| s.node_id)
                    .collect();
                let digest = &answered[0].digest;
                if leaders.len() == 1
                    && answered.iter().all(|s| s.leader_known && s.leader_id == leaders[0])
                    && answered.iter().all(|s| &s.digest == digest)
                {
                    return Ok((leaders[0], digest.clone()));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!("not stable after {timeout:?}: {}", summarize(&statuses)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The highest applied revision any node answering now reports (0: none answers).
    pub async fn highest_revision(&self) -> u64 {
        self.highest_of(|s| s.revision).await
    }

    /// The highest Raft term any node answering now reports (0: none answers).
    pub async fn highest_term(&self) -> u64 {
        self.highest_of(|s| s.term).await
    }

    async fn highest_of(&self, field: fn(&pb::StatusResponse) -> u64) -> u64 {
        self.statuses().await.values().flatten().map(field).max().unwrap_or(0)
    }

    /// Waits until every node answers, all agree on one leader, and each has applied
    /// at least `revision`: the cluster is whole again and has caught up with what was
    /// written before, even while writes go on. Answers the leader.
    pub async fn wait_for_caught_up(&self, revision: u64, timeout: Duration) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let statuses = self.statuses().await;
            let answered: Vec<&pb::StatusResponse> = statuses.values().flatten().collect();
            let leaders: BTreeSet<u64> = answered
                .iter()
                .filter(|s| s.role == "leader")
                .map(|s| s.node_id)
                .collect();
            if answered.len() == statuses.len() && leaders.len() == 1 {
                let leader = *leaders.first().expect("one leader");
                if answered
                    .iter()
                    .all(|s| s.leader_known && s.leader_id == leader && s.revision >= revision)
                {
                    return Ok(leader);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!(
                    "not caught up with revision {revision} after {timeout:?}: {}",
                    summarize(&statuses)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every active node reports the same state digest.
    pub async fn wait_for_same_digest(&self, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let digests: Vec<Option<String>> = self
                .statuses()
                .await
                .into_values()
                .map(|s| s.map(|s| s.digest))
                .collect();
            if let Some(Some(d)) = digests.first().cloned() {
                if digests.iter().all(|x| x.as_deref() == Some(d.as_str())) {
                    return Ok(d);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!("digests differ after {timeout:?}: {digests:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // A failing test leaves the nodes' data and logs behind for a post-mortem
        // (its message names the directory).
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("kept the cluster's data and logs in {}", self.dir.path().display());
        }
        // `network` (and with it the namespaces, when this holds the last
        // reference) is dropped after this, once no process runs inside them.
    }
}

/// Each node's role, term, leader, revision and digest, for an error message.
fn summarize(statuses: &BTreeMap<u64, Option<pb::StatusResponse>>) -> String {
    let nodes: Vec<String> = statuses
        .iter()
        .map(|(id, s)| match s {
            Some(s) => format!(
                "{id}: {} term {} leader {} rev {} digest {}",
                s.role,
                s.term,
                s.leader_id,
                s.revision,
                s.digest.get(..12).unwrap_or(&s.digest)
            ),
            None => format!("{id}: no answer"),
        })
        .collect();
    nodes.join("; ")
}
