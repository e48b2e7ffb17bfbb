//! The watch hub: applied events go into a bounded history (for resuming) and a
//! broadcast ring shared by every watcher. Each event is encoded at most once per
//! wire format (protobuf for gRPC, JSON for SSE), by the first watcher that sends
//! it, and the encoding is shared by all the others.
//!
//! A watcher's queue is its position in the ring: it can fall at most `queue`
//! events behind. One that falls further gets a `Reset` with the full matching state
//! and continues live from there, so memory stays bounded and no change is missed.
//!
//! Watchers are woken by connection: the watchers whose items leave by one client
//! connection share a wake group, and a published batch wakes each group in turn,
//! so a connection's streams run one after the other and their frames leave in one
//! write, instead of one write per stream in whatever order the streams subscribed.
//!
//! One watcher loop serves every frontend; a [`WatchEncoder`] decides what it hands
//! out: [`ProtobufEncoder`] yields encoded `muster.v1.WatchResponse`s (gRPC),
//! [`MessageEncoder`] yields [`WatchMessage`]s (SSE and other JSON frontends).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use muster_core::history::Replay;
use muster_core::{Event, Instance, Revision, WatchFilter, WatchHistory};
use muster_proto::v1 as pb;
use muster_store::{EventSink, SharedState};
use prost::Message;
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio::sync::Notify;

use crate::config::WatchSettings;
use crate::metrics::Metrics;

/// An applied event with its wire encodings, each made once on first use.
#[derive(Debug)]
pub struct HubEvent {
    /// The event.
    pub event: Arc<Event>,
    protobuf: OnceLock<Bytes>,
    json: OnceLock<Arc<str>>,
}

impl HubEvent {
    /// Wraps an event; nothing is encoded yet.
    pub fn new(event: Arc<Event>) -> Self {
        HubEvent {
            event,
            protobuf: OnceLock::new(),
            json: OnceLock::new(),
        }
    }

    /// The event as an encoded `muster.v1.WatchResponse`.
    pub fn protobuf(&self) -> Bytes {
        self.protobuf.get_or_init(|| encode_event(&self.event)).clone()
    }

    /// The event as the JSON `data` of a REST watch (see [`crate::rest::json`]).
    pub fn json(&self) -> Arc<str> {
        self.json
            .get_or_init(|| crate::rest::json::event_data(&self.event).into())
            .clone()
    }
}

/// One item in the broadcast ring.
#[derive(Debug)]
pub enum HubItem {
    /// An applied event.
    Event(Arc<HubEvent>),
    /// The state was replaced wholesale (snapshot install).
    Reset(Revision),
}

/// The connection a watcher's items leave by: its client's address, or `None` for
/// watchers that are not grouped (they share one wake group).
pub type ConnectionKey = Option<SocketAddr>;

/// The hub every watcher subscribes to.
pub struct WatchHub {
    settings: WatchSettings,
    history: Mutex<WatchHistory>,
    sender: broadcast::Sender<Arc<HubItem>>,
    /// One wake group per connection with live watchers.
    wake_groups: Mutex<HashMap<ConnectionKey, Weak<Notify>>>,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl WatchHub {
    /// An empty hub.
    pub fn new(settings: WatchSettings, metrics: Arc<Metrics>) -> Self {
        let (sender, _) = broadcast::channel(settings.queue.max(16));
        WatchHub {
            history: Mutex::new(WatchHistory::new(settings.history, 0)),
            settings,
            sender,
            wake_groups: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            metrics,
        }
    }

    /// The hub's settings.
    pub fn settings(&self) -> &WatchSettings {
        &self.settings
    }

    fn history(&self) -> std::sync::MutexGuard<'_, WatchHistory> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionKey, Weak<Notify>>> {
        self.wake_groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to live items (subscribe before reading state, so nothing falls in
    /// between).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<HubItem>> {
        self.sender.subscribe()
    }

    /// The wake group of `connection`, made when it has no live watcher yet.
    fn wake_group(&self, connection: ConnectionKey) -> Arc<Notify> {
        let mut groups = self.groups();
        if let Some(group) = groups.get(&connection).and_then(Weak::upgrade) {
            return group;
        }
        let group = Arc::new(Notify::new());
        groups.insert(connection, Arc::downgrade(&group));
        group
    }

    /// Wakes every waiting watcher, a connection's watchers together; forgets the
    /// groups whose watchers are all gone.
    fn wake_watchers(&self) {
        let live: Vec<Arc<Notify>> = {
            let mut groups = self.groups();
            groups.retain(|_, group| group.strong_count() > 0);
            groups.values().filter_map(Weak::upgrade).collect()
        };
        for group in live {
            group.notify_waiters();
        }
    }

    /// How many connections have live watchers (each is one wake group; watchers not
    /// grouped by connection count as one).
    pub fn connections(&self) -> usize {
        self.groups().values().filter(|group| group.strong_count() > 0).count()
    }

    /// Ends every watcher (the node is stopping); watchers opened later end at once.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake_watchers();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

impl EventSink for WatchHub {
    fn publish(&self, events: &[Event], _revision: Revision) {
        {
            let mut history = self.history();
            for event in events {
                let event = Arc::new(event.clone());
                history.push(event.clone());
                // No receivers is fine: nobody watches.
                let _ = self
                    .sender
                    .send(Arc::new(HubItem::Event(Arc::new(HubEvent::new(event)))));
            }
        }
        self.wake_watchers();
    }

    fn reset(&self, revision: Revision) {
        self.history().reset(revision);
        let _ = self.sender.send(Arc::new(HubItem::Reset(revision)));
        self.wake_watchers();
    }
}

/// What a gRPC watcher receives: an encoded `muster.v1.WatchResponse`.
pub type WatchItem = Bytes;

/// What a JSON watcher receives.
#[derive(Clone, Debug)]
pub enum WatchMessage {
    /// A change that matches the filter.
    Event(Arc<HubEvent>),
    /// Every matching instance at `revision`; the watch continues live from there.
    /// Sent when the start revision is older than the history, after a snapshot
    /// install, or when the watcher fell behind.
    Reset {
        /// The revision of the snapshot.
        revision: Revision,
        /// The matching instances, in key order.
        instances: Vec<Arc<Instance>>,
    },
    /// Every matching change up to `revision` has been sent (a bookmark).
    Progress(Revision),
}

impl WatchMessage {
    /// The revision this message brings the watcher to.
    pub fn revision(&self) -> Revision {
        match self {
            WatchMessage::Event(e) => e.event.revision,
            WatchMessage::Reset { revision, .. } | WatchMessage::Progress(revision) => *revision,
        }
    }
}

/// Turns what a watcher sees into the items its client receives.
pub trait WatchEncoder: Send + 'static {
    /// One item for the client.
    type Item: Send + 'static;
    /// A matching event.
    fn event(&self, event: &Arc<HubEvent>) -> Self::Item;
    /// A reset to the matching state at `revision`.
    fn reset(&self, revision: Revision, instances: Vec<Arc<Instance>>) -> Self::Item;
    /// A progress bookmark at `revision`.
    fn progress(&self, revision: Revision) -> Self::Item;
}

/// Encoded `muster.v1.WatchResponse`s (gRPC).
pub struct ProtobufEncoder;

impl WatchEncoder for ProtobufEncoder {
    type Item = WatchItem;

    fn event(&self, event: &Arc<HubEvent>) -> Bytes {
        event.protobuf()
    }

    fn reset(&self, revision: Revision, instances: Vec<Arc<Instance>>) -> Bytes {
        encode(&pb::WatchResponse {
            response: Some(pb::watch_response::Response::Reset(pb::Reset {
                revision,
                instances: instances.iter().map(|i| pb::Instance::from(&**i)).collect(),
            })),
        })
    }

    fn progress(&self, revision: Revision) -> Bytes {
        encode(&pb::WatchResponse {
            response: Some(pb::watch_response::Response::Progress(pb::Progress { revision })),
        })
    }
}

/// [`WatchMessage`]s, for frontends that encode on their own (SSE).
pub struct MessageEncoder;

impl WatchEncoder for MessageEncoder {
    type Item = WatchMessage;

    fn event(&self, event: &Arc<HubEvent>) -> WatchMessage {
        WatchMessage::Event(event.clone())
    }

    fn reset(&self, revision: Revision, instances: Vec<Arc<Instance>>) -> WatchMessage {
        WatchMessage::Reset { revision, instances }
    }

    fn progress(&self, revision: Revision) -> WatchMessage {
        WatchMessage::Progress(revision)
    }
}

fn encode(message: &pb::WatchResponse) -> Bytes {
    Bytes::from(message.encode_to_vec())
}

fn encode_event(event: &Event) -> Bytes {
    encode(&pb::WatchResponse {
        response: Some(pb::watch_response::Response::Event(pb::Event::from(event))),
    })
}

/// Every instance matching `filter` and the revision they are at.
fn matching_state(shared: &SharedState, filter: &WatchFilter) -> (Revision, Vec<Arc<Instance>>) {
    let registry = shared.read();
    (registry.revision(), registry.matching(filter))
}

/// A watcher's items, pulled by whoever sends them to the client (the gRPC or SSE
/// response body). No task or channel sits between the hub and the response: the
/// watcher runs when the client's connection is ready for more, and it ends when
/// the response is dropped (client gone) or the hub closes (node shutting down).
pub type WatchStream<T> = BoxStream<'static, T>;

/// The one watcher implementation: replay from `start_revision` (or reset when it is
/// older than the history), then live events, progress bookmarks when idle, and a
/// reset whenever the watcher falls behind or the state is replaced.
///
/// `start_revision` 0 means "live from now"; a revision not reached yet means "from
/// that revision on, when it comes". The watcher is woken with the others of
/// `connection`; it ends when its stream is dropped or the hub closes.
pub fn start_watch_with<E: WatchEncoder>(
    hub: Arc<WatchHub>,
    shared: Arc<SharedState>,
    filter: WatchFilter,
    start_revision: Revision,
    connection: ConnectionKey,
    encoder: E,
) -> WatchStream<E::Item> {
    // Subscribe before reading the state, so nothing falls in between.
    let live = hub.subscribe();
    // Everything up to `last` has been sent (or did not match).
    let (initial, last): (VecDeque<E::Item>, Revision) = {
        let registry = shared.read();
        let history = hub.history();
        let current = registry.revision();
        if start_revision == 0 || start_revision > current {
            // Live from now, or from a revision not reached yet.
            let last = if start_revision == 0 {
                current
            } else {
                start_revision - 1
            };
            (VecDeque::new(), last)
        } else {
            match history.replay_from(start_revision) {
                Replay::Events(events) => (
                    events
                        .iter()
                        .filter(|e| filter.matches(e))
                        .map(|e| encoder.event(&Arc::new(HubEvent::new(e.clone()))))
                        .collect(),
                    current,
                ),
                Replay::Compacted { .. } => {
                    drop(history);
                    drop(registry);
                    let (revision, instances) = matching_state(&shared, &filter);
                    hub.metrics.watch_resets.inc();
                    (VecDeque::from([encoder.reset(revision, instances)]), revision)
                }
            }
        }
    };
    hub.metrics.watchers.inc();
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + hub.settings.progress_interval,
        hub.settings.progress_interval,
    );
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watcher = Watcher {
        metrics: hub.metrics.clone(),
        wake: hub.wake_group(connection),
        hub,
        shared,
        filter,
        encoder,
        live,
        pending: initial,
        last,
        progress,
        sent_since_progress: false,
    };
    futures::stream::unfold(watcher, |mut watcher| async move {
        let item = watcher.next_item().await?;
        Some((item, watcher))
    })
    .boxed()
}

/// How a watcher's wait ended.
enum Wait<T> {
    /// Its group was woken (or the ring has items): look at the ring.
    Woken,
    /// Idle for a progress interval: the bookmark to send.
    Progress(T),
    /// The hub closed.
    Closed,
}

/// One watcher's state between the items it hands out.
struct Watcher<E: WatchEncoder> {
    /// Counts this watcher in `watchers` from its start until it is dropped.
    metrics: Arc<Metrics>,
    hub: Arc<WatchHub>,
    /// Its connection's wake group (kept alive by its watchers).
    wake: Arc<Notify>,
    shared: Arc<SharedState>,
    filter: WatchFilter,
    encoder: E,
    /// Its position in the broadcast ring: read without waiting, woken by `wake`.
    live: broadcast::Receiver<Arc<HubItem>>,
    /// Replayed items not handed out yet.
    pending: VecDeque<E::Item>,
    last: Revision,
    progress: tokio::time::Interval,
    sent_since_progress: bool,
}

impl<E: WatchEncoder> Watcher<E> {
    /// The next item for the client; `None` ends the stream.
    async fn next_item(&mut self) -> Option<E::Item> {
        if self.hub.is_closed() {
            return None;
        }
        if let Some(item) = self.pending.pop_front() {
            self.metrics.watch_events_sent.inc();
            return Some(item);
        }
        loop {
            let item = match self.live.try_recv() {
                Err(TryRecvError::Empty) => match self.wait().await {
                    Wait::Woken => continue,
                    Wait::Progress(item) => return Some(item),
                    Wait::Closed => return None,
                },
                other => other,
            };
            match item {
                Ok(item) => match &*item {
                    HubItem::Event(hub_event) => {
                        let event = &hub_event.event;
                        if event.revision <= self.last {
                            continue;
                        }
                        self.last = event.revision;
                        if self.filter.matches(event) {
                            self.metrics.watch_events_sent.inc();
                            self.sent_since_progress = true;
                            return Some(self.encoder.event(hub_event));
                        }
                    }
                    HubItem::Reset(_) => {
                        if let Some(reset) = self.reset() {
                            return Some(reset);
                        }
                    }
                },
                Err(TryRecvError::Lagged(skipped)) => {
                    tracing::debug!(skipped, "watcher fell behind; sending a reset");
                    if let Some(reset) = self.reset() {
                        return Some(reset);
                    }
                }
                Err(TryRecvError::Closed) => return None,
                Err(TryRecvError::Empty) => continue,
            }
        }
    }

    /// Waits for the next wake of this watcher's group or its progress tick.
    async fn wait(&mut self) -> Wait<E::Item> {
        // Register for the next wake, then look again: a batch published in between
        // is either seen now or wakes this watcher.
        let woken = self.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if self.hub.is_closed() {
            return Wait::Closed;
        }
        if !self.live.is_empty() {
            return Wait::Woken;
        }
        tokio::select! {
            biased;
            _ = &mut woken => {}
            _ = self.progress.tick() => {
                let idle = !self.sent_since_progress;
                self.sent_since_progress = false;
                if idle {
                    // `last`, not the applied revision: events up to the applied
                    // revision may still wait in this watcher's ring position, and a
                    // bookmark past them would let a resuming client skip them.
                    return Wait::Progress(self.encoder.progress(self.last));
                }
            }
        }
        if self.hub.is_closed() {
            Wait::Closed
        } else {
            Wait::Woken
        }
    }

    /// Every matching instance as of now, from which the watch continues live; or
    /// nothing when this node's state is older than what the watcher has already
    /// been given (a client resuming here from a revision this node has not reached,
    /// while it installs an older snapshot or falls behind). Every node goes through
    /// the same revisions, so such a watcher simply waits for the ones after its own.
    /// (Found by the fault suite: a watcher resuming at 768 on a re-added member was
    /// sent the member's snapshot at 688.)
    fn reset(&mut self) -> Option<E::Item> {
        let (revision, instances) = matching_state(&self.shared, &self.filter);
        if revision < self.last {
            return None;
        }
        self.last = revision;
        self.metrics.watch_resets.inc();
        Some(self.encoder.reset(revision, instances))
    }
}

/// The watcher ends when its stream is dropped: the client went away or the hub
/// closed.
impl<E: WatchEncoder> Drop for Watcher<E> {
    fn drop(&mut self) {
        self.metrics.watchers.dec();
    }
}

#[cfg(test)]
mod tests {
    use muster_core::{DeleteReason, Event, EventKind, InstanceKey};
    use muster_store::{EventSink, StateMachineStore};

    use super::*;
    use crate::config::WatchSettings;

    /// Found by the fault suite (member-readded): a watcher that had seen revision
    /// 767 elsewhere resumed on a re-added member still catching up, and was sent a
    /// `Reset` at 688 when the member installed its snapshot, taking its client
    /// back in time.
    #[tokio::test]
    async fn a_watcher_ahead_of_its_node_gets_no_reset_to_an_older_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hub = Arc::new(WatchHub::new(WatchSettings::default(), Arc::new(Metrics::new())));
        let store = StateMachineStore::open(dir.path(), 1 << 20, hub.clone()).expect("store");
        // The node is at revision 0; the client resumes at 10.
        let mut watch = start_watch_with(
            hub.clone(),
            store.shared(),
            WatchFilter::default(),
            10,
            None,
            MessageEncoder,
        );
        // The node's state is replaced by one from before 10, then catches up.
        hub.reset(0);
        for revision in 1..=10 {
            let event = Event {
                revision,
                kind: EventKind::Delete {
                    key: InstanceKey::new("", "api", &format!("i-{revision}")),
                    reason: DeleteReason::Deregistered,
                },
            };
            hub.publish(&[event], revision);
        }
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
            .await
            .expect("an item")
            .expect("the watch goes on");
        match first {
            WatchMessage::Event(e) => assert_eq!(e.event.revision, 10),
            other => panic!("the first item after revision 9 was {other:?}"),
        }
    }
}
