//! The peer network: openraft RPCs and forwarded requests over gRPC on the peer port.
//! Two cached [`PeerTransport`]s per peer, each a single HTTP/2 connection reopened
//! after it fails: one for snapshot chunks, one that every other call to that peer
//! shares ([`Lane`]). Every call is bounded by a deadline enforced here, whatever the
//! peer does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_proto::v1::peer::raft_peer_client::RaftPeerClient;
use muster_proto::v1::peer::PeerMessage;
use muster_store::{LogDurability, NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::append_budget::AppendBudget;
use crate::forward::{ForwardRequest, ForwardResponse};
use crate::identity::ClusterIdentity;
use crate::leader_lease::QuorumClock;
use crate::member_levels::{level_of, MemberLevels, COMMAND_LEVEL_HEADER};
use crate::metrics::{PeerCallLabels, PeerLabels};
use crate::peer_transport::PeerTransport;
use crate::read_lease::ReadLeaseTable;
use crate::tls::NodeTls;

/// Largest peer message (snapshot chunks, append batches).
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Cached transports to peers, shared by Raft replication and request forwarding.
#[derive(Clone, Default)]
pub struct PeerChannels {
    transports: Arc<Mutex<HashMap<String, PeerLanes>>>,
    cluster: Arc<ClusterIdentity>,
    /// TLS for the connections to peers, when configured.
    tls: Option<NodeTls>,
}

/// The transports to one peer, one per [`Lane`] (nothing is opened until a call).
#[derive(Clone)]
struct PeerLanes {
    messages: PeerTransport,
    snapshots: PeerTransport,
}

/// Which of a peer's connections a call takes. Snapshot chunks (megabytes each) have
/// a connection of their own, so the heartbeats, appends and forwarded requests on
/// the other never wait behind a chunk in a socket buffer: on a slow link they would
/// miss their deadlines there, and the connection would be taken for a silent one
/// and replaced, cutting the snapshot off (see `peer_transport.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Everything but snapshots.
    Messages,
    /// Snapshot chunks.
    Snapshots,
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
    /// The peer answered that it cannot take the request: it could not decode it (a
    /// build that does not know the request) or refused its sender (a node of
    /// another cluster). Nothing of the request was done.
    #[error("peer {addr} refused the request: {message}")]
    Refused {
        /// Peer address.
        addr: String,
        /// The peer's reason.
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
            tls: None,
        }
    }

    /// The same transports, opening their connections with TLS when `tls` is given.
    pub fn with_tls(mut self, tls: Option<NodeTls>) -> Self {
        self.tls = tls;
        self
    }

    /// A gRPC client for the peer at `addr` (`host:port`), sharing its connection for
    /// everything but snapshots.
    pub fn client(&self, addr: &str) -> Result<RaftPeerClient<PeerTransport>, PeerError> {
        self.client_on(addr, Lane::Messages)
    }

    /// A gRPC client for the peer at `addr` on the connection of `lane`.
    pub fn client_on(&self, addr: &str, lane: Lane) -> Result<RaftPeerClient<PeerTransport>, PeerError> {
        let transport = {
            let mut transports = self.transports.lock().unwrap_or_else(|p| p.into_inner());
            let lanes = match transports.get(addr) {
                Some(lanes) => lanes,
                None => {
                    let transport = || {
                        PeerTransport::new(addr, self.cluster.clone(), self.tls.clone()).map_err(|e| {
                            PeerError::Unreachable {
                                addr: addr.to_string(),
                                message: format!("not a host:port address: {e}"),
                            }
                        })
                    };
                    let lanes = PeerLanes {
                        messages: transport()?,
                        snapshots: transport()?,
                    };
                    transports.entry(addr.to_string()).or_insert(lanes)
                }
            };
            match lane {
                Lane::Messages => lanes.messages.clone(),
                Lane::Snapshots => lanes.snapshots.clone(),
            }
        };
        let origin = transport.origin().clone();
        Ok(RaftPeerClient::with_origin(transport, origin)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }

    /// Sends a forwarded request to the peer at `addr`. A peer that answered it could
    /// not take the request fails with [`PeerError::Refused`]: nothing of it was done.
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
        let resp = within(timeout, client.forward(req)).await.map_err(|s| match s.code() {
            // Only the peer's request handling answers these; the transport never does.
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => PeerError::Refused {
                addr: addr.to_string(),
                message: describe(&s),
            },
            _ => PeerError::Unreachable {
                addr: addr.to_string(),
                message: describe(&s),
            },
        })?;
        Ok(bincode::deserialize(&resp.into_inner().data)?)
    }
}

/// A failed call's message, or its code's description when it has none (an answer
/// from something that is not a Muster peer port).
fn describe(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
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
///
/// openraft sends that heartbeat only to followers with no append in flight, as it
/// sees them: a follower whose clamped append was answered just before the request,
/// but whose answer openraft had not yet taken in, is skipped. So each follower's
/// held index is kept until an append tells it, and the heartbeat is asked for again
/// while one is left untold with nothing in flight to it.
#[derive(Debug, Default)]
pub struct HeldCommit {
    /// The highest index held back (0: none yet).
    index: AtomicU64,
    held: Notify,
    /// Per follower: the highest index held back from it and not told since, and the
    /// appends in flight to it.
    followers: Mutex<HashMap<NodeId, FollowerCommit>>,
    /// Woken each time a follower is told a held index.
    told: Notify,
}

/// What [`HeldCommit`] knows of one follower.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct FollowerCommit {
    /// The highest commit index held back from it and not told since (0: none).
    untold: u64,
    /// When it was first left untold (of no use while `untold` is 0).
    untold_since: Option<Instant>,
    /// Appends sent to it and not yet answered.
    in_flight: u32,
}

/// Whether every follower has been told a held commit index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Telling {
    /// No follower is left untold up to the index.
    Done,
    /// An untold follower has an append in flight, which may still tell it.
    Waiting,
    /// An untold follower has nothing in flight: only a new heartbeat tells it.
    Stuck,
}

/// An append to one follower in flight, as [`HeldCommit`] counts it.
struct AppendInFlight<'a> {
    held: &'a HeldCommit,
    target: NodeId,
}

impl Drop for AppendInFlight<'_> {
    fn drop(&mut self) {
        self.held.answered(self.target);
    }
}

/// How many times [`resend_held_commit`] asks again for a heartbeat for one index,
/// after the first: enough to outlast openraft's view of an append just answered,
/// few enough that a follower that is down costs little.
const MAX_HELD_COMMIT_RETRIES: u32 = 3;

/// The share of the heartbeat interval a follower may stay untold with nothing in
/// flight to it before the heartbeat is asked for again.
const HELD_COMMIT_RETRY_DIVISOR: u32 = 10;

impl HeldCommit {
    fn followers(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, FollowerCommit>> {
        self.followers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that an append to `target` is about to be sent: it tells `target` the
    /// commit index `told`, and holds back `wanted` when that is higher. The append
    /// counts as in flight until the returned guard is dropped (answered, failed, or
    /// given up by openraft).
    fn sending(&self, target: NodeId, wanted: Option<u64>, told: Option<u64>) -> AppendInFlight<'_> {
        let told = told.unwrap_or(0);
        let held = wanted.filter(|w| *w > told);
        {
            let mut followers = self.followers();
            let follower = followers.entry(target).or_default();
            follower.in_flight += 1;
            if follower.untold != 0 && follower.untold <= told {
                follower.untold = 0;
                self.told.notify_waiters();
            }
            if let Some(held) = held {
                // A hold after everything held before was told starts afresh, so a
                // follower held at every append of a long burst is not left to the
                // heartbeats at its end.
                if follower.untold == 0 {
                    follower.untold_since = Some(Instant::now());
                }
                follower.untold = follower.untold.max(held);
            }
        }
        if let Some(held) = held {
            if self.index.fetch_max(held, Ordering::AcqRel) < held {
                self.held.notify_one();
            }
        }
        AppendInFlight { held: self, target }
    }

    /// Records that an append to `target` recorded by [`HeldCommit::sending`] is no
    /// longer in flight.
    fn answered(&self, target: NodeId) {
        let mut followers = self.followers();
        if let Some(follower) = followers.get_mut(&target) {
            follower.in_flight = follower.in_flight.saturating_sub(1);
        }
        drop(followers);
        self.told.notify_waiters();
    }

    /// Whether each follower held back at `index` or below, within `recent`, has
    /// since been told. One left untold for longer (down, or removed from the
    /// cluster) is left to the heartbeats.
    fn telling(&self, index: u64, recent: Duration) -> Telling {
        let now = Instant::now();
        let followers = self.followers();
        let untold = followers.values().filter(|f| {
            f.untold != 0 && f.untold <= index && f.untold_since.is_some_and(|t| now.duration_since(t) < recent)
        });
        let mut telling = Telling::Done;
        for follower in untold {
            if follower.in_flight == 0 {
                return Telling::Stuck;
            }
            telling = Telling::Waiting;
        }
        telling
    }
}

/// Sends a heartbeat carrying the commit index each time one held back by
/// [`HeldCommit`] is on this node's disk, and again, a few times at most, while a
/// follower it was held from is left untold with nothing in flight to it. The wait
/// is bounded by `give_up_after` (the heartbeat interval): an index that will never
/// be durable here (this node stepped down and its entry was truncated), or a
/// follower that does not answer, is left to the next heartbeat or leader.
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
        let deadline = tokio::time::Instant::now() + give_up_after;
        match tokio::time::timeout_at(deadline, log_durability.wait_durable(index)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(index, error = %e, "held commit index will not become durable");
                continue;
            }
            Err(_) => {
                tracing::debug!(index, "held commit index not durable within a heartbeat");
                continue;
            }
        }
        for attempt in 0..=MAX_HELD_COMMIT_RETRIES {
            resent.inc();
            if let Err(e) = raft.trigger().heartbeat().await {
                tracing::debug!(error = %e, "raft stopped; no more held commits to send");
                return;
            }
            if !wait_until_told(&held, index, give_up_after, deadline).await {
                break;
            }
            tracing::debug!(
                index,
                attempt,
                "a follower was not told a held commit index; asking again"
            );
        }
    }
}

/// Waits until every follower held back at `index` or below has been told (false),
/// or one of them has had nothing in flight to it for a tenth of `heartbeat` (true:
/// ask for another heartbeat), or `deadline` passes (false).
async fn wait_until_told(held: &HeldCommit, index: u64, heartbeat: Duration, deadline: tokio::time::Instant) -> bool {
    let retry_after = heartbeat / HELD_COMMIT_RETRY_DIVISOR;
    let mut stuck_since = None;
    loop {
        // Registered before the check, so a change after it wakes the wait below.
        let told = held.told.notified();
        tokio::pin!(told);
        told.as_mut().enable();
        let wake = match held.telling(index, heartbeat) {
            Telling::Done => return false,
            Telling::Waiting => {
                stuck_since = None;
                deadline
            }
            Telling::Stuck => {
                // openraft may not yet have taken in the answer that left it idle.
                let since = *stuck_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= retry_after {
                    return true;
                }
                deadline.min(since + retry_after)
            }
        };
        if tokio::time::timeout_at(wake, told).await.is_err() && tokio::time::Instant::now() >= deadline {
            return false;
        }
    }
}

/// Builds a connection per Raft target; each connection keeps a copy of it.
#[derive(Clone)]
pub struct NetworkFactory {
    /// The peer transports, shared with forwarding and read index calls.
    pub channels: PeerChannels,
    /// Where appends a follower accepted are recorded (the leader lease).
    pub quorum_clock: Arc<QuorumClock>,
    /// What is on this node's disk: the commit index sent never passes it.
    pub log_durability: LogDurability<TypeConfig>,
    /// The commit index held back from each follower until this node's disk has it.
    pub held_commit: Arc<HeldCommit>,
    /// Where accepted appends are recorded for read leases, whose holders may hold the
    /// commit index back further.
    pub read_leases: Arc<ReadLeaseTable>,
    /// The Raft heartbeat interval, which scales the pauses after a peer fails (see
    /// [`retry_pauses`]).
    pub heartbeat: Duration,
    /// Failed peer calls, by peer, call and failure.
    pub failures: Family<PeerCallLabels, Counter>,
    /// Appends cut to fit a peer's [`AppendBudget`], by peer.
    pub appends_cut: Family<PeerLabels, Counter>,
    /// The command level each peer answers with.
    pub member_levels: Arc<MemberLevels>,
}

/// openraft's connection to one peer.
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    /// What every connection shares (transports, clocks, the commit index held back).
    shared: NetworkFactory,
    /// How many bytes an append to this peer may carry. A std mutex: it is held for
    /// a few instructions and never across an await, by this connection's one
    /// replication task and the drop of a call its deadline ended.
    append_budget: Mutex<AppendBudget>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            target,
            addr: node.addr.clone(),
            shared: self.clone(),
            append_budget: Mutex::default(),
        }
    }
}

/// The first pause after a failed call to a peer, as a share of the heartbeat.
const FIRST_RETRY_PAUSE_DIVISOR: u32 = 5;
/// The longest pause between calls to a peer that keeps failing, in heartbeats.
const LONGEST_RETRY_PAUSE_HEARTBEATS: u32 = 4;

/// The pauses openraft makes between calls to a peer that keep failing: a fifth of
/// a heartbeat first, doubling up to four heartbeats.
///
/// A missed deadline mostly means a peer (or this node) was briefly starved of CPU
/// or disk, not that it is gone. With one fixed pause of four heartbeats, an append
/// that missed its deadline at both followers of a three-node cluster at once held
/// every commit back for that long: 250 ms stalls in the watch benchmark, from
/// which its p99 delivery latency was taken. A peer that stays down is still called
/// only every four heartbeats after a few quick tries.
pub fn retry_pauses(heartbeat: Duration) -> impl Iterator<Item = Duration> + Send + 'static {
    let longest = heartbeat * LONGEST_RETRY_PAUSE_HEARTBEATS;
    std::iter::successors(Some(heartbeat / FIRST_RETRY_PAUSE_DIVISOR), move |pause| {
        Some((*pause * 2).min(longest))
    })
}

/// Which peer RPC to call.
#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl Rpc {
    /// The call's name in metrics.
    fn name(self) -> &'static str {
        match self {
            Rpc::Append => "append",
            Rpc::Vote => "vote",
            Rpc::Snapshot => "snapshot",
        }
    }
}

/// A peer call not yet answered. openraft bounds the call by the same deadline as
/// [`within`] does, from a timer started a moment earlier: when its timer ends the
/// call first, the call is dropped here, and counted as a missed deadline if that
/// is why (a call dropped well before its deadline, as when this node steps down,
/// is not a failure of the peer).
struct Unanswered<'a> {
    connection: &'a PeerConnection,
    rpc: Rpc,
    started: Instant,
    deadline: Duration,
    /// The size of the request.
    bytes: u64,
    /// The call ended here (answered, or failed and counted by its status).
    answered: bool,
}

/// How much earlier than [`Unanswered::deadline`] openraft's own timer may end a call.
const DEADLINE_SLACK: Duration = Duration::from_millis(1);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered && ended_by_deadline(self.started.elapsed(), self.deadline) {
            self.connection.count_failure(self.rpc, PeerFailure::Deadline);
            self.connection.note_missed_deadline(self.rpc, self.bytes);
        }
    }
}

/// Whether a call dropped unanswered `elapsed` after it started was ended by
/// openraft's timer for `deadline`.
fn ended_by_deadline(elapsed: Duration, deadline: Duration) -> bool {
    elapsed + DEADLINE_SLACK >= deadline
}

/// How a peer call failed: what openraft is told, and the metric's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerFailure {
    /// No answer within the deadline.
    Deadline,
    /// No connection, or it was refused, reset or closed.
    Unreachable,
    /// Any other failure.
    Error,
}

impl PeerFailure {
    fn of(code: tonic::Code) -> Self {
        match code {
            tonic::Code::DeadlineExceeded => PeerFailure::Deadline,
            tonic::Code::Unavailable | tonic::Code::Cancelled => PeerFailure::Unreachable,
            _ => PeerFailure::Error,
        }
    }

    /// The label in `muster_peer_call_failures_total`.
    fn label(self) -> &'static str {
        match self {
            PeerFailure::Deadline => "deadline",
            PeerFailure::Unreachable => "unreachable",
            PeerFailure::Error => "error",
        }
    }

    /// What openraft is told: a peer that did not answer or could not be reached
    /// is `Unreachable` (its replication pauses, see [`retry_pauses`]); any other
    /// failure is a network error.
    fn into_rpc_error<E: std::error::Error>(self, err: &PeerError) -> RPCError<NodeId, BasicNode, E> {
        match self {
            PeerFailure::Deadline | PeerFailure::Unreachable => RPCError::Unreachable(Unreachable::new(err)),
            PeerFailure::Error => RPCError::Network(NetworkError::new(err)),
        }
    }
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
        let lane = match rpc {
            Rpc::Snapshot => Lane::Snapshots,
            _ => Lane::Messages,
        };
        let mut client = self.shared.channels.client_on(&self.addr, lane).map_err(|e| {
            self.count_failure(rpc, PeerFailure::Unreachable);
            RPCError::Unreachable(Unreachable::new(&e))
        })?;
        let deadline = option.hard_ttl();
        let bytes = data.len() as u64;
        let mut request = tonic::Request::new(PeerMessage { data });
        request.set_timeout(deadline);
        request
            .metadata_mut()
            .insert(COMMAND_LEVEL_HEADER, self.shared.member_levels.own().into());
        let mut call = Unanswered {
            connection: self,
            rpc,
            started: Instant::now(),
            deadline,
            bytes,
            answered: false,
        };
        let result = match rpc {
            Rpc::Append => within(deadline, client.append_entries(request)).await,
            Rpc::Vote => within(deadline, client.vote(request)).await,
            Rpc::Snapshot => within(deadline, client.install_snapshot(request)).await,
        };
        call.answered = true;
        let response = result.map_err(|status| {
            let failure = PeerFailure::of(status.code());
            self.count_failure(rpc, failure);
            if failure == PeerFailure::Deadline {
                self.note_missed_deadline(rpc, bytes);
            }
            failure.into_rpc_error(&PeerError::Unreachable {
                addr: self.addr.clone(),
                message: describe(&status),
            })
        })?;
        if let Rpc::Append = rpc {
            self.budget().delivered(bytes, call.started.elapsed(), deadline);
        }
        self.shared.member_levels.record(
            self.target,
            level_of(response.metadata().get(COMMAND_LEVEL_HEADER).map(|v| v.as_bytes())),
        );
        let decoded: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&response.into_inner().data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
    }

    fn budget(&self) -> std::sync::MutexGuard<'_, AppendBudget> {
        self.append_budget.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call of `bytes` bytes missed its deadline: if it was an append, the link to
    /// the peer may not carry that much in time.
    fn note_missed_deadline(&self, rpc: Rpc, bytes: u64) {
        if let Rpc::Append = rpc {
            self.budget().missed(bytes);
        }
    }

    /// How many of `rpc`'s entries fit this peer's [`AppendBudget`], when not all do.
    fn entries_within_budget(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> Option<u64> {
        let budget = *self.budget();
        // Sizing a request costs a pass over it: only while the link is known slow.
        budget.limit()?;
        let total = bincode::serialized_size(rpc).ok()?;
        let entry_sizes = rpc
            .entries
            .iter()
            .map(|entry| bincode::serialized_size(entry).unwrap_or(u64::MAX));
        budget.entries_within(total, entry_sizes)
    }

    fn count_failure(&self, rpc: Rpc, failure: PeerFailure) {
        self.shared
            .failures
            .get_or_create(&PeerCallLabels {
                peer: self.target,
                rpc: rpc.name(),
                failure: failure.label(),
            })
            .inc();
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
        if let Some(fitting) = self.entries_within_budget(&rpc) {
            // openraft sends the first `fitting` entries at once, and no more than
            // that for its next few appends.
            self.shared
                .appends_cut
                .get_or_create(&PeerLabels { peer: self.target })
                .inc();
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fitting)));
        }
        let commit = rpc.leader_commit;
        let durable = self.shared.log_durability.durable_prefix(commit);
        let in_flight = self
            .shared
            .held_commit
            .sending(self.target, commit.map(|c| c.index), durable.map(|d| d.index));
        // Nor of entries a read lease holder lacks (`crate::read_lease`).
        rpc.leader_commit = self.shared.read_leases.commit_cap(self.target, &rpc.vote, durable);
        let last_sent = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let sent = Instant::now();
        let vote = rpc.vote;
        let response = self.call(Rpc::Append, &rpc, &option).await;
        drop(in_flight);
        // Anything but a higher vote means the follower accepted this leader (a
        // conflict only says its log differs).
        match &response {
            Ok(AppendEntriesResponse::Success) => {
                self.shared.quorum_clock.record(self.target, &vote, sent);
                if let Some(last) = last_sent {
                    self.shared.read_leases.record_match(self.target, vote, last);
                }
            }
            Ok(AppendEntriesResponse::PartialSuccess(matched)) => {
                self.shared.quorum_clock.record(self.target, &vote, sent);
                if let Some(last) = matched {
                    self.shared.read_leases.record_match(self.target, vote, *last);
                }
            }
            Ok(AppendEntriesResponse::Conflict) => self.shared.quorum_clock.record(self.target, &vote, sent),
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
        openraft::network::Backoff::new(retry_pauses(self.shared.heartbeat))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECENT: Duration = Duration::from_secs(60);

    #[test]
    fn a_failed_call_without_a_message_is_described_by_its_code() {
        assert_eq!(
            describe(&tonic::Status::unimplemented("")),
            "Operation is not implemented or not supported"
        );
        assert_eq!(
            describe(&tonic::Status::unavailable("peer went away")),
            "peer went away"
        );
    }

    #[test]
    fn peers_that_do_not_answer_pause_replication_and_other_failures_do_not() {
        let err = PeerError::Unreachable {
            addr: "127.0.0.1:1".into(),
            message: "test".into(),
        };
        for (code, failure, label) in [
            (tonic::Code::DeadlineExceeded, PeerFailure::Deadline, "deadline"),
            (tonic::Code::Unavailable, PeerFailure::Unreachable, "unreachable"),
            (tonic::Code::Cancelled, PeerFailure::Unreachable, "unreachable"),
            (tonic::Code::Internal, PeerFailure::Error, "error"),
        ] {
            assert_eq!(PeerFailure::of(code), failure, "{code:?}");
            assert_eq!(failure.label(), label);
            let rpc: RPCError<NodeId, BasicNode, RaftError<NodeId>> = failure.into_rpc_error(&err);
            assert_eq!(
                matches!(rpc, RPCError::Unreachable(_)),
                failure != PeerFailure::Error,
                "{code:?}: {rpc:?}"
            );
        }
    }

    #[test]
    fn a_call_dropped_at_its_deadline_is_a_missed_deadline_and_one_dropped_early_is_not() {
        let deadline = Duration::from_millis(50);
        assert!(ended_by_deadline(Duration::from_millis(50), deadline));
        assert!(ended_by_deadline(Duration::from_micros(49_500), deadline));
        assert!(!ended_by_deadline(Duration::from_millis(20), deadline));
    }

    #[test]
    fn retry_pauses_start_at_a_fifth_of_a_heartbeat_and_double_up_to_four_heartbeats() {
        let pauses: Vec<u64> = retry_pauses(Duration::from_millis(50))
            .take(8)
            .map(|p| p.as_millis() as u64)
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 200, 200, 200]);
    }

    #[test]
    fn a_follower_held_back_is_untold_until_an_append_tells_it() {
        let held = HeldCommit::default();
        let append = held.sending(2, Some(5), Some(4));
        assert_eq!(held.index.load(Ordering::Acquire), 5);
        assert_eq!(held.telling(5, RECENT), Telling::Waiting, "its append is in flight");
        drop(append);
        assert_eq!(held.telling(5, RECENT), Telling::Stuck, "answered, still untold");
        assert_eq!(held.telling(4, RECENT), Telling::Done, "nothing held at 4 or below");
        let _append = held.sending(2, Some(5), Some(5));
        assert_eq!(held.telling(5, RECENT), Telling::Done);
    }

    #[test]
    fn a_later_hold_is_kept_when_an_earlier_index_is_told() {
        let held = HeldCommit::default();
        drop(held.sending(2, Some(5), Some(4)));
        drop(held.sending(2, Some(7), Some(6)));
        assert_eq!(held.telling(7, RECENT), Telling::Stuck, "6 told, 7 still held");
        assert_eq!(held.telling(6, RECENT), Telling::Done, "the hold left is above 6");
        let _append = held.sending(3, Some(7), Some(7));
        assert_eq!(
            held.telling(7, RECENT),
            Telling::Stuck,
            "another follower told says nothing of 2"
        );
    }

    #[test]
    fn an_append_given_up_before_its_answer_is_no_longer_in_flight() {
        let held = HeldCommit::default();
        let append = held.sending(2, Some(5), Some(4));
        let cancelled = async move {
            let _append = append;
            std::future::pending::<()>().await;
        };
        drop(cancelled);
        assert_eq!(held.telling(5, RECENT), Telling::Stuck);
    }

    #[test]
    fn a_follower_told_each_earlier_hold_counts_from_its_latest() {
        let held = HeldCommit::default();
        drop(held.sending(2, Some(5), Some(4)));
        std::thread::sleep(Duration::from_millis(30));
        // Tells 5 and holds 6: the hold at 6 is new.
        drop(held.sending(2, Some(6), Some(5)));
        assert_eq!(held.telling(6, Duration::from_millis(20)), Telling::Stuck);
    }

    #[test]
    fn a_follower_left_untold_for_long_is_left_to_the_heartbeats() {
        let held = HeldCommit::default();
        drop(held.sending(2, Some(5), None));
        assert_eq!(held.telling(5, RECENT), Telling::Stuck);
        assert_eq!(held.telling(5, Duration::ZERO), Telling::Done);
    }

    #[tokio::test]
    async fn the_wait_ends_when_the_follower_is_told_and_asks_again_when_it_stays_idle() {
        let held = Arc::new(HeldCommit::default());
        let heartbeat = Duration::from_millis(200);
        let far = tokio::time::Instant::now() + Duration::from_secs(30);
        let append = held.sending(2, Some(5), Some(4));
        let waiter = tokio::spawn({
            let held = held.clone();
            async move { wait_until_told(&held, 5, heartbeat, far).await }
        });
        drop(append);
        drop(held.sending(2, Some(5), Some(5)));
        assert!(!waiter.await.unwrap(), "told: no heartbeat needed");

        drop(held.sending(3, Some(6), Some(5)));
        assert!(
            wait_until_told(&held, 6, heartbeat, far).await,
            "idle and untold: ask again"
        );
    }
}
