//! Regression tests for bugs the fault suite found, each named for the bug.
//!
//! Needs the `muster` binary: `MUSTER_BIN`, else `target/debug/muster`.

use std::path::PathBuf;
use std::time::Duration;

use muster_proto::v1 as pb;
use muster_testkit::process::ProcessCluster;

fn muster_bin() -> PathBuf {
    std::env::var_os("MUSTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/debug/muster")))
}

/// A three-node process cluster, its leader and one follower.
async fn cluster_with_follower(bin: &std::path::Path) -> (ProcessCluster, u64, u64) {
    let cluster = ProcessCluster::start(bin, 3).await.expect("cluster");
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await.expect("leader");
    let follower = cluster
        .running()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");
    (cluster, leader, follower)
}

/// A three-node process cluster in network namespaces, stable, and its leader; `None`
/// (announced) when namespaces are not available here.
async fn netns_cluster(
    test: &str,
) -> Option<(std::sync::Arc<muster_testkit::netns::NetnsNetwork>, ProcessCluster, u64)> {
    use muster_testkit::netns::{available_or_skip, NetnsNetwork};
    use muster_testkit::process::{ClusterOptions, Network};

    if !available_or_skip(test) {
        return None;
    }
    let bin = muster_bin();
    assert!(bin.exists(), "no muster binary at {}", bin.display());
    let net = std::sync::Arc::new(NetnsNetwork::create(&[1, 2, 3]).expect("namespaces"));
    let mut options = ClusterOptions::new(3);
    options.network = Network::Netns(net.clone());
    let cluster = ProcessCluster::start_with(&bin, options).await.expect("cluster");
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await.expect("leader");
    cluster
        .wait_for_stable(Duration::from_secs(20))
        .await
        .expect("stable before the fault");
    Some((net, cluster, leader))
}

/// Registers instances `<prefix>-0`, `<prefix>-1`, ... one every 50 ms for `how_long`,
/// each of which must succeed; answers how many were written.
async fn write_for(
    writer: &mut muster_proto::v1::registry_client::RegistryClient<tonic::transport::Channel>,
    prefix: &str,
    how_long: Duration,
) -> u64 {
    let started = std::time::Instant::now();
    let mut written = 0;
    while started.elapsed() < how_long {
        writer
            .register(pb::RegisterRequest {
                instance: Some(instance(&format!("{prefix}-{written}"))),
                ttl_ms: 0,
            })
            .await
            .expect("the majority keeps writing");
        written += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    written
}

/// Waits for the cluster to be stable and asserts that `leader` still leads and every
/// node is still in `term`; `when` names the moment in failure messages.
async fn assert_still_leads(cluster: &ProcessCluster, leader: u64, term: u64, when: &str) {
    let (stable_leader, _) = cluster
        .wait_for_stable(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("not stable {when}: {e}"));
    assert_eq!(stable_leader, leader, "the leader was unseated {when}");
    for (id, status) in cluster.statuses().await {
        let status = status.expect("every node answers");
        assert_eq!(status.term, term, "node {id} is in another term {when}");
    }
}

fn instance(id: &str) -> pb::Instance {
    pb::Instance {
        service: "orders".into(),
        instance_id: id.into(),
        address: "10.1.0.1".into(),
        port: 8080,
        ..Default::default()
    }
}

/// Bug (found by `muster-chaos --seed 0 --faults kill-leader`): a follower forwards a
/// deregistration to the leader; the leader commits it and dies before answering;
/// the follower's `propose_raw` retried the command on the new leader, where it was
/// rejected as "instance not found", and the client got NOT_FOUND for a
/// deregistration that had happened. The same held for lease revocation. A retry
/// now carries the first attempt's number in the follower's forwarding session, and
/// the state machine answers it with the first attempt's result.
///
/// Kills the leader while forty deregistrations are in flight through a follower,
/// a few times; none of them may answer NOT_FOUND (every key was registered and is
/// deregistered once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_deregistration_retried_after_the_leader_died_is_not_answered_not_found() {
    let bin = muster_bin();
    assert!(bin.exists(), "no muster binary at {}", bin.display());
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for attempt in 0..4u64 {
        let (mut cluster, leader, follower) = cluster_with_follower(&bin).await;
        // No client-side deadline: the answer the server gives is what is checked.
        let client = muster_proto::v1::registry_client::RegistryClient::connect(format!(
            "http://{}",
            cluster.grpc_addr(follower).expect("address")
        ))
        .await
        .expect("client");
        let keys: Vec<String> = (0..40).map(|i| format!("o-{attempt}-{i}")).collect();
        for k in &keys {
            client
                .clone()
                .register(pb::RegisterRequest {
                    instance: Some(instance(k)),
                    ttl_ms: 0,
                })
                .await
                .expect("register");
        }
        let calls: Vec<_> = keys
            .iter()
            .map(|k| {
                let mut c = client.clone();
                let k = k.clone();
                tokio::spawn(async move {
                    c.deregister(pb::DeregisterRequest {
                        namespace: String::new(),
                        service: "orders".into(),
                        instance_id: k.clone(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| (s.code(), s.message().to_string()))
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(2 + attempt * 3)).await;
        cluster.kill9(leader).expect("kill");
        for (k, call) in keys.iter().zip(calls) {
            let result = call.await.expect("task");
            let label = match &result {
                Ok(()) => "ok".to_string(),
                Err((code, _)) => format!("{code:?}"),
            };
            *outcomes.entry(label).or_default() += 1;
            if let Err((tonic::Code::NotFound, message)) = &result {
                panic!("deregistration of {k} (registered, deregistered once) answered NOT_FOUND: {message}");
            }
        }
    }
    eprintln!("figure: outcomes of deregistrations in flight when the leader died: {outcomes:?}");
}

/// Bug (found by `muster-chaos --seed 40019 --faults clock-fast`, with the leader
/// killed): a follower forwards a registration to the leader, which appends and
/// replicates it and dies before answering; the follower sent it again to the new
/// leader, so it was applied twice, the second time over a newer write of the same
/// key that a client may already have read (a linearizability violation).
///
/// Forwarded writes now travel numbered in the follower's forwarding session and
/// the state machine applies each number once (`muster_core::sessions`).
///
/// Kills the leader while forty registrations of new keys are in flight through a
/// follower, a few times; every key must have been applied at most once (its
/// create and mod revisions equal), whatever each call answered. It failed on the
/// retrying code without sessions in most runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_registration_whose_leader_died_unanswered_is_applied_at_most_once() {
    let bin = muster_bin();
    assert!(bin.exists(), "no muster binary at {}", bin.display());
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for attempt in 0..4u64 {
        let (mut cluster, leader, follower) = cluster_with_follower(&bin).await;
        let client = muster_proto::v1::registry_client::RegistryClient::connect(format!(
            "http://{}",
            cluster.grpc_addr(follower).expect("address")
        ))
        .await
        .expect("client");
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let mut c = client.clone();
                let key = format!("r-{attempt}-{i}");
                tokio::spawn(async move {
                    c.register(pb::RegisterRequest {
                        instance: Some(instance(&key)),
                        ttl_ms: 0,
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(2 + attempt * 3)).await;
        cluster.kill9(leader).expect("kill");
        for call in calls {
            let label = match call.await.expect("task") {
                Ok(()) => "ok".to_string(),
                Err(code) => format!("{code:?}"),
            };
            *outcomes.entry(label).or_default() += 1;
        }
        cluster
            .wait_for_leader(Duration::from_secs(20))
            .await
            .expect("new leader");
        let found = client
            .clone()
            .discover(pb::DiscoverRequest {
                service: "orders".into(),
                mode: pb::ReadMode::Linearizable as i32,
                ..Default::default()
            })
            .await
            .expect("discover")
            .into_inner()
            .instances;
        for i in &found {
            assert_eq!(
                i.create_revision, i.mod_revision,
                "{} was registered once but applied at revisions {} and {}",
                i.instance_id, i.create_revision, i.mod_revision
            );
        }
    }
    eprintln!("figure: outcomes of registrations in flight when the leader died: {outcomes:?}");
}

/// Bug (found by the fault suite's `leader-isolated` fault): a leader cut off from
/// its followers still believes it leads (openraft 0.9 has no check-quorum
/// step-down) and kept acknowledging keep-alives from its local lease table, while
/// the majority elected a new leader that heard no keep-alive and expired the
/// lease: the owner, connected and renewing every 300 ms, lost its instance and was
/// told for the whole partition that its lease was alive.
///
/// Cuts the leader off while an owner renews through it; every keep-alive it
/// acknowledges must come more than a TTL before the majority expires the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_does_not_acknowledge_keep_alives_for_a_lease_the_majority_expires() {
    use tokio_stream::StreamExt;

    let Some((net, cluster, leader)) =
        netns_cluster("an_isolated_leader_does_not_acknowledge_keep_alives_for_a_lease_the_majority_expires").await
    else {
        return;
    };
    let other = cluster
        .running()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");
    let mut client = cluster.registry(leader).await.expect("client");
    let ttl_ms = 3_000;
    let lease_id = client
        .register(pb::RegisterRequest {
            instance: Some(instance("held")),
            ttl_ms,
        })
        .await
        .expect("register")
        .into_inner()
        .lease_id;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::KeepAliveRequest { lease_id }).await.expect("send");
    let mut answers = client
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("keep-alive stream")
        .into_inner();
    answers.next().await.expect("first answer").expect("first answer ok");

    net.isolate(leader).expect("isolate");
    let cut_at = std::time::Instant::now();
    let mut last_ok = None;
    let mut expired_at = None;
    let mut majority = cluster.registry(other).await.expect("majority client");
    while cut_at.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = tx.send(pb::KeepAliveRequest { lease_id }).await;
        if let Ok(Some(Ok(r))) = tokio::time::timeout(Duration::from_millis(500), answers.next()).await {
            if r.ttl_ms > 0 {
                last_ok = Some(cut_at.elapsed());
            }
        }
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            majority.discover(pb::DiscoverRequest {
                service: "orders".into(),
                mode: pb::ReadMode::Linearizable as i32,
                ..Default::default()
            }),
        )
        .await;
        if let Ok(Ok(r)) = read {
            if r.into_inner().instances.is_empty() && expired_at.is_none() {
                expired_at = Some(cut_at.elapsed());
            }
        }
    }
    net.heal_all().expect("heal");
    eprintln!("figure: leader isolated; last keep-alive acknowledged by it at {last_ok:?}, lease expired on the majority at {expired_at:?}");
    if let (Some(ok), Some(expired)) = (last_ok, expired_at) {
        assert!(
            ok + Duration::from_millis(ttl_ms) <= expired,
            "the isolated leader acknowledged a keep-alive at {ok:?}, yet the lease expired at {expired:?} (TTL {ttl_ms} ms)"
        );
    }
}

/// Open (found by `muster-chaos --faults restart-all`, seeds 5016 and 5026): after
/// every node is killed at once and restarted, a node that led before the crash
/// comes back as leader of the same term (openraft's "restore leader at startup"),
/// and its read index is `max(first log id of its term, committed)`, where
/// `committed` is what was persisted before the crash — which the log store writes
/// lazily (`committed_flush_interval`, 100 ms). A linearizable read then misses
/// writes that were committed and acknowledged just before the crash.
///
/// Fixed: a leader never answers a read index below the last log index it had on
/// disk at start-up (`NodeCore::read_index_local`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linearizable_read_right_after_a_full_restart_sees_every_acknowledged_write() {
    let bin = muster_bin();
    assert!(bin.exists(), "no muster binary at {}", bin.display());
    for attempt in 0..5 {
        let mut cluster = ProcessCluster::start(&bin, 3).await.expect("cluster");
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await.expect("leader");
        let mut client = cluster.registry(leader).await.expect("client");
        for i in 0..20 {
            client
                .register(pb::RegisterRequest {
                    instance: Some(instance(&format!("r-{i}"))),
                    ttl_ms: 0,
                })
                .await
                .expect("register");
        }
        // Acknowledged; now every node dies before the committed id is flushed.
        for id in cluster.running() {
            cluster.kill9(id).expect("kill");
        }
        for id in 1..=3 {
            cluster.restart(id).expect("restart");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let read = async {
                let mut c = cluster.registry(leader).await?;
                let r = c
                    .discover(pb::DiscoverRequest {
                        service: "orders".into(),
                        mode: pb::ReadMode::Linearizable as i32,
                        ..Default::default()
                    })
                    .await?;
                anyhow::Ok(r.into_inner())
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), read).await {
                assert_eq!(
                    r.instances.len(),
                    20,
                    "attempt {attempt}: a linearizable read on node {leader} after a full restart sees {} of 20 acknowledged registrations (revision {})",
                    r.instances.len(),
                    r.header.map_or(0, |h| h.revision)
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no linearizable read after restart"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Found by the fault suite's `minority-partition` rounds, which took 0.7 s to
/// recover after every heal: a follower cut off from the others campaigned again
/// and again, raising its term, and once reachable its answer to the leader's next
/// append stated that term, so the leader stepped down and the cluster elected
/// again for nothing. A voter now lets elections start only while a quorum would
/// join them (`muster_server::pre_vote`).
///
/// Cuts a follower off for several election timeouts while writes go on, then
/// heals: no node may have raised its term, and the leader leads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_for_a_while_rejoins_without_unseating_the_leader() {
    let Some((net, cluster, leader)) =
        netns_cluster("a_follower_cut_off_for_a_while_rejoins_without_unseating_the_leader").await
    else {
        return;
    };
    let cut_off = cluster
        .running()
        .into_iter()
        .find(|id| *id != leader)
        .expect("follower");
    let term = cluster.status(leader).await.expect("status").term;

    net.isolate(cut_off).expect("isolate");
    let mut writer = cluster.registry(leader).await.expect("client");
    // Several election timeouts (at most 400 ms each, after a 400 ms lease).
    let written = write_for(&mut writer, "during", Duration::from_secs(3)).await;
    assert_eq!(
        cluster.status(cut_off).await.expect("status").term,
        term,
        "the cut-off node raised its term"
    );
    let held_back = cluster
        .metric(cut_off, "muster_elections_held_back_total")
        .await
        .expect("metrics of the cut-off node");
    assert!(held_back > 0.0, "the cut-off node held back no election");

    net.heal_all().expect("heal");
    assert_still_leads(&cluster, leader, term, "after the heal").await;
    let caught_up = cluster.status(cut_off).await.expect("status");
    assert!(
        caught_up.revision >= written,
        "the rejoined node holds revision {} of {written} writes",
        caught_up.revision
    );
}

/// A follower that had taken part in an election kept openraft's election timer on
/// while it followed the leader it elected. Paused (SIGSTOP) for longer than an
/// election timeout and resumed, it could campaign at once, before a pre-vote round
/// had switched the timer off, and unseat the leader with its higher term.
///
/// Elects a second leader (the first is paused), then pauses the follower that took
/// part in that election, several times, for several election timeouts each while
/// writes go on: no node may raise its term, and the leader leads on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_paused_for_a_while_resumes_without_unseating_the_leader() {
    use nix::sys::signal::Signal;

    let bin = muster_bin();
    assert!(bin.exists(), "no muster binary at {}", bin.display());
    let (mut cluster, first_leader, _) = cluster_with_follower(&bin).await;
    cluster
        .wait_for_stable(Duration::from_secs(20))
        .await
        .expect("stable at the start");
    cluster.signal(first_leader, Signal::SIGSTOP).expect("SIGSTOP");
    // The paused node is not active: the leader awaited is a second one.
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .expect("a second leader");
    cluster.signal(first_leader, Signal::SIGCONT).expect("SIGCONT");
    let (stable_leader, _) = cluster
        .wait_for_stable(Duration::from_secs(20))
        .await
        .expect("stable after the second election");
    assert_eq!(stable_leader, leader);
    let voter = cluster
        .running()
        .into_iter()
        .find(|id| *id != leader && *id != first_leader)
        .expect("the follower that took part in the election");
    let term = cluster.status(leader).await.expect("status").term;

    let mut writer = cluster.registry(leader).await.expect("client");
    for round in 0..3 {
        cluster.signal(voter, Signal::SIGSTOP).expect("SIGSTOP");
        // Longer than the lease and election timeout openraft waits for (400 + 400 ms).
        write_for(&mut writer, &format!("paused-{round}"), Duration::from_millis(1500)).await;
        cluster.signal(voter, Signal::SIGCONT).expect("SIGCONT");
        assert_still_leads(&cluster, leader, term, &format!("after pause {round}")).await;
    }
}
