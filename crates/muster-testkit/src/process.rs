//! A cluster of real `muster server` processes, each with its own data directory,
//! that tests can kill with SIGKILL, pause with SIGSTOP and restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use muster_proto::v1 as pb;
use muster_proto::v1::cluster_client::ClusterClient;
use muster_proto::v1::registry_client::RegistryClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tonic::transport::Channel;

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
    child: Option<Child>,
}

/// A cluster of server processes on loopback.
pub struct ProcessCluster {
    bin: PathBuf,
    initial_cluster: String,
    /// Nodes by id.
    pub nodes: BTreeMap<u64, ProcessNode>,
    dir: TempDir,
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

impl ProcessCluster {
    /// Starts `n` server processes of the binary at `bin` forming one cluster.
    pub async fn start(bin: &Path, n: u64) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            nodes.insert(
                id,
                ProcessNode {
                    id,
                    grpc: free_port()?,
                    peer: free_port()?,
                    http: free_port()?,
                    data_dir: dir.path().join(format!("node-{id}")),
                    log: dir.path().join(format!("node-{id}.log")),
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
            nodes,
            dir,
        };
        for id in 1..=n {
            cluster.spawn(id)?;
        }
        cluster.wait_for_leader(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    /// The directory holding data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let child = Command::new(&self.bin)
            .arg("server")
            .args(["--id", &id.to_string()])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--grpc-addr", &node.grpc.to_string()])
            .args(["--peer-addr", &node.peer.to_string()])
            .args(["--http-addr", &node.http.to_string()])
            .args(["--initial-cluster", &self.initial_cluster])
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
        Ok(())
    }

    /// Ids of nodes whose process runs.
    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect()
    }

    /// Kills node `id` with SIGKILL and reaps it.
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Sends SIGSTOP (pause) or SIGCONT (resume) to node `id`.
    pub fn signal(&self, id: u64, signal: Signal) -> Result<()> {
        let child = self.nodes[&id].child.as_ref().context("node not running")?;
        kill(Pid::from_raw(child.id() as i32), signal)?;
        Ok(())
    }

    /// Stops node `id` with SIGTERM and waits for it to exit.
    pub fn terminate(&mut self, id: u64) -> Result<std::process::ExitStatus> {
        let mut child = self
            .nodes
            .get_mut(&id)
            .and_then(|n| n.child.take())
            .context("node not running")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        Ok(child.wait()?)
    }

    /// Starts node `id` again from its data directory.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        self.spawn(id)
    }

    /// A Registry client for node `id`.
    pub async fn registry(&self, id: u64) -> Result<RegistryClient<Channel>> {
        Ok(RegistryClient::connect(format!("http://{}", self.nodes[&id].grpc)).await?)
    }

    /// The status of node `id`.
    pub async fn status(&self, id: u64) -> Result<pb::StatusResponse> {
        let mut c = ClusterClient::connect(format!("http://{}", self.nodes[&id].grpc)).await?;
        Ok(c.status(pb::StatusRequest {}).await?.into_inner())
    }

    /// The leader every running node agrees on, waiting up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for id in self.running() {
                leaders.push(
                    self.status(id)
                        .await
                        .ok()
                        .filter(|s| s.leader_known)
                        .map(|s| s.leader_id),
                );
            }
            if let Some(Some(l)) = leaders.first().copied() {
                if self.running().contains(&l) && leaders.iter().all(|x| *x == Some(l)) {
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

    /// Waits until every running node reports the same state digest and revision.
    pub async fn wait_for_same_digest(&self, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut digests = Vec::new();
            for id in self.running() {
                digests.push(self.status(id).await.ok().map(|s| s.digest));
            }
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
    }
}
