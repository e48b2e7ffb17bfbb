//! The peer network: openraft RPCs and forwarded requests over gRPC on the peer port.
//! One cached [`PeerTransport`] per peer: a single HTTP/2 connection that every call
//! to that peer shares, reopened after it fails. Every call is bounded by a deadline
//! enforced here, whatever the peer does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_proto::v1::peer::raft_peer_client::RaftPeerClient;
use muster_proto::v1::peer::PeerMessage;
use muster_store::{LogDurability, NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};
use prometheus_client::metrics::counter::Counter;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::forward::{ForwardRequest, ForwardResponse};
use crate::identity::ClusterIdentity;
use crate::leader_lease::QuorumClock;
use crate::peer_transport::PeerTransport;
use crate::read_lease::ReadLeaseTable;

/// Largest peer message (snapshot chunks, append batches).
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Cached transports to peers, shared by Raft replication and request forwarding.
#[derive(Clone, Default)]
pub struct PeerChannels {
    transports: Arc<Mutex<HashMap<String, PeerTransport>>>,
    cluster: Arc<ClusterIdentity>,
}

/// A peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer could not be reached (connection refused, reset, timeout).
    #[error("peer {addr} unreachable: {message}")]
    Unreachable {
        /// Peer address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The message could not be encoded or decoded.
    #[error("peer message codec: {0}")]
    Codec(#[from] bincode::Error),
}

impl PeerChannels {
    /// Transports whose calls name the cluster `cluster` (see
    /// [`ClusterIdentity::admit`]). `PeerChannels::default()` names none.
    pub fn new(cluster: Arc<ClusterIdentity>) -> Self {
        PeerChannels {
            transports: Default::default(),
            cluster,
        }
    }

    /// A gRPC client for the peer at `addr` (`host:port`), sharing its connection.
    pub fn client(&self, addr: &str) -> Result<RaftPeerClient<PeerTransport>, PeerError> {
        let transport = {
            let mut transports = self.transports.lock().unwrap_or_else(|p| p.into_inner());
            match transports.get(addr) {
                Some(transport) => transport.clone(),
                None => {
                    let transport =
                        PeerTransport::new(addr, self.cluster.clone()).map_err(|e| PeerError::Unreachable {
                            addr: addr.to_string(),
                            message: format!("not a host:port address: {e}"),
                        })?;
                    transports.insert(addr.to_string(), transport.clone());
                    transport
                }
            }
        };
        let origin = transport.origin().clone();
        Ok(RaftPeerClient::with_origin(transport, origin)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }

    /// Sends a forwarded request to the peer at `addr`.
    pub async fn forward(
        &self,
        addr: &str,
        request: &ForwardRequest,
        timeout: Duration,
    ) -> Result<ForwardResponse, PeerError> {
        let mut client = self.client(addr)?;
        let data = bincode::serialize(request)?;
        let mut req = tonic::Request::new(PeerMessage { data });
        req.set_timeout(timeout);
        let resp = within(timeout, client.forward(req))
            .await
            .map_err(|s| PeerError::Unreachable {
                addr: addr.to_string(),
                message: s.message().to_string(),
            })?;
        Ok(bincode::deserialize(&resp.into_inner().data)?)
    }
}

/// Runs a peer call, failing it with `DeadlineExceeded` once `deadline` has passed
/// (the `grpc-timeout` header only tells the peer; this holds whatever it does).
async fn within<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(deadline, call).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {deadline:?}"
        )))
    })
}

/// The commit index this leader held back from its followers because its own disk
/// had not reached it yet.
///
/// openraft tells the followers about a new commit index at once, usually in an
/// append without entries, and sends nothing more until the next write or heartbeat.
/// When the leader's own flush ends after a follower's acknowledgement, that commit
/// index is clamped to the durable prefix ([`LogDurability`]); [`resend_held_commit`]
/// asks openraft for a heartbeat once the disk has it, so followers (and their
/// watchers) learn of the commit without waiting for the next heartbeat.
#[derive(Debug, Default)]
pub struct HeldCommit {
    /// The highest index held back (0: none yet).
    index: AtomicU64,
    held: Notify,
}

impl HeldCommit {
    /// Records that the commit index `index` was held back from a follower.
    fn hold(&self, index: u64) {
        if self.index.fetch_max(index, Ordering::AcqRel) < index {
            self.held.notify_one();
        }
    }
}

/// Sends a heartbeat carrying the commit index each time one held back by
/// [`HeldCommit`] is on this node's disk. The wait is bounded by `give_up_after` (the
/// heartbeat interval): an index that will never be durable here (this node stepped
/// down and its entry was truncated) is left to the next leader.
pub async fn resend_held_commit(
    raft: Raft<TypeConfig>,
    held: Arc<HeldCommit>,
    log_durability: LogDurability<TypeConfig>,
    give_up_after: Duration,
    resent: Counter,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = held.held.notified() => {}
        }
        let index = held.index.load(Ordering::Acquire);
        match tokio::time::timeout(give_up_after, log_durability.wait_durable(index)).await {
            Ok(Ok(())) => {
                resent.inc();
                if let Err(e) = raft.trigger().heartbeat().await {
                    tracing::debug!(error = %e, "raft stopped; no more held commits to send");
                    return;
                }
            }
            Ok(Err(e)) => tracing::debug!(index, error = %e, "held commit index will not become durable"),
            Err(_) => tracing::debug!(index, "held commit index not durable within a heartbeat"),
        }
    }
}

/// Builds a connection per Raft target.
pub struct NetworkFactory {
    channels: PeerChannels,
    quorum_clock: Arc<QuorumClock>,
    log_durability: LogDurability<TypeConfig>,
    held_commit: Arc<HeldCommit>,
    read_leases: Arc<ReadLeaseTable>,
}

impl NetworkFactory {
    /// A factory sharing `channels`, recording accepted appends in `quorum_clock`;
    /// the commit index it sends never passes what `log_durability` says is on this
    /// node's disk, and what it holds back is recorded in `held_commit`. Appends
    /// accepted are recorded in `read_leases`, which may hold the commit index back
    /// further for the holders of read leases.
    pub fn new(
        channels: PeerChannels,
        quorum_clock: Arc<QuorumClock>,
        log_durability: LogDurability<TypeConfig>,
        held_commit: Arc<HeldCommit>,
        read_leases: Arc<ReadLeaseTable>,
    ) -> Self {
        NetworkFactory {
            channels,
            quorum_clock,
            log_durability,
            held_commit,
            read_leases,
        }
    }
}

/// openraft's connection to one peer.
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    quorum_clock: Arc<QuorumClock>,
    log_durability: LogDurability<TypeConfig>,
    held_commit: Arc<HeldCommit>,
    read_leases: Arc<ReadLeaseTable>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            quorum_clock: self.quorum_clock.clone(),
            log_durability: self.log_durability.clone(),
            held_commit: self.held_commit.clone(),
            read_leases: self.read_leases.clone(),
        }
    }
}

/// Which peer RPC to call.
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self
            .channels
            .client(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let deadline = option.hard_ttl();
        let mut request = tonic::Request::new(PeerMessage { data });
        request.set_timeout(deadline);
        let result = match rpc {
            Rpc::Append => within(deadline, client.append_entries(request)).await,
            Rpc::Vote => within(deadline, client.vote(request)).await,
            Rpc::Snapshot => within(deadline, client.install_snapshot(request)).await,
        };
        let response = result.map_err(|status| {
            let err = PeerError::Unreachable {
                addr: self.addr.clone(),
                message: status.message().to_string(),
            };
            match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                    RPCError::Unreachable(Unreachable::new(&err))
                }
                _ => RPCError::Network(NetworkError::new(&err)),
            }
        })?;
        let decoded: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&response.into_inner().data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // The leader may count itself in an entry's quorum while its own disk still
        // flushes it; followers apply nothing until it is durable here too (see
        // `LogDurability`).
        let commit = rpc.leader_commit;
        let durable = self.log_durability.durable_prefix(commit);
        if let Some(held) = commit.filter(|_| durable != commit) {
            self.held_commit.hold(held.index);
        }
        // Nor of entries a read lease holder lacks (`crate::read_lease`).
        rpc.leader_commit = self.read_leases.commit_cap(self.target, &rpc.vote, durable);
        let last_sent = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let sent = Instant::now();
        let vote = rpc.vote;
        let response = self.call(Rpc::Append, &rpc, &option).await;
        // Anything but a higher vote means the follower accepted this leader (a
        // conflict only says its log differs).
        match &response {
            Ok(AppendEntriesResponse::Success) => {
                self.quorum_clock.record(self.target, &vote, sent);
                if let Some(last) = last_sent {
                    self.read_leases.record_match(self.target, vote, last);
                }
            }
            Ok(AppendEntriesResponse::PartialSuccess(matched)) => {
                self.quorum_clock.record(self.target, &vote, sent);
                if let Some(last) = matched {
                    self.read_leases.record_match(self.target, vote, *last);
                }
            }
            Ok(AppendEntriesResponse::Conflict) => self.quorum_clock.record(self.target, &vote, sent),
            _ => {}
        }
        response
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
