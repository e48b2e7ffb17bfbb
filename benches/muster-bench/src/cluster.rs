//! Three-node clusters of Muster and of etcd on loopback, as separate processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use muster_proto::v1 as pb;
use muster_proto::v1::cluster_client::ClusterClient;
use tempfile::TempDir;

/// CPU time (user + system) a process has used, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // Linux reports /proc times in USER_HZ, which is 100 on every mainstream build.
    let hz = 100u64;
    Duration::from_micros(ticks * 1_000_000 / hz.max(1))
}

/// Resident set size of a process in bytes, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

/// One server process.
pub struct Node {
    /// 1-based index.
    pub id: u64,
    /// Client address (host:port).
    pub client: String,
    /// Data directory.
    pub data_dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    /// The process id, when running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Which system a cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Muster.
    Muster,
    /// etcd.
    Etcd,
}

/// A three-node cluster of either system.
pub struct Cluster {
    /// Which system.
    pub kind: Kind,
    /// Its nodes.
    pub nodes: Vec<Node>,
    program: PathBuf,
    /// TLS to the nodes (Muster started with `--tls-cert`), else plain TCP.
    client_tls: Option<tonic::transport::ClientTlsConfig>,
    _dir: TempDir,
}

/// A CA and one certificate for every node (naming 127.0.0.1), written to `dir`:
/// the `--tls-*` flags, and the client's configuration.
fn node_certificates(dir: &Path) -> Result<(Vec<String>, tonic::transport::ClientTlsConfig)> {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let files = [
        ("ca.pem", ca.pem()),
        ("node.pem", cert.pem()),
        ("node-key.pem", key.serialize_pem()),
    ];
    for (name, pem) in &files {
        std::fs::write(dir.join(name), pem)?;
    }
    let path = |name: &str| dir.join(name).display().to_string();
    let flags = vec![
        "--tls-cert".into(),
        path("node.pem"),
        "--tls-key".into(),
        path("node-key.pem"),
        "--tls-ca".into(),
        path("ca.pem"),
    ];
    let client =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()));
    Ok((flags, client))
}

/// The directory of a cluster's data and logs: removed afterwards, unless
/// `MUSTER_BENCH_KEEP=1` (then its path is printed, to read the nodes' logs, whose
/// level `MUSTER_BENCH_LOG` sets).
fn cluster_dir() -> Result<TempDir> {
    let mut dir = tempfile::tempdir()?;
    if std::env::var("MUSTER_BENCH_KEEP").is_ok_and(|v| v == "1") {
        dir.disable_cleanup(true);
        eprintln!("  cluster data and logs kept in {}", dir.path().display());
    }
    Ok(dir)
}

impl Cluster {
    /// Starts three Muster nodes of the binary `bin`.
    pub async fn muster(bin: &Path, base_port: u16) -> Result<Self> {
        Self::muster_with(bin, base_port, false).await
    }

    /// Starts three Muster nodes of the binary `bin`, with TLS on every port when
    /// `tls` (one certificate for all three, from a CA made here).
    pub async fn muster_with(bin: &Path, base_port: u16, tls: bool) -> Result<Self> {
        let dir = cluster_dir()?;
        let (tls_flags, client_tls) = if tls {
            let (flags, client) = node_certificates(dir.path())?;
            (flags, Some(client))
        } else {
            (Vec::new(), None)
        };
        let peers: Vec<String> = (0..3)
            .map(|i| format!("{}=127.0.0.1:{}", i + 1, base_port + 200 + i))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..3u16 {
            let data_dir = dir.path().join(format!("m{}", i + 1));
            let mut args: Vec<String> = vec![
                "server".into(),
                "--id".into(),
                (i + 1).to_string(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--grpc-addr".into(),
                format!("127.0.0.1:{}", base_port + i),
                "--peer-addr".into(),
                format!("127.0.0.1:{}", base_port + 200 + i),
                "--http-addr".into(),
                format!("127.0.0.1:{}", base_port + 400 + i),
                "--initial-cluster".into(),
                peers.join(","),
            ];
            args.extend(tls_flags.iter().cloned());
            nodes.push(Node {
                id: u64::from(i) + 1,
                client: format!("127.0.0.1:{}", base_port + i),
                log: dir.path().join(format!("m{}.log", i + 1)),
                data_dir,
                args,
                child: None,
            });
        }
        let mut cluster = Cluster {
            kind: Kind::Muster,
            nodes,
            program: bin.to_path_buf(),
            client_tls,
            _dir: dir,
        };
        for i in 0..3 {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Starts three etcd members, as a registry operator runs them: auto-compaction on.
    pub async fn etcd(base_port: u16) -> Result<Self> {
        let program = which("etcd").context("etcd not found: install Debian's etcd-server")?;
        let dir = cluster_dir()?;
        let initial: Vec<String> = (0..3)
            .map(|i| format!("e{}=http://127.0.0.1:{}", i + 1, base_port + 100 + i))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..3u16 {
            let data_dir = dir.path().join(format!("e{}", i + 1));
            let client = format!("127.0.0.1:{}", base_port + i);
            let peer = format!("http://127.0.0.1:{}", base_port + 100 + i);
            let args = vec![
                "--name".into(),
                format!("e{}", i + 1),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--listen-client-urls".into(),
                format!("http://{client}"),
                "--advertise-client-urls".into(),
                format!("http://{client}"),
                "--listen-peer-urls".into(),
                peer.clone(),
                "--initial-advertise-peer-urls".into(),
                peer,
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                "muster-bench".into(),
                "--auto-compaction-mode".into(),
                "revision".into(),
                "--auto-compaction-retention".into(),
                "1000".into(),
                "--quota-backend-bytes".into(),
                (4u64 << 30).to_string(),
                "--log-level".into(),
                "error".into(),
            ];
            nodes.push(Node {
                id: u64::from(i) + 1,
                client,
                log: dir.path().join(format!("e{}.log", i + 1)),
                data_dir,
                args,
                child: None,
            });
        }
        let mut cluster = Cluster {
            kind: Kind::Etcd,
            nodes,
            program,
            client_tls: None,
            _dir: dir,
        };
        for i in 0..3 {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn spawn(&mut self, index: usize) -> Result<()> {
        let node = &mut self.nodes[index];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let child = Command::new(&self.program)
            .args(&node.args)
            // MUSTER_BENCH_LOG sets the nodes' log filter (default: warnings only).
            .env(
                "RUST_LOG",
                std::env::var("MUSTER_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Kills node `index` with SIGKILL.
    pub fn kill9(&mut self, index: usize) -> Result<()> {
        if let Some(mut c) = self.nodes[index].child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Stops node `index` with SIGTERM and waits.
    pub fn stop(&mut self, index: usize) -> Result<()> {
        if let Some(mut c) = self.nodes[index].child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts node `index` again from its data directory.
    pub fn restart(&mut self, index: usize) -> Result<()> {
        self.spawn(index)
    }

    /// A gRPC channel to the Muster node at `addr`, over TLS when the cluster has it.
    pub async fn channel(&self, addr: &str) -> Result<tonic::transport::Channel> {
        let scheme = if self.client_tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?.tcp_nodelay(true);
        if let Some(tls) = &self.client_tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint.connect().await?)
    }

    /// `n` channels to the Muster node at `addr` (see [`Cluster::channel`]).
    pub async fn channels(&self, addr: &str, n: usize) -> Result<Vec<tonic::transport::Channel>> {
        let mut out = Vec::new();
        for _ in 0..n.max(1) {
            out.push(self.channel(addr).await?);
        }
        Ok(out)
    }

    /// Index of the leader node.
    pub async fn leader(&self) -> Result<usize> {
        match self.kind {
            Kind::Muster => {
                for (i, n) in self.nodes.iter().enumerate() {
                    if n.child.is_none() {
                        continue;
                    }
                    if let Ok(mut c) = self.channel(&n.client).await.map(ClusterClient::new) {
                        if let Ok(s) = c.status(pb::StatusRequest {}).await {
                            let s = s.into_inner();
                            if s.leader_known {
                                return Ok((s.leader_id - 1) as usize);
                            }
                        }
                    }
                    let _ = i;
                }
                bail!("no Muster leader")
            }
            Kind::Etcd => {
                for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                    let mut c = etcd_client::Client::connect([n.client.as_str()], None).await?;
                    let s = c.status().await?;
                    let leader = s.leader();
                    for (j, m) in self.nodes.iter().enumerate() {
                        if m.child.is_none() {
                            continue;
                        }
                        let mut cm = etcd_client::Client::connect([m.client.as_str()], None).await?;
                        let sm = cm.status().await?;
                        if sm.header().map(|h| h.member_id()) == Some(leader) {
                            return Ok(j);
                        }
                    }
                }
                bail!("no etcd leader")
            }
        }
    }

    /// Index of a running follower.
    pub async fn follower(&self) -> Result<usize> {
        let leader = self.leader().await?;
        (0..self.nodes.len())
            .find(|i| *i != leader && self.nodes[*i].child.is_some())
            .context("no follower")
    }

    /// Waits until a leader is known.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("{:?} cluster not ready in {timeout:?}", self.kind);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Compacts and defragments etcd (no-op for Muster), before each workload.
    pub async fn compact(&self) -> Result<()> {
        if self.kind != Kind::Etcd {
            return Ok(());
        }
        let mut c = etcd_client::Client::connect([self.nodes[0].client.as_str()], None).await?;
        let rev = c.get("x", None).await?.header().map_or(0, |h| h.revision());
        if rev > 1 {
            let _ = c
                .compact(rev, Some(etcd_client::CompactionOptions::new().with_physical()))
                .await;
        }
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let mut c = etcd_client::Client::connect([n.client.as_str()], None).await?;
            c.defragment().await?;
        }
        Ok(())
    }

    /// CPU time used by all running nodes.
    pub fn total_cpu(&self) -> Duration {
        self.nodes.iter().filter_map(|n| n.pid()).map(cpu_time).sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}
