//! The watch hub: applied events go into a bounded history (for resuming) and a
//! broadcast ring shared by every watcher. Each event is converted to its protobuf
//! form once, when it is applied, and shared by all watchers.
//!
//! A watcher's queue is its position in the ring: it can fall at most `queue`
//! events behind. One that falls further gets a `Reset` with the full matching state
//! and continues live from there, so memory stays bounded and no change is missed.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use muster_core::history::Replay;
use muster_core::{Event, Revision, WatchFilter, WatchHistory};
use muster_proto::v1 as pb;
use muster_store::{EventSink, SharedState};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::WatchSettings;
use crate::metrics::Metrics;

/// One item in the broadcast ring.
#[derive(Debug)]
pub enum HubItem {
    /// An applied event and its protobuf form.
    Event {
        /// The event.
        event: Arc<Event>,
        /// The event as a `muster.v1.WatchResponse`, encoded once for every watcher.
        encoded: Bytes,
    },
    /// The state was replaced wholesale (snapshot install).
    Reset(Revision),
}

/// The hub every watcher subscribes to.
pub struct WatchHub {
    settings: WatchSettings,
    history: Mutex<WatchHistory>,
    sender: broadcast::Sender<Arc<HubItem>>,
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

    /// Subscribes to live items (subscribe before reading state, so nothing falls in
    /// between).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<HubItem>> {
        self.sender.subscribe()
    }
}

impl EventSink for WatchHub {
    fn publish(&self, events: &[Event], _revision: Revision) {
        let mut history = self.history();
        for event in events {
            let event = Arc::new(event.clone());
            history.push(event.clone());
            let encoded = encode_event(&event);
            // No receivers is fine: nobody watches.
            let _ = self.sender.send(Arc::new(HubItem::Event { event, encoded }));
        }
    }

    fn reset(&self, revision: Revision) {
        self.history().reset(revision);
        let _ = self.sender.send(Arc::new(HubItem::Reset(revision)));
    }
}

/// What a watcher receives: an encoded `muster.v1.WatchResponse`.
pub type WatchItem = Bytes;

fn encode(message: &pb::WatchResponse) -> Bytes {
    Bytes::from(message.encode_to_vec())
}

fn encode_event(event: &Event) -> Bytes {
    encode(&pb::WatchResponse {
        response: Some(pb::watch_response::Response::Event(pb::Event::from(event))),
    })
}

fn reset_message(shared: &SharedState, filter: &WatchFilter) -> (Revision, Bytes) {
    let registry = shared.read();
    let revision = registry.revision();
    let instances = registry
        .matching(filter)
        .iter()
        .map(|i| pb::Instance::from(&**i))
        .collect();
    (
        revision,
        encode(&pb::WatchResponse {
            response: Some(pb::watch_response::Response::Reset(pb::Reset { revision, instances })),
        }),
    )
}

/// Starts a watcher task and returns its output channel. The task ends when the
/// client goes away or `shutdown` fires.
pub fn start_watcher(
    hub: Arc<WatchHub>,
    shared: Arc<SharedState>,
    filter: WatchFilter,
    start_revision: Revision,
    shutdown: CancellationToken,
) -> mpsc::Receiver<WatchItem> {
    let (out, rx) = mpsc::channel::<WatchItem>(64);
    let mut live = hub.subscribe();
    // Everything up to `last` has been sent (or did not match).
    let (initial, mut last) = {
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
            (Vec::new(), last)
        } else {
            match history.replay_from(start_revision) {
                Replay::Events(events) => (
                    events
                        .iter()
                        .filter(|e| filter.matches(e))
                        .map(|e| encode_event(e))
                        .collect(),
                    current,
                ),
                Replay::Compacted { .. } => {
                    drop(history);
                    drop(registry);
                    let (revision, reset) = reset_message(&shared, &filter);
                    hub.metrics.watch_resets.inc();
                    (vec![reset], revision)
                }
            }
        }
    };
    let metrics = hub.metrics.clone();
    let progress_every = hub.settings.progress_interval;
    tokio::spawn(async move {
        metrics.watchers.inc();
        let _guard = scopeguard(metrics.clone());
        for item in initial {
            if out.send(item).await.is_err() {
                return;
            }
            metrics.watch_events_sent.inc();
        }
        let mut progress = tokio::time::interval(progress_every);
        progress.tick().await;
        let mut sent_since_progress = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = progress.tick() => {
                    if !sent_since_progress {
                        let p = encode(&pb::WatchResponse {
                            response: Some(pb::watch_response::Response::Progress(pb::Progress {
                                revision: last.max(shared.current_revision()),
                            })),
                        });
                        if out.send(p).await.is_err() {
                            return;
                        }
                    }
                    sent_since_progress = false;
                }
                item = live.recv() => {
                    match item {
                        Ok(item) => match &*item {
                            HubItem::Event { event, encoded } => {
                                if event.revision <= last {
                                    continue;
                                }
                                last = event.revision;
                                if filter.matches(event) {
                                    if out.send(encoded.clone()).await.is_err() {
                                        return;
                                    }
                                    metrics.watch_events_sent.inc();
                                    sent_since_progress = true;
                                }
                            }
                            HubItem::Reset(_) => {
                                let (revision, reset) = reset_message(&shared, &filter);
                                last = revision;
                                metrics.watch_resets.inc();
                                if out.send(reset).await.is_err() {
                                    return;
                                }
                            }
                        },
                        Err(broadcast::error::RecvError::Lagged(skipped)) => {
                            tracing::debug!(skipped, "watcher fell behind; sending a reset");
                            let (revision, reset) = reset_message(&shared, &filter);
                            last = revision;
                            metrics.watch_resets.inc();
                            if out.send(reset).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        }
    });
    rx
}

/// Decrements the watcher gauge when the watcher task ends.
struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.watchers.dec();
    }
}

fn scopeguard(metrics: Arc<Metrics>) -> WatcherGuard {
    WatcherGuard(metrics)
}
