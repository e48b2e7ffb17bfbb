//! Change notifications per service and per namespace, for blocking queries
//! (Consul's `?index=N&wait=D`).
//!
//! One task reads the watch hub and pokes a `tokio::sync::watch` channel per service
//! (and per namespace) that somebody waits on, so a change to one busy service wakes
//! only the waiters of that service (Consul issue 1244), not every blocked query.
//! A waiter subscribes *before* it reads the registry, then waits until a change
//! with a revision above the index it was given arrives, or its time runs out.
//!
//! When the hub is reset (snapshot install) or this task falls behind, every waiter
//! is woken with [`WAKE_ALL`]: it re-reads the state and answers, which may be a
//! spurious wake-up but never a missed change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use muster_core::{Revision, ServiceKey};
use tokio::sync::{broadcast, watch};

use crate::node::NodeCore;
use crate::watch::HubItem;

/// The value sent to every waiter when changes may have been missed.
pub const WAKE_ALL: Revision = Revision::MAX;

/// Sweep channels nobody waits on after this many notifications.
const SWEEP_EVERY: u32 = 1024;

/// The per-service and per-namespace channels.
#[derive(Default)]
pub struct ChangeNotifier {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    services: HashMap<ServiceKey, watch::Sender<Revision>>,
    namespaces: HashMap<String, watch::Sender<Revision>>,
    since_sweep: u32,
}

impl Inner {
    fn sweep(&mut self) {
        self.services.retain(|_, s| s.receiver_count() > 0);
        self.namespaces.retain(|_, s| s.receiver_count() > 0);
        self.since_sweep = 0;
    }
}

impl ChangeNotifier {
    /// An empty notifier.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Receives the revision of each later change to one service (or [`WAKE_ALL`]).
    /// Subscribe before reading the registry.
    pub fn service(&self, key: &ServiceKey) -> watch::Receiver<Revision> {
        let mut inner = self.lock();
        inner
            .services
            .entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Receives the revision of each later change in one namespace (or
    /// [`WAKE_ALL`]). Subscribe before reading the registry.
    pub fn namespace(&self, namespace: &str) -> watch::Receiver<Revision> {
        let mut inner = self.lock();
        inner
            .namespaces
            .entry(namespace.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// A change to `(namespace, service)` at `revision`.
    pub fn notify(&self, namespace: &str, service: &str, revision: Revision) {
        let mut inner = self.lock();
        if let Some(sender) = inner.namespaces.get(namespace) {
            sender.send_replace(revision);
        }
        // Allocates the key only when somebody waits on a service of this namespace.
        if !inner.services.is_empty() {
            if let Some(sender) = inner.services.get(&ServiceKey::new(namespace, service)) {
                sender.send_replace(revision);
            }
        }
        inner.since_sweep += 1;
        if inner.since_sweep >= SWEEP_EVERY {
            inner.sweep();
        }
    }

    /// Wakes every waiter.
    pub fn notify_all(&self) {
        let mut inner = self.lock();
        for sender in inner.services.values().chain(inner.namespaces.values()) {
            sender.send_replace(WAKE_ALL);
        }
        inner.sweep();
    }

    /// Channels currently kept (tests, metrics).
    pub fn channels(&self) -> usize {
        let inner = self.lock();
        inner.services.len() + inner.namespaces.len()
    }
}

/// Feeds the notifier from the watch hub until the node stops.
pub async fn run(core: Arc<NodeCore>) {
    let mut live = core.hub.subscribe();
    loop {
        let item = tokio::select! {
            _ = core.shutdown.cancelled() => return,
            item = live.recv() => item,
        };
        match item {
            Ok(item) => match &*item {
                HubItem::Event(e) => {
                    let (namespace, service) = e.event.service();
                    core.changes.notify(namespace, service, e.event.revision);
                }
                HubItem::Reset(_) => core.changes.notify_all(),
            },
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                tracing::debug!(skipped, "change notifier fell behind; waking every blocking query");
                core.changes.notify_all();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_wakes_only_the_waiters_of_its_service() {
        let n = ChangeNotifier::new();
        let mut web = n.service(&ServiceKey::new("", "web"));
        let mut api = n.service(&ServiceKey::new("", "api"));
        let ns = n.namespace("default");
        n.notify("default", "web", 7);
        assert!(web.has_changed().unwrap());
        assert_eq!(*web.borrow_and_update(), 7);
        assert!(!api.has_changed().unwrap());
        assert!(ns.has_changed().unwrap());
        n.notify_all();
        assert_eq!(*api.borrow_and_update(), WAKE_ALL);
    }

    #[tokio::test]
    async fn channels_nobody_waits_on_are_swept() {
        let n = ChangeNotifier::new();
        drop(n.service(&ServiceKey::new("", "web")));
        let _kept = n.service(&ServiceKey::new("", "api"));
        assert_eq!(n.channels(), 2);
        n.notify_all();
        assert_eq!(n.channels(), 1);
    }
}
