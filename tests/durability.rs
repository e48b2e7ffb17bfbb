//! Restarts, snapshots and lease edge cases on in-process clusters.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};
use muster_proto::v1 as pb;
use muster_testkit::{init_tracing, TestCluster};

fn instance(service: &str, id: &str) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "10.0.0.1".into(),
        port: 80,
        ..Default::default()
    }
}

async fn count(cluster: &TestCluster, node: u64, service: &str) -> Result<usize> {
    let mut c = cluster.registry(node).await?;
    Ok(c.discover(pb::DiscoverRequest {
        service: service.into(),
        ..Default::default()
    })
    .await?
    .into_inner()
    .instances
    .len())
}

/// The maintenance reason of one instance of `snap` as `node` serves it (empty when
/// it is not in maintenance).
async fn maintenance_reason(cluster: &TestCluster, node: u64, id: &str) -> Result<String> {
    let mut c = cluster.registry(node).await?;
    let instances = c
        .discover(pb::DiscoverRequest {
            service: "snap".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .instances;
    let Some(found) = instances.into_iter().find(|i| i.instance_id == id) else {
        bail!("{id} is not on node {node}")
    };
    Ok(found.maintenance.map(|m| m.reason).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_cluster_restart_keeps_every_registration() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let mut client = cluster.registry(1).await?;
    for n in 0..50 {
        client
            .register(pb::RegisterRequest {
                instance: Some(instance("kept", &format!("k-{n}"))),
                ttl_ms: 0,
            })
            .await?;
    }
    let before = cluster.wait_for_same_digest(Duration::from_secs(10)).await?;
    for id in [1, 2, 3] {
        cluster.stop(id).await;
    }
    for id in [1, 2, 3] {
        cluster.restart(id).await?;
    }
    cluster.wait_for_leader(Duration::from_secs(15)).await?;
    let after = cluster.wait_for_same_digest(Duration::from_secs(15)).await?;
    assert_eq!(before, after, "state after restart equals state before");
    assert_eq!(count(&cluster, 2, "kept").await?, 50);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_purged_log_catches_up_from_a_snapshot() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start_with(3, |c| {
        c.raft.snapshot_every = 40;
        c.raft.keep_behind_snapshot = 5;
    })
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let lagging = cluster.follower().await?;
    cluster.stop(lagging).await;
    let mut client = cluster.registry(leader).await?;
    for n in 0..200 {
        client
            .register(pb::RegisterRequest {
                instance: Some(instance("snap", &format!("s-{n}"))),
                ttl_ms: 0,
            })
            .await?;
    }
    client
        .set_maintenance(pb::SetMaintenanceRequest {
            service: "snap".into(),
            instance_id: "s-7".into(),
            enable: true,
            reason: "in the snapshot".into(),
            ..Default::default()
        })
        .await?;
    for n in 200..240 {
        client
            .register(pb::RegisterRequest {
                instance: Some(instance("snap", &format!("s-{n}"))),
                ttl_ms: 0,
            })
            .await?;
    }
    let status = cluster
        .cluster(leader)
        .await?
        .status(pb::StatusRequest {})
        .await?
        .into_inner();
    assert!(status.snapshot_index > 0, "the leader built a snapshot");
    cluster.restart(lagging).await?;
    cluster.wait_for_same_digest(Duration::from_secs(20)).await?;
    assert_eq!(count(&cluster, lagging, "snap").await?, 240);
    assert_eq!(maintenance_reason(&cluster, lagging, "s-7").await?, "in the snapshot");
    // And it keeps the state across its own restart (snapshot file + sled).
    cluster.stop(lagging).await;
    cluster.restart(lagging).await?;
    cluster.wait_for_same_digest(Duration::from_secs(20)).await?;
    assert_eq!(maintenance_reason(&cluster, lagging, "s-7").await?, "in the snapshot");
    cluster.shutdown().await;
    Ok(())
}

/// etcd issue 9888: with leases restarted at full TTL on every election, a dead lease
/// lives as long as elections keep coming. Checkpoints bound its life.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_elections_cannot_keep_a_dead_lease_alive() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start_with(3, |c| {
        c.leases.checkpoint_interval = Duration::from_millis(200);
    })
    .await?;
    let mut client = cluster.registry(1).await?;
    client
        .register(pb::RegisterRequest {
            instance: Some(instance("dead", "d-1")),
            ttl_ms: 4_000,
        })
        .await?;
    let started = tokio::time::Instant::now();
    // Change leaders every ~1.5 s (less than the TTL) and never renew the lease.
    loop {
        let alive: usize = {
            let running = cluster.running();
            let mut n = 0;
            for id in running {
                n = n.max(count(&cluster, id, "dead").await.unwrap_or(1));
            }
            n
        };
        if alive == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("a lease without keep-alives outlived 5 TTLs through elections");
        }
        let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        cluster.stop(leader).await;
        cluster.wait_for_leader(Duration::from_secs(10)).await?;
        cluster.restart(leader).await?;
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mass_expiry_is_rate_limited_and_drains_gradually() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start_with(3, |c| {
        c.leases.expiry_rate = 0.05;
        c.leases.expiry_floor_per_sec = 10;
    })
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let mut client = cluster.registry(leader).await?;
    for n in 0..60 {
        client
            .register(pb::RegisterRequest {
                instance: Some(instance("fleet", &format!("f-{n}"))),
                ttl_ms: 1_000,
            })
            .await?;
    }
    // All 60 leases are due at about the same time; at most 10 per second may go.
    let mut samples = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = count(&cluster, leader, "fleet").await?;
        samples.push(left);
        if left == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(samples.last(), Some(&0), "everything expires in the end: {samples:?}");
    let distinct: BTreeSet<usize> = samples.iter().copied().collect();
    assert!(
        distinct.len() >= 4,
        "the registry drained in steps, not in one tick: {samples:?}"
    );
    let throttled = cluster.metric(leader, "muster_lease_expiry_throttled_total");
    assert!(throttled > 0.0, "the rate limit engaged and was counted");
    cluster.shutdown().await;
    Ok(())
}

/// A follower that returns to an idle cluster is brought up to date without new
/// writes (with blackholed rather than refused connections this needs the leader's
/// barrier nudge; `make compose-test` covers that case with real containers).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_back_on_an_idle_cluster_catches_up_without_new_writes() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    cluster.stop(follower).await;
    let mut client = cluster.registry(leader).await?;
    for n in 0..5 {
        client
            .register(pb::RegisterRequest {
                instance: Some(instance("idle", &format!("i-{n}"))),
                ttl_ms: 0,
            })
            .await?;
    }
    // Long enough for the leader's replication to the stopped node to fail.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.restart(follower).await?;
    // No writes from here on.
    cluster.wait_for_same_digest(Duration::from_secs(15)).await?;
    assert_eq!(count(&cluster, follower, "idle").await?, 5);
    cluster.shutdown().await;
    Ok(())
}
