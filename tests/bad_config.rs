//! A node given another node's or another cluster's data, or a reused id, refuses
//! to start (or to join) with a message that says what is wrong.

use std::time::Duration;

use anyhow::Result;
use muster_proto::v1 as pb;
use muster_server::{Listeners, Node};
use muster_testkit::{init_tracing, TestCluster};

async fn loopback_listeners() -> Result<Listeners> {
    Ok(Listeners::bind_addrs("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_refuses_another_nodes_or_another_clusters_data() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    cluster.stop(2).await;
    let original = cluster.nodes[&2].config.clone();

    // Node 3's id on node 2's directory.
    let mut wrong_id = original.clone();
    wrong_id.id = 3;
    wrong_id.initial_cluster = original.initial_cluster.clone();
    let err = Node::start(wrong_id, loopback_listeners().await?)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("holds the data of node 2"), "{err}");

    // A peer list naming other addresses: another cluster's directory.
    let mut other_cluster = original.clone();
    for addr in other_cluster.initial_cluster.values_mut() {
        *addr = "10.99.0.1:7300".into();
    }
    let err = Node::start(other_cluster, loopback_listeners().await?)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("contradicts the cluster"), "{err}");

    // A directory with foreign files in it.
    let foreign = tempfile::tempdir()?;
    std::fs::write(foreign.path().join("something"), b"not muster")?;
    let mut config = original.clone();
    config.data_dir = foreign.path().to_path_buf();
    let err = Node::start(config, loopback_listeners().await?)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not written by a Muster node"), "{err}");

    // The right configuration still starts, with nothing lost.
    cluster.restart(2).await?;
    cluster.wait_for_same_digest(Duration::from_secs(15)).await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_with_an_id_already_in_use_is_refused() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let mut admin = cluster.cluster(1).await?;
    let status = admin
        .add_learner(pb::AddLearnerRequest {
            node_id: 2,
            peer_addr: "127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("already used"), "{}", status.message());
    let members = admin.members(pb::MembersRequest {}).await?.into_inner().members;
    assert_eq!(members.len(), 3, "membership unchanged");
    cluster.shutdown().await;
    Ok(())
}
