//! Three real nodes in one test process (real sockets, fsynced logs and sled on disk):
//! replication, read modes, watches, leases and leader loss.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};
use muster_proto::v1 as pb;
use muster_testkit::{eventually, init_tracing, TestCluster};
use tokio_stream::StreamExt;

use muster_tests::{discover, instance, register};

fn ids(resp: &pb::DiscoverResponse) -> BTreeSet<String> {
    resp.instances.iter().map(|i| i.instance_id.clone()).collect()
}

fn revision(header: &Option<pb::ResponseHeader>) -> u64 {
    header.as_ref().map_or(0, |h| h.revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registration_on_a_follower_is_read_on_every_node() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let follower = cluster.follower().await?;
    let mut client = cluster.registry(follower).await?;
    let resp = register(&mut client, instance("web", "web-1", 8080), 0).await?;
    let rev = revision(&resp.header);
    assert!(rev > 0);
    for id in cluster.running() {
        let mut c = cluster.registry(id).await?;
        let found = discover(&mut c, "web", pb::ReadMode::MinRevision, rev).await?;
        assert_eq!(ids(&found), BTreeSet::from(["web-1".to_string()]), "node {id}");
        let h = found.header.unwrap();
        assert!(h.revision >= rev);
        assert!(h.leader_known);
        assert_eq!(found.instances[0].port, 8080);
        // The default local read sees it too once applied.
        eventually(Duration::from_secs(5), "local read", || {
            let mut c = c.clone();
            async move { Ok(discover(&mut c, "web", pb::ReadMode::Local, 0).await?.instances.len() == 1) }
        })
        .await?;
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn min_revision_reads_your_writes_on_another_node() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let mut writer = cluster.registry(leader).await?;
    let mut reader = cluster.registry(follower).await?;
    for n in 0..20 {
        let resp = register(&mut writer, instance("api", &format!("api-{n}"), 9000 + n), 0).await?;
        let found = discover(&mut reader, "api", pb::ReadMode::MinRevision, revision(&resp.header)).await?;
        assert!(
            ids(&found).contains(&format!("api-{n}")),
            "write {n} not visible on the follower"
        );
        let lin = discover(&mut reader, "api", pb::ReadMode::Linearizable, 0).await?;
        assert_eq!(lin.instances.len(), n as usize + 1, "linearizable read after write {n}");
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_apply_each_write_without_waiting_for_the_next_heartbeat() -> Result<()> {
    init_tracing();
    // Heartbeats far apart: a follower that learned a commit index only from the next
    // heartbeat (or the next write) would miss the bound below. The leader's own disk
    // may finish an entry after a follower acknowledged it; the commit index it then
    // holds back must still reach the followers once its disk has the entry.
    let heartbeat = Duration::from_secs(2);
    let cluster = TestCluster::start_with(3, |c| {
        c.raft.heartbeat = heartbeat;
        c.raft.election_min = Duration::from_secs(7);
        c.raft.election_max = Duration::from_secs(9);
    })
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let mut writer = cluster.registry(leader).await?;
    let mut readers = Vec::new();
    for id in cluster.running().into_iter().filter(|id| *id != leader) {
        readers.push((id, cluster.registry(id).await?));
    }
    for n in 0..200 {
        let resp = register(&mut writer, instance("ticks", &format!("tick-{n}"), 7000 + n), 0).await?;
        let rev = revision(&resp.header);
        for (id, reader) in &mut readers {
            let found = tokio::time::timeout(
                heartbeat * 3 / 4,
                discover(reader, "ticks", pb::ReadMode::MinRevision, rev),
            )
            .await
            .with_context(|| {
                let nodes: Vec<String> = cluster
                    .running()
                    .into_iter()
                    .map(|id| {
                        let s = cluster.status(id);
                        format!(
                            "node {id}: {} log {} commit {} applied {} revision {}",
                            s.role, s.last_log_index, s.commit_index, s.applied_index, s.revision
                        )
                    })
                    .collect();
                format!(
                    "node {id} applied write {n} (revision {rev}) only with a later message; {}; \
                         the leader resent {} held commit indexes",
                    nodes.join("; "),
                    cluster.metric(leader, "muster_held_commits_resent_total")
                )
            })??;
            assert!(revision(&found.header) >= rev);
        }
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_input_is_refused_naming_the_field_and_the_node_keeps_serving() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let mut client = cluster.registry(1).await?;
    let err = register(&mut client, instance("Bad_Name", "x", 80), 0)
        .await
        .unwrap_err();
    let status = err.downcast::<tonic::Status>()?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("service"), "{}", status.message());
    let err = register(&mut client, instance("web", "x", 70_000), 0)
        .await
        .unwrap_err();
    assert!(err.downcast::<tonic::Status>()?.message().contains("port"));
    let err = client
        .keep_alive(tokio_stream::iter(vec![pb::KeepAliveRequest { lease_id: 424242 }]))
        .await?
        .into_inner()
        .next()
        .await
        .unwrap()?;
    assert_eq!(err.ttl_ms, 0, "an unknown lease reports ttl 0");
    let status = client
        .revoke_lease(pb::RevokeLeaseRequest { lease_id: 424242 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let mut big = instance("web", "big", 80);
    big.metadata.insert("blob".into(), "x".repeat(5 * 1024 * 1024));
    let status = client
        .register(pb::RegisterRequest {
            instance: Some(big),
            ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument
        ),
        "{status:?}"
    );
    // Still serving.
    register(&mut client, instance("web", "ok", 80), 0).await?;
    cluster.shutdown().await;
    Ok(())
}

fn event_of(resp: pb::WatchResponse) -> Option<pb::Event> {
    match resp.response {
        Some(pb::watch_response::Response::Event(e)) => Some(e),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_from_a_revision_replays_exactly_the_missed_events() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let mut client = cluster.registry(1).await?;
    register(&mut client, instance("db", "a", 5432), 0).await?;
    let b = register(&mut client, instance("db", "b", 5432), 0).await?;
    register(&mut client, instance("other", "x", 1), 0).await?;
    register(&mut client, instance("db", "c", 5432), 0).await?;
    client
        .deregister(pb::DeregisterRequest {
            service: "db".into(),
            instance_id: "b".into(),
            ..Default::default()
        })
        .await?;
    let from = revision(&b.header);
    let follower = cluster.follower().await?;
    let mut watcher = cluster.registry(follower).await?;
    // The follower may still be applying: wait until it has everything.
    discover(&mut watcher, "db", pb::ReadMode::MinRevision, from + 3).await?;
    let mut stream = watcher
        .watch(pb::WatchRequest {
            service: "db".into(),
            start_revision: from,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await?
            .unwrap()?;
        if let Some(e) = event_of(msg) {
            let what = match e.kind.unwrap() {
                pb::event::Kind::Put(i) => format!("put {}", i.instance_id),
                pb::event::Kind::Delete(d) => format!("delete {}", d.key.unwrap().instance_id),
            };
            seen.push((e.revision, what));
        }
    }
    assert_eq!(
        seen,
        vec![
            (from, "put b".to_string()),
            (from + 2, "put c".to_string()),
            (from + 3, "delete b".to_string())
        ]
    );
    // Live events follow the replay.
    register(&mut client, instance("db", "d", 5432), 0).await?;
    let next = loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await?
            .unwrap()?;
        if let Some(e) = event_of(msg) {
            break e;
        }
    };
    assert_eq!(next.revision, from + 4);

    // A client that goes away does not leave its watcher behind.
    let core = cluster.nodes[&follower]
        .handle
        .as_ref()
        .context("the follower runs")?
        .core()
        .clone();
    assert_eq!(core.metrics.watchers.get(), 1);
    drop(stream);
    eventually(Duration::from_secs(5), "the watcher to end", || {
        let core = core.clone();
        async move { Ok(core.metrics.watchers.get() == 0) }
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_sharing_a_connection_or_not_all_get_each_change_and_end_when_the_node_stops() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let mut writer = cluster.registry(1).await?;
    let follower = cluster.follower().await?;
    // Three streams on one connection (one wake group), one on a connection of its own.
    let shared = cluster.registry(follower).await?;
    let own = cluster.registry(follower).await?;
    let mut streams = Vec::new();
    for mut client in [shared.clone(), shared.clone(), shared, own] {
        let stream = client
            .watch(pb::WatchRequest {
                service: "fan".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        streams.push(stream);
    }
    let core = cluster.nodes[&follower]
        .handle
        .as_ref()
        .context("the follower runs")?
        .core()
        .clone();
    eventually(Duration::from_secs(5), "every watcher to start", || {
        let core = core.clone();
        async move { Ok(core.metrics.watchers.get() == 4) }
    })
    .await?;
    assert_eq!(
        core.hub.connections(),
        2,
        "watchers are grouped by their client connection"
    );
    let mut written = Vec::new();
    for n in 0..3 {
        let resp = register(&mut writer, instance("fan", &format!("f-{n}"), 80), 0).await?;
        written.push(revision(&resp.header));
    }
    for stream in &mut streams {
        let mut seen = Vec::new();
        while seen.len() < written.len() {
            let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await?
                .context("stream ended early")??;
            if let Some(e) = event_of(msg) {
                seen.push(e.revision);
            }
        }
        assert_eq!(seen, written, "each watcher gets every change, in order");
    }

    // Stopping the node ends every open stream, and the stop is not held up by them.
    tokio::time::timeout(Duration::from_secs(10), cluster.stop(follower)).await?;
    for stream in &mut streams {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return,
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the stream ends when its node stops");
    }
    assert_eq!(core.metrics.watchers.get(), 0);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_that_falls_behind_gets_a_reset_and_ends_with_the_right_state() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start_with(3, |c| c.watch.queue = 16).await?;
    let mut client = cluster.registry(1).await?;
    let mut watcher = cluster.registry(2).await?;
    let mut stream = watcher
        .watch(pb::WatchRequest {
            service: "busy".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    // Write far more than the watcher's queue and the transport's buffers (~4 KiB
    // per event) while it is not reading.
    let mut last = 0;
    for n in 0..800u32 {
        let mut inst = instance("busy", &format!("b-{}", n % 120), 1000 + n);
        inst.metadata.insert("pad".into(), "x".repeat(4000));
        let resp = register(&mut client, inst, 0).await?;
        last = revision(&resp.header);
        if n % 7 == 0 {
            let resp = client
                .deregister(pb::DeregisterRequest {
                    service: "busy".into(),
                    instance_id: format!("b-{}", n % 120),
                    ..Default::default()
                })
                .await?
                .into_inner();
            last = revision(&resp.header);
        }
    }
    let mut state: BTreeMap<String, u32> = BTreeMap::new();
    let mut resets = 0;
    let mut at = 0;
    while at < last {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await?
            .unwrap()?;
        match msg.response.unwrap() {
            pb::watch_response::Response::Event(e) => {
                assert!(e.revision > at, "events arrive in revision order");
                at = e.revision;
                match e.kind.unwrap() {
                    pb::event::Kind::Put(i) => {
                        state.insert(i.instance_id, i.port);
                    }
                    pb::event::Kind::Delete(d) => {
                        state.remove(&d.key.unwrap().instance_id);
                    }
                }
            }
            pb::watch_response::Response::Reset(r) => {
                resets += 1;
                at = r.revision;
                state = r.instances.into_iter().map(|i| (i.instance_id, i.port)).collect();
            }
            pb::watch_response::Response::Progress(p) => at = at.max(p.revision),
        }
    }
    assert!(resets >= 1, "the watcher fell behind, so it must have been reset");
    let truth = discover(&mut watcher, "busy", pb::ReadMode::MinRevision, last).await?;
    let expected: BTreeMap<String, u32> = truth.instances.into_iter().map(|i| (i.instance_id, i.port)).collect();
    assert_eq!(state, expected);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_expire_when_keep_alives_stop() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let follower = cluster.follower().await?;
    let mut client = cluster.registry(follower).await?;
    let resp = register(&mut client, instance("ephemeral", "e-1", 80), 1_000).await?;
    assert!(resp.lease_id > 0);
    let mut watch = client
        .watch(pb::WatchRequest {
            service: "ephemeral".into(),
            start_revision: revision(&resp.header),
            ..Default::default()
        })
        .await?
        .into_inner();
    let reason = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await?
            .unwrap()?;
        if let Some(pb::Event {
            kind: Some(pb::event::Kind::Delete(d)),
            ..
        }) = event_of(msg)
        {
            break d.reason;
        }
    };
    assert_eq!(reason, pb::DeleteReason::LeaseExpired as i32);
    for id in cluster.running() {
        let mut c = cluster.registry(id).await?;
        eventually(Duration::from_secs(5), "expiry applied everywhere", || {
            let mut c = c.clone();
            async move {
                Ok(discover(&mut c, "ephemeral", pb::ReadMode::Local, 0)
                    .await?
                    .instances
                    .is_empty())
            }
        })
        .await?;
        let _ = &mut c;
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_kept_alive_do_not_expire_across_a_leader_change() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let survivor = cluster.follower().await?;
    let mut client = cluster.registry(survivor).await?;
    let resp = register(&mut client, instance("kept", "k-1", 80), 2_000).await?;
    let lease = resp.lease_id;
    let start = revision(&resp.header);
    let stop = tokio_util_token();
    let keeper = {
        let mut c = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = async {
                    let mut s = c
                        .keep_alive(tokio_stream::iter(vec![pb::KeepAliveRequest { lease_id: lease }]))
                        .await?
                        .into_inner();
                    Ok::<_, tonic::Status>(s.next().await.transpose()?.map(|r| r.ttl_ms))
                }
                .await;
                match reply {
                    Ok(Some(ttl)) => assert!(ttl > 0, "lease reported gone while kept alive"),
                    _ => failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            failures
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.stop(leader).await;
    let new_leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    assert_ne!(new_leader, leader);
    // Two full TTLs under the new leader.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    keeper.await?;
    let found = discover(&mut client, "kept", pb::ReadMode::Linearizable, 0).await?;
    assert_eq!(ids(&found), BTreeSet::from(["k-1".to_string()]));
    // No delete event at all since registration.
    let mut watch = client
        .watch(pb::WatchRequest {
            service: "kept".into(),
            start_revision: start + 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), watch.next()).await {
        assert!(event_of(msg?).is_none(), "no change to the kept instance");
    }
    cluster.shutdown().await;
    Ok(())
}

fn tokio_util_token() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_leader_is_replaced_and_no_acknowledged_write_is_lost() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let survivor = cluster.follower().await?;
    let client = cluster.registry(survivor).await?;
    let writer = {
        let mut c = client.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in 0..150u32 {
                let id = format!("w-{n}");
                if register(&mut c, instance("ledger", &id, 80), 0).await.is_ok() {
                    acked.push(id);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    cluster.stop(leader).await;
    let new_leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    assert_ne!(new_leader, leader);
    let acked = writer.await?;
    assert!(
        acked.len() > 100,
        "writes resumed on the new leader ({} acked)",
        acked.len()
    );
    cluster.restart(leader).await?;
    cluster.wait_for_same_digest(Duration::from_secs(15)).await?;
    for id in cluster.running() {
        let mut c = cluster.registry(id).await?;
        let found = ids(&discover(&mut c, "ledger", pb::ReadMode::Local, 0).await?);
        for a in &acked {
            assert!(found.contains(a), "acknowledged {a} missing on node {id}");
        }
    }
    cluster.shutdown().await;
    Ok(())
}

/// A follower that forwards a write to a leader that has just stopped gets no
/// answer, sends the write again (same number in its forwarding session) until the
/// next leader takes it, and counts each repeat in
/// `muster_forwarded_write_retries_total`; the write is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_forwarded_to_a_stopped_leader_is_retried_on_the_next_and_counted() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let mut client = cluster.registry(follower).await?;
    // Forwarded and answered at once: nothing to repeat.
    register(&mut client, instance("relay", "before", 80), 0).await?;
    let retries = |cluster: &TestCluster| cluster.metric(follower, "muster_forwarded_write_retries_total");
    assert_eq!(retries(&cluster), 0.0);

    // The follower still takes the stopped node for its leader for an election
    // timeout or more, so the write goes there first.
    cluster.stop(leader).await;
    let written = register(&mut client, instance("relay", "after", 81), 0).await?;
    assert_ne!(cluster.wait_for_leader(Duration::from_secs(10)).await?, leader);
    assert!(retries(&cluster) >= 1.0, "the write was not repeated");

    let read = discover(&mut client, "relay", pb::ReadMode::Linearizable, 0).await?;
    let after = read
        .instances
        .iter()
        .find(|i| i.instance_id == "after")
        .context("the repeated write is on the follower")?;
    assert_eq!(
        after.create_revision, after.mod_revision,
        "the repeated write was applied more than once"
    );
    assert_eq!(after.mod_revision, revision(&written.header));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_without_a_quorum_gets_unavailable_with_a_retry_hint() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let survivor = cluster.follower().await?;
    for id in cluster.running() {
        if id != survivor {
            cluster.stop(id).await;
        }
    }
    let _ = leader;
    let mut client = cluster.registry(survivor).await?;
    let err = register(&mut client, instance("web", "lonely", 80), 0)
        .await
        .unwrap_err();
    let status = err.downcast::<tonic::Status>()?;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.metadata().get("retry-after-ms").is_some(), "retry hint present");
    // Reads still answer from memory, saying the leader is gone or stale.
    let found = discover(&mut client, "web", pb::ReadMode::Local, 0).await?;
    let h = found.header.unwrap();
    assert!(!h.leader_known || h.ms_since_leader_contact > 0);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_as_a_learner_is_promoted_and_serves_the_same_state() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let mut client = cluster.registry(1).await?;
    for n in 0..10 {
        register(&mut client, instance("pre", &format!("p-{n}"), 80), 0).await?;
    }
    cluster.add_joining_node(4, 2).await?;
    let mut admin = cluster.cluster(3).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let members = admin.members(pb::MembersRequest {}).await?.into_inner().members;
        if members.iter().any(|m| m.node_id == 4) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node 4 never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.promote(pb::PromoteRequest { node_id: 4 }).await?;
    let members = admin.members(pb::MembersRequest {}).await?.into_inner().members;
    assert!(members.iter().any(|m| m.node_id == 4 && m.voter), "{members:?}");
    cluster.wait_for_same_digest(Duration::from_secs(15)).await?;
    // The joined node took the cluster's id from the node it joined through, recorded
    // it and reports it.
    let cluster_id = |id: u64| cluster.nodes[&id].handle.as_ref().and_then(|h| h.core().cluster.id());
    assert!(cluster_id(1).is_some());
    assert_eq!(cluster_id(4), cluster_id(1));
    let reported = cluster
        .cluster(4)
        .await?
        .status(pb::StatusRequest {})
        .await?
        .into_inner()
        .cluster_id;
    assert_eq!(
        Some(reported.as_str()),
        cluster_id(1).map(muster_server::identity::format_cluster_id).as_deref()
    );
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cluster.nodes[&4].config.data_dir.join("identity.json"))?)?;
    assert_eq!(
        recorded["cluster_id"].as_str(),
        cluster_id(1).map(muster_server::identity::format_cluster_id).as_deref()
    );
    let mut c4 = cluster.registry(4).await?;
    assert_eq!(
        discover(&mut c4, "pre", pb::ReadMode::Local, 0).await?.instances.len(),
        10
    );
    // Removing it again works too.
    admin.remove_member(pb::RemoveMemberRequest { node_id: 4 }).await?;
    let members = admin.members(pb::MembersRequest {}).await?.into_inner().members;
    assert!(!members.iter().any(|m| m.node_id == 4));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_linearizable_reads_on_a_follower_all_see_a_completed_write() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let mut writer = cluster.registry(leader).await?;
    let reader = cluster.registry(follower).await?;
    for round in 0..5u32 {
        register(&mut writer, instance("lin", &format!("l-{round}"), 80), 0).await?;
        // Many readers at once share read-index rounds; each must see the write.
        let mut reads = Vec::new();
        for _ in 0..50 {
            let mut c = reader.clone();
            reads.push(tokio::spawn(async move {
                discover(&mut c, "lin", pb::ReadMode::Linearizable, 0)
                    .await
                    .map(|r| r.instances.len())
            }));
        }
        for r in reads {
            assert_eq!(
                r.await??,
                round as usize + 1,
                "a linearizable read missed a completed write"
            );
        }
    }
    cluster.shutdown().await;
    Ok(())
}

/// A leader that a quorum accepted within its lease gives read indexes without a
/// heartbeat round; cut off from its followers it stops once the lease runs out,
/// and its linearizable reads fail instead of answering from a stale state.
/// (Followers ask for each read index here: their read leases are off.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_reads_from_its_lease_only_while_a_quorum_accepts_it() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start_with(3, |c| c.raft.follower_read_leases = false).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let mut writer = cluster.registry(leader).await?;
    let mut reader = cluster.registry(follower).await?;
    let mut on_leader = cluster.registry(leader).await?;
    let lease_reads = |cluster: &TestCluster| cluster.metric(leader, "muster_lease_reads_total");
    let before = lease_reads(&cluster);
    for n in 0..5u32 {
        register(&mut writer, instance("leased", &format!("l-{n}"), 80), 0).await?;
        let seen = discover(&mut reader, "leased", pb::ReadMode::Linearizable, 0).await?;
        assert_eq!(
            seen.instances.len(),
            n as usize + 1,
            "the follower's read missed a write"
        );
        let seen = discover(&mut on_leader, "leased", pb::ReadMode::Linearizable, 0).await?;
        assert_eq!(seen.instances.len(), n as usize + 1, "the leader's read missed a write");
    }
    assert!(
        lease_reads(&cluster) >= before + 10.0,
        "the leader gave read indexes from its lease"
    );
    // One reader at a time: five read indexes, each serving one of the five reads.
    assert_eq!(
        cluster.metric(follower, "muster_read_index_batch_size_count"),
        5.0,
        "the follower counts the read indexes it obtained"
    );
    assert_eq!(
        cluster.metric(follower, "muster_read_index_batch_size_sum"),
        5.0,
        "and the readers they served"
    );

    // Without its followers the lease runs out and no read is answered.
    for id in cluster.running() {
        if id != leader {
            cluster.stop(id).await;
        }
    }
    let mut on_leader = cluster.registry(leader).await?;
    eventually(
        Duration::from_secs(20),
        "a leader without a quorum refuses linearizable reads",
        || {
            let mut c = on_leader.clone();
            async move { Ok(discover(&mut c, "leased", pb::ReadMode::Linearizable, 0).await.is_err()) }
        },
    )
    .await?;
    let after = lease_reads(&cluster);
    assert!(discover(&mut on_leader, "leased", pb::ReadMode::Linearizable, 0)
        .await
        .is_err());
    assert_eq!(lease_reads(&cluster), after, "no lease read once the quorum is gone");
    cluster.shutdown().await;
    Ok(())
}

/// A restarted node may have accepted a leader just before it stopped and forgot
/// when, so for an election timeout after it starts it refuses votes (the leader
/// lease of the current leader relies on that promise); afterwards it votes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_refuses_votes_for_an_election_timeout() -> Result<()> {
    use muster_proto::v1::peer::raft_peer_client::RaftPeerClient;
    use muster_proto::v1::peer::PeerMessage;
    init_tracing();
    // A window long enough that the first request surely falls inside it.
    let election_max = Duration::from_secs(10);
    let mut cluster = TestCluster::start_with(3, |c| {
        c.raft.election_min = Duration::from_secs(1);
        c.raft.election_max = election_max;
    })
    .await?;
    cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let follower = cluster.follower().await?;
    cluster.stop(follower).await;
    // Taken before the restart: the node's window starts after this, so a request
    // sent within `election_max` of it is inside the window, and the node cannot
    // vote again sooner than `election_max` after it.
    let restarted = tokio::time::Instant::now();
    cluster.restart(follower).await?;
    let peer_addr = cluster.nodes[&follower].config.peer_addr;
    let mut peer = RaftPeerClient::connect(format!("http://{peer_addr}")).await?;
    let vote_request = || -> Result<PeerMessage> {
        let request = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(1_000, 99), None);
        Ok(PeerMessage {
            data: bincode::serialize(&request)?,
        })
    };
    let refused = peer.vote(vote_request()?).await;
    assert!(restarted.elapsed() < election_max, "the check ran inside the window");
    let status = refused.expect_err("a node restarted moments ago must not vote");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("not voting"), "{}", status.message());

    // Once the window has passed it answers vote requests again.
    eventually(Duration::from_secs(30), "the restarted node votes again", || {
        let mut peer = peer.clone();
        let message = vote_request();
        async move { Ok(peer.vote(message?).await.is_ok()) }
    })
    .await?;
    assert!(restarted.elapsed() >= election_max);
    cluster.shutdown().await;
    Ok(())
}

/// A write that finds nothing queued and a slot free is proposed by its own
/// request, not handed to the write batcher's task (two task hand-offs fewer on the
/// path of every write at low load).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_write_at_a_time_is_proposed_alone_and_never_batched() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let counts = || {
        (
            cluster.metric(leader, "muster_lone_writes_total"),
            cluster.metric(leader, "muster_write_batch_size_count"),
        )
    };
    let (lone_before, batches_before) = counts();
    let mut client = cluster.registry(leader).await?;
    for n in 0..20 {
        register(&mut client, instance("solo", &format!("s-{n}"), 80), 0).await?;
    }
    let (lone_after, batches_after) = counts();
    assert!(
        lone_after - lone_before >= 20.0,
        "{} of 20 writes proposed alone",
        lone_after - lone_before
    );
    assert_eq!(batches_after, batches_before, "a write one at a time was batched");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_raft_entries_and_each_gets_its_own_answer() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    // Through the leader and through a follower (forwarded), with leases and
    // one invalid write among them, all released at once.
    let (to_leader, to_follower) = (cluster.registry(leader).await?, cluster.registry(follower).await?);
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(300));
    let mut writes = Vec::new();
    for n in 0..300u32 {
        let mut client = if n % 2 == 0 {
            to_leader.clone()
        } else {
            to_follower.clone()
        };
        let start = start.clone();
        let port = if n == 150 { 0 } else { 1000 + n };
        writes.push(tokio::spawn(async move {
            start.wait().await;
            register(&mut client, instance("batch", &format!("b-{n}"), port), 5_000).await
        }));
    }
    let mut revisions = BTreeSet::new();
    let mut leases = BTreeSet::new();
    for (n, write) in writes.into_iter().enumerate() {
        match write.await? {
            Ok(answer) => {
                let stored = answer.instance.expect("the stored instance");
                assert_eq!(
                    stored.instance_id,
                    format!("b-{n}"),
                    "each writer gets its own instance back"
                );
                assert!(revisions.insert(stored.mod_revision), "a revision given to two writes");
                assert!(
                    revision(&answer.header) >= stored.mod_revision,
                    "read-your-writes on the answering node"
                );
                assert!(leases.insert(answer.lease_id), "a lease granted twice");
            }
            Err(e) => {
                assert_eq!(n, 150, "only the invalid write fails: {e}");
                assert!(e.to_string().contains("port"), "{e}");
            }
        }
    }
    assert_eq!(revisions.len(), 299);
    let mut reader = cluster.registry(follower).await?;
    let read = discover(&mut reader, "batch", pb::ReadMode::Linearizable, 0).await?;
    assert_eq!(read.instances.len(), 299);
    // 300 writes released together outrun the 4 entries in flight: the leader
    // proposed some of them as batches.
    let metrics = reqwest::get(format!("http://{}/metrics", cluster.nodes[&leader].config.http_addr))
        .await?
        .text()
        .await?;
    let batches: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("muster_write_batch_size_count ")?.trim().parse().ok())
        .unwrap_or(0);
    assert!(batches > 0, "no write was batched");
    cluster.wait_for_same_digest(Duration::from_secs(10)).await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_writes_still_lead_to_snapshots() -> Result<()> {
    init_tracing();
    // Many revisions in few entries: openraft's count of entries would not
    // snapshot before entry 1,000; the count of revisions does.
    let cluster = TestCluster::start_with(3, |c| c.raft.snapshot_every = 1_000).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let client = cluster.registry(leader).await?;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(1_200));
    let mut writes = Vec::new();
    for n in 0..1_200u32 {
        let mut client = client.clone();
        let start = start.clone();
        writes.push(tokio::spawn(async move {
            start.wait().await;
            register(&mut client, instance("snap", &format!("s-{n}"), 1000 + n), 0).await
        }));
    }
    for write in writes {
        write.await??;
    }
    let core = cluster.nodes[&leader]
        .handle
        .as_ref()
        .expect("leader runs")
        .core()
        .clone();
    eventually(Duration::from_secs(15), "a snapshot on the leader", || {
        let core = core.clone();
        async move { Ok(core.raft.metrics().borrow().snapshot.is_some()) }
    })
    .await?;
    let metrics = core.raft.metrics().borrow().clone();
    let snapshot = metrics.snapshot.map_or(0, |l| l.index);
    assert!(
        snapshot < 1_000,
        "snapshot at entry {snapshot}: by entry count, not revisions (last log {:?})",
        metrics.last_log_index
    );
    cluster.shutdown().await;
    Ok(())
}

/// A Discover at an unchanged service revision reuses the instances encoded for an
/// earlier read; every change to the service (a registration, an update, a
/// deregistration, a lease expiry) is in the next answer, and each filter gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discover_answers_are_reused_until_the_service_changes() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let hits = || cluster.metric(leader, "muster_discover_cache_hits_total");
    let mut client = cluster.registry(leader).await?;
    let read = |tags: &[&str]| pb::DiscoverRequest {
        service: "cached".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    register(&mut client, instance("cached", "a", 8080), 0).await?;
    let mut b = instance("cached", "b", 8081);
    b.tags.push("canary".into());
    b.metadata = [("zone-hint".to_string(), "x".repeat(300))].into();
    let written = register(&mut client, b.clone(), 0).await?;

    let first = client.discover(read(&[])).await?.into_inner();
    let before = hits();
    let second = client.discover(read(&[])).await?.into_inner();
    assert_eq!(hits(), before + 1.0, "the second read reuses the first one's instances");
    assert_eq!(first.instances, second.instances);
    assert_eq!(second.service_revision, revision(&written.header));
    assert!(revision(&second.header) >= revision(&written.header));
    assert_eq!(second.header.as_ref().map(|h| h.node_id), Some(leader));
    let got_b = &second.instances[1];
    assert_eq!((got_b.port, &got_b.tags, &got_b.metadata), (8081, &b.tags, &b.metadata));
    assert_eq!(ids(&second), BTreeSet::from(["a".to_string(), "b".to_string()]));

    // A filter has an answer of its own, reused in turn.
    let canary = client.discover(read(&["canary"])).await?.into_inner();
    assert_eq!(ids(&canary), BTreeSet::from(["b".to_string()]));
    let before = hits();
    assert_eq!(
        client.discover(read(&["canary"])).await?.into_inner().instances,
        canary.instances
    );
    assert_eq!(hits(), before + 1.0);

    // An update is in the next answer of every filter.
    b.port = 9091;
    let updated = register(&mut client, b.clone(), 0).await?;
    for tags in [&[][..], &["canary"][..]] {
        let answer = client.discover(read(tags)).await?.into_inner();
        assert_eq!(answer.service_revision, revision(&updated.header));
        let got_b = answer.instances.iter().find(|i| i.instance_id == "b").context("b")?;
        assert_eq!(got_b.port, 9091);
    }

    // A registration and a deregistration.
    register(&mut client, instance("cached", "c", 8082), 0).await?;
    assert_eq!(ids(&client.discover(read(&[])).await?.into_inner()).len(), 3);
    client
        .deregister(pb::DeregisterRequest {
            service: "cached".into(),
            instance_id: "b".into(),
            ..Default::default()
        })
        .await?;
    assert!(client
        .discover(read(&["canary"]))
        .await?
        .into_inner()
        .instances
        .is_empty());
    assert_eq!(
        ids(&client.discover(read(&[])).await?.into_inner()),
        BTreeSet::from(["a".to_string(), "c".to_string()])
    );

    // A lease that expires takes its instance out of the next answer.
    register(&mut client, instance("cached", "leased", 8083), 1_000).await?;
    assert!(ids(&client.discover(read(&[])).await?.into_inner()).contains("leased"));
    eventually(
        Duration::from_secs(20),
        "the expired instance leaves the answer",
        || {
            let mut client = client.clone();
            let request = read(&[]);
            async move { Ok(!ids(&client.discover(request).await?.into_inner()).contains("leased")) }
        },
    )
    .await?;
    cluster.shutdown().await;
    Ok(())
}

/// A rolling upgrade: while one member states an older command level (here pinned
/// with `command_level`, as `--command-level 1` does), a command it could not read
/// is refused on whichever node it arrives and never reaches the log; writes it can
/// read go on. Once the member states the new level, the command goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_at_an_older_command_level_keeps_newer_commands_out_of_the_log() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start_with(3, |c| {
        if c.id == 3 {
            c.command_level = 1;
        }
    })
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let level_of = |status: pb::StatusResponse| status.command_level;
    for (node, level) in [(1, muster_core::COMMAND_LEVEL), (3, 1)] {
        let status = cluster
            .cluster(node)
            .await?
            .status(pb::StatusRequest {})
            .await?
            .into_inner();
        assert_eq!(level_of(status), level, "node {node}'s Status states its level");
    }
    register(&mut cluster.registry(1).await?, instance("up", "u-1", 80), 0).await?;
    if leader != 3 {
        let core = cluster.nodes[&leader]
            .handle
            .as_ref()
            .context("leader running")?
            .core()
            .clone();
        eventually(Duration::from_secs(5), "the leader to hear node 3's level", || {
            let known = core.member_levels.level(3);
            async move { Ok(known == Some(1)) }
        })
        .await?;
    }
    let maintenance = pb::SetMaintenanceRequest {
        service: "up".into(),
        instance_id: "u-1".into(),
        enable: true,
        reason: "drain".into(),
        ..Default::default()
    };
    for node in [1, 2, 3] {
        let refused = cluster
            .registry(node)
            .await?
            .set_maintenance(maintenance.clone())
            .await
            .expect_err("refused while node 3 states level 1");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "via node {node}: {refused:?}"
        );
        assert!(
            refused.message().contains("level 1"),
            "via node {node}: {}",
            refused.message()
        );
    }
    // Writes node 3 can read go on, and none of the refused ones is anywhere.
    register(&mut cluster.registry(3).await?, instance("up", "u-2", 80), 0).await?;
    cluster.wait_for_same_digest(Duration::from_secs(10)).await?;
    for node in [1, 2, 3] {
        let found = discover(&mut cluster.registry(node).await?, "up", pb::ReadMode::Local, 0).await?;
        assert_eq!(ids(&found), BTreeSet::from(["u-1".to_string(), "u-2".to_string()]));
        assert!(found.instances.iter().all(|i| i.maintenance.is_none()), "node {node}");
    }

    // Node 3 upgraded: restarted stating this build's level.
    cluster.stop(3).await;
    cluster.nodes.get_mut(&3).context("node 3")?.config.command_level = muster_core::COMMAND_LEVEL;
    cluster.restart(3).await?;
    cluster.wait_for_leader(Duration::from_secs(10)).await?;
    assert_eq!(cluster.status(3).command_level, muster_core::COMMAND_LEVEL);
    let client = cluster.registry(1).await?;
    eventually(
        Duration::from_secs(10),
        "maintenance accepted after the upgrade",
        || {
            let mut client = client.clone();
            let request = maintenance.clone();
            async move { Ok(client.set_maintenance(request).await.is_ok()) }
        },
    )
    .await?;
    cluster.wait_for_same_digest(Duration::from_secs(10)).await?;
    let found = discover(&mut cluster.registry(3).await?, "up", pb::ReadMode::Local, 0).await?;
    let drained = found.instances.iter().find(|i| i.instance_id == "u-1").context("u-1")?;
    assert_eq!(drained.maintenance.as_ref().map(|m| m.reason.as_str()), Some("drain"));
    cluster.shutdown().await;
    Ok(())
}
