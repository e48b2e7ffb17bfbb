//! Three `muster server` processes: kill -9 the leader during writes, and restart it;
//! SIGTERM, SIGSTOP, and the `cluster status` they show.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use muster_proto::v1 as pb;
use muster_proto::v1::registry_client::RegistryClient;
use muster_testkit::process::ProcessCluster;
use tonic::transport::Channel;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_muster"))
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

/// Registers `id` in `orders`, without a lease, through `client`.
async fn register(client: &mut RegistryClient<Channel>, id: &str) -> Result<()> {
    client
        .register(pb::RegisterRequest {
            instance: Some(instance(id)),
            ttl_ms: 0,
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_during_writes_loses_nothing_and_the_node_catches_up() -> Result<()> {
    let mut cluster = ProcessCluster::start(bin(), 3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let survivor = cluster.running().into_iter().find(|id| *id != leader).unwrap();

    // How long a registration takes to be visible on all three nodes.
    let mut client = cluster.registry(survivor).await?;
    let t = Instant::now();
    register(&mut client, "probe").await?;
    for id in cluster.running() {
        let mut c = cluster.registry(id).await?;
        loop {
            let found = c
                .discover(pb::DiscoverRequest {
                    service: "orders".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if !found.instances.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    eprintln!(
        "figure: registration visible on all three nodes after {:?}",
        t.elapsed()
    );

    // A steady writer through a node that survives; every acknowledged id is kept.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let failures = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, failures, stop) = (acked.clone(), failures.clone(), stop.clone());
        let mut c = client.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("o-{n}");
                n += 1;
                match c
                    .register(pb::RegisterRequest {
                        instance: Some(instance(&id)),
                        ttl_ms: 0,
                    })
                    .await
                {
                    Ok(_) => acked.lock().unwrap().push(id),
                    Err(_) => failures.lock().unwrap().push(Instant::now()),
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = acked.lock().unwrap().len();
    let killed_at = Instant::now();
    cluster.kill9(leader)?;
    let new_leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    eprintln!(
        "figure: new leader {new_leader} agreed by the survivors {:?} after kill -9",
        killed_at.elapsed()
    );
    assert_ne!(new_leader, leader);
    // Writes resume.
    let resumed = loop {
        let n = acked.lock().unwrap().len();
        if n > before + 50 {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < Duration::from_secs(20), "writes did not resume");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("figure: 50 writes acknowledged again {resumed:?} after the kill");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await?;

    cluster.restart(leader)?;
    let digest = cluster.wait_for_same_digest(Duration::from_secs(30)).await?;
    eprintln!(
        "figure: {} writes acknowledged, all nodes at digest {}",
        acked.lock().unwrap().len(),
        &digest[..12]
    );
    let acked: Vec<String> = acked.lock().unwrap().clone();
    for id in cluster.running() {
        let mut c = cluster.registry(id).await?;
        let found: BTreeSet<String> = c
            .discover(pb::DiscoverRequest {
                service: "orders".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .instances
            .into_iter()
            .map(|i| i.instance_id)
            .collect();
        for a in &acked {
            assert!(found.contains(a), "acknowledged {a} missing on node {id}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_a_node_cleanly_and_it_restarts_with_its_data() -> Result<()> {
    let mut cluster = ProcessCluster::start(bin(), 3).await?;
    let mut client = cluster.registry(1).await?;
    for n in 0..20 {
        register(&mut client, &format!("t-{n}")).await?;
    }
    let digest = cluster.wait_for_same_digest(Duration::from_secs(10)).await?;
    let status = cluster.terminate(2)?;
    assert!(status.success(), "graceful exit, got {status:?}");
    cluster.restart(2)?;
    cluster.wait_for_leader(Duration::from_secs(20)).await?;
    assert_eq!(cluster.wait_for_same_digest(Duration::from_secs(20)).await?, digest);

    // `cluster status` lists every node with the one cluster id they share.
    let addrs: Vec<String> = (1..=3)
        .map(|id| cluster.grpc_addr(id).map(|a| a.to_string()))
        .collect::<Result<_>>()?;
    let out = std::process::Command::new(bin())
        .args(["--addr", &addrs.join(","), "cluster", "status"])
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().map(|h| h.split_whitespace().collect()).unwrap_or_default();
    let column = header
        .iter()
        .position(|c| *c == "CLUSTER")
        .context("a CLUSTER column")?;
    let ids: BTreeSet<&str> = lines.filter_map(|row| row.split_whitespace().nth(column)).collect();
    assert_eq!(ids.len(), 1, "{table}");
    assert!(
        ids.iter()
            .all(|id| id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit())),
        "{table}"
    );
    assert_eq!(table.lines().count(), 4, "a header and one row per node: {table}");
    Ok(())
}

/// A leader whose followers both stop answering for a moment (SIGSTOP) keeps
/// running its read index round instead of failing linearizable reads, for up to
/// an election timeout, and answers them once one follower is back (SIGCONT).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_linearizable_read_waits_out_followers_that_miss_a_read_index_round() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use muster_testkit::eventually;
    use muster_testkit::process::ClusterOptions;
    use nix::sys::signal::Signal;

    let mut options = ClusterOptions::new(3);
    // A 500 ms leader lease and a 2 s window for the rounds run again.
    options.extra_args = ["--election-timeout-min-ms", "1000", "--election-timeout-max-ms", "2000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut cluster = ProcessCluster::start_with(bin(), options).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let followers: Vec<u64> = cluster.running().into_iter().filter(|id| *id != leader).collect();
    let mut client = cluster.registry(leader).await?;
    register(&mut client, "steady").await?;
    let retries_before = cluster.metric(leader, "muster_read_index_quorum_retries_total").await?;

    for f in &followers {
        cluster.signal(*f, Signal::SIGSTOP)?;
    }
    // Linearizable reads on the leader without pause: under its lease at first, then
    // through read index rounds that no follower answers.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, mut c) = (stop.clone(), reads.clone(), client.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let found = c
                    .discover(pb::DiscoverRequest {
                        service: "orders".into(),
                        mode: pb::ReadMode::Linearizable as i32,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(found.instances.len() == 1, "a read saw {:?}", found.instances);
                reads.fetch_add(1, Ordering::SeqCst);
            }
            anyhow::Ok(())
        })
    };
    let retried = eventually(
        Duration::from_secs(10),
        "the leader runs a read index round again",
        || {
            let (cluster, reader) = (&cluster, &reader);
            async move {
                anyhow::ensure!(!reader.is_finished(), "the reader ended");
                Ok(cluster.metric(leader, "muster_read_index_quorum_retries_total").await? > retries_before)
            }
        },
    )
    .await;
    // No read is answered while both followers are stopped and the lease is over.
    let at_resume = reads.load(Ordering::SeqCst);
    cluster.signal(followers[0], Signal::SIGCONT)?;
    let answered = match retried {
        Ok(()) => {
            eventually(
                Duration::from_secs(10),
                "a read answered after the follower is back",
                || {
                    let (reads, reader) = (&reads, &reader);
                    async move { Ok(reads.load(Ordering::SeqCst) > at_resume || reader.is_finished()) }
                },
            )
            .await
        }
        Err(e) => Err(e),
    };
    stop.store(true, Ordering::Relaxed);
    cluster.signal(followers[1], Signal::SIGCONT)?;
    // The reader's own error, if it failed, says most.
    reader.await??;
    answered?;
    assert!(reads.load(Ordering::SeqCst) > at_resume);
    Ok(())
}

/// Raft calls to a follower that stops answering (SIGSTOP) are counted as missed
/// deadlines, and to one that is gone (kill -9) as unreachable, each under its
/// peer's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_calls_to_a_stopped_or_killed_follower_are_counted_by_peer_and_failure() -> Result<()> {
    use muster_testkit::eventually;
    use nix::sys::signal::Signal;

    let mut cluster = ProcessCluster::start(bin(), 3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let stopped = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let series = |peer: u64, failure: &str| {
        format!(r#"muster_peer_call_failures_total{{peer="{peer}",rpc="append",failure="{failure}"}}"#)
    };
    // Counted by whichever node leads meanwhile: summed over the running nodes.
    async fn total(cluster: &ProcessCluster, series: &str) -> Result<f64> {
        let mut sum = 0.0;
        for id in cluster.running() {
            sum += cluster.metric(id, series).await.unwrap_or(0.0);
        }
        Ok(sum)
    }

    cluster.signal(stopped, Signal::SIGSTOP)?;
    let missed = eventually(
        Duration::from_secs(10),
        "appends to the stopped follower counted as missed deadlines",
        || {
            let (cluster, series) = (&cluster, series(stopped, "deadline"));
            async move { Ok(total(cluster, &series).await? > 0.0) }
        },
    )
    .await;
    cluster.signal(stopped, Signal::SIGCONT)?;
    missed?;

    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let killed = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    cluster.kill9(killed)?;
    eventually(
        Duration::from_secs(10),
        "appends to the killed follower counted as unreachable",
        || {
            let (cluster, series) = (&cluster, series(killed, "unreachable"));
            async move { Ok(total(cluster, &series).await? > 0.0) }
        },
    )
    .await?;
    // Only failed calls are counted: appends the follower that runs answers (a
    // write needs its answer now) add no unreachable or error call to it.
    let survivor = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let before = (
        total(&cluster, &series(survivor, "unreachable")).await?,
        total(&cluster, &series(survivor, "error")).await?,
    );
    let mut client = cluster.registry(leader).await?;
    register(&mut client, "counted").await?;
    let after = (
        total(&cluster, &series(survivor, "unreachable")).await?,
        total(&cluster, &series(survivor, "error")).await?,
    );
    assert_eq!(after, before);
    Ok(())
}
