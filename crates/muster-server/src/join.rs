//! A node started with `--join` learns its cluster's id from the node it names, then
//! asks that node to add it as a learner.

use std::sync::Arc;
use std::time::Duration;

use muster_proto::v1::cluster_client::ClusterClient;
use muster_proto::v1::{AddLearnerRequest, StatusRequest};
use tonic::transport::Endpoint;

use crate::identity::{format_cluster_id, parse_cluster_id};
use crate::node::NodeCore;

/// First pause after a failed step; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(200);
/// Longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// Bound on connecting to the `--join` node and on its answer to `Status`.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Learns the cluster's id from `join` (until then the node serves no peer naming a
/// cluster, see [`crate::identity::ClusterIdentity::admit`]), then retries until the
/// cluster lists this node, or the node stops.
pub async fn join_cluster(core: Arc<NodeCore>, join: String) {
    let scheme = if core.tls.is_some() { "https" } else { "http" };
    let addr = if join.starts_with("http") {
        join.clone()
    } else {
        format!("{scheme}://{join}")
    };
    let mut pause = FIRST_PAUSE;
    loop {
        match join_step(&core, &addr).await {
            Ok(Step::Member) => {
                tracing::info!(node = core.id, "this node is a cluster member");
                return;
            }
            Ok(Step::AddedAsLearner) => {
                tracing::info!(node = core.id, via = %join, "joined the cluster as a learner; promote it with `muster cluster promote {}`", core.id);
                return;
            }
            Err(reason) => tracing::warn!(via = %join, error = %reason, "join failed; retrying"),
        }
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Where one attempt to join left the node.
enum Step {
    /// The node's own membership already lists it (a restart after joining).
    Member,
    /// The cluster added it as a learner just now.
    AddedAsLearner,
}

/// One attempt; an error says why it did not complete.
async fn join_step(core: &NodeCore, addr: &str) -> Result<Step, String> {
    // Connected on first use: a member restarting with a known id contacts nobody.
    let mut endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(CALL_TIMEOUT);
    if let Some(tls) = &core.tls {
        endpoint = endpoint
            .tls_config(tls.tonic_client())
            .map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint.connect_lazy();
    let mut cluster = ClusterClient::new(channel);
    if core.cluster.id().is_none() {
        let reported = tokio::time::timeout(CALL_TIMEOUT, cluster.status(StatusRequest {}))
            .await
            .map_err(|_| format!("no answer to Status within {CALL_TIMEOUT:?}"))?
            .map_err(|s| s.message().to_string())?
            .into_inner()
            .cluster_id;
        let id = parse_cluster_id(&reported).ok_or_else(|| {
            format!(
                "the node reports no cluster id (got {reported:?}): it is joining itself, or runs an \
                 earlier version of Muster; join through a member that reports one"
            )
        })?;
        core.cluster.adopt(id).map_err(|e| e.to_string())?;
        tracing::info!(cluster = %format_cluster_id(id), "learned the cluster id from the node joined through");
    }
    let member = core
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&core.id)
        .is_some();
    if member {
        return Ok(Step::Member);
    }
    // Not bounded: the answer comes once this node has caught up with the log.
    cluster
        .add_learner(AddLearnerRequest {
            node_id: core.id,
            peer_addr: core.config.advertised_peer_addr(),
        })
        .await
        .map_err(|s| s.message().to_string())?;
    Ok(Step::AddedAsLearner)
}
