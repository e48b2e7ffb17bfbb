//! A node started with `--join` asks an existing node to add it as a learner.

use std::sync::Arc;
use std::time::Duration;

use muster_proto::v1::cluster_client::ClusterClient;
use muster_proto::v1::AddLearnerRequest;

use crate::node::NodeCore;

/// Retries until the cluster lists this node, or the node stops.
pub async fn join_cluster(core: Arc<NodeCore>, join: String) {
    let addr = if join.starts_with("http") {
        join.clone()
    } else {
        format!("http://{join}")
    };
    let peer_addr = core.config.advertised_peer_addr();
    let mut delay = Duration::from_millis(200);
    loop {
        let known = core
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&core.id)
            .is_some();
        if known {
            tracing::info!(node = core.id, "this node is a cluster member");
            return;
        }
        let attempt = async {
            let mut client = ClusterClient::connect(addr.clone()).await.map_err(|e| e.to_string())?;
            client
                .add_learner(AddLearnerRequest {
                    node_id: core.id,
                    peer_addr: peer_addr.clone(),
                })
                .await
                .map_err(|s| s.message().to_string())
        };
        match attempt.await {
            Ok(_) => {
                tracing::info!(node = core.id, via = %join, "joined the cluster as a learner; promote it with `muster cluster promote {}`", core.id);
                return;
            }
            Err(e) => tracing::warn!(via = %join, error = %e, "join failed; retrying"),
        }
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
