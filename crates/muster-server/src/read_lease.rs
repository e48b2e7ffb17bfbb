//! Follower read leases: linearizable reads a follower answers from its own memory,
//! without asking the leader for a read index on each batch of reads.
//!
//! A follower that serves linearizable reads asks the leader for a lease every
//! [`RENEW_EVERY`]. The leader grants one only while its own leader lease holds
//! ([`crate::leader_lease`]), and never past that lease's end: no other leader can
//! commit anything before then, so nothing a later leader does can be missed by a
//! read under the lease. While a lease it granted runs, the leader keeps three
//! promises to its holder (the [`ReadLeaseTable`]):
//!
//! 1. it answers no write and no read index at a log index the holder has not
//!    appended ([`ReadLeaseTable::await_holders`]);
//! 2. it tells no node (holder or not) that an entry is committed before every other
//!    holder has appended it ([`ReadLeaseTable::commit_cap`]), and applies none itself
//!    before then (its [`muster_store::ApplyGate`]), so nothing a node applies, and
//!    may show in a linearizable read, is missing from a holder's log;
//! 3. the grant carries the leader's last log index at the time (the floor), which
//!    covers every entry answered or sent as committed before the grant.
//!
//! A holder answers a linearizable read once it has applied everything it had
//! appended when the read arrived and the floor: each entry answered before the read
//! began is in that prefix, and so is everything any node could have shown. The
//! holder counts its lease from when it sent the request and relies on less than
//! half of it, so it ends before the leader's view of it even when the leader's
//! clock runs twice as fast. A holder that stops appending (partitioned, paused,
//! slow) delays the leader's answers by at most the rest of its lease.
//!
//! A holder reads under its lease only while it follows the leader and term that
//! granted it; if what it must wait for is not applied within two heartbeats (the
//! end of its log may hold a former leader's entries that will never commit), it
//! asks the leader for a read index as a follower without a lease does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use muster_store::{NodeId, TypeConfig};
use openraft::{LogId, Raft, ServerState, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::forward::{ForwardRequest, ForwardResponse};
use crate::node::NodeCore;

/// How often a follower serving linearizable reads renews its lease. Grants last
/// until the leader's own lease ends, 50-100 ms ahead with the default timing, and
/// the holder relies on less than half of that ([`TRUSTED_SHARE`]).
pub const RENEW_EVERY: Duration = Duration::from_millis(10);

/// The longest a follower waits before asking again after its lease requests were
/// refused or failed: the wait doubles from [`RENEW_EVERY`] with each refusal in a
/// row, so a leader that grants none (read leases off there, or no leader lease)
/// is not asked a hundred times a second, and a lease is back soon after a brief
/// refusal (a new leader's first heartbeats).
pub const MAX_REFUSED_WAIT: Duration = Duration::from_millis(640);

/// How long a follower keeps renewing its lease after its last linearizable read.
pub const KEEP_WHILE_IDLE: Duration = Duration::from_secs(2);

/// How many entries a follower may be behind the leader's log and still get a
/// lease. A holder holds back the leader's answers until it has appended each
/// entry, so a node catching up (restarted, or slow) reads through the leader
/// instead of slowing every write to its pace.
pub const MAX_HOLDER_LAG: u64 = 256;

/// The share of a granted duration a holder relies on: the rest is margin for
/// clocks that run at different rates on the two nodes. The leader measures the
/// lease on its clock and the holder on its own; at 0.45 a holder's lease ends in
/// time as long as the leader's clock runs less than 2.2 times as fast as the
/// holder's (the fault suite runs nodes at twice real speed).
pub const TRUSTED_SHARE: f64 = 0.45;

/// The leader's answer to a lease request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadLeaseGrant {
    /// The term of the leader that granted it.
    pub term: u64,
    /// How long the lease runs, in microseconds, from when the leader granted it.
    pub valid_for_micros: u64,
    /// The leader's last log index when it granted the lease: a read under it waits
    /// until this is applied.
    pub floor: u64,
}

/// A lease as the leader sees it.
#[derive(Clone, Copy, Debug)]
struct Granted {
    vote: Vote<NodeId>,
    expires: Instant,
}

#[derive(Default)]
struct Table {
    leases: HashMap<NodeId, Granted>,
    /// The last entry each follower is known to hold, per leader vote.
    matched: HashMap<NodeId, (Vote<NodeId>, LogId<NodeId>)>,
}

impl Table {
    /// The leases held by nodes other than `except` that run at `now`, each with the
    /// last entry its holder is known to have appended from the leader that granted
    /// it. A lease granted under an earlier vote of this node still counts until it
    /// ends, though no progress under that vote will come.
    fn running(
        &self,
        except: Option<NodeId>,
        now: Instant,
    ) -> impl Iterator<Item = (Granted, Option<LogId<NodeId>>)> + '_ {
        self.leases
            .iter()
            .filter(move |(id, g)| Some(**id) != except && g.expires > now)
            .map(move |(id, g)| {
                let matched = self.matched.get(id).filter(|(v, _)| *v == g.vote).map(|(_, l)| *l);
                (*g, matched)
            })
    }
}

/// The leases this node granted as leader, and how far each holder's log is known
/// to reach.
pub struct ReadLeaseTable {
    table: Mutex<Table>,
    /// Whether a lease may still be running (false: every check is skipped).
    any: AtomicBool,
    /// Bumped when a holder's log is known to reach further.
    progress: watch::Sender<u64>,
    /// Set when a commit index was held back from a node for a holder.
    capped: AtomicBool,
    /// Woken when a holder reached further after a commit index was held back.
    cap_lifted: Notify,
}

impl Default for ReadLeaseTable {
    fn default() -> Self {
        ReadLeaseTable {
            table: Mutex::default(),
            any: AtomicBool::new(false),
            progress: watch::Sender::new(0),
            capped: AtomicBool::new(false),
            cap_lifted: Notify::new(),
        }
    }
}

impl ReadLeaseTable {
    /// Whether a lease granted by this node may still be running, or a follower
    /// asked for one.
    pub fn maybe_running(&self) -> bool {
        self.any.load(Ordering::SeqCst)
    }

    /// Records that a follower asked for a lease this node could not grant for want
    /// of a running leader lease, so that [`keep_leader_lease_ahead`] renews it.
    fn asked_without_leader_lease(&self) {
        self.any.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a lease for `follower` under the leader's `vote` until `expires`.
    /// Read the floor after this returns, so that it covers every answer given
    /// before the lease was visible to [`Self::await_holders`].
    pub fn grant(&self, follower: NodeId, vote: Vote<NodeId>, expires: Instant) {
        let mut table = self.lock();
        let now = Instant::now();
        table.leases.retain(|_, g| g.expires > now);
        table.leases.insert(follower, Granted { vote, expires });
        self.any.store(true, Ordering::SeqCst);
    }

    /// Whether `follower` has accepted an append from the leader with `vote` ending
    /// within [`MAX_HOLDER_LAG`] entries of `last_index`.
    pub fn keeps_up(&self, follower: NodeId, vote: &Vote<NodeId>, last_index: u64) -> bool {
        self.lock()
            .matched
            .get(&follower)
            .is_some_and(|(v, l)| v == vote && l.index + MAX_HOLDER_LAG >= last_index)
    }

    /// Records that `follower` accepted an append from the leader with `vote` ending
    /// at `last`.
    pub fn record_match(&self, follower: NodeId, vote: Vote<NodeId>, last: LogId<NodeId>) {
        {
            let mut table = self.lock();
            match table.matched.get_mut(&follower) {
                Some((v, l)) if *v == vote => {
                    if last.index <= l.index {
                        return;
                    }
                    *l = last;
                }
                _ => {
                    table.matched.insert(follower, (vote, last));
                }
            }
        }
        if self.any.load(Ordering::SeqCst) {
            self.progress.send_modify(|n| *n = n.wrapping_add(1));
            if self.capped.swap(false, Ordering::SeqCst) {
                self.cap_lifted.notify_one();
            }
        }
    }

    /// The commit index the leader with `vote` may tell `target`: `commit`, or less,
    /// so that it covers only entries every other running holder has appended. Under
    /// a lease of another vote nothing is known appended (its progress is in another
    /// log), so nothing is told until it ends.
    pub fn commit_cap(
        &self,
        target: NodeId,
        vote: &Vote<NodeId>,
        commit: Option<LogId<NodeId>>,
    ) -> Option<LogId<NodeId>> {
        let wanted = commit?;
        if !self.any.load(Ordering::SeqCst) {
            return Some(wanted);
        }
        let table = self.lock();
        let mut capped = Some(wanted);
        for (granted, matched) in table.running(Some(target), Instant::now()) {
            capped = match (capped, matched.filter(|_| granted.vote == *vote)) {
                (Some(c), Some(m)) => Some(if m.index < c.index { m } else { c }),
                _ => None,
            };
        }
        if capped != Some(wanted) {
            self.capped.store(true, Ordering::SeqCst);
        }
        capped
    }

    /// Waits until every running lease's holder has appended `index`, or its lease
    /// has ended.
    pub async fn await_holders(&self, index: u64) {
        if !self.any.load(Ordering::SeqCst) {
            return;
        }
        let mut progress = self.progress.subscribe();
        loop {
            // Seen before the check, so progress made after it wakes the wait below.
            progress.borrow_and_update();
            let next_end = {
                let table = self.lock();
                let now = Instant::now();
                if table.leases.values().all(|g| g.expires <= now) {
                    // Under the lock: a lease granted after this reads a floor that
                    // covers `index`.
                    self.any.store(false, Ordering::SeqCst);
                    return;
                }
                table
                    .running(None, now)
                    .filter(|(_, matched)| matched.map_or(0, |m| m.index) < index)
                    .map(|(g, _)| g.expires)
                    .min()
            };
            let Some(end) = next_end else {
                return;
            };
            let _ = tokio::time::timeout_at(end.into(), progress.changed()).await;
        }
    }
}

/// The leader applies no entry before every holder has appended it (or its lease
/// ended): what the leader applies it may show in a read at once, and a holder
/// reads only what it has appended. (Found by the fault suite: a leader's read
/// showed a write its read index did not cover, applied while the read waited,
/// before a holder had appended it; the holder's next read missed it.)
impl muster_store::ApplyGate for ReadLeaseTable {
    fn ready(&self, index: u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.await_holders(index))
    }
}

/// Sends a heartbeat, carrying the commit index, each time a holder's progress
/// lifts a commit index that [`ReadLeaseTable::commit_cap`] held back.
pub async fn resend_capped_commit(raft: Raft<TypeConfig>, table: Arc<ReadLeaseTable>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = table.cap_lifted.notified() => {}
        }
        if raft.trigger().heartbeat().await.is_err() {
            return;
        }
    }
}

/// Keeps this leader's own lease (and so the leases it grants) at least a heartbeat
/// ahead while followers hold or ask for read leases: openraft sends heartbeats from a timer
/// that fires every one and a half heartbeat intervals and slips under load, and a
/// grant can only run to the end of the leader lease.
pub async fn keep_leader_lease_ahead(core: Arc<NodeCore>) {
    let heartbeat = core.config.raft.heartbeat;
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = tokio::time::sleep(heartbeat / 2) => {}
        }
        if !core.read_leases.maybe_running() || !core.is_leader() {
            continue;
        }
        let ends_soon = core
            .leader_lease_end()
            .is_none_or(|(_, end)| end.saturating_duration_since(Instant::now()) < heartbeat);
        if ends_soon {
            core.metrics.leader_lease_heartbeats.inc();
            if core.raft.trigger().heartbeat().await.is_err() {
                return;
            }
        }
    }
}

/// A lease as its holder sees it.
#[derive(Clone, Copy, Debug)]
struct Held {
    leader: NodeId,
    term: u64,
    /// Counted from when the request was sent.
    expires: Instant,
    floor: u64,
}

/// This node's lease as a follower, and whether linearizable reads want one.
pub struct FollowerReadLease {
    held: Mutex<Option<Held>>,
    /// When a linearizable read last wanted the lease (ms since `epoch`).
    wanted_at_ms: AtomicU64,
    epoch: Instant,
    wanted: Notify,
}

impl Default for FollowerReadLease {
    fn default() -> Self {
        FollowerReadLease {
            held: Mutex::new(None),
            wanted_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            wanted: Notify::new(),
        }
    }
}

impl FollowerReadLease {
    /// The index a linearizable read on this follower must wait for, when it holds a
    /// running lease from `leader` in `term`; `None` when it must ask the leader.
    /// `appended` is the last index of this node's log.
    pub fn read_index(&self, leader: Option<NodeId>, term: u64, appended: u64) -> Option<u64> {
        let now = Instant::now();
        if !self.wanted_recently() {
            self.wanted.notify_one();
        }
        // 0 means never wanted.
        let since_epoch = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        self.wanted_at_ms.store(since_epoch, Ordering::Relaxed);
        let held = (*self.held.lock().unwrap_or_else(PoisonError::into_inner))?;
        (held.expires > now && Some(held.leader) == leader && held.term == term).then(|| appended.max(held.floor))
    }

    fn wanted_recently(&self) -> bool {
        let since_epoch = self.epoch.elapsed().as_millis() as u64 + 1;
        let wanted = self.wanted_at_ms.load(Ordering::Relaxed);
        wanted > 0 && since_epoch.saturating_sub(wanted) < KEEP_WHILE_IDLE.as_millis() as u64
    }

    fn hold(&self, leader: NodeId, sent: Instant, grant: &ReadLeaseGrant) {
        let trusted = Duration::from_micros(grant.valid_for_micros).mul_f64(TRUSTED_SHARE);
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = Some(Held {
            leader,
            term: grant.term,
            expires: sent + trusted,
            floor: grant.floor,
        });
    }

    fn drop_lease(&self) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Keeps a lease while this node is a follower that serves linearizable reads.
pub async fn run(core: Arc<NodeCore>) {
    if !core.config.raft.follower_read_leases {
        return;
    }
    let lease = &core.follower_read_lease;
    let mut wait = RENEW_EVERY;
    loop {
        if !lease.wanted_recently() {
            lease.drop_lease();
            wait = RENEW_EVERY;
            tokio::select! {
                _ = core.shutdown.cancelled() => return,
                _ = lease.wanted.notified() => continue,
            }
        }
        match core.leader() {
            Some((leader, addr)) if leader != core.id => {
                let sent = Instant::now();
                core.metrics.read_lease_requests.inc();
                let granted = match core.forward_to(&addr, &ForwardRequest::ReadLease(core.id)).await {
                    Ok(ForwardResponse::ReadLease(grant)) => {
                        lease.hold(leader, sent, &grant);
                        core.metrics.read_leases_held.inc();
                        true
                    }
                    Ok(other) => {
                        tracing::debug!(?other, leader, "read lease refused");
                        false
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, leader, "read lease request failed");
                        false
                    }
                };
                wait = next_request_wait(wait, granted);
            }
            _ => lease.drop_lease(),
        }
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How long a follower waits before its next lease request, after `last` and an
/// answer that `granted` one or not: [`RENEW_EVERY`] after a grant, twice `last`
/// (at most [`MAX_REFUSED_WAIT`]) after a refusal or failure.
fn next_request_wait(last: Duration, granted: bool) -> Duration {
    if granted {
        RENEW_EVERY
    } else {
        (last * 2).min(MAX_REFUSED_WAIT)
    }
}

impl NodeCore {
    /// Grants `follower` a read lease, when this node leads with a running leader
    /// lease, read leases are on and the follower keeps up with the log
    /// ([`MAX_HOLDER_LAG`]); `None` otherwise.
    pub fn grant_read_lease(&self, follower: NodeId) -> Option<ReadLeaseGrant> {
        if !self.config.raft.follower_read_leases || follower == self.id {
            return None;
        }
        let Some((vote, expires)) = self.leader_lease_end() else {
            tracing::debug!(follower, "read lease refused: no running leader lease");
            if self.is_leader() {
                self.read_leases.asked_without_leader_lease();
            }
            return None;
        };
        {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            if !m.membership_config.membership().nodes().any(|(id, _)| *id == follower) {
                return None;
            }
        }
        let last_index = self.log_durability.last_index().unwrap_or(0);
        if !self.read_leases.keeps_up(follower, &vote, last_index) {
            tracing::debug!(follower, last_index, %vote, "read lease refused: the follower is behind");
            return None;
        }
        let now = Instant::now();
        self.read_leases.grant(follower, vote, expires);
        let floor = self
            .log_durability
            .last_index()
            .unwrap_or(0)
            .max(self.startup_last_log_index);
        self.metrics.read_leases_granted.inc();
        Some(ReadLeaseGrant {
            term: vote.leader_id().term,
            valid_for_micros: expires.saturating_duration_since(now).as_micros() as u64,
            floor,
        })
    }

    /// The read index of a linearizable read under this follower's lease, when it
    /// holds a running one; `None` when the read must ask the leader.
    pub fn follower_lease_read_index(&self) -> Option<u64> {
        if !self.config.raft.follower_read_leases {
            return None;
        }
        let (leader, term) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            if m.state != ServerState::Follower && m.state != ServerState::Learner {
                return None;
            }
            (m.current_leader, m.vote.leader_id().term)
        };
        let appended = self.log_durability.durable_index().unwrap_or(0);
        let index = self.follower_read_lease.read_index(leader, term, appended)?;
        self.metrics.follower_lease_reads.inc();
        Some(index)
    }

    /// Waits until every follower holding a read lease from this node has appended
    /// `index` (or its lease ended): called before a write or a read index is answered.
    pub async fn await_read_lease_holders(&self, index: u64) {
        self.read_leases.await_holders(index).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn vote(term: u64) -> Vote<NodeId> {
        Vote::new_committed(term, 1)
    }

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn refused_lease_requests_come_ever_less_often_until_one_is_granted() {
        let mut wait = RENEW_EVERY;
        let mut waits = Vec::new();
        for _ in 0..8 {
            wait = next_request_wait(wait, false);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [20, 40, 80, 160, 320, 640, 640, 640]);
        assert_eq!(next_request_wait(wait, true), RENEW_EVERY);
    }

    #[test]
    fn without_leases_the_commit_index_is_sent_as_it_is() {
        let table = ReadLeaseTable::default();
        table.record_match(2, vote(1), log_id(1, 3));
        assert_eq!(table.commit_cap(3, &vote(1), Some(log_id(1, 9))), Some(log_id(1, 9)));
    }

    #[test]
    fn the_commit_index_stops_at_what_the_other_holders_have_appended() {
        let table = ReadLeaseTable::default();
        let later = Instant::now() + Duration::from_secs(5);
        table.grant(2, vote(1), later);
        table.record_match(2, vote(1), log_id(1, 4));
        // Node 3 is told only what holder 2 has; holder 2 itself is not held back
        // by its own log.
        assert_eq!(table.commit_cap(3, &vote(1), Some(log_id(1, 9))), Some(log_id(1, 4)));
        assert_eq!(table.commit_cap(2, &vote(1), Some(log_id(1, 9))), Some(log_id(1, 9)));
        assert!(table.capped.load(Ordering::SeqCst));
        // A holder with nothing known appended holds every commit back.
        table.grant(4, vote(1), later);
        assert_eq!(table.commit_cap(3, &vote(1), Some(log_id(1, 9))), None);
        // Progress under another vote is not progress on a lease of this one.
        table.record_match(4, vote(2), log_id(2, 9));
        assert_eq!(table.commit_cap(3, &vote(1), Some(log_id(1, 9))), None);
        // Nor is progress under an earlier vote, for a leader with a new one.
        table.record_match(4, vote(1), log_id(1, 9));
        assert_eq!(table.commit_cap(3, &vote(2), Some(log_id(2, 12))), None);
    }

    #[test]
    fn only_a_follower_that_keeps_up_with_this_leaders_log_may_hold_a_lease() {
        let table = ReadLeaseTable::default();
        assert!(
            !table.keeps_up(2, &vote(1), 10),
            "nothing accepted from this leader yet"
        );
        table.record_match(2, vote(1), log_id(1, 100));
        assert!(table.keeps_up(2, &vote(1), 100 + MAX_HOLDER_LAG));
        assert!(!table.keeps_up(2, &vote(1), 101 + MAX_HOLDER_LAG), "too far behind");
        assert!(!table.keeps_up(2, &vote(2), 100), "accepted from another vote");
    }

    #[test]
    fn an_ended_lease_holds_nothing_back() {
        let table = ReadLeaseTable::default();
        table.grant(2, vote(1), Instant::now() - Duration::from_millis(1));
        assert_eq!(table.commit_cap(3, &vote(1), Some(log_id(1, 9))), Some(log_id(1, 9)));
    }

    #[tokio::test]
    async fn answers_wait_until_every_holder_has_appended_the_index() {
        let table = Arc::new(ReadLeaseTable::default());
        table.grant(2, vote(1), Instant::now() + Duration::from_secs(30));
        table.record_match(2, vote(1), log_id(1, 4));
        // Already appended: no wait.
        table.await_holders(4).await;
        let waiting = tokio::spawn({
            let table = table.clone();
            async move { table.await_holders(6).await }
        });
        tokio::task::yield_now().await;
        table.record_match(2, vote(1), log_id(1, 5));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "answered before the holder appended index 6");
        table.record_match(2, vote(1), log_id(1, 6));
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("answered once the holder appended")
            .expect("task");
    }

    #[tokio::test]
    async fn a_holder_that_stops_appending_delays_answers_only_until_its_lease_ends() {
        let table = ReadLeaseTable::default();
        let ends = Instant::now() + Duration::from_millis(150);
        table.grant(2, vote(1), ends);
        table.await_holders(6).await;
        assert!(Instant::now() >= ends, "answered while the holder's lease ran");
        // With no lease running, checks are skipped again.
        assert!(!table.any.load(Ordering::SeqCst));
    }

    #[test]
    fn a_follower_reads_under_its_lease_only_for_the_leader_and_term_that_granted_it() {
        let lease = FollowerReadLease::default();
        assert_eq!(lease.read_index(Some(1), 3, 10), None, "no lease yet");
        assert!(lease.wanted_recently());
        let grant = ReadLeaseGrant {
            term: 3,
            valid_for_micros: 10_000_000,
            floor: 12,
        };
        lease.hold(1, Instant::now(), &grant);
        assert_eq!(lease.read_index(Some(1), 3, 10), Some(12), "waits for the floor");
        assert_eq!(lease.read_index(Some(1), 3, 15), Some(15), "waits for its own log");
        assert_eq!(lease.read_index(Some(2), 3, 15), None, "another leader");
        assert_eq!(lease.read_index(Some(1), 4, 15), None, "another term");
        assert_eq!(lease.read_index(None, 3, 15), None, "no leader known");
        let short = ReadLeaseGrant {
            valid_for_micros: 0,
            ..grant
        };
        lease.hold(1, Instant::now(), &short);
        assert_eq!(lease.read_index(Some(1), 3, 15), None, "ended");
    }
}
