//! The workloads, each run on Muster and on etcd the same way.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::{GetOptions, PutOptions, WatchOptions};
use hdrhistogram::Histogram;
use muster_proto::v1 as pb;
use muster_proto::v1::cluster_client::ClusterClient;
use muster_proto::v1::registry_client::RegistryClient;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::{cpu_time, rss_bytes, Cluster, Kind};
use crate::load::{closed_loop, LoadResult};
use crate::report::{num, ratio, Table};
use crate::{start, Settings};

const WARMUP: Duration = Duration::from_millis(500);
/// Per-operation timeout in the failover workload, the same for both systems.
const OP_TIMEOUT: Duration = Duration::from_secs(1);
/// Metadata padding so a Muster instance carries about as much as etcd's 256 B value.
const PAD: usize = 200;

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Muster => "Muster",
        Kind::Etcd => "etcd",
    }
}

async fn channels(addr: &str, n: usize) -> Result<Vec<Channel>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(
            Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

async fn etcd_clients(addr: &str, n: usize) -> Result<Vec<etcd_client::Client>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(etcd_client::Client::connect([addr], None).await?);
    }
    Ok(out)
}

fn connections_for(clients: usize) -> usize {
    clients.clamp(1, 8)
}

fn instance(service: &str, id: &str, lease_id: u64) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "10.0.0.1".into(),
        port: 8080,
        metadata: [("pad".to_string(), "x".repeat(PAD))].into(),
        lease_id,
        ..Default::default()
    }
}

fn value() -> Vec<u8> {
    vec![b'x'; 256]
}

/// One Muster registration with a lease: instance `id` of service `reg`.
async fn muster_register_once(mut r: RegistryClient<Channel>, id: String) -> bool {
    r.register(pb::RegisterRequest {
        instance: Some(instance("reg", &id, 0)),
        ttl_ms: 600_000,
    })
    .await
    .is_ok()
}

/// etcd's registration with a lease: a lease grant, then a put under `key` with it.
async fn etcd_register_once(mut e: etcd_client::Client, key: String) -> bool {
    let Ok(lease) = e.lease_grant(600, None).await else {
        return false;
    };
    e.put(key, value(), Some(PutOptions::new().with_lease(lease.id())))
        .await
        .is_ok()
}

/// One Muster Discover of `service` in `mode`, counted only when it finds all
/// ten instances.
async fn muster_discover_once(mut r: RegistryClient<Channel>, service: &str, mode: pb::ReadMode) -> bool {
    matches!(
        r.discover(pb::DiscoverRequest {
            service: service.into(),
            mode: mode as i32,
            ..Default::default()
        })
        .await,
        Ok(resp) if resp.get_ref().instances.len() == 10
    )
}

/// etcd's discover: a range get of `service`'s prefix, counted only when it finds
/// all ten keys.
async fn etcd_discover_once(mut e: etcd_client::Client, service: &str, linearizable: bool) -> bool {
    let mut opts = GetOptions::new().with_prefix();
    if !linearizable {
        opts = opts.with_serializable();
    }
    matches!(e.get(format!("/registry/{service}/"), Some(opts)).await, Ok(r) if r.kvs().len() == 10)
}

/// One load point on one system: rate, latencies, and CPU per operation of the
/// servers and of the load generator.
struct Point {
    result: LoadResult,
    cpu_per_op_us: f64,
    client_cpu_per_op_us: f64,
}

fn load_row(clients: usize, m: Option<&Point>, e: Option<&Point>) -> Vec<String> {
    let f = |p: Option<&Point>, g: &dyn Fn(&Point) -> f64| p.map(g);
    let rate = |p: &Point| p.result.rate();
    let p50 = |p: &Point| p.result.ms(0.5);
    let p99 = |p: &Point| p.result.ms(0.99);
    let cpu = |p: &Point| p.cpu_per_op_us;
    let client_cpu = |p: &Point| p.client_cpu_per_op_us;
    let cell = |v: Option<f64>| v.map_or("-".into(), num);
    vec![
        clients.to_string(),
        cell(f(m, &rate)),
        cell(f(e, &rate)),
        ratio(f(m, &rate), f(e, &rate)),
        cell(f(m, &p50)),
        cell(f(e, &p50)),
        cell(f(m, &p99)),
        cell(f(e, &p99)),
        cell(f(m, &cpu)),
        cell(f(e, &cpu)),
        cell(f(m, &client_cpu)),
        cell(f(e, &client_cpu)),
        m.map_or("-".into(), |p| p.result.errors.to_string())
            + " / "
            + &e.map_or("-".into(), |p| p.result.errors.to_string()),
    ]
}

const LOAD_COLUMNS: &[&str] = &[
    "clients",
    "Muster ops/s",
    "etcd ops/s",
    "ratio",
    "Muster p50 ms",
    "etcd p50 ms",
    "Muster p99 ms",
    "etcd p99 ms",
    "Muster CPU µs/op",
    "etcd CPU µs/op",
    "Muster client CPU µs/op",
    "etcd client CPU µs/op",
    "errors M / e",
];

async fn measure<F, Fut>(cluster: &Cluster, clients: usize, duration: Duration, op: F) -> Point
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    // CPU is measured over the warm-up too; scale by the share of ops measured.
    let generator = std::process::id();
    let (cpu0, client_cpu0) = (cluster.total_cpu(), cpu_time(generator));
    let t0 = Instant::now();
    let result = closed_loop(clients, WARMUP, duration, op).await;
    let cpu = cluster.total_cpu().saturating_sub(cpu0);
    let client_cpu = cpu_time(generator).saturating_sub(client_cpu0);
    let wall = t0.elapsed().as_secs_f64();
    let ops_total = (result.ops as f64 * wall / duration.as_secs_f64()).max(1.0);
    Point {
        cpu_per_op_us: cpu.as_secs_f64() * 1e6 / ops_total,
        client_cpu_per_op_us: client_cpu.as_secs_f64() * 1e6 / ops_total,
        result,
    }
}

/// The empty gRPC call on loopback (gRPC health check), the floor under every
/// Muster read.
pub async fn floor(bin: &Path, s: &Settings) -> Result<Table> {
    let cluster = start(Kind::Muster, bin).await?;
    let node = cluster.follower().await?;
    let mut table = Table::new(
        "Floor: an empty gRPC unary call",
        "`grpc.health.v1.Health/Check` on a Muster follower over loopback: what the transport alone costs.",
        &[
            "clients",
            "calls/s",
            "p50 ms",
            "p99 ms",
            "server CPU µs/op",
            "client CPU µs/op",
        ],
    );
    for &clients in &s.clients {
        let chans = channels(&cluster.nodes[node].client, connections_for(clients)).await?;
        let point = measure(&cluster, clients, s.duration, move |c, _| {
            let mut h = tonic_health::pb::health_client::HealthClient::new(chans[c % chans.len()].clone());
            async move {
                h.check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await
                    .is_ok()
            }
        })
        .await;
        let r = &point.result;
        table.row(vec![
            clients.to_string(),
            num(r.rate()),
            num(r.ms(0.5)),
            num(r.ms(0.99)),
            num(point.cpu_per_op_us),
            num(point.client_cpu_per_op_us),
        ]);
    }
    Ok(table)
}

/// `clients` registering with a lease through `addr` (the leader) for `duration`;
/// instance names (etcd: keys) start with `prefix`.
async fn measure_register(
    cluster: &Cluster,
    addr: &str,
    clients: usize,
    duration: Duration,
    prefix: &str,
) -> Result<Point> {
    let n = connections_for(clients);
    let prefix = prefix.to_string();
    Ok(match cluster.kind {
        Kind::Muster => {
            let chans = channels(addr, n).await?;
            measure(cluster, clients, duration, move |c, seq| {
                let r = RegistryClient::new(chans[c % chans.len()].clone());
                muster_register_once(r, format!("{prefix}{clients}-{c}-{seq}"))
            })
            .await
        }
        Kind::Etcd => {
            let cs = etcd_clients(addr, n).await?;
            measure(cluster, clients, duration, move |c, seq| {
                etcd_register_once(
                    cs[c % cs.len()].clone(),
                    format!("/registry/reg/{prefix}{clients}-{c}-{seq}"),
                )
            })
            .await
        }
    })
}

/// Register with a lease (Muster: one Register carrying the TTL; etcd: lease grant +
/// put with the lease), on the leader; and etcd's plain put at one client, the
/// latency a registration with a lease is held to.
pub async fn register(bin: &Path, kinds: &[Kind], s: &Settings) -> Result<Table> {
    let mut points: HashMap<(Kind, usize), Point> = HashMap::new();
    let mut plain_put = None;
    for &kind in kinds {
        let cluster = start(kind, bin).await?;
        let leader = cluster.leader().await?;
        let addr = cluster.nodes[leader].client.clone();
        if kind == Kind::Etcd {
            cluster.compact().await?;
            let cs = etcd_clients(&addr, 1).await?;
            let point = measure(&cluster, 1, s.duration, move |_, seq| {
                let mut e = cs[0].clone();
                async move { e.put(format!("/registry/put/p-{seq}"), value(), None).await.is_ok() }
            })
            .await;
            eprintln!("  etcd plain put 1 client: p50 {:.2} ms", point.result.ms(0.5));
            plain_put = Some(point);
        }
        for &clients in &s.clients {
            cluster.compact().await?;
            let point = measure_register(&cluster, &addr, clients, s.duration, "c").await?;
            eprintln!(
                "  {} register {clients} clients: {:.0} ops/s",
                name(kind),
                point.result.rate()
            );
            points.insert((kind, clients), point);
        }
    }
    let mut table = Table::new(
        "Register with a lease",
        "Muster: `Register` with `ttl_ms` (lease and instance in one Raft entry). etcd: `LeaseGrant` then `Put` with the lease. Sent to the leader; every write fsynced on a majority. The last row is etcd's put without a lease at one client, the p50 a registration is held to.",
        LOAD_COLUMNS,
    );
    for &clients in &s.clients {
        table.row(load_row(
            clients,
            points.get(&(Kind::Muster, clients)),
            points.get(&(Kind::Etcd, clients)),
        ));
    }
    if let Some(point) = plain_put {
        let mut row = load_row(1, None, Some(&point));
        row[0] = "1, etcd plain put (no lease)".into();
        table.row(row);
    }
    Ok(table)
}

/// Registers ten instances of `service` without leases (etcd: ten keys under
/// `/registry/{service}/`) through the leader at `leader_addr`.
async fn seed_service(kind: Kind, leader_addr: &str, service: &str) -> Result<()> {
    match kind {
        Kind::Muster => {
            let mut r = RegistryClient::new(channels(leader_addr, 1).await?.remove(0));
            for i in 0..10 {
                r.register(pb::RegisterRequest {
                    instance: Some(instance(service, &format!("d-{i}"), 0)),
                    ttl_ms: 0,
                })
                .await?;
            }
        }
        Kind::Etcd => {
            let mut e = etcd_clients(leader_addr, 1).await?.remove(0);
            for i in 0..10 {
                e.put(format!("/registry/{service}/d-{i}"), value(), None).await?;
            }
        }
    }
    Ok(())
}

/// Discover a service of 10 instances from a follower.
pub async fn discover(bin: &Path, kinds: &[Kind], s: &Settings, linearizable: bool) -> Result<Table> {
    let mut points: HashMap<(Kind, usize), Point> = HashMap::new();
    for &kind in kinds {
        let cluster = start(kind, bin).await?;
        let leader = cluster.leader().await?;
        let follower = cluster.follower().await?;
        seed_service(kind, &cluster.nodes[leader].client, "disc").await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let addr = cluster.nodes[follower].client.clone();
        for &clients in &s.clients {
            cluster.compact().await?;
            let n = connections_for(clients);
            let point = match kind {
                Kind::Muster => {
                    let chans = channels(&addr, n).await?;
                    let mode = if linearizable {
                        pb::ReadMode::Linearizable
                    } else {
                        pb::ReadMode::Local
                    };
                    measure(&cluster, clients, s.duration, move |c, _| {
                        muster_discover_once(RegistryClient::new(chans[c % chans.len()].clone()), "disc", mode)
                    })
                    .await
                }
                Kind::Etcd => {
                    let cs = etcd_clients(&addr, n).await?;
                    measure(&cluster, clients, s.duration, move |c, _| {
                        etcd_discover_once(cs[c % cs.len()].clone(), "disc", linearizable)
                    })
                    .await
                }
            };
            eprintln!(
                "  {} discover {clients} clients: {:.0} ops/s",
                name(kind),
                point.result.rate()
            );
            points.insert((kind, clients), point);
        }
    }
    let (title, note) = if linearizable {
        (
            "Discover, linearizable",
            "Muster: `Discover` with `READ_MODE_LINEARIZABLE` on a follower (under the follower's read lease, else a read index from the leader; then a local read). etcd: linearizable range get of the prefix on a follower.",
        )
    } else {
        (
            "Discover, local read",
            "A service of 10 instances read from a follower. Muster: `Discover` (local, from memory). etcd: serializable range get of the prefix.",
        )
    };
    let mut table = Table::new(title, note, LOAD_COLUMNS);
    for &clients in &s.clients {
        table.row(load_row(
            clients,
            points.get(&(Kind::Muster, clients)),
            points.get(&(Kind::Etcd, clients)),
        ));
    }
    Ok(table)
}

/// Linearizable readers on each follower during [`register_under_reads`].
const READERS_PER_FOLLOWER: usize = 4;

/// Register with a lease on the leader, as in [`register`], while
/// [`READERS_PER_FOLLOWER`] clients on each follower read a service linearizably
/// without pause: what the followers' reads cost the writes (for Muster, the
/// promises of the read leases those followers hold).
pub async fn register_under_reads(bin: &Path, kinds: &[Kind], s: &Settings) -> Result<Table> {
    let mut points: HashMap<(Kind, usize), (Point, f64)> = HashMap::new();
    for &kind in kinds {
        let cluster = start(kind, bin).await?;
        let leader = cluster.leader().await?;
        let leader_addr = cluster.nodes[leader].client.clone();
        seed_service(kind, &leader_addr, "lin").await?;
        let reads = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for follower in cluster.nodes.iter().enumerate().filter(|(i, _)| *i != leader) {
            let addr = follower.1.client.clone();
            let muster = channels(&addr, 1).await?.remove(0);
            let etcd = match kind {
                Kind::Etcd => Some(etcd_clients(&addr, 1).await?.remove(0)),
                Kind::Muster => None,
            };
            for _ in 0..READERS_PER_FOLLOWER {
                let (muster, etcd, reads, stop) = (muster.clone(), etcd.clone(), reads.clone(), stop.clone());
                readers.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let ok = match &etcd {
                            Some(e) => etcd_discover_once(e.clone(), "lin", true).await,
                            None => {
                                muster_discover_once(
                                    RegistryClient::new(muster.clone()),
                                    "lin",
                                    pb::ReadMode::Linearizable,
                                )
                                .await
                            }
                        };
                        if ok {
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        for &clients in &s.clients {
            cluster.compact().await?;
            let (reads0, t0) = (reads.load(Ordering::Relaxed), Instant::now());
            let point = measure_register(&cluster, &leader_addr, clients, s.duration, "u").await?;
            let read_rate = (reads.load(Ordering::Relaxed) - reads0) as f64 / t0.elapsed().as_secs_f64();
            eprintln!(
                "  {} register {clients} clients under reads: {:.0} ops/s, {read_rate:.0} reads/s",
                name(kind),
                point.result.rate()
            );
            points.insert((kind, clients), (point, read_rate));
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            let _ = r.await;
        }
    }
    let mut columns = LOAD_COLUMNS.to_vec();
    columns.push("reads/s M / e");
    let mut table = Table::new(
        "Register while followers read linearizably",
        &format!(
            "Register with a lease on the leader, as above, while {READERS_PER_FOLLOWER} clients on each follower read a service of 10 instances linearizably without pause (Muster: under the followers' read leases, whose holders the leader waits for before it answers a write; etcd: a read index from the leader per read). CPU per operation counts the reads' CPU too."
        ),
        &columns,
    );
    for &clients in &s.clients {
        let m = points.get(&(Kind::Muster, clients));
        let e = points.get(&(Kind::Etcd, clients));
        let mut row = load_row(clients, m.map(|(p, _)| p), e.map(|(p, _)| p));
        let cell = |v: Option<&(Point, f64)>| v.map_or("-".into(), |(_, r)| num(*r));
        row.push(cell(m) + " / " + &cell(e));
        table.row(row);
    }
    Ok(table)
}

/// 10k instances on 1k leases, each lease kept alive once a second; the leader's CPU.
pub async fn keepalive(bin: &Path, kinds: &[Kind], s: &Settings) -> Result<Table> {
    const LEASES: usize = 1_000;
    const PER_LEASE: usize = 10;
    let window = s.duration.max(Duration::from_secs(5)) * 2;
    let mut table = Table::new(
        "Keep-alive: 10k instances on 1k leases, one keep-alive per lease per second",
        "Keep-alive streams spread over all three nodes. CPU is the share of one core used during the window.",
        &["system", "leader CPU %", "all nodes CPU %", "keep-alives/s answered"],
    );
    for &kind in kinds {
        let cluster = start(kind, bin).await?;
        let leader = cluster.leader().await?;
        let answered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        match kind {
            Kind::Muster => {
                let mut r = RegistryClient::new(channels(&cluster.nodes[leader].client, 1).await?.remove(0));
                let mut leases = Vec::new();
                for l in 0..LEASES {
                    let id = r
                        .grant_lease(pb::GrantLeaseRequest {
                            ttl_ms: 10_000,
                            lease_id: 0,
                        })
                        .await?
                        .into_inner()
                        .lease_id;
                    for i in 0..PER_LEASE {
                        r.register(pb::RegisterRequest {
                            instance: Some(instance("ka", &format!("k-{l}-{i}"), id)),
                            ttl_ms: 0,
                        })
                        .await?;
                    }
                    leases.push(id);
                }
                // 20 streams, 50 leases each, spread over the nodes.
                for (k, chunk) in leases.chunks(LEASES / 20).enumerate() {
                    let addr = cluster.nodes[k % 3].client.clone();
                    let chunk = chunk.to_vec();
                    let (answered, stop) = (answered.clone(), stop.clone());
                    tasks.push(tokio::spawn(async move {
                        let Ok(chan) = channels(&addr, 1).await else { return };
                        let mut r = RegistryClient::new(chan[0].clone());
                        let (tx, rx) = tokio::sync::mpsc::channel(chunk.len() * 2);
                        let Ok(resp) = r.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await else {
                            return;
                        };
                        let mut inbound = resp.into_inner();
                        let counter = answered.clone();
                        tokio::spawn(async move {
                            while let Some(Ok(_)) = inbound.next().await {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                        let mut tick = tokio::time::interval(Duration::from_secs(1));
                        while !stop.load(Ordering::Relaxed) {
                            tick.tick().await;
                            for id in &chunk {
                                if tx.send(pb::KeepAliveRequest { lease_id: *id }).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }));
                }
            }
            Kind::Etcd => {
                let mut e = etcd_clients(&cluster.nodes[leader].client, 1).await?.remove(0);
                let mut leases = Vec::new();
                for l in 0..LEASES {
                    let id = e.lease_grant(10, None).await?.id();
                    for i in 0..PER_LEASE {
                        e.put(
                            format!("/registry/ka/k-{l}-{i}"),
                            value(),
                            Some(PutOptions::new().with_lease(id)),
                        )
                        .await?;
                    }
                    leases.push(id);
                }
                for (k, chunk) in leases.chunks(LEASES / 20).enumerate() {
                    let addr = cluster.nodes[k % 3].client.clone();
                    let chunk = chunk.to_vec();
                    let (answered, stop) = (answered.clone(), stop.clone());
                    tasks.push(tokio::spawn(async move {
                        let Ok(mut cs) = etcd_clients(&addr, 1).await else {
                            return;
                        };
                        let mut client = cs.remove(0);
                        let mut keepers = Vec::new();
                        for id in chunk {
                            if let Ok(k) = client.lease_keep_alive(id).await {
                                keepers.push(k);
                            }
                        }
                        let mut tick = tokio::time::interval(Duration::from_secs(1));
                        while !stop.load(Ordering::Relaxed) {
                            tick.tick().await;
                            for (keeper, stream) in keepers.iter_mut() {
                                if keeper.keep_alive().await.is_ok() && matches!(stream.message().await, Ok(Some(_))) {
                                    answered.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }));
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = cluster.leader().await?;
        let leader_pid = cluster.nodes[leader].pid().context("leader pid")?;
        let (c0, all0, a0) = (
            cpu_time(leader_pid),
            cluster.total_cpu(),
            answered.load(Ordering::Relaxed),
        );
        tokio::time::sleep(window).await;
        let (c1, all1, a1) = (
            cpu_time(leader_pid),
            cluster.total_cpu(),
            answered.load(Ordering::Relaxed),
        );
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.abort();
        }
        let secs = window.as_secs_f64();
        table.row(vec![
            name(kind).into(),
            num((c1 - c0).as_secs_f64() / secs * 100.0),
            num((all1 - all0).as_secs_f64() / secs * 100.0),
            num((a1 - a0) as f64 / secs),
        ]);
        eprintln!("  {} keep-alive done", name(kind));
    }
    Ok(table)
}

/// Watch fan-out: delivery latency from the start of each write to its arrival at
/// every watcher, and events lost.
pub async fn watch(bin: &Path, kinds: &[Kind], s: &Settings) -> Result<Table> {
    let mut table = Table::new(
        "Watch fan-out",
        "Delivery latency is measured from the moment each write is sent to the moment each watcher receives its event. Writes go to the leader at a fixed rate for the window.",
        &["system", "streams", "nodes", "writes/s", "p50 ms", "p99 ms", "max ms", "events lost"],
    );
    let configs = [(1_000usize, 100u64, false), (10_000usize, 10u64, true)];
    for &(streams, rate, one_node) in &configs {
        for &kind in kinds {
            let cluster = start(kind, bin).await?;
            let leader = cluster.leader().await?;
            let writes = (rate as f64 * s.duration.max(Duration::from_secs(5)).as_secs_f64()) as usize;
            let base = Instant::now();
            let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..writes).map(|_| AtomicU64::new(0)).collect());
            let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
            let received = Arc::new(AtomicU64::new(0));
            let ready = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            let per_conn = 100;
            let target_nodes: Vec<usize> = if one_node {
                vec![cluster.follower().await?]
            } else {
                vec![0, 1, 2]
            };
            for conn in 0..streams.div_ceil(per_conn) {
                let addr = cluster.nodes[target_nodes[conn % target_nodes.len()]].client.clone();
                let count = per_conn.min(streams - conn * per_conn);
                let (sent_at, hist, received, ready) = (sent_at.clone(), hist.clone(), received.clone(), ready.clone());
                tasks.push(tokio::spawn(async move {
                    watch_connection(kind, &addr, count, base, sent_at, hist, received, ready).await
                }));
            }
            // Wait until every watcher is subscribed.
            let deadline = Instant::now() + Duration::from_secs(60);
            while (ready.load(Ordering::Relaxed) as usize) < streams && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The writer.
            let leader_addr = cluster.nodes[leader].client.clone();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            match kind {
                Kind::Muster => {
                    let r = RegistryClient::new(channels(&leader_addr, 1).await?.remove(0));
                    for seq in 0..writes {
                        tick.tick().await;
                        let mut r = r.clone();
                        let sent_at = sent_at.clone();
                        tokio::spawn(async move {
                            sent_at[seq].store(base.elapsed().as_micros() as u64, Ordering::Relaxed);
                            let _ = r
                                .register(pb::RegisterRequest {
                                    instance: Some(instance("wf", &format!("w-{seq}"), 0)),
                                    ttl_ms: 0,
                                })
                                .await;
                        });
                    }
                }
                Kind::Etcd => {
                    let e = etcd_clients(&leader_addr, 1).await?.remove(0);
                    for seq in 0..writes {
                        tick.tick().await;
                        let mut e = e.clone();
                        let sent_at = sent_at.clone();
                        tokio::spawn(async move {
                            sent_at[seq].store(base.elapsed().as_micros() as u64, Ordering::Relaxed);
                            let _ = e.put(format!("/registry/wf/w-{seq}"), value(), None).await;
                        });
                    }
                }
            }
            let expected = (writes * streams) as u64;
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for t in tasks {
                t.abort();
            }
            let h = hist.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let got = received.load(Ordering::Relaxed);
            table.row(vec![
                name(kind).into(),
                streams.to_string(),
                if one_node { "1".into() } else { "3".into() },
                rate.to_string(),
                num(h.value_at_quantile(0.5) as f64 / 1000.0),
                num(h.value_at_quantile(0.99) as f64 / 1000.0),
                num(h.max() as f64 / 1000.0),
                expected.saturating_sub(got).to_string(),
            ]);
            eprintln!("  {} watch {streams} streams: {got}/{expected} events", name(kind));
        }
    }
    Ok(table)
}

#[allow(clippy::too_many_arguments)]
async fn watch_connection(
    kind: Kind,
    addr: &str,
    count: usize,
    base: Instant,
    sent_at: Arc<Vec<AtomicU64>>,
    hist: Arc<Mutex<Histogram<u64>>>,
    received: Arc<AtomicU64>,
    ready: Arc<AtomicU64>,
) {
    // One O(1) record per event into the shared histogram. (Merging a per-stream
    // histogram after each event walked and cleared its whole bucket array, which made
    // the load generator, not the servers, the bottleneck of this workload.)
    let record = move |seq: usize| {
        let now = base.elapsed().as_micros() as u64;
        let sent = sent_at.get(seq).map_or(0, |a| a.load(Ordering::Relaxed));
        if sent > 0 {
            if let Ok(mut h) = hist.lock() {
                let _ = h.record(now.saturating_sub(sent).max(1));
            }
        }
        received.fetch_add(1, Ordering::Relaxed);
    };
    let seq_of = |id: &str| id.rsplit('-').next().and_then(|n| n.parse::<usize>().ok());
    let mut streams = Vec::new();
    match kind {
        Kind::Muster => {
            let Ok(chan) = channels(addr, 1).await else { return };
            for _ in 0..count {
                let mut r = RegistryClient::new(chan[0].clone());
                let Ok(resp) = r
                    .watch(pb::WatchRequest {
                        service: "wf".into(),
                        ..Default::default()
                    })
                    .await
                else {
                    continue;
                };
                ready.fetch_add(1, Ordering::Relaxed);
                let mut stream = resp.into_inner();
                let record = record.clone();
                streams.push(tokio::spawn(async move {
                    while let Some(Ok(msg)) = stream.next().await {
                        if let Some(pb::watch_response::Response::Event(pb::Event {
                            kind: Some(pb::event::Kind::Put(i)),
                            ..
                        })) = msg.response
                        {
                            if let Some(seq) = seq_of(&i.instance_id) {
                                record(seq);
                            }
                        }
                    }
                }));
            }
        }
        Kind::Etcd => {
            let Ok(mut cs) = etcd_clients(addr, 1).await else {
                return;
            };
            let mut client = cs.remove(0);
            for _ in 0..count {
                let Ok(mut stream) = client
                    .watch("/registry/wf/", Some(WatchOptions::new().with_prefix()))
                    .await
                else {
                    continue;
                };
                ready.fetch_add(1, Ordering::Relaxed);
                let record = record.clone();
                streams.push(tokio::spawn(async move {
                    while let Ok(Some(resp)) = stream.message().await {
                        for ev in resp.events() {
                            if let Some(seq) = ev.kv().and_then(|kv| kv.key_str().ok()).and_then(seq_of) {
                                record(seq);
                            }
                        }
                    }
                }));
            }
        }
    }
    for s in streams {
        let _ = s.await;
    }
}

/// Failover: kill -9 the leader during a steady register load sent through a
/// follower; time until writes succeed again, and local reads failed on followers.
pub async fn failover(bin: &Path, kinds: &[Kind], _s: &Settings) -> Result<Table> {
    let mut table = Table::new(
        "Failover: kill -9 the leader under register load",
        "16 writers through a surviving follower (each write with a 1 s timeout, then retried), 4 readers per follower doing local reads of a service of 10 instances (etcd: serializable range get of its prefix). Time from the kill to the first success of a write sent after the kill; reads counted over the 5 s after it.",
        &["system", "writes again after ms", "reads failed on followers", "reads on followers"],
    );
    for &kind in kinds {
        let mut cluster = start(kind, bin).await?;
        let leader = cluster.leader().await?;
        let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        // What the readers read: a fixed service, not the one the writers grow.
        seed_service(kind, &cluster.nodes[leader].client, "fr").await?;
        let write_addr = cluster.nodes[followers[0]].client.clone();
        let stop = Arc::new(AtomicBool::new(false));
        // (call started, answered) of every successful write.
        let last_ok = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
        let reads = Arc::new(AtomicU64::new(0));
        let read_fail = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..16 {
            let (stop, last_ok, addr) = (stop.clone(), last_ok.clone(), write_addr.clone());
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                match kind {
                    Kind::Muster => {
                        let Ok(ch) = channels(&addr, 1).await else { return };
                        let mut r = RegistryClient::new(ch[0].clone());
                        while !stop.load(Ordering::Relaxed) {
                            seq += 1;
                            let started = Instant::now();
                            let ok = matches!(
                                tokio::time::timeout(
                                    OP_TIMEOUT,
                                    r.register(pb::RegisterRequest {
                                        instance: Some(instance("fo", &format!("f-{c}-{seq}"), 0)),
                                        ttl_ms: 0,
                                    })
                                )
                                .await,
                                Ok(Ok(_))
                            );
                            if ok {
                                if let Ok(mut v) = last_ok.lock() {
                                    v.push((started, Instant::now()));
                                }
                            } else {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                    Kind::Etcd => {
                        let Ok(mut cs) = etcd_clients(&addr, 1).await else {
                            return;
                        };
                        let mut e = cs.remove(0);
                        while !stop.load(Ordering::Relaxed) {
                            seq += 1;
                            let started = Instant::now();
                            let ok = matches!(
                                tokio::time::timeout(
                                    OP_TIMEOUT,
                                    e.put(format!("/registry/fo/f-{c}-{seq}"), value(), None)
                                )
                                .await,
                                Ok(Ok(_))
                            );
                            if ok {
                                if let Ok(mut v) = last_ok.lock() {
                                    v.push((started, Instant::now()));
                                }
                            } else {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        }
                    }
                }
            }));
        }
        for f in &followers {
            for _ in 0..4 {
                let (stop, reads, read_fail, addr) = (
                    stop.clone(),
                    reads.clone(),
                    read_fail.clone(),
                    cluster.nodes[*f].client.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    match kind {
                        Kind::Muster => {
                            let Ok(ch) = channels(&addr, 1).await else { return };
                            let mut r = RegistryClient::new(ch[0].clone());
                            while !stop.load(Ordering::Relaxed) {
                                let ok = r
                                    .discover(pb::DiscoverRequest {
                                        service: "fr".into(),
                                        ..Default::default()
                                    })
                                    .await
                                    .is_ok_and(|r| r.into_inner().instances.len() == 10);
                                reads.fetch_add(1, Ordering::Relaxed);
                                if !ok {
                                    read_fail.fetch_add(1, Ordering::Relaxed);
                                }
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        }
                        Kind::Etcd => {
                            let Ok(mut cs) = etcd_clients(&addr, 1).await else {
                                return;
                            };
                            let mut e = cs.remove(0);
                            while !stop.load(Ordering::Relaxed) {
                                let ok = matches!(
                                    e.get("/registry/fr/", Some(GetOptions::new().with_prefix().with_serializable())).await,
                                    Ok(r) if r.kvs().len() == 10
                                );
                                reads.fetch_add(1, Ordering::Relaxed);
                                if !ok {
                                    read_fail.fetch_add(1, Ordering::Relaxed);
                                }
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        }
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (reads0, fails0) = (reads.load(Ordering::Relaxed), read_fail.load(Ordering::Relaxed));
        let killed = Instant::now();
        cluster.kill9(leader)?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let first_after = last_ok
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
            .filter(|(started, _)| *started > killed)
            .map(|(_, done)| *done)
            .min();
        let gap = first_after.map_or("no write succeeded".to_string(), |t| {
            num((t - killed).as_secs_f64() * 1000.0)
        });
        table.row(vec![
            name(kind).into(),
            gap,
            (read_fail.load(Ordering::Relaxed) - fails0).to_string(),
            (reads.load(Ordering::Relaxed) - reads0).to_string(),
        ]);
        eprintln!("  {} failover done", name(kind));
    }
    Ok(table)
}

/// Memory with 10k and `max` instances (each with a lease), then a cold start of a
/// follower holding them all.
pub async fn memory_and_cold_start(bin: &Path, kinds: &[Kind], s: &Settings) -> Result<(Table, Table)> {
    let mut mem = Table::new(
        "Memory: RSS per node",
        "Instances registered with leases (100 per lease; etcd: keys with 256 B values on the same leases). Largest RSS of the three nodes.",
        &["system", "instances", "RSS MB (max node)", "RSS MB (mean)"],
    );
    let mut cold = Table::new(
        "Cold start",
        "A follower holding every instance is stopped (SIGTERM) and started again: time until it answers a read with the full count.",
        &["system", "instances", "serves reads after ms"],
    );
    let sizes: Vec<usize> = [10_000usize, s.max_instances]
        .into_iter()
        .filter(|n| *n <= s.max_instances)
        .collect();
    for &kind in kinds {
        let mut cluster = start(kind, bin).await?;
        let leader = cluster.leader().await?;
        let addr = cluster.nodes[leader].client.clone();
        let mut have = 0usize;
        for &target in &sizes {
            fill(kind, &addr, have, target).await?;
            have = target;
            cluster.compact().await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let rss: Vec<f64> = cluster
                .nodes
                .iter()
                .filter_map(|n| n.pid())
                .map(|p| rss_bytes(p) as f64 / 1e6)
                .collect();
            let max = rss.iter().cloned().fold(0.0, f64::max);
            let mean = rss.iter().sum::<f64>() / rss.len().max(1) as f64;
            mem.row(vec![name(kind).into(), target.to_string(), num(max), num(mean)]);
            eprintln!("  {} memory at {target}: {max:.0} MB", name(kind));
        }
        let follower = cluster.follower().await?;
        cluster.stop(follower)?;
        let t = Instant::now();
        cluster.restart(follower)?;
        let node_addr = cluster.nodes[follower].client.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if serves_all(kind, &node_addr, have).await {
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cold.row(vec![
            name(kind).into(),
            have.to_string(),
            num(t.elapsed().as_secs_f64() * 1000.0),
        ]);
    }
    Ok((mem, cold))
}

async fn serves_all(kind: Kind, addr: &str, expected: usize) -> bool {
    match kind {
        Kind::Muster => {
            let Ok(mut c) = ClusterClient::connect(format!("http://{addr}")).await else {
                return false;
            };
            matches!(c.status(pb::StatusRequest {}).await, Ok(s) if s.get_ref().instances as usize >= expected)
        }
        Kind::Etcd => {
            let Ok(mut cs) = etcd_clients(addr, 1).await else {
                return false;
            };
            matches!(
                cs[0].get("/registry/mem/", Some(GetOptions::new().with_prefix().with_serializable().with_count_only())).await,
                Ok(r) if r.count() as usize >= expected
            )
        }
    }
}

/// Registers instances `from..to` with 64 writers, 100 instances per lease.
async fn fill(kind: Kind, addr: &str, from: usize, to: usize) -> Result<()> {
    let next = Arc::new(AtomicU64::new(from as u64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let next = next.clone();
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            match kind {
                Kind::Muster => {
                    let ch = channels(&addr, 1).await?;
                    let mut r = RegistryClient::new(ch[0].clone());
                    let mut lease = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= to {
                            return Ok::<_, anyhow::Error>(());
                        }
                        if lease == 0 || i.is_multiple_of(100) {
                            lease = r
                                .grant_lease(pb::GrantLeaseRequest {
                                    ttl_ms: 3_600_000,
                                    lease_id: 0,
                                })
                                .await?
                                .into_inner()
                                .lease_id;
                        }
                        r.register(pb::RegisterRequest {
                            instance: Some(instance(&format!("mem-{}", i % 1000), &format!("m-{i}"), lease)),
                            ttl_ms: 0,
                        })
                        .await?;
                    }
                }
                Kind::Etcd => {
                    let mut e = etcd_clients(&addr, 1).await?.remove(0);
                    let mut lease = 0i64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= to {
                            return Ok(());
                        }
                        if lease == 0 || i.is_multiple_of(100) {
                            lease = e.lease_grant(3600, None).await?.id();
                        }
                        e.put(
                            format!("/registry/mem/m-{i}"),
                            value(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                        .await?;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// What TLS costs: Discover (local read, a service of 10 instances, on a follower)
/// and Register with a lease (on the leader), on a plain cluster and on one with
/// TLS on every port, Muster alone.
pub async fn tls_cost(bin: &Path, s: &Settings) -> Result<Table> {
    let mut points: HashMap<(bool, &'static str, usize), Point> = HashMap::new();
    for tls in [false, true] {
        let cluster = Cluster::muster_with(bin, 17100, tls).await?;
        let leader = cluster.leader().await?;
        let follower = cluster.follower().await?;
        let leader_addr = cluster.nodes[leader].client.clone();
        let mut seeder = RegistryClient::new(cluster.channel(&leader_addr).await?);
        for i in 0..10 {
            seeder
                .register(pb::RegisterRequest {
                    instance: Some(instance("disc", &format!("d-{i}"), 0)),
                    ttl_ms: 0,
                })
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let follower_addr = cluster.nodes[follower].client.clone();
        for &clients in &s.clients {
            let n = connections_for(clients);
            let chans = cluster.channels(&follower_addr, n).await?;
            let point = measure(&cluster, clients, s.duration, move |c, _| {
                muster_discover_once(
                    RegistryClient::new(chans[c % chans.len()].clone()),
                    "disc",
                    pb::ReadMode::Local,
                )
            })
            .await;
            eprintln!(
                "  TLS {tls}: discover {clients} clients: {:.0} ops/s",
                point.result.rate()
            );
            points.insert((tls, "discover", clients), point);
            let chans = cluster.channels(&leader_addr, n).await?;
            let point = measure(&cluster, clients, s.duration, move |c, seq| {
                let r = RegistryClient::new(chans[c % chans.len()].clone());
                muster_register_once(r, format!("t{clients}-{c}-{seq}"))
            })
            .await;
            eprintln!(
                "  TLS {tls}: register {clients} clients: {:.0} ops/s",
                point.result.rate()
            );
            points.insert((tls, "register", clients), point);
        }
    }
    let mut table = Table::new(
        "TLS: what it costs",
        "Muster alone, the same cluster started plain and with `--tls-cert/--tls-key/--tls-ca` (TLS 1.3 on the client, HTTP and peer ports, peers mutually authenticated). Discover: local read of a service of 10 instances on a follower. Register: with a lease, on the leader. CPU is the servers' per operation.",
        &[
            "operation",
            "clients",
            "plain ops/s",
            "TLS ops/s",
            "TLS / plain",
            "plain p50 ms",
            "TLS p50 ms",
            "plain p99 ms",
            "TLS p99 ms",
            "plain CPU µs/op",
            "TLS CPU µs/op",
        ],
    );
    for operation in ["discover", "register"] {
        for &clients in &s.clients {
            let (Some(plain), Some(tls)) = (
                points.get(&(false, operation, clients)),
                points.get(&(true, operation, clients)),
            ) else {
                continue;
            };
            table.row(vec![
                operation.to_string(),
                clients.to_string(),
                num(plain.result.rate()),
                num(tls.result.rate()),
                ratio(Some(tls.result.rate()), Some(plain.result.rate())),
                num(plain.result.ms(0.5)),
                num(tls.result.ms(0.5)),
                num(plain.result.ms(0.99)),
                num(tls.result.ms(0.99)),
                num(plain.cpu_per_op_us),
                num(tls.cpu_per_op_us),
            ]);
        }
    }
    Ok(table)
}
