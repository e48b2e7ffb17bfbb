//! A running node: storage, Raft, the servers on their listeners, and the background
//! tasks, started together and stopped in order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_core::{ApplyResult, Command, LeaseId, Outcome, Revision};
use muster_store::{LogOptions, NodeId, SegmentLog, SharedState, StateMachineStore, TypeConfig};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState, SnapshotPolicy, Vote};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::error::ApiError;
use crate::forward::{ForwardRequest, ForwardResponse, MembershipChange};
use crate::identity::ClusterIdentity;
use crate::leases::LeaseKeeper;
use crate::metrics::Metrics;
use crate::network::{HeldCommit, NetworkFactory, PeerChannels, PeerError};
use crate::watch::WatchHub;

/// How long a write waits for a leader before answering UNAVAILABLE.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// How long a read waits for `min_revision` or a read index.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// The share of the heartbeat interval a leader pauses before it runs again a read
/// index round that too few followers answered (so that followers refusing
/// connections do not make it spin).
const QUORUM_RETRY_PAUSE_DIVISOR: u32 = 5;

/// The three listeners a node serves on, bound before the node starts (so tests can
/// bind port 0 and learn the addresses first).
pub struct Listeners {
    /// Client gRPC API.
    pub grpc: TcpListener,
    /// Peer Raft traffic.
    pub peer: TcpListener,
    /// HTTP.
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `config`.
    pub async fn bind(config: &NodeConfig) -> std::io::Result<Self> {
        Self::bind_addrs(config.grpc_addr, config.peer_addr, config.http_addr).await
    }

    /// Binds three addresses.
    pub async fn bind_addrs(grpc: SocketAddr, peer: SocketAddr, http: SocketAddr) -> std::io::Result<Self> {
        Ok(Listeners {
            grpc: TcpListener::bind(grpc).await?,
            peer: TcpListener::bind(peer).await?,
            http: TcpListener::bind(http).await?,
        })
    }
}

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory could not be used.
    #[error("data directory {path}: {message}")]
    DataDir {
        /// The directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// Storage failed to open.
    #[error("storage: {0}")]
    Storage(String),
    /// Raft failed to start.
    #[error("raft: {0}")]
    Raft(String),
    /// The TLS certificate, key or CA could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything the API handlers and background tasks share.
pub struct NodeCore {
    /// This node's id.
    pub id: u64,
    /// The configuration it runs with.
    pub config: NodeConfig,
    /// TLS for the node's ports and the connections it opens, when configured.
    pub tls: Option<crate::tls::NodeTls>,
    /// The Raft instance.
    pub raft: Raft<TypeConfig>,
    /// The registry as applied on this node.
    pub shared: Arc<SharedState>,
    /// The watch hub.
    pub hub: Arc<WatchHub>,
    /// The lease keeper (active on the leader).
    pub leases: LeaseKeeper,
    /// The TTL check keeper (active on the leader).
    pub checks: crate::checks::CheckKeeper,
    /// Per-service change notifications for blocking queries.
    pub changes: crate::blocking::ChangeNotifier,
    /// Channels to peers.
    pub channels: PeerChannels,
    /// The cluster this node belongs to; peers of another cluster are refused.
    pub cluster: Arc<ClusterIdentity>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the node stops.
    pub shutdown: CancellationToken,
    /// The last log index on disk when this node started (see `read_index_local`).
    pub startup_last_log_index: u64,
    /// Whether this node held a vote or log entries when it started.
    pub voted_before: bool,
    /// When a quorum last accepted this node as leader (lease reads, keep-alives).
    pub quorum_clock: Arc<crate::leader_lease::QuorumClock>,
    /// The read leases this node granted as leader.
    pub read_leases: Arc<crate::read_lease::ReadLeaseTable>,
    /// This node's read lease as a follower.
    pub follower_read_lease: crate::read_lease::FollowerReadLease,
    /// How far this node's log is appended and on disk.
    pub log_durability: muster_store::LogDurability<TypeConfig>,
    /// Batches linearizable reads into one read index per round.
    pub read_index_batcher: Arc<crate::read_index::ReadIndexBatcher>,
    /// Batches concurrent writes into one Raft entry.
    pub write_batcher: crate::write_batch::WriteBatcher,
    /// Numbers the writes this node forwards, so a retry cannot apply one twice.
    pub forwarded_writes: crate::forward::ForwardedWrites,
    /// Discover answers encoded once per service revision.
    pub discover_cache: crate::discover_cache::DiscoverCache,
    /// The command level each peer answers with (see [`crate::member_levels`]).
    pub member_levels: Arc<crate::member_levels::MemberLevels>,
    started: Instant,
    last_leader_contact_ms: AtomicU64,
    /// Highest commit index a leader has reported to this node in an append.
    leader_commit: AtomicU64,
    /// Whether a leader has reached this node since it started.
    leader_contacted: AtomicBool,
}

/// Where a node stands, attached to every answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Applied revision.
    pub revision: Revision,
    /// This node.
    pub node_id: u64,
    /// The leader, if known.
    pub leader_id: Option<u64>,
    /// Milliseconds since this node last heard from the leader.
    pub ms_since_leader_contact: u64,
}

impl NodeCore {
    /// Records that the leader just reached this node (called by the peer service).
    pub fn touch_leader_contact(&self) {
        self.last_leader_contact_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.leader_contacted.store(true, Ordering::Relaxed);
    }

    /// Whether a leader has reached this node (append or snapshot) since it started.
    pub fn leader_contacted(&self) -> bool {
        self.leader_contacted.load(Ordering::Relaxed)
    }

    /// Whether a leader reached this node (append or snapshot) within `within`.
    pub fn heard_from_leader_within(&self, within: Duration) -> bool {
        self.leader_contacted() && self.ms_since_leader_append() < within.as_millis() as u64
    }

    /// Asks the node to read its TLS files again now (see
    /// [`crate::tls::run_reloader`]); nothing happens on a node without TLS.
    pub fn request_tls_reload(&self) {
        if let Some(tls) = &self.tls {
            tls.request_reload();
        }
    }

    /// How long since a leader's append or snapshot last reached this node (since its
    /// start when none has).
    pub fn since_leader_contact(&self) -> Duration {
        Duration::from_millis(self.ms_since_leader_append())
    }

    /// Milliseconds since a leader's append or snapshot last reached this node (since
    /// its start when none has).
    fn ms_since_leader_append(&self) -> u64 {
        let last = self.last_leader_contact_ms.load(Ordering::Relaxed);
        (self.started.elapsed().as_millis() as u64).saturating_sub(last)
    }

    /// Records the commit index the leader reported in an append (called by the peer
    /// service), so a follower can tell how far behind it is.
    pub fn note_leader_commit(&self, index: u64) {
        self.leader_commit.fetch_max(index, Ordering::Relaxed);
    }

    /// The highest commit index a leader has reported to this node (0: none yet).
    pub fn leader_commit(&self) -> u64 {
        self.leader_commit.load(Ordering::Relaxed)
    }

    /// The leader's id and peer address, as this node knows them.
    pub fn leader(&self) -> Option<(u64, String)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&leader)?.addr.clone();
        Some((leader, addr))
    }

    /// The term in which this node leads, or `None` when it does not lead.
    pub fn leader_term(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        (m.state == ServerState::Leader && m.current_leader == Some(self.id)).then_some(m.current_term)
    }

    /// This node's last log index when it leads and its leader lease holds: a quorum
    /// accepted appends it sent within half the minimum election timeout, so no other
    /// leader can have been elected since (see [`crate::leader_lease`]). `None` when it
    /// does not lead, leads a joint membership, or the lease ran out.
    pub fn leased_leadership(&self) -> Option<u64> {
        self.leader_lease().map(|(_, _, last_log_index)| last_log_index)
    }

    /// When this leader's lease ends, with the vote it leads under; `None` when this
    /// node does not lead with a running lease.
    pub fn leader_lease_end(&self) -> Option<(Vote<NodeId>, Instant)> {
        self.leader_lease().map(|(vote, end, _)| (vote, end))
    }

    /// The vote, the end and the last log index of this leader's running lease.
    fn leader_lease(&self) -> Option<(Vote<NodeId>, Instant, u64)> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        if m.state != ServerState::Leader || m.current_leader != Some(self.id) {
            return None;
        }
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() != 1 {
            return None;
        }
        let now = Instant::now();
        let accepted = self
            .quorum_clock
            .quorum_accepted_at(self.id, &m.vote, membership.voter_ids(), now)?;
        let end = accepted + self.config.raft.election_min / 2;
        (now <= end).then_some((m.vote, end, m.last_log_index.unwrap_or(0)))
    }

    /// Time since this node started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        self.leader_term().is_some()
    }

    /// Where this node stands now. Called for every answer, so it reads the Raft
    /// metrics in place instead of cloning them.
    pub fn view(&self) -> NodeView {
        let (leader_id, quorum_ack) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            (m.current_leader, m.millis_since_quorum_ack)
        };
        let ms_since_leader_contact = if leader_id == Some(self.id) {
            quorum_ack.unwrap_or(0)
        } else {
            self.ms_since_leader_append()
        };
        NodeView {
            revision: self.shared.current_revision(),
            node_id: self.id,
            leader_id,
            ms_since_leader_contact,
        }
    }

    /// Leader time for a command: milliseconds since the Unix epoch.
    pub fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Proposes a command through Raft, forwarding it to the leader when this node is
    /// not. A rejected command comes back as its `ApiError`.
    pub async fn propose(&self, command: Command) -> Result<ApplyResult, ApiError> {
        let result = self.propose_raw(command).await?;
        self.await_applied_here(result.revision).await;
        match result.outcome {
            Outcome::Rejected(r) => Err(r.into()),
            _ => Ok(result),
        }
    }

    /// Proposes `command` here when this node leads, else forwards it to the leader,
    /// until one answers or the write deadline passes.
    ///
    /// A forwarded attempt that got no answer (the leader died, or the connection
    /// broke after sending) may still be committed, so once a command has been
    /// forwarded it travels numbered in this node's forwarding session, and every
    /// later attempt, forwarded or proposed here, carries the same number: the state
    /// machine applies it once and answers a repeat with the first result. (Found by
    /// the fault suite, seed 40019: a registration retried on the next leader was
    /// applied twice, the second time over a newer write of the same key;
    /// regression test in `crates/muster-chaos/tests/regressions.rs`.)
    async fn propose_raw(&self, command: Command) -> Result<ApplyResult, ApiError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut command = command;
        let mut in_flight = None;
        // Whether an attempt went unanswered, so the write may be in the log already.
        let mut maybe_written = false;
        // Why the last forwarded attempt was refused, if it was.
        let mut refused = None;
        loop {
            // Checked again before each attempt, since the leader may have changed or
            // stated its level meanwhile (a node that just started may know its
            // leader from its saved vote before hearing from it). A write that may be
            // in the log already is not refused: its fate is not known.
            if !maybe_written {
                self.check_members_can_apply(&command)?;
            }
            if in_flight.is_some() {
                self.metrics.forwarded_write_retries.inc();
            }
            // openraft answers ForwardToLeader only for entries it did not append or
            // truncated, so proposing again after it is safe.
            match self.write_batcher.write(self, command.clone()).await {
                Ok(result) => return Ok(result),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    if let Some(node) = f.leader_node {
                        if in_flight.is_none() {
                            let (numbered, numbered_in_flight) = self.forwarded_writes.number(command);
                            command = numbered;
                            in_flight = Some(numbered_in_flight);
                        }
                        self.metrics.forwarded_writes.inc();
                        let request = ForwardRequest::Write(Box::new(command.clone()));
                        match self.channels.forward(&node.addr, &request, WRITE_DEADLINE).await {
                            Ok(ForwardResponse::Written(r)) => return Ok(r),
                            Ok(ForwardResponse::Failed(e)) => return Err(e),
                            // The leader stepped down before appending it: try again.
                            Ok(ForwardResponse::NotLeader) => {}
                            // The leader could not read it (an older build, during a
                            // rolling upgrade): nothing was written. The next check
                            // refuses it once the leader's appends state its level.
                            Err(PeerError::Refused { message, .. }) => refused = Some(message),
                            // No answer: the write may have been appended.
                            Ok(_) | Err(_) => maybe_written = true,
                        }
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    return Err(ApiError::Internal(e.to_string()))
                }
                Err(RaftError::Fatal(_)) => return Err(ApiError::ShuttingDown),
            }
            if Instant::now() >= deadline || self.shutdown.is_cancelled() {
                let reason = match refused {
                    Some(message) if !maybe_written => format!("the leader refused the write: {message}"),
                    _ => "no leader elected or reachable within 5s".into(),
                };
                return Err(ApiError::NoLeader {
                    reason,
                    retry_after_ms: 500,
                });
            }
            self.wait_for_leader_change().await;
        }
    }

    /// Waits briefly for the Raft metrics to change (a new leader), at most 100 ms.
    pub(crate) async fn wait_for_leader_change(&self) {
        let mut metrics = self.raft.metrics();
        let _ = tokio::time::timeout(Duration::from_millis(100), metrics.changed()).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    pub(crate) async fn forward_to(&self, addr: &str, request: &ForwardRequest) -> Result<ForwardResponse, ApiError> {
        self.channels
            .forward(addr, request, WRITE_DEADLINE)
            .await
            .map_err(|e| ApiError::NoLeader {
                reason: e.to_string(),
                retry_after_ms: 200,
            })
    }

    /// Renews leases on the leader (here, or forwarded). Answers each lease's TTL, 0
    /// when the lease no longer exists.
    pub async fn keep_alive(&self, ids: Vec<LeaseId>) -> Result<Vec<(LeaseId, u64)>, ApiError> {
        let deadline = Instant::now() + WRITE_DEADLINE;
        loop {
            if let Some(answer) = self.leases.keep_alive_local(self, &ids) {
                return Ok(answer);
            }
            if let Some((leader, addr)) = self.leader() {
                if leader != self.id {
                    match self.forward_to(&addr, &ForwardRequest::KeepAlive(ids.clone())).await {
                        Ok(ForwardResponse::KeptAlive(answer)) => return Ok(answer),
                        Ok(ForwardResponse::Failed(e)) => return Err(e),
                        Ok(_) | Err(_) => {}
                    }
                }
            }
            if Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Err(ApiError::NoLeader {
                    reason: "no leader to renew leases with".into(),
                    retry_after_ms: 500,
                });
            }
            self.wait_for_leader_change().await;
        }
    }

    /// After a write the leader applied: waits (usually a millisecond) until this node
    /// has applied it too, so a client reads its own write from the node it wrote
    /// through, whatever the frontend. A timeout is logged, not returned: the write
    /// itself succeeded.
    pub async fn await_applied_here(&self, revision: Revision) {
        if self.shared.current_revision() < revision {
            if let Err(e) = self.wait_for_revision(revision).await {
                tracing::warn!(error = %e, revision, "write applied on the leader but not yet here");
            }
        }
    }

    /// Waits until this node has applied `revision`.
    pub async fn wait_for_revision(&self, revision: Revision) -> Result<(), ApiError> {
        let mut rx = self.shared.revision();
        let reached = tokio::time::timeout(READ_DEADLINE, async {
            rx.wait_for(|r| *r >= revision).await.map(|_| ())
        })
        .await;
        match reached {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ApiError::ShuttingDown),
            Err(_) => Err(ApiError::Timeout(format!(
                "min_revision {revision} not reached within {}s (node is at {})",
                READ_DEADLINE.as_secs(),
                self.shared.current_revision()
            ))),
        }
    }

    /// Makes the next local read linearizable: waits until this node has applied the
    /// read index, which comes from its read lease as a follower
    /// ([`crate::read_lease`]) or from the leader, confirmed by a quorum.
    pub async fn linearizable_barrier(&self) -> Result<(), ApiError> {
        if let Some(index) = self.follower_lease_read_index() {
            // Entries of a former leader still at the end of this log may never be
            // committed: if the lease's index is not applied soon, ask the leader.
            let wait = self.config.raft.heartbeat * 2;
            if self.wait_applied(index, wait).await.is_ok() {
                return Ok(());
            }
        }
        let index = self.read_index_batcher.read_index(|| self.fetch_read_index(1)).await?;
        self.wait_applied(index, READ_DEADLINE).await
    }

    /// Waits at most `timeout` until this node has applied the log up to `index`.
    async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), ApiError> {
        // Usually already applied: openraft's wait copies the whole metrics first.
        let applied = self.raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
        if applied >= index {
            return Ok(());
        }
        let waited = self
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "linearizable read")
            .await;
        waited.map(|_| ()).map_err(|e| ApiError::Timeout(e.to_string()))
    }

    /// Obtains a read index for `readers` linearizable reads: confirmed by a quorum
    /// on the leader (here, or asked of the leader). Called once per batch of
    /// concurrent readers, or by a lone reader, through
    /// [`crate::read_index::ReadIndexBatcher`].
    pub async fn fetch_read_index(&self, readers: usize) -> Result<u64, ApiError> {
        self.metrics.read_index_batch_size.observe(readers as f64);
        let deadline = Instant::now() + READ_DEADLINE;
        let index = loop {
            match self.read_index_local().await {
                Ok(index) => break index,
                Err(None) => {}
                Err(Some(e)) => return Err(e),
            }
            if let Some((leader, addr)) = self.leader() {
                if leader != self.id {
                    match self.forward_to(&addr, &ForwardRequest::ReadIndex).await {
                        Ok(ForwardResponse::ReadIndex(index)) => break index,
                        Ok(ForwardResponse::Failed(e)) => return Err(e),
                        Ok(_) | Err(_) => {}
                    }
                }
            }
            if Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Err(ApiError::NoLeader {
                    reason: "no leader to confirm a linearizable read".into(),
                    retry_after_ms: 500,
                });
            }
            self.wait_for_leader_change().await;
        };
        Ok(index)
    }

    /// The read index when this node is the leader; `Err(None)` when it is not. It is
    /// answered once every follower holding a read lease has appended it.
    pub async fn read_index_local(&self) -> Result<u64, Option<ApiError>> {
        let index = self.leader_read_index().await?;
        self.await_read_lease_holders(index).await;
        Ok(index)
    }

    async fn leader_read_index(&self) -> Result<u64, Option<ApiError>> {
        // A round that too few followers answer in time (a loaded machine, a long
        // fsync) is run again, for up to an election timeout from the first: a
        // leader cut off from its quorum for that long has likely been replaced, and
        // the reader is told to go elsewhere.
        let mut give_up = None;
        loop {
            // Within the leader lease every entry committed so far is in this
            // leader's log (entries are acknowledged only once committed, after the
            // metrics showing them appended were published), so its last index is a
            // read index without a heartbeat round.
            if let Some(last_log_index) = self.leased_leadership() {
                self.metrics.lease_reads.inc();
                return Ok(last_log_index.max(self.startup_last_log_index));
            }
            match self.raft.get_read_log_id().await {
                // A leader restored at start-up in its old term computes its read
                // index from the commit index it persisted before the crash, which
                // may be behind entries it had acknowledged. Those entries are in its
                // own log, so never read below the log it started with.
                Ok((read, _applied)) => return Ok(read.map_or(0, |l| l.index).max(self.startup_last_log_index)),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => return Err(None),
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                    let now = Instant::now();
                    let give_up = *give_up.get_or_insert(now + self.config.raft.election_max);
                    if now >= give_up || self.shutdown.is_cancelled() {
                        return Err(Some(ApiError::NoLeader {
                            reason: e.to_string(),
                            retry_after_ms: 500,
                        }));
                    }
                    self.metrics.read_index_quorum_retries.inc();
                    tokio::time::sleep(self.config.raft.heartbeat / QUORUM_RETRY_PAUSE_DIVISOR).await;
                }
                Err(RaftError::Fatal(_)) => return Err(Some(ApiError::ShuttingDown)),
            }
        }
    }

    /// Runs a membership change on the leader (here, or forwarded).
    pub async fn change_membership(&self, change: MembershipChange) -> Result<u64, ApiError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.is_leader() {
                match self.change_membership_local(&change).await {
                    Err(None) => {}
                    Ok(index) => return Ok(index),
                    Err(Some(e)) => return Err(e),
                }
            } else if let Some((_, addr)) = self.leader() {
                match self
                    .forward_to(&addr, &ForwardRequest::Membership(change.clone()))
                    .await
                {
                    Ok(ForwardResponse::MembershipChanged(i)) => {
                        self.await_membership_here(i).await;
                        return Ok(i);
                    }
                    Ok(ForwardResponse::Failed(e)) => return Err(e),
                    Ok(_) | Err(_) => {}
                }
            }
            if Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Err(ApiError::NoLeader {
                    reason: "no leader for a membership change".into(),
                    retry_after_ms: 1000,
                });
            }
            self.wait_for_leader_change().await;
        }
    }

    /// Waits (up to the write deadline) until this node holds the membership
    /// entry at `index`, so that a change made through this node is what its own
    /// member list answers next.
    async fn await_membership_here(&self, index: u64) {
        let held = self
            .raft
            .wait(Some(WRITE_DEADLINE))
            .metrics(
                |m| m.membership_config.log_id().is_some_and(|l| l.index >= index),
                "membership entry held here",
            )
            .await;
        if let Err(e) = held {
            tracing::debug!(index, error = %e, "membership change not yet seen on this node");
        }
    }

    /// A membership change on this node as leader; `Err(None)` when it is not.
    pub async fn change_membership_local(&self, change: &MembershipChange) -> Result<u64, Option<ApiError>> {
        let result = match change {
            MembershipChange::AddLearner { id, addr } => {
                muster_core::validate::address(addr.split(':').next().unwrap_or(""))
                    .map_err(|e| Some(ApiError::Invalid(e)))?;
                if *id == 0 {
                    return Err(Some(ApiError::Invalid(muster_core::ValidationError::new(
                        "node_id",
                        "node ids start at 1",
                    ))));
                }
                let existing = self
                    .raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(id)
                    .map(|n| n.addr.clone());
                if let Some(current) = existing.filter(|current| current != addr) {
                    return Err(Some(ApiError::Membership(format!(
                        "node id {id} is already used by the member at {current}; give the new node an unused --id (or remove node {id} first)"
                    ))));
                }
                self.raft.add_learner(*id, BasicNode::new(addr.clone()), true).await
            }
            MembershipChange::Promote(id) => {
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds([*id].into()), false)
                    .await
            }
            MembershipChange::Remove(id) => {
                let m = self.raft.metrics().borrow().membership_config.clone();
                let is_voter = m.membership().voter_ids().any(|v| v == *id);
                if is_voter {
                    self.raft
                        .change_membership(ChangeMembers::RemoveVoters([*id].into()), false)
                        .await
                } else {
                    self.raft
                        .change_membership(ChangeMembers::RemoveNodes([*id].into()), false)
                        .await
                }
            }
        };
        match result {
            Ok(resp) => Ok(resp.log_id.index),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(None),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(Some(ApiError::Membership(e.to_string())))
            }
            Err(RaftError::Fatal(_)) => Err(Some(ApiError::ShuttingDown)),
        }
    }
}

/// A running node. Dropping it does not stop the node; call [`NodeHandle::shutdown`].
pub struct NodeHandle {
    core: Arc<NodeCore>,
    tasks: Vec<JoinHandle<()>>,
    store_open: std::sync::Weak<()>,
}

impl NodeHandle {
    /// The shared core (tests, embedding).
    pub fn core(&self) -> &Arc<NodeCore> {
        &self.core
    }

    /// Stops the node: stops accepting requests, ends watch streams, stops Raft and
    /// waits (up to 10 s) for the tasks.
    pub async fn shutdown(self) {
        tracing::info!(node = self.core.id, "shutting down");
        self.core.shutdown.cancel();
        let grace = Duration::from_secs(10);
        let _ = tokio::time::timeout(grace, async {
            for task in self.tasks {
                let _ = task.await;
            }
        })
        .await;
        if let Err(e) = self.core.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        // openraft's state machine task ends shortly after; wait for it to close the
        // database so the same directory can be opened again in this process.
        let closed = tokio::time::timeout(grace, async {
            while self.store_open.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if closed.is_err() {
            tracing::warn!("state database still open after shutdown");
        }
        tracing::info!(node = self.core.id, "stopped");
    }
}

/// Node start-up.
pub struct Node;

impl Node {
    /// Opens storage, starts Raft, serves the listeners and the background tasks, and
    /// bootstraps or joins the cluster as configured.
    pub async fn start(config: NodeConfig, listeners: Listeners) -> Result<NodeHandle, NodeError> {
        config.validate()?;
        let tls = config.tls.as_ref().map(crate::tls::NodeTls::load).transpose()?;
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|e| NodeError::DataDir {
            path: data_dir.display().to_string(),
            message: e.to_string(),
        })?;
        let cluster_id = crate::identity::check_or_record(&config)?;
        let cluster = Arc::new(ClusterIdentity::new(cluster_id, Some(data_dir.clone())));
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(WatchHub::new(config.watch.clone(), metrics.clone()));
        let mut log = SegmentLog::<TypeConfig>::open(&data_dir.join("raft"), LogOptions::default())
            .map_err(|e| NodeError::Storage(e.to_string()))?;
        // The leader's disk flushes its entries while they travel to the followers; the
        // state machine and the commit index sent to followers wait for that flush.
        log.flush_leader_appends_in_background(config.id);
        let log_durability = log.durability();
        let startup_last_log_index = openraft::storage::RaftLogStorage::get_log_state(&mut log)
            .await
            .map_err(|e| NodeError::Storage(e.to_string()))?
            .last_log_id
            .map_or(0, |l| l.index);
        // A node that never voted nor holds entries never accepted a leader, so it
        // has no promise to keep after starting (see `crate::peer`'s vote).
        let voted_before = openraft::storage::RaftLogStorage::read_vote(&mut log)
            .await
            .map_err(|e| NodeError::Storage(e.to_string()))?
            .is_some()
            || startup_last_log_index > 0;
        let mut state_machine = StateMachineStore::open(&data_dir, config.state_cache_bytes, hub.clone())
            .map_err(|e| NodeError::Storage(e.to_string()))?;
        state_machine.apply_only_durable_entries(log_durability.clone());
        // A leader shows no entry a read lease holder lacks (`crate::read_lease`).
        let read_leases = Arc::new(crate::read_lease::ReadLeaseTable::default());
        state_machine.apply_after(read_leases.clone());
        let shared = state_machine.shared();
        let store_open = state_machine.open_marker();
        let raft_config = openraft::Config {
            cluster_name: "muster".into(),
            heartbeat_interval: config.raft.heartbeat.as_millis() as u64,
            election_timeout_min: config.raft.election_min.as_millis() as u64,
            election_timeout_max: config.raft.election_max.as_millis() as u64,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.raft.snapshot_every),
            max_in_snapshot_log_to_keep: config.raft.keep_behind_snapshot,
            purge_batch_size: 256,
            max_payload_entries: 512,
            // Elections start only while a quorum would join them (`crate::pre_vote`).
            enable_elect: false,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let channels = PeerChannels::new(cluster.clone()).with_tls(tls.clone());
        let quorum_clock = Arc::new(crate::leader_lease::QuorumClock::default());
        let held_commit = Arc::new(HeldCommit::default());
        let member_levels = Arc::new(crate::member_levels::MemberLevels::new(config.command_level));
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            NetworkFactory {
                channels: channels.clone(),
                quorum_clock: quorum_clock.clone(),
                log_durability: log_durability.clone(),
                held_commit: held_commit.clone(),
                read_leases: read_leases.clone(),
                heartbeat: config.raft.heartbeat,
                failures: metrics.peer_call_failures.clone(),
                appends_cut: metrics.peer_appends_cut.clone(),
                member_levels: member_levels.clone(),
            },
            log,
            state_machine,
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;

        let write_batcher = crate::write_batch::WriteBatcher::new(metrics.lone_writes.clone());
        let core = Arc::new(NodeCore {
            id: config.id,
            leases: LeaseKeeper::new(config.leases.clone(), metrics.clone()),
            checks: crate::checks::CheckKeeper::new(),
            changes: crate::blocking::ChangeNotifier::new(),
            config,
            raft,
            shared,
            hub,
            channels,
            cluster,
            tls,
            metrics,
            shutdown: CancellationToken::new(),
            read_index_batcher: Default::default(),
            read_leases,
            follower_read_lease: Default::default(),
            log_durability: log_durability.clone(),
            write_batcher,
            forwarded_writes: Default::default(),
            discover_cache: Default::default(),
            member_levels,
            quorum_clock,
            voted_before,
            startup_last_log_index,
            started: Instant::now(),
            last_leader_contact_ms: AtomicU64::new(0),
            leader_commit: AtomicU64::new(0),
            leader_contacted: AtomicBool::new(false),
        });

        let tasks = vec![
            tokio::spawn(crate::peer::serve(core.clone(), listeners.peer)),
            tokio::spawn(crate::grpc::serve(core.clone(), listeners.grpc)),
            tokio::spawn(crate::http::serve(core.clone(), listeners.http)),
            tokio::spawn(crate::tls::run_reloader(core.clone())),
            tokio::spawn(crate::leases::run(core.clone())),
            tokio::spawn(crate::replication::run(core.clone())),
            tokio::spawn(crate::read_index::run(core.clone())),
            tokio::spawn(crate::write_batch::run(core.clone())),
            tokio::spawn(crate::snapshots::run(core.clone())),
            tokio::spawn(crate::checks::run(core.clone())),
            tokio::spawn(crate::blocking::run(core.clone())),
            tokio::spawn(crate::metrics::run_raft_gauges(core.clone())),
            tokio::spawn(crate::network::resend_held_commit(
                core.raft.clone(),
                held_commit,
                log_durability,
                core.config.raft.heartbeat,
                core.metrics.held_commits_resent.clone(),
                core.shutdown.clone(),
            )),
            tokio::spawn(crate::read_lease::run(core.clone())),
            tokio::spawn(crate::pre_vote::run(core.clone())),
            tokio::spawn(crate::read_lease::keep_leader_lease_ahead(core.clone())),
            tokio::spawn(crate::read_lease::resend_capped_commit(
                core.raft.clone(),
                core.read_leases.clone(),
                core.shutdown.clone(),
            )),
            tokio::spawn(close_watches_on_shutdown(core.clone())),
        ];

        bootstrap(&core).await?;
        tracing::info!(
            node = core.id,
            grpc = %core.config.grpc_addr,
            peer = %core.config.advertised_peer_addr(),
            http = %core.config.http_addr,
            revision = core.shared.current_revision(),
            "node started"
        );
        Ok(NodeHandle {
            core,
            tasks,
            store_open,
        })
    }
}

/// Ends every watch when the node stops, so long-lived streams do not hold up the
/// servers' graceful shutdown.
async fn close_watches_on_shutdown(core: Arc<NodeCore>) {
    core.shutdown.cancelled().await;
    core.hub.close();
}

async fn bootstrap(core: &Arc<NodeCore>) -> Result<(), NodeError> {
    if !core.config.initial_cluster.is_empty() {
        let initialized = core
            .raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        if !initialized {
            let members: BTreeMap<u64, BasicNode> = core
                .config
                .initial_cluster
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
                .collect();
            // Every member is started with the same list; whichever initializes
            // first wins and the others learn the same membership from it.
            if let Err(e) = core.raft.initialize(members).await {
                tracing::debug!(error = %e, "initialize skipped");
            }
        }
    }
    if let Some(join) = core.config.join.clone() {
        let core = core.clone();
        tokio::spawn(async move { crate::join::join_cluster(core, join).await });
    }
    Ok(())
}

impl NodeCore {
    /// Proposes `command` through this node's Raft and answers its applied result
    /// once every follower holding a read lease has appended it (see
    /// [`crate::read_lease`]).
    pub async fn client_write(
        &self,
        command: Command,
    ) -> Result<ApplyResult, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> {
        let response = self.raft.client_write(command).await?;
        self.await_read_lease_holders(response.log_id.index).await;
        Ok(response.data)
    }

    /// Refuses a command some member is known to be too old to apply (see
    /// [`crate::member_levels`]). Every write passes here before it is proposed:
    /// on the node that took it, and on the leader for a forwarded one. The leader
    /// hears every member's level with each append; a follower hears only the
    /// leader's (with the leader's appends), so it checks only that one, and leaves
    /// the rest to the leader.
    fn check_members_can_apply(&self, command: &Command) -> Result<(), ApiError> {
        let needed = command.level();
        if needed <= 1 {
            return Ok(());
        }
        let others: Vec<u64> = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            match m.current_leader {
                Some(leader) if leader == self.id => m
                    .membership_config
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .filter(|id| *id != self.id)
                    .collect(),
                leader => leader.into_iter().collect(),
            }
        };
        self.member_levels.check(others, needed)
    }

    /// Proposes a command only if this node leads; never forwards. Used for the
    /// leader's own decisions (lease expiry), which a former leader must not push to
    /// its successor.
    pub async fn propose_on_leader(&self, command: Command) -> Result<ApplyResult, ApiError> {
        self.check_members_can_apply(&command)?;
        match self.client_write(command).await {
            Ok(result) => Ok(result),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(ApiError::NoLeader {
                reason: "no longer the leader".into(),
                retry_after_ms: 0,
            }),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(ApiError::Internal(e.to_string()))
            }
            Err(RaftError::Fatal(_)) => Err(ApiError::ShuttingDown),
        }
    }
}
