//! The peer service on the peer port: Raft RPCs from other nodes and requests that
//! followers forward to the leader.

use std::sync::Arc;

use muster_proto::v1::peer::raft_peer_server::{RaftPeer, RaftPeerServer};
use muster_proto::v1::peer::PeerMessage;
use muster_store::TypeConfig;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::coalesced_writes::{incoming, incoming_tls};
use crate::error::ApiError;
use crate::forward::{ForwardRequest, ForwardResponse};
use crate::identity::{ForeignPeer, CLUSTER_ID_HEADER};
use crate::member_levels::{level_of, COMMAND_LEVEL_HEADER};
use crate::network::MAX_PEER_MESSAGE_BYTES;
use crate::node::NodeCore;
use crate::tls::TlsPort;

/// Serves the peer API on `listener` until the node shuts down.
pub async fn serve(core: Arc<NodeCore>, listener: TcpListener) {
    let service = RaftPeerServer::new(PeerApi { core: core.clone() })
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(service);
    let shutdown = core.shutdown.clone().cancelled_owned();
    let result = match core.tls.clone() {
        None => router.serve_with_incoming_shutdown(incoming(listener), shutdown).await,
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(incoming_tls(listener, tls, TlsPort::Peer), shutdown)
                .await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "peer gRPC server failed");
    }
}

struct PeerApi {
    core: Arc<NodeCore>,
}

impl PeerApi {
    /// Decodes a Raft request after checking its sender's cluster, and records the
    /// command level its sender (`sender` of the decoded request) states.
    fn decode_from<T: DeserializeOwned>(
        &self,
        req: Request<PeerMessage>,
        sender: impl FnOnce(&T) -> Option<u64>,
    ) -> Result<T, Status> {
        let level = level_of(req.metadata().get(COMMAND_LEVEL_HEADER).map(|v| v.as_bytes()));
        let decoded: T = self.decode(req)?;
        if let Some(node) = sender(&decoded) {
            self.core.member_levels.record(node, level);
        }
        Ok(decoded)
    }

    /// Decodes a peer request after checking that its sender belongs to this node's
    /// cluster ([`crate::identity::ClusterIdentity::admit`]).
    fn decode<T: DeserializeOwned>(&self, req: Request<PeerMessage>) -> Result<T, Status> {
        let header = req.metadata().get(CLUSTER_ID_HEADER).map(|v| v.as_bytes());
        self.core.cluster.admit(header).map_err(|refused| match refused {
            ForeignPeer::Malformed(_) => Status::invalid_argument(refused.to_string()),
            ForeignPeer::OtherCluster { .. } => Status::failed_precondition(refused.to_string()),
            // Transient: the sender retries after a pause, as for a node that is down.
            ForeignPeer::NotJoinedYet { .. } => Status::unavailable(refused.to_string()),
        })?;
        bincode::deserialize(&req.into_inner().data)
            .map_err(|e| Status::invalid_argument(format!("undecodable peer message: {e}")))
    }
}

/// Encodes an answer, stating this node's command level (see
/// [`crate::member_levels`]).
fn encode<T: Serialize>(value: &T, level: u32) -> Result<Response<PeerMessage>, Status> {
    let data = bincode::serialize(value).map_err(|e| Status::internal(e.to_string()))?;
    let mut response = Response::new(PeerMessage { data });
    response
        .metadata_mut()
        .insert(COMMAND_LEVEL_HEADER, MetadataValue::from(level));
    Ok(response)
}

#[tonic::async_trait]
impl RaftPeer for PeerApi {
    async fn append_entries(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let req: AppendEntriesRequest<TypeConfig> = self
            .decode_from(request, |r: &AppendEntriesRequest<TypeConfig>| {
                r.vote.leader_id().voted_for()
            })?;
        let leader_commit = req.leader_commit.map_or(0, |l| l.index);
        let result = self.core.raft.append_entries(req).await;
        if let Ok(resp) = &result {
            if resp.is_success() {
                self.core.touch_leader_contact();
                self.core.note_leader_commit(leader_commit);
            }
        }
        encode(&result, self.core.member_levels.own())
    }

    async fn vote(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let req: VoteRequest<u64> = self.decode_from(request, |r: &VoteRequest<u64>| r.vote.leader_id().voted_for())?;
        // Before it stopped, this node may have accepted a leader moments ago and
        // promised (by openraft's leader lease) not to vote for another one for an
        // election timeout; it forgot when, so it keeps that promise from its start.
        // The leader's lease reads and keep-alives rely on it (`crate::leader_lease`).
        let since_start = self.core.uptime();
        if self.core.voted_before && since_start < self.core.config.raft.election_max {
            return Err(Status::unavailable(format!(
                "node started {} ms ago: not voting until an election timeout ({} ms) has passed",
                since_start.as_millis(),
                self.core.config.raft.election_max.as_millis()
            )));
        }
        encode(&self.core.raft.vote(req).await, self.core.member_levels.own())
    }

    async fn install_snapshot(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = self
            .decode_from(request, |r: &InstallSnapshotRequest<TypeConfig>| {
                r.vote.leader_id().voted_for()
            })?;
        let result = self.core.raft.install_snapshot(req).await;
        if result.is_ok() {
            self.core.touch_leader_contact();
        }
        encode(&result, self.core.member_levels.own())
    }

    async fn forward(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let req: ForwardRequest = self.decode(request)?;
        let core = &self.core;
        let response = match req {
            ForwardRequest::Write(command) => match core.propose_on_leader(*command).await {
                Ok(result) => ForwardResponse::Written(result),
                Err(ApiError::NoLeader { .. }) => ForwardResponse::NotLeader,
                Err(e) => ForwardResponse::Failed(e),
            },
            ForwardRequest::KeepAlive(ids) => match core.leases.keep_alive_local(core, &ids) {
                Some(answer) => ForwardResponse::KeptAlive(answer),
                None => ForwardResponse::NotLeader,
            },
            ForwardRequest::ReadIndex => match core.read_index_local().await {
                Ok(index) => ForwardResponse::ReadIndex(index),
                Err(None) => ForwardResponse::NotLeader,
                Err(Some(e)) => ForwardResponse::Failed(e),
            },
            ForwardRequest::ReadLease(follower) => match core.grant_read_lease(follower) {
                Some(grant) => ForwardResponse::ReadLease(grant),
                None => ForwardResponse::NotLeader,
            },
            ForwardRequest::ReportCheck(report) => match core.checks.report_local(core, &report).await {
                Some(Ok(result)) => ForwardResponse::Written(result),
                Some(Err(e)) => ForwardResponse::Failed(e),
                None => ForwardResponse::NotLeader,
            },
            ForwardRequest::PreVote { last_log, .. } => {
                ForwardResponse::PreVote(crate::pre_vote::grants(core, last_log.as_ref()))
            }
            ForwardRequest::Membership(change) => match core.change_membership_local(&change).await {
                Ok(index) => ForwardResponse::MembershipChanged(index),
                Err(None) => ForwardResponse::NotLeader,
                Err(Some(e)) => ForwardResponse::Failed(e),
            },
        };
        encode(&response, self.core.member_levels.own())
    }
}
