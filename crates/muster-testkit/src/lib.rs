//! Test support: an in-process cluster of real nodes (real sockets, sled on disk,
//! fsynced logs in temporary directories) that tests can stop and restart; a
//! cluster of real `muster server` processes ([`process`]) optionally placed in
//! network namespaces ([`netns`]) for partitions; and a linearizability checker
//! ([`linearizability`]).
#![forbid(unsafe_code)]

pub mod linearizability;
pub mod netns;
pub mod pki;
pub mod process;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use muster_proto::v1::cluster_client::ClusterClient;
use muster_proto::v1::registry_client::RegistryClient;
use muster_server::{Listeners, Node, NodeConfig, NodeHandle};
use tempfile::TempDir;
use tonic::transport::Channel;

/// Raft timing for tests: fast elections on loopback.
pub fn test_timing() -> muster_server::RaftTiming {
    muster_server::RaftTiming {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(300),
        election_max: Duration::from_millis(600),
        ..Default::default()
    }
}

/// A loopback address where connections are refused, with the socket that keeps it
/// so: bound but not listening. Unlike a port bound and closed again, no other
/// socket of the test run can take it while the socket is kept.
pub fn refusing_addr() -> Result<(tokio::net::TcpSocket, SocketAddr)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let addr = socket.local_addr()?;
    Ok((socket, addr))
}

/// One node of a [`TestCluster`].
pub struct TestNode {
    /// Its configuration (addresses are the ones bound).
    pub config: NodeConfig,
    /// The running node, or `None` while stopped.
    pub handle: Option<NodeHandle>,
}

/// An in-process cluster.
pub struct TestCluster {
    /// Nodes by id.
    pub nodes: BTreeMap<u64, TestNode>,
    _dir: TempDir,
}

impl TestCluster {
    /// Starts `n` nodes forming a new cluster, and waits for a leader.
    pub async fn start(n: u64) -> Result<Self> {
        Self::start_with(n, |_| {}).await
    }

    /// Starts `n` nodes, letting `adjust` change each configuration first.
    pub async fn start_with(n: u64, adjust: impl Fn(&mut NodeConfig)) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut listeners = BTreeMap::new();
        let mut initial = BTreeMap::new();
        for id in 1..=n {
            let l =
                Listeners::bind_addrs("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
            initial.insert(id, l.peer.local_addr()?.to_string());
            listeners.insert(id, l);
        }
        let mut nodes = BTreeMap::new();
        for (id, l) in listeners {
            let mut config = NodeConfig::new(
                id,
                dir.path().join(format!("node-{id}")),
                l.grpc.local_addr()?,
                l.peer.local_addr()?,
                l.http.local_addr()?,
            );
            config.initial_cluster = initial.clone();
            config.raft = test_timing();
            adjust(&mut config);
            let handle = Node::start(config.clone(), l).await?;
            nodes.insert(
                id,
                TestNode {
                    config,
                    handle: Some(handle),
                },
            );
        }
        let cluster = TestCluster { nodes, _dir: dir };
        cluster.wait_for_leader(Duration::from_secs(10)).await?;
        Ok(cluster)
    }

    /// Starts one more node that joins through node `via` (not yet a voter), with
    /// `via`'s TLS settings.
    pub async fn add_joining_node(&mut self, id: u64, via: u64) -> Result<()> {
        let l = Listeners::bind_addrs("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
        let mut config = NodeConfig::new(
            id,
            self._dir.path().join(format!("node-{id}")),
            l.grpc.local_addr()?,
            l.peer.local_addr()?,
            l.http.local_addr()?,
        );
        config.join = Some(self.grpc_addr(via).to_string());
        config.raft = test_timing();
        config.tls = self.nodes[&via].config.tls.clone();
        let handle = Node::start(config.clone(), l).await?;
        self.nodes.insert(
            id,
            TestNode {
                config,
                handle: Some(handle),
            },
        );
        Ok(())
    }

    /// The client API address of node `id`.
    pub fn grpc_addr(&self, id: u64) -> SocketAddr {
        self.nodes[&id].config.grpc_addr
    }

    /// The value of `series` (see [`metric_value`]) in running node `id`'s metrics.
    pub fn metric(&self, id: u64, series: &str) -> f64 {
        let core = self.nodes[&id].handle.as_ref().expect("the node is running").core();
        metric_value(&core.metrics.render(), series)
    }

    /// The status of running node `id`, as its `/v1/status` endpoint shows it.
    pub fn status(&self, id: u64) -> muster_server::status::NodeStatus {
        self.nodes[&id]
            .handle
            .as_ref()
            .expect("the node is running")
            .core()
            .status()
    }

    /// A Registry client connected to node `id`.
    pub async fn registry(&self, id: u64) -> Result<RegistryClient<Channel>> {
        Ok(RegistryClient::connect(format!("http://{}", self.grpc_addr(id))).await?)
    }

    /// A Cluster client connected to node `id`.
    pub async fn cluster(&self, id: u64) -> Result<ClusterClient<Channel>> {
        Ok(ClusterClient::connect(format!("http://{}", self.grpc_addr(id))).await?)
    }

    /// Ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.handle.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// The leader that every running node agrees on, waiting up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for id in self.running() {
                let core = self.nodes[&id].handle.as_ref().map(|h| h.core().clone());
                if let Some(core) = core {
                    leaders.push(core.raft.metrics().borrow().current_leader);
                }
            }
            if let Some(Some(leader)) = leaders.first().copied() {
                let running = self.running();
                if running.contains(&leader) && leaders.iter().all(|l| *l == Some(leader)) {
                    return Ok(leader);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!("no agreed leader within {timeout:?}: {leaders:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A running node that is not the leader.
    pub async fn follower(&self) -> Result<u64> {
        let leader = self.wait_for_leader(Duration::from_secs(10)).await?;
        self.running()
            .into_iter()
            .find(|id| *id != leader)
            .context("no running follower")
    }

    /// Stops node `id` gracefully; its data directory stays for a restart.
    pub async fn stop(&mut self, id: u64) {
        if let Some(handle) = self.nodes.get_mut(&id).and_then(|n| n.handle.take()) {
            handle.shutdown().await;
        }
    }

    /// Restarts a stopped node on the same addresses and data directory.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        let config = self.nodes[&id].config.clone();
        let mut attempts = 0;
        let listeners = loop {
            match Listeners::bind(&config).await {
                Ok(l) => break l,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    tracing::debug!(error = %e, "port not free yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let handle = Node::start(config, listeners).await?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.handle = Some(handle);
        }
        Ok(())
    }

    /// Waits until every running node reports the same state digest, and returns it.
    pub async fn wait_for_same_digest(&self, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut digests = Vec::new();
            for id in self.running() {
                let core = self.nodes[&id].handle.as_ref().map(|h| h.core().clone());
                if let Some(core) = core {
                    digests.push(core.shared.read().digest());
                }
            }
            if !digests.is_empty() && digests.iter().all(|d| *d == digests[0]) {
                return Ok(digests[0].clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!("digests still differ after {timeout:?}: {digests:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every node.
    pub async fn shutdown(mut self) {
        for id in self.running() {
            self.stop(id).await;
        }
    }
}

/// Installs a test log subscriber once (`RUST_LOG` controls it; quiet by default).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 20 ms until it returns `Ok(true)` or `timeout` passes; the
/// condition-based wait every test uses instead of sleeping.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(anyhow!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the first sample of `series` (a metric name, with labels if any) in
/// a Prometheus text exposition; 0 when it is absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs `promtool check metrics` on an exposition. Without promtool the check fails
/// when `MUSTER_REQUIRE_EXTERNAL=1` and is skipped, loudly, otherwise.
pub fn promtool_check(text: &str) -> Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("MUSTER_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
                return Err(anyhow!(
                    "promtool is required (MUSTER_REQUIRE_EXTERNAL=1) but not installed"
                ));
            }
            eprintln!("\n========================================================");
            eprintln!("SKIPPED: promtool not installed (apt-get install prometheus)");
            eprintln!("========================================================\n");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("promtool stdin"))?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(anyhow!(
            "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
