//! Network namespaces for fault tests: every node gets its own namespace with one
//! address, joined to the others by veth pairs and a bridge, so traffic between
//! chosen nodes can be cut in both directions and healed.
//!
//! ```text
//!   root namespace (the test, its clients)        mst<S>-br (bridge only)
//!   mst<S>c 10.77.S.254/24 ──veth──────────────── br0 ─┬─ veth ── mst<S>-n1: eth0 10.77.S.1
//!                                                       ├─ veth ── mst<S>-n2: eth0 10.77.S.2
//!                                                       └─ veth ── mst<S>-n3: eth0 10.77.S.3
//! ```
//!
//! The bridge sits in a namespace of its own rather than in the root namespace: the
//! root namespace of a container often runs `br_netfilter` with a `FORWARD DROP`
//! policy (Docker's), which would drop bridged traffic between the nodes, and the test
//! should not have to change the host's firewall. The root namespace only gets one
//! veth end with the `.254` address, so the test process reaches every node.
//!
//! Cuts are nftables rules inside the two nodes' namespaces (drop in `input` and
//! `output`), so a cut node still talks to the test's clients unless it is also
//! cut from them.
//!
//! Names and the subnet `S` are claimed per run (by creating the bridge namespace,
//! which fails when it exists), so several test processes can run at once. The run's
//! process id is written into the bridge namespace's directory name
//! (`mst<S>-br`) owner file; a later run removes what a dead process left behind.
//! [`NetnsNetwork`]'s `Drop` removes everything it created, also after a panic.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// Prefix of every name this module creates.
const PREFIX: &str = "mst";
/// Second octet of every subnet (10.77.S.0/24).
const SECOND_OCTET: u8 = 77;
/// Environment variable that turns a skip into a failure.
pub const REQUIRE_ENV: &str = "MUSTER_REQUIRE_NETNS";

/// What went wrong with network namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Namespaces cannot be used here (not root, no CAP_NET_ADMIN, tools missing).
    #[error("network namespaces unavailable: {0}")]
    Unavailable(String),
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Every subnet 10.77.0-253.0/24 is taken by other runs.
    #[error("no free 10.77.x.0/24 subnet")]
    NoFreeSubnet,
    /// The node is not part of the network.
    #[error("node {0} is not in the network")]
    UnknownNode(u64),
    /// Node ids must be 1..=250 (they become the last octet).
    #[error("node id {0} out of range 1..=250")]
    BadNodeId(u64),
}

fn run(program: &str, args: &[&str]) -> Result<String, NetnsError> {
    run_with_input(program, args, None)
}

fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String, NetnsError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetnsError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| NetnsError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    }
    let out = child.wait_with_output().map_err(|e| NetnsError::Command {
        command: command.clone(),
        stderr: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetnsError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Checks that namespaces, veth pairs, bridges and nftables work here, by creating
/// and removing a throwaway namespace (once per process; the answer is kept).
pub fn availability() -> Result<(), NetnsError> {
    static ANSWER: OnceLock<Result<(), String>> = OnceLock::new();
    ANSWER
        .get_or_init(|| probe().map_err(|e| e.to_string()))
        .clone()
        .map_err(NetnsError::Unavailable)
}

fn probe() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not running as root".into());
    }
    for (tool, arg) in [("ip", "-V"), ("nft", "--version")] {
        if Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            return Err(format!("`{tool}` is missing (apt-get install iproute2 nftables)"));
        }
    }
    let probe = format!("{PREFIX}probe{}", std::process::id());
    let _ = run("ip", &["netns", "del", &probe]);
    run("ip", &["netns", "add", &probe]).map_err(|e| e.to_string())?;
    let nft = run_with_input(
        "ip",
        &["netns", "exec", &probe, "nft", "-f", "-"],
        Some("table inet probe {\n  chain input {\n    type filter hook input priority 0; policy accept;\n  }\n}\n"),
    );
    let _ = run("ip", &["netns", "del", &probe]);
    nft.map_err(|e| format!("nftables inside a namespace: {e}"))?;
    Ok(())
}

/// For network tests: `true` when namespaces are usable. Otherwise prints a loud
/// `SKIPPED: network namespaces unavailable: <reason>` and answers `false` — or
/// panics when `MUSTER_REQUIRE_NETNS=1`, so CI that must run them cannot pass silently.
pub fn available_or_skip(test: &str) -> bool {
    match availability() {
        Ok(()) => true,
        Err(e) => {
            let reason = match e {
                NetnsError::Unavailable(r) => r,
                other => other.to_string(),
            };
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!("{test}: network namespaces unavailable ({reason}) and {REQUIRE_ENV}=1");
            }
            let reason = reason.replace('\n', " ");
            let line = format!("SKIPPED: network namespaces unavailable: {reason} ({test})");
            let bar = "!".repeat(line.len().min(100));
            eprintln!("\n{bar}\n{line}\n{bar}\n");
            println!("{line}");
            false
        }
    }
}

/// One node's namespace.
#[derive(Clone, Debug)]
pub struct NsNode {
    /// Namespace name.
    pub namespace: String,
    /// The node's address.
    pub ip: Ipv4Addr,
}

/// A set of namespaces on one bridge, with the cuts currently in force.
#[derive(Debug)]
pub struct NetnsNetwork {
    subnet: u8,
    bridge_ns: String,
    root_veth: String,
    nodes: Mutex<BTreeMap<u64, NsNode>>,
    /// Directed pairs `(from, to)` whose packets are dropped.
    cuts: Mutex<BTreeSet<(u64, u64)>>,
    /// Nodes cut from the test's clients too.
    client_cuts: Mutex<BTreeSet<u64>>,
}

fn owner_file(subnet: u8) -> PathBuf {
    PathBuf::from(format!("/run/netns/.{PREFIX}{subnet}.owner"))
}

fn pid_alive(pid: i32) -> bool {
    // Signal 0 checks existence; EPERM still means it exists.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

fn namespaces() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Removes namespaces and veths of subnet `s` (of a dead run, or our own).
fn remove_subnet(s: u8) {
    let tag = format!("{PREFIX}{s}-");
    for ns in namespaces() {
        if ns.starts_with(&tag) {
            let _ = run("ip", &["netns", "del", &ns]);
        }
    }
    let _ = run("ip", &["link", "del", &format!("{PREFIX}{s}c")]);
    let _ = std::fs::remove_file(owner_file(s));
}

/// Removes what runs that died without cleaning up left behind.
fn sweep_stale() {
    for ns in namespaces() {
        let Some(rest) = ns.strip_prefix(PREFIX) else { continue };
        let Some(s) = rest.strip_suffix("-br").and_then(|s| s.parse::<u8>().ok()) else {
            continue;
        };
        let owner = std::fs::read_to_string(owner_file(s))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        match owner {
            Some(pid) if pid_alive(pid) => {}
            // No owner file: a run may be between creating the namespace and writing
            // it; leave it unless it is clearly old.
            None if !is_old(&ns) => {}
            _ => {
                tracing::warn!(namespace = %ns, "removing namespaces left by a dead run");
                remove_subnet(s);
            }
        }
    }
}

fn is_old(ns: &str) -> bool {
    std::fs::metadata(format!("/run/netns/{ns}"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() > 60)
}

impl NetnsNetwork {
    /// Creates the bridge namespace and one namespace per node id (ids 1..=250).
    pub fn create(ids: &[u64]) -> Result<Self, NetnsError> {
        availability()?;
        sweep_stale();
        let start = (std::process::id() % 250) as u8;
        let mut claimed = None;
        for i in 0..250u16 {
            let s = ((u16::from(start) + i) % 250) as u8;
            let bridge_ns = format!("{PREFIX}{s}-br");
            if run("ip", &["netns", "add", &bridge_ns]).is_ok() {
                claimed = Some((s, bridge_ns));
                break;
            }
        }
        let (subnet, bridge_ns) = claimed.ok_or(NetnsError::NoFreeSubnet)?;
        let _ = std::fs::write(owner_file(subnet), std::process::id().to_string());
        let net = NetnsNetwork {
            subnet,
            root_veth: format!("{PREFIX}{subnet}c"),
            bridge_ns,
            nodes: Mutex::new(BTreeMap::new()),
            cuts: Mutex::new(BTreeSet::new()),
            client_cuts: Mutex::new(BTreeSet::new()),
        };
        // From here on, Drop cleans up whatever was made.
        net.setup_bridge()?;
        for id in ids {
            net.add_node(*id)?;
        }
        Ok(net)
    }

    fn setup_bridge(&self) -> Result<(), NetnsError> {
        let b = self.bridge_ns.as_str();
        run("ip", &["-n", b, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", b, "link", "set", "br0", "up"])?;
        run("ip", &["-n", b, "link", "set", "lo", "up"])?;
        // The test's own leg: root namespace <-> bridge.
        let root = self.root_veth.as_str();
        let peer = format!("{PREFIX}{}cb", self.subnet);
        run("ip", &["link", "add", root, "type", "veth", "peer", "name", &peer])?;
        run("ip", &["link", "set", &peer, "netns", b])?;
        run("ip", &["-n", b, "link", "set", &peer, "master", "br0"])?;
        run("ip", &["-n", b, "link", "set", &peer, "up"])?;
        let addr = format!("{}/24", self.client_ip());
        run("ip", &["addr", "add", &addr, "dev", root])?;
        run("ip", &["link", "set", root, "up"])?;
        Ok(())
    }

    /// Adds a namespace for node `id` (also used for nodes that join later).
    pub fn add_node(&self, id: u64) -> Result<NsNode, NetnsError> {
        if !(1..=250).contains(&id) {
            return Err(NetnsError::BadNodeId(id));
        }
        if let Some(n) = self.nodes.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(n.clone());
        }
        let s = self.subnet;
        let ns = format!("{PREFIX}{s}-n{id}");
        let host = format!("{PREFIX}{s}h{id}");
        let inner = format!("{PREFIX}{s}n{id}");
        let ip = Ipv4Addr::new(10, SECOND_OCTET, s, id as u8);
        run("ip", &["netns", "add", &ns])?;
        let node = NsNode {
            namespace: ns.clone(),
            ip,
        };
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, node.clone());
        run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
        run("ip", &["link", "set", &inner, "netns", &ns])?;
        run("ip", &["link", "set", &host, "netns", &self.bridge_ns])?;
        run("ip", &["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
        run("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &self.bridge_ns, "link", "set", &host, "master", "br0"])?;
        run("ip", &["-n", &self.bridge_ns, "link", "set", &host, "up"])?;
        self.apply_rules(id)?;
        Ok(node)
    }

    /// The subnet's third octet.
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    /// The test process's address on the bridge (where clients come from).
    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, SECOND_OCTET, self.subnet, 254)
    }

    /// Node `id`'s namespace and address.
    pub fn node(&self, id: u64) -> Result<NsNode, NetnsError> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or(NetnsError::UnknownNode(id))
    }

    /// The command prefix that runs a program inside node `id`'s namespace.
    pub fn exec_prefix(&self, id: u64) -> Result<Vec<OsString>, NetnsError> {
        let node = self.node(id)?;
        Ok(vec!["ip".into(), "netns".into(), "exec".into(), node.namespace.into()])
    }

    /// Rewrites node `id`'s nftables table from the cuts in force.
    fn apply_rules(&self, id: u64) -> Result<(), NetnsError> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let node = nodes.get(&id).ok_or(NetnsError::UnknownNode(id))?;
        let cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut input = String::new();
        let mut output = String::new();
        for (from, to) in &cuts {
            if *to == id {
                if let Some(peer) = nodes.get(from) {
                    input.push_str(&format!("    ip saddr {} drop\n", peer.ip));
                }
            }
            if *from == id {
                if let Some(peer) = nodes.get(to) {
                    output.push_str(&format!("    ip daddr {} drop\n", peer.ip));
                }
            }
        }
        if self.client_cuts.lock().unwrap_or_else(|p| p.into_inner()).contains(&id) {
            input.push_str(&format!("    ip saddr {} drop\n", self.client_ip()));
            output.push_str(&format!("    ip daddr {} drop\n", self.client_ip()));
        }
        // `add table` then `delete table` makes the delete valid on first use; the
        // whole script is applied atomically by nft.
        let script = format!(
            "add table inet muster\ndelete table inet muster\ntable inet muster {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority 0; policy accept;\n{output}  }}\n}}\n"
        );
        run_with_input(
            "ip",
            &["netns", "exec", &node.namespace, "nft", "-f", "-"],
            Some(&script),
        )?;
        Ok(())
    }

    fn update(&self, change: impl FnOnce(&mut BTreeSet<(u64, u64)>)) -> Result<(), NetnsError> {
        let before = self.cuts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let after = {
            let mut cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner());
            change(&mut cuts);
            cuts.clone()
        };
        let touched: BTreeSet<u64> = before
            .symmetric_difference(&after)
            .flat_map(|(a, b)| [*a, *b])
            .collect();
        for id in touched {
            self.apply_rules(id)?;
        }
        Ok(())
    }

    /// Drops all traffic between `a` and `b`, both directions.
    pub fn cut(&self, a: u64, b: u64) -> Result<(), NetnsError> {
        self.node(a)?;
        self.node(b)?;
        self.update(|c| {
            c.insert((a, b));
            c.insert((b, a));
        })
    }

    /// Restores traffic between `a` and `b`.
    pub fn heal(&self, a: u64, b: u64) -> Result<(), NetnsError> {
        self.update(|c| {
            c.remove(&(a, b));
            c.remove(&(b, a));
        })
    }

    /// Cuts node `id` from every other node (clients still reach it).
    pub fn isolate(&self, id: u64) -> Result<(), NetnsError> {
        let others: Vec<u64> = self.ids().into_iter().filter(|o| *o != id).collect();
        self.update(|c| {
            for o in others {
                c.insert((id, o));
                c.insert((o, id));
            }
        })
    }

    /// Splits the nodes into groups that cannot reach each other (each node in at
    /// most one group; nodes in no group form one more group).
    pub fn partition(&self, groups: &[Vec<u64>]) -> Result<(), NetnsError> {
        let ids = self.ids();
        let group_of = |id: u64| groups.iter().position(|g| g.contains(&id)).unwrap_or(groups.len());
        self.update(|c| {
            for a in &ids {
                for b in &ids {
                    if a != b && group_of(*a) != group_of(*b) {
                        c.insert((*a, *b));
                    }
                }
            }
        })
    }

    /// Cuts (or restores) node `id` from the test's clients.
    pub fn set_client_cut(&self, id: u64, cut: bool) -> Result<(), NetnsError> {
        {
            let mut cc = self.client_cuts.lock().unwrap_or_else(|p| p.into_inner());
            if cut {
                cc.insert(id);
            } else {
                cc.remove(&id);
            }
        }
        self.apply_rules(id)
    }

    /// Removes every cut.
    pub fn heal_all(&self) -> Result<(), NetnsError> {
        self.cuts.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.client_cuts.lock().unwrap_or_else(|p| p.into_inner()).clear();
        for id in self.ids() {
            self.apply_rules(id)?;
        }
        Ok(())
    }

    /// The directed cuts in force.
    pub fn cuts(&self) -> BTreeSet<(u64, u64)> {
        self.cuts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Node ids with a namespace.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

impl Drop for NetnsNetwork {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it and so their peers.
        for node in self.nodes.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let _ = run("ip", &["netns", "del", &node.namespace]);
        }
        let _ = run("ip", &["netns", "del", &self.bridge_ns]);
        remove_subnet(self.subnet);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn can_connect(from_ns: Option<&str>, ip: Ipv4Addr, port: u16) -> bool {
        let target = format!("exec 3<>/dev/tcp/{ip}/{port}");
        let mut cmd = match from_ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "timeout", "1", "bash", "-c", &target]);
                c
            }
            None => {
                let mut c = Command::new("timeout");
                c.args(["1", "bash", "-c", &target]);
                c
            }
        };
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A listener inside a namespace, killed on drop.
    struct Listener(std::process::Child);

    impl Listener {
        fn start(ns: &str, ip: Ipv4Addr, port: u16) -> Self {
            // `nc`-free listener: bash cannot listen, so use the test binary's own
            // std listener through a tiny helper process (python is not assumed).
            let child = Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(std::env::current_exe().expect("test binary"))
                .args(["--exact", "netns::tests::listener_helper", "--ignored", "--nocapture"])
                .env("NETNS_HELPER_ADDR", format!("{ip}:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn listener");
            std::thread::sleep(std::time::Duration::from_millis(300));
            Listener(child)
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Not a test: the listener the other tests start inside a namespace.
    #[test]
    #[ignore]
    fn listener_helper() {
        let Ok(addr) = std::env::var("NETNS_HELPER_ADDR") else {
            return;
        };
        let l = std::net::TcpListener::bind(addr).expect("bind");
        for conn in l.incoming() {
            drop(conn);
        }
    }

    #[test]
    fn cut_and_heal_drop_and_restore_traffic_between_two_namespaces_only() {
        if !available_or_skip("cut_and_heal_drop_and_restore_traffic_between_two_namespaces_only") {
            return;
        }
        let net = NetnsNetwork::create(&[1, 2, 3]).expect("create");
        let (n1, n2, n3) = (net.node(1).unwrap(), net.node(2).unwrap(), net.node(3).unwrap());
        let _l2 = Listener::start(&n2.namespace, n2.ip, 7300);
        let _l3 = Listener::start(&n3.namespace, n3.ip, 7300);
        assert!(can_connect(Some(&n1.namespace), n2.ip, 7300), "node 1 reaches node 2");
        assert!(can_connect(None, n2.ip, 7300), "the test reaches node 2");

        net.cut(1, 2).unwrap();
        assert!(!can_connect(Some(&n1.namespace), n2.ip, 7300), "cut 1-2");
        assert!(can_connect(Some(&n1.namespace), n3.ip, 7300), "1-3 untouched");
        assert!(can_connect(None, n2.ip, 7300), "clients untouched");

        net.heal(1, 2).unwrap();
        assert!(can_connect(Some(&n1.namespace), n2.ip, 7300), "healed");

        net.isolate(3).unwrap();
        assert!(!can_connect(Some(&n1.namespace), n3.ip, 7300));
        assert!(can_connect(None, n3.ip, 7300), "an isolated node still serves clients");
        net.set_client_cut(3, true).unwrap();
        assert!(!can_connect(None, n3.ip, 7300));
        net.heal_all().unwrap();
        assert!(can_connect(Some(&n1.namespace), n3.ip, 7300));
        assert!(can_connect(None, n3.ip, 7300));
    }

    #[test]
    fn dropping_the_network_removes_its_namespaces_even_after_a_panic() {
        if !available_or_skip("dropping_the_network_removes_its_namespaces_even_after_a_panic") {
            return;
        }
        let names = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = names.clone();
        let result = std::panic::catch_unwind(move || {
            let net = NetnsNetwork::create(&[1, 2]).expect("create");
            seen.lock().unwrap().push(net.node(1).unwrap().namespace);
            seen.lock().unwrap().push(net.bridge_ns.clone());
            panic!("a failing test");
        });
        assert!(result.is_err());
        let left = namespaces();
        for n in names.lock().unwrap().iter() {
            assert!(!left.contains(n), "{n} left behind");
        }
    }

    #[test]
    fn two_networks_at_once_get_different_subnets() {
        if !available_or_skip("two_networks_at_once_get_different_subnets") {
            return;
        }
        let a = NetnsNetwork::create(&[1]).expect("a");
        let b = NetnsNetwork::create(&[1]).expect("b");
        assert_ne!(a.subnet(), b.subnet());
        assert_ne!(a.node(1).unwrap().ip, b.node(1).unwrap().ip);
    }
}
