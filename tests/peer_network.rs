//! The peer transport: failures name the peer and end by the deadline, connections
//! are reopened after a peer restarts, and large messages pass both ways.

use std::time::Duration;

use anyhow::{bail, Result};
use muster_server::forward::{ForwardRequest, ForwardResponse};
use muster_server::network::{PeerChannels, PeerError};
use muster_testkit::{eventually, init_tracing, refusing_addr, TestCluster};
use muster_tests::{instance, register};

/// Asks the peer at `addr` for a read index: a follower answers `NotLeader`.
async fn read_index(peers: &PeerChannels, addr: &str, timeout: Duration) -> Result<ForwardResponse, PeerError> {
    peers.forward(addr, &ForwardRequest::ReadIndex, timeout).await
}

/// Asks the peer at `addr`, as a member of cluster `cluster`, for a vote for node 2
/// in `term`; the refusal it expects.
async fn refused_vote(cluster: u64, addr: &str, term: u64) -> Result<tonic::Status> {
    use muster_proto::v1::peer::PeerMessage;
    use muster_server::identity::ClusterIdentity;
    let sender = PeerChannels::new(std::sync::Arc::new(ClusterIdentity::new(Some(cluster), None)));
    let vote = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(term, 2), None);
    match sender
        .client(addr)?
        .vote(PeerMessage {
            data: bincode::serialize(&vote)?,
        })
        .await
    {
        Ok(_) => bail!("the vote from cluster {cluster:016x} was served"),
        Err(refused) => Ok(refused),
    }
}

#[tokio::test]
async fn a_closed_port_fails_as_unreachable_naming_the_peer() -> Result<()> {
    init_tracing();
    let (_kept, addr) = refusing_addr()?;
    let addr = addr.to_string();
    let peers = PeerChannels::default();
    match read_index(&peers, &addr, Duration::from_secs(5)).await {
        Err(PeerError::Unreachable { addr: failed, message }) => {
            assert_eq!(failed, addr);
            assert!(message.contains(&addr), "the message names the peer: {message}");
        }
        other => bail!("expected Unreachable, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_peer_that_accepts_but_never_answers_fails_by_the_deadline() -> Result<()> {
    init_tracing();
    // Accepts connections and holds them open without speaking HTTP/2.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let peers = PeerChannels::default();
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        read_index(&peers, &addr, Duration::from_millis(300)),
    )
    .await;
    silent.abort();
    match outcome {
        // Ended by the call's own deadline, not by the connection's keep-alive (which
        // gives up on a silent peer only after 10 s).
        Ok(Err(PeerError::Unreachable { addr: failed, message })) => {
            assert_eq!(failed, addr);
            assert!(message.contains("no answer within 300ms"), "{message}");
        }
        Ok(other) => bail!("expected Unreachable, got {other:?}"),
        Err(_) => bail!("a silent peer held the call past its deadline"),
    }
    Ok(())
}

/// Freezes every connection a [`freezable_relay`] has opened so far.
struct Freeze {
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
    frozen_up_to: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Closes the frozen connections.
    release: std::sync::Arc<tokio::sync::Notify>,
}

impl Freeze {
    fn freeze_open_connections(&self) {
        use std::sync::atomic::Ordering;
        self.frozen_up_to
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// A TCP relay to `target` whose connections can be frozen: a frozen connection stays
/// open and carries nothing more, like one whose packets a network cut dropped
/// while TCP's retransmission timer backed off. Connections opened later relay.
/// The two directions of a relayed connection: client to server, then server to
/// client, each as what is read and where it is written.
fn both_ways(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
) -> [(
    Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
); 2] {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    [
        (Box::new(client_read), Box::new(server_write)),
        (Box::new(server_read), Box::new(client_write)),
    ]
}

async fn freezable_relay(target: std::net::SocketAddr) -> Result<(String, Freeze)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let freeze = Freeze {
        opened: std::sync::Arc::new(AtomicU64::new(0)),
        frozen_up_to: std::sync::Arc::new(AtomicU64::new(0)),
        release: Default::default(),
    };
    let (opened, frozen, release) = (
        freeze.opened.clone(),
        freeze.frozen_up_to.clone(),
        freeze.release.clone(),
    );
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let generation = opened.fetch_add(1, Ordering::SeqCst) + 1;
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            for (mut from, mut to) in both_ways(client, server) {
                let frozen = frozen.clone();
                let release = release.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if frozen.load(Ordering::SeqCst) >= generation {
                            // Holds both sockets open, relaying nothing.
                            return release.notified().await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    Ok((addr, freeze))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_that_stops_carrying_answers_is_replaced_at_once() -> Result<()> {
    use muster_server::identity::ClusterIdentity;
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let core = cluster.nodes[&leader].handle.as_ref().expect("running").core().clone();
    let (relay, freeze) = freezable_relay(cluster.nodes[&leader].config.peer_addr).await?;
    let peers = PeerChannels::new(std::sync::Arc::new(ClusterIdentity::new(core.cluster.id(), None)));
    read_index(&peers, &relay, Duration::from_secs(5)).await?;

    // The connection goes silent for good: a call on it goes unanswered. New
    // connections relay; the silent one must not hold calls until its 5 s
    // keep-alive gives up.
    freeze.freeze_open_connections();
    let lost = read_index(&peers, &relay, Duration::from_millis(100)).await;
    assert!(lost.is_err(), "a frozen connection answered: {lost:?}");
    let started = std::time::Instant::now();
    eventually(
        Duration::from_secs(3),
        "a call answered on a new connection",
        || async { Ok(read_index(&peers, &relay, Duration::from_millis(200)).await.is_ok()) },
    )
    .await?;
    eprintln!(
        "figure: answered again {:?} after the connection went silent",
        started.elapsed()
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_is_reopened_after_the_peer_restarts() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let addr = cluster.nodes[&follower].config.peer_addr.to_string();
    let peers = PeerChannels::default();
    // A follower answers that it is not the leader: the call went through.
    assert!(matches!(
        read_index(&peers, &addr, Duration::from_secs(5)).await?,
        ForwardResponse::NotLeader
    ));

    cluster.stop(follower).await;
    eventually(Duration::from_secs(20), "calls to the stopped peer fail", || {
        let peers = peers.clone();
        let addr = addr.clone();
        async move {
            Ok(matches!(
                read_index(&peers, &addr, Duration::from_secs(1)).await,
                Err(PeerError::Unreachable { .. })
            ))
        }
    })
    .await?;

    cluster.restart(follower).await?;
    eventually(
        Duration::from_secs(20),
        "the same channels reach the restarted peer",
        || {
            let peers = peers.clone();
            let addr = addr.clone();
            async move {
                Ok(matches!(
                    read_index(&peers, &addr, Duration::from_secs(1)).await,
                    Ok(ForwardResponse::NotLeader)
                ))
            }
        },
    )
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_larger_than_the_flow_control_windows_pass_both_ways() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let peers = PeerChannels::default();
    // 400k lease ids: a 3.2 MB request and a 6.4 MB answer, both beyond one
    // stream's 2 MiB window, so the transport must hand capacity back as it reads.
    let leases: Vec<u64> = (1..=400_000).collect();
    let request = ForwardRequest::KeepAlive(leases.clone());
    let answered = std::sync::Arc::new(std::sync::Mutex::new(None));
    let running = &cluster;
    eventually(Duration::from_secs(30), "the leader answers the keep-alive", || {
        let peers = peers.clone();
        let request = request.clone();
        let answered = answered.clone();
        async move {
            let leader = running.wait_for_leader(Duration::from_secs(10)).await?;
            let leader_addr = running.nodes[&leader].config.peer_addr.to_string();
            Ok(
                match peers.forward(&leader_addr, &request, Duration::from_secs(10)).await? {
                    ForwardResponse::KeptAlive(ttls) => {
                        *answered.lock().expect("not poisoned") = Some(ttls);
                        true
                    }
                    // Until the new leader holds its lease.
                    ForwardResponse::NotLeader | ForwardResponse::Failed(_) => false,
                    other => bail!("unexpected answer {other:?}"),
                },
            )
        }
    })
    .await?;
    let ttls = answered.lock().expect("not poisoned").take().expect("answered");
    assert_eq!(ttls.len(), leases.len());
    assert!(ttls
        .iter()
        .zip(&leases)
        .all(|((id, ttl), asked)| id == asked && *ttl == 0));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_write_of_a_command_the_leader_does_not_know_is_refused_and_nothing_is_written() -> Result<()> {
    use muster_proto::v1::peer::PeerMessage;
    use muster_server::identity::ClusterIdentity;
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let core = cluster.nodes[&leader].handle.as_ref().expect("running").core().clone();
    let addr = cluster.nodes[&leader].config.peer_addr.to_string();
    let revision_before = core.shared.current_revision();

    // What a newer build forwards to an older leader during a rolling upgrade: a
    // write (variant 0) of a command variant this build does not have.
    let mut data = bincode::serialize(&0u32)?;
    data.extend(bincode::serialize(&999u32)?);
    let peers = PeerChannels::new(std::sync::Arc::new(ClusterIdentity::new(core.cluster.id(), None)));
    let refused = match peers.client(&addr)?.forward(PeerMessage { data }).await {
        Ok(answer) => bail!("an unknown command was answered: {answer:?}"),
        Err(refused) => refused,
    };
    // InvalidArgument is what `PeerChannels::forward` reads as a refusal.
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("undecodable"), "{}", refused.message());

    // Nothing of it was applied, and the leader goes on leading and writing: the
    // next write is the next revision.
    assert_eq!(core.shared.current_revision(), revision_before);
    assert_eq!(cluster.wait_for_leader(Duration::from_secs(10)).await?, leader);
    let mut writer = cluster.registry(leader).await?;
    let written = register(&mut writer, instance("after", "after-1", 80), 0).await?;
    assert_eq!(written.header.map(|h| h.revision), Some(revision_before + 1));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_refuses_votes_and_requests_from_another_cluster() -> Result<()> {
    use muster_server::identity::{format_cluster_id, ClusterIdentity};
    use std::sync::Arc;
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let core = cluster.nodes[&leader].handle.as_ref().expect("running").core().clone();
    let ours = core.cluster.id().expect("a founding member knows its cluster id");
    let addr = cluster.nodes[&leader].config.peer_addr.to_string();
    let term_before = core.raft.metrics().borrow().current_term;

    // A node of another cluster that reached this address (a reused port, a stale
    // peer list) asks for a vote in a far higher term: refused, naming both clusters.
    let theirs = ours.wrapping_add(1);
    let refused = refused_vote(theirs, &addr, term_before + 100).await?;
    let foreign = PeerChannels::new(Arc::new(ClusterIdentity::new(Some(theirs), None)));
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let message = refused.message();
    assert!(
        message.contains(&format_cluster_id(theirs)) && message.contains(&format_cluster_id(ours)),
        "{message}"
    );
    match read_index(&foreign, &addr, Duration::from_secs(5)).await {
        // A refusal: the write path knows nothing of it was done.
        Err(PeerError::Refused { message, .. }) => assert!(message.contains("belongs to cluster"), "{message}"),
        other => bail!("expected a refusal, got {other:?}"),
    }
    // Nothing of it reached Raft: same term, same leader.
    assert_eq!(core.raft.metrics().borrow().current_term, term_before);
    assert_eq!(cluster.wait_for_leader(Duration::from_secs(10)).await?, leader);

    // Its own cluster's peers are served.
    let own = PeerChannels::new(Arc::new(ClusterIdentity::new(Some(ours), None)));
    match read_index(&own, &addr, Duration::from_secs(5)).await? {
        ForwardResponse::ReadIndex(_) => {}
        other => bail!("the leader answers its own cluster's read index request: {other:?}"),
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_refuses_peers_of_any_cluster_until_it_learns_its_own_from_join() -> Result<()> {
    use muster_server::{Listeners, Node, NodeConfig};
    init_tracing();
    let dir = tempfile::tempdir()?;
    let l = Listeners::bind_addrs("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
    let mut config = NodeConfig::new(
        4,
        dir.path().join("node-4"),
        l.grpc.local_addr()?,
        l.peer.local_addr()?,
        l.http.local_addr()?,
    );
    // The node it joins through is not up yet.
    let (_kept, join) = refusing_addr()?;
    config.join = Some(join.to_string());
    config.raft = muster_testkit::test_timing();
    let addr = config.peer_addr.to_string();
    let node = Node::start(config, l).await?;
    let core = node.core().clone();

    // Whatever cluster reaches it first (a reused address, a stale peer list) is told
    // to come back later and does not make the node one of its members.
    let refused = refused_vote(0xbb, &addr, 7).await?;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("--join"), "{}", refused.message());
    assert_eq!(core.cluster.id(), None, "nothing was learned from the stranger");
    assert_eq!(
        core.raft.metrics().borrow().current_term,
        0,
        "the vote never reached Raft"
    );
    assert_eq!(core.status().cluster_id, None);
    node.shutdown().await;
    Ok(())
}

/// A TCP relay that passes at most `bytes_per_second` each way over all its
/// connections together, like one slow link, to the address put in the answered
/// slot (connections that come before it is set are closed); and a count of the
/// connections it relayed.
async fn throttled_relay(
    bytes_per_second: u64,
) -> Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let target: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = Default::default();
    let opened = std::sync::Arc::new(AtomicU64::new(0));
    let (slot, count) = (target.clone(), opened.clone());
    // When each direction of the link is next free.
    let link: [std::sync::Arc<std::sync::Mutex<tokio::time::Instant>>; 2] = [Default::default(), Default::default()]
        .map(|()| std::sync::Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Some(to) = *slot.lock().unwrap_or_else(|p| p.into_inner()) else {
                continue;
            };
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            for ((mut from, mut to), direction) in both_ways(client, server).into_iter().zip(link.clone()) {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // The chunk leaves once the link has carried what was queued
                        // before it, on any connection.
                        let leaves = {
                            let mut free_at = direction.lock().unwrap_or_else(|p| p.into_inner());
                            *free_at = (*free_at).max(tokio::time::Instant::now())
                                + Duration::from_micros(n as u64 * 1_000_000 / bytes_per_second);
                            *free_at
                        };
                        tokio::time::sleep_until(leaves).await;
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    Ok((addr, target, opened))
}

/// The node every other node reaches over the slow link in the slow-link tests.
const SLOW: u64 = 3;

/// A three-node cluster whose nodes reach node [`SLOW`] through a relay limited to
/// 2 MB/s, with `snapshot_every` entries between snapshots, and the leader, elected
/// while node [`SLOW`] is down and about 3 MB of instances were written to it (each
/// with 1 KB of metadata, so an append batch of hundreds of entries is far more than
/// the link carries within the 50 ms append deadline). Also the relay's count of
/// connections opened.
async fn behind_a_slow_link(
    snapshot_every: u64,
) -> Result<(TestCluster, u64, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    let (relay, target, opened) = throttled_relay(2 * 1024 * 1024).await?;
    let slot = target.clone();
    let mut cluster = TestCluster::start_with(3, move |config| {
        config.initial_cluster.insert(SLOW, relay.to_string());
        if config.id == SLOW {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(config.peer_addr);
        }
        config.raft.snapshot_every = snapshot_every;
        config.raft.keep_behind_snapshot = 10;
    })
    .await?;
    cluster.stop(SLOW).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let padding = "x".repeat(1000);
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut client = cluster.registry(leader).await?;
        let padding = padding.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..375 {
                let mut inst = instance("bulk", &format!("i-{w}-{i}"), 8080);
                inst.metadata.insert("padding".into(), padding.clone());
                register(&mut client, inst, 0).await?;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    Ok((cluster, leader, opened))
}

/// The sum of the leader's samples of `metric` about peer [`SLOW`] whose labels
/// contain `label`.
fn leader_metric_for_slow_peer(cluster: &TestCluster, leader: u64, metric: &str, label: &str) -> f64 {
    let core = cluster.nodes[&leader].handle.as_ref().expect("running").core().clone();
    core.metrics
        .render()
        .lines()
        .filter(|l| {
            l.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{'))
                && l.contains(&format!("peer=\"{SLOW}\""))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A follower whose peers reach it over a slow link (2 MB/s) and which has fallen
/// behind the leader's snapshot catches up: the leader's heartbeats, which queue
/// behind the snapshot on that link and miss their deadlines, must not keep tearing
/// down the connection the snapshot travels on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_a_slow_link_catches_up_from_a_snapshot() -> Result<()> {
    use std::sync::atomic::Ordering;
    init_tracing();
    let (mut cluster, leader, opened) = behind_a_slow_link(200).await?;
    let failed_snapshot_calls = |cluster: &TestCluster| {
        leader_metric_for_slow_peer(cluster, leader, "muster_peer_call_failures_total", "rpc=\"snapshot\"")
    };
    let opened_before = opened.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    cluster.restart(SLOW).await?;
    // Counted from when node 3 serves: a call made while it was down fails at once.
    let failed_before = failed_snapshot_calls(&cluster);
    cluster.wait_for_same_digest(Duration::from_secs(60)).await?;
    let failed = failed_snapshot_calls(&cluster) - failed_before;
    eprintln!(
        "figure: caught up over the slow link after {:?}, {} relayed connections opened, {failed} snapshot calls failed",
        started.elapsed(),
        opened.load(Ordering::SeqCst) - opened_before
    );
    assert_eq!(failed, 0.0, "snapshot chunks were cut off on the slow link");
    cluster.shutdown().await;
    Ok(())
}

/// Regression: a follower behind the leader by 3 MB of log entries, reached over a
/// slow link (2 MB/s), stayed behind for good. Every append carried up to 512
/// entries (600 KB, 0.3 s on that link) and had 50 ms to be answered, so each was
/// cut off at its deadline and sent again. The leader now learns how much an append
/// to that peer may carry and sends the entries that fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_a_slow_link_catches_up_from_the_log() -> Result<()> {
    init_tracing();
    // No snapshot: everything node 3 lacks comes in appends.
    let (mut cluster, leader, _) = behind_a_slow_link(1_000_000).await?;
    let started = std::time::Instant::now();
    cluster.restart(SLOW).await?;
    cluster.wait_for_same_digest(Duration::from_secs(60)).await?;
    let cut = leader_metric_for_slow_peer(&cluster, leader, "muster_peer_appends_cut_total", "");
    let missed = leader_metric_for_slow_peer(
        &cluster,
        leader,
        "muster_peer_call_failures_total",
        "rpc=\"append\",failure=\"deadline\"",
    );
    eprintln!(
        "figure: caught up from the log over the slow link after {:?}, {cut} appends cut to fit, {missed} appends missed their deadline",
        started.elapsed()
    );
    assert!(cut > 0.0, "no append was cut to fit the slow link");
    cluster.shutdown().await;
    Ok(())
}
