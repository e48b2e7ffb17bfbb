//! `muster dev`: a local cluster of child `muster server` processes on loopback.
//!
//! The children run in their own process group, so a Ctrl-C in the terminal
//! reaches only this process, which then stops them in order: SIGTERM to each,
//! up to 10 s to exit, SIGKILL for any that did not. A child that exits on its own
//! is reported and the others are stopped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use muster_client::{Client, ClientOptions, RetryPolicy};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, Signal as SignalStream, SignalKind};
use tokio::sync::mpsc;

use crate::cli::{DevArgs, LogFormat};
use crate::output::Table;

/// How long children get to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// One node of the dev cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevNode {
    /// Node id, from 1.
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
}

/// The layout of an `n`-node dev cluster under `root`: node i on gRPC 7100+i-1,
/// peer 7300+i-1 and HTTP 8500+i-1 on 127.0.0.1.
pub fn layout(n: u16, root: &Path) -> Vec<DevNode> {
    (1..=n)
        .map(|i| {
            let at = |base: u16| SocketAddr::from(([127, 0, 0, 1], base + i - 1));
            DevNode {
                id: u64::from(i),
                grpc: at(7100),
                peer: at(7300),
                http: at(8500),
                data_dir: root.join(format!("node-{i}")),
                log: root.join(format!("node-{i}.log")),
            }
        })
        .collect()
}

/// The `--initial-cluster` value every node gets.
pub fn initial_cluster(nodes: &[DevNode]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}={}", n.id, n.peer))
        .collect::<Vec<_>>()
        .join(",")
}

/// A running child.
struct Child {
    id: u64,
    pid: Pid,
    exited: bool,
}

/// The signals that stop the cluster.
struct Stop {
    term: SignalStream,
    int: SignalStream,
    hup: SignalStream,
}

impl Stop {
    fn install() -> Result<Self> {
        Ok(Stop {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Runs the dev cluster until a signal or a child's unexpected exit.
pub async fn run(args: &DevArgs, log_format: LogFormat, verbose: bool) -> Result<ExitCode> {
    let mut stop = Stop::install()?;
    let exe = std::env::current_exe().context("finding the muster executable")?;
    let (root, temp) = match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("muster-dev-")
                .tempdir()
                .context("creating a temporary directory")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let nodes = layout(args.nodes, &root);
    for node in &nodes {
        for addr in [node.grpc, node.peer, node.http] {
            if let Err(e) = std::net::TcpListener::bind(addr) {
                bail!("cannot use {addr} ({e}); is another cluster (muster dev) running?");
            }
        }
    }

    let cluster = initial_cluster(&nodes);
    let (exits, mut exited) = mpsc::unbounded_channel::<(u64, std::io::Result<ExitStatus>)>();
    let mut children = Vec::new();
    for node in &nodes {
        match spawn(&exe, node, &cluster, log_format, verbose) {
            Ok(mut child) => {
                let pid = child.id().map(|p| Pid::from_raw(p as i32));
                let id = node.id;
                let exits = exits.clone();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    let _ = exits.send((id, status));
                });
                if let Some(pid) = pid {
                    children.push(Child { id, pid, exited: false });
                }
            }
            Err(e) => {
                eprintln!("muster dev: starting node {}: {e:#}", node.id);
                stop_all(&mut children, &mut exited).await;
                return Ok(ExitCode::FAILURE);
            }
        }
    }

    println!("{}", banner(&nodes, &root, temp.is_some(), verbose));
    println!("waiting for a leader...");

    let outcome = supervise(&nodes, &mut children, &mut exited, &mut stop).await;
    stop_all(&mut children, &mut exited).await;
    if let Some(temp) = temp {
        if let Err(e) = temp.close() {
            eprintln!("muster dev: removing {}: {e}", root.display());
        }
    }
    match outcome {
        Ok(()) => {
            println!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("muster dev: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn spawn(
    exe: &Path,
    node: &DevNode,
    cluster: &str,
    log_format: LogFormat,
    verbose: bool,
) -> Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("server")
        .args(["--id", &node.id.to_string()])
        .arg("--data-dir")
        .arg(&node.data_dir)
        .args(["--grpc-addr", &node.grpc.to_string()])
        .args(["--peer-addr", &node.peer.to_string()])
        .args(["--http-addr", &node.http.to_string()])
        .args(["--initial-cluster", cluster])
        .args([
            "--log-format",
            match log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            },
        ])
        .stdin(Stdio::null())
        // Its own process group: Ctrl-C reaches only `muster dev`, which stops
        // the nodes in order.
        .process_group(0)
        .kill_on_drop(true);
    // The caller's MUSTER_* server settings (e.g. MUSTER_JOIN) must not leak in.
    for env in crate::config_file::server_flag_env().values() {
        command.env_remove(env);
    }
    command.env_remove("MUSTER_CONFIG");
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    if verbose {
        command.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    } else {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("opening {}", node.log.display()))?;
        command.stdout(log.try_clone()?).stderr(log);
    }
    command.spawn().with_context(|| format!("spawning {}", exe.display()))
}

fn banner(nodes: &[DevNode], root: &Path, temporary: bool, verbose: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "muster dev: {} node{}, data in {}{}",
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" },
        root.display(),
        if temporary { " (removed on exit)" } else { "" }
    );
    let mut table = Table::new(&["NODE", "GRPC", "PEER", "HTTP", "LOG"]);
    for n in nodes {
        table.row(vec![
            n.id.to_string(),
            n.grpc.to_string(),
            n.peer.to_string(),
            n.http.to_string(),
            if verbose {
                "(this terminal)".into()
            } else {
                n.log.display().to_string()
            },
        ]);
    }
    out.push('\n');
    for line in table.render().lines() {
        let _ = writeln!(out, "  {line}");
    }
    let all: Vec<String> = nodes.iter().map(|n| n.grpc.to_string()).collect();
    let _ = write!(
        out,
        "\ntry, in another terminal:\n  \
         muster register web --id web-1 --address 127.0.0.1 --port 8080 --tag v1 --ttl 10s\n  \
         muster discover web\n  \
         muster watch --from 1\n  \
         muster cluster status --addr {}\n  \
         curl http://{}/health\n\
         Ctrl-C stops the cluster.\n",
        all.join(","),
        nodes.first().map_or_else(String::new, |n| n.http.to_string()),
    );
    out
}

/// Waits for a leader, then for a signal; fails when a child exits by itself.
async fn supervise(
    nodes: &[DevNode],
    children: &mut [Child],
    exited: &mut mpsc::UnboundedReceiver<(u64, std::io::Result<ExitStatus>)>,
    stop: &mut Stop,
) -> Result<()> {
    let first = nodes.first().context("no nodes")?;
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            max_elapsed: Duration::ZERO,
            ..RetryPolicy::default()
        },
        ..ClientOptions::default()
    };
    let client = Client::connect_with(vec![first.grpc.to_string()], options).await?;
    let started = tokio::time::Instant::now();
    let mut warned = false;
    let mut leader = None;
    while leader.is_none() {
        tokio::select! {
            which = stop.recv() => {
                println!("{which}: stopping the cluster before it formed");
                return Ok(());
            }
            exit = exited.recv() => return Err(unexpected_exit(nodes, children, exit)),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Ok(status) = client.status().await {
                    leader = status.leader_id;
                }
                if leader.is_none() && !warned && started.elapsed() > Duration::from_secs(30) {
                    warned = true;
                    eprintln!("muster dev: still no leader after 30 s; see the node logs");
                }
            }
        }
    }
    if let Some(leader) = leader {
        println!("cluster ready, leader = {leader}");
    }
    tokio::select! {
        which = stop.recv() => {
            println!("{which}: stopping the cluster");
            Ok(())
        }
        exit = exited.recv() => Err(unexpected_exit(nodes, children, exit)),
    }
}

fn unexpected_exit(
    nodes: &[DevNode],
    children: &mut [Child],
    exit: Option<(u64, std::io::Result<ExitStatus>)>,
) -> anyhow::Error {
    let Some((id, status)) = exit else {
        return anyhow::anyhow!("lost track of the nodes");
    };
    if let Some(child) = children.iter_mut().find(|c| c.id == id) {
        child.exited = true;
    }
    let how = match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    };
    let log = nodes
        .iter()
        .find(|n| n.id == id)
        .map(|n| format!("; see {}", n.log.display()))
        .unwrap_or_default();
    anyhow::anyhow!("node {id} exited unexpectedly ({how}){log}; stopping the others")
}

/// SIGTERM to every running child, up to [`STOP_GRACE`] for them to exit, then
/// SIGKILL for the rest.
async fn stop_all(children: &mut [Child], exited: &mut mpsc::UnboundedReceiver<(u64, std::io::Result<ExitStatus>)>) {
    // Exits already reported but not yet read.
    while let Ok((id, _)) = exited.try_recv() {
        mark_exited(children, id);
    }
    for child in children.iter().filter(|c| !c.exited) {
        // The child is not reaped until its waiter reports it, so the pid is still its own.
        let _ = kill(child.pid, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while children.iter().any(|c| !c.exited) {
        match tokio::time::timeout_at(deadline, exited.recv()).await {
            Ok(Some((id, status))) => {
                mark_exited(children, id);
                if let Ok(status) = status {
                    if !status.success() {
                        eprintln!("muster dev: node {id} exited with {status}");
                    }
                }
            }
            Ok(None) => break,
            Err(_) => {
                for child in children.iter().filter(|c| !c.exited) {
                    eprintln!(
                        "muster dev: node {} did not stop within {STOP_GRACE:?}; killing it",
                        child.id
                    );
                    let _ = kill(child.pid, Signal::SIGKILL);
                }
                while children.iter().any(|c| !c.exited) {
                    match tokio::time::timeout(Duration::from_secs(5), exited.recv()).await {
                        Ok(Some((id, _))) => mark_exited(children, id),
                        _ => return,
                    }
                }
            }
        }
    }
}

fn mark_exited(children: &mut [Child], id: u64) {
    if let Some(child) = children.iter_mut().find(|c| c.id == id) {
        child.exited = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_nodes_use_the_documented_ports() {
        let nodes = layout(3, Path::new("/tmp/d"));
        assert_eq!(nodes[0].grpc.to_string(), "127.0.0.1:7100");
        assert_eq!(nodes[1].peer.to_string(), "127.0.0.1:7301");
        assert_eq!(nodes[2].http.to_string(), "127.0.0.1:8502");
        assert_eq!(nodes[2].data_dir, Path::new("/tmp/d/node-3"));
        assert_eq!(
            initial_cluster(&nodes),
            "1=127.0.0.1:7300,2=127.0.0.1:7301,3=127.0.0.1:7302"
        );
    }

    #[test]
    fn the_initial_cluster_parses_back() {
        let nodes = layout(3, Path::new("/tmp/d"));
        let parsed = crate::parse::parse_initial_cluster(&initial_cluster(&nodes)).unwrap();
        assert_eq!(parsed.0.len(), 3);
    }
}
