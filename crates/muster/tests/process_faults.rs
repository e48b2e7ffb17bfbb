//! Three `muster server` processes: kill -9 the leader during writes, and restart it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use muster_proto::v1 as pb;
use muster_testkit::process::ProcessCluster;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_during_writes_loses_nothing_and_the_node_catches_up() -> Result<()> {
    let mut cluster = ProcessCluster::start(bin(), 3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let survivor = cluster.running().into_iter().find(|id| *id != leader).unwrap();

    // How long a registration takes to be visible on all three nodes.
    let mut client = cluster.registry(survivor).await?;
    let t = Instant::now();
    client
        .register(pb::RegisterRequest {
            instance: Some(instance("probe")),
            ttl_ms: 0,
        })
        .await?;
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
        client
            .register(pb::RegisterRequest {
                instance: Some(instance(&format!("t-{n}"))),
                ttl_ms: 0,
            })
            .await?;
    }
    let digest = cluster.wait_for_same_digest(Duration::from_secs(10)).await?;
    let status = cluster.terminate(2)?;
    assert!(status.success(), "graceful exit, got {status:?}");
    cluster.restart(2)?;
    cluster.wait_for_leader(Duration::from_secs(20)).await?;
    assert_eq!(cluster.wait_for_same_digest(Duration::from_secs(20)).await?, digest);
    Ok(())
}
