//! A service's instances cached in memory and kept current by a watch, so that
//! picking an instance costs no network call.
//!
//! A background task reads the service once (`Discover`, every health state),
//! then follows its `Watch` from the revision after: puts and deletes update the
//! cache, a `Reset` replaces it. When the stream fails, or nothing (not even a
//! progress bookmark) arrives for [`ResolverOptions::stale_after`], the cache is
//! marked stale and keeps answering with what it last knew while the task
//! reconnects, without end, with backoff (survival mode). A service the registry
//! has never answered for is served from the [`StaticFallback`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use muster_core::{EventKind, Health, Instance, Revision};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::breaker::{BreakerPolicy, BreakerState, Breakers};
use crate::client::Client;
use crate::error::ClientError;
use crate::fallback::{StaticEndpoint, StaticFallback};
use crate::pick::{usable, PickStrategy, Picker};
use crate::types::DiscoverOptions;
use crate::watch::WatchItem;

/// How a [`Resolver`] picks and when it calls its cache stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverOptions {
    /// Namespace of the services; empty means `default`.
    pub namespace: String,
    /// How calls are spread over instances.
    pub strategy: PickStrategy,
    /// Prefer instances of this zone while any is usable.
    pub prefer_zone: Option<String>,
    /// Per-instance circuit breakers.
    pub breaker: BreakerPolicy,
    /// The cache is stale when nothing has been heard from the registry for this
    /// long (nodes send a progress bookmark every 5 s on an idle watch).
    pub stale_after: Duration,
    /// How long [`Client::resolver`] waits for the registry's first answer before
    /// returning a resolver that answers from the fallback.
    pub first_sync_timeout: Duration,
    /// Longest wait between two reconnection attempts in survival mode.
    pub max_reconnect_delay: Duration,
}

impl Default for ResolverOptions {
    fn default() -> Self {
        ResolverOptions {
            namespace: String::new(),
            strategy: PickStrategy::RoundRobin,
            prefer_zone: None,
            breaker: BreakerPolicy::default(),
            stale_after: Duration::from_secs(12),
            first_sync_timeout: Duration::from_secs(3),
            max_reconnect_delay: Duration::from_secs(5),
        }
    }
}

/// Where a picked instance came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PickSource {
    /// The registry (through the watch-fed cache).
    Registry,
    /// The static fallback: the registry has never answered for this service.
    Fallback,
}

/// The answer of [`Resolver::pick`].
#[derive(Clone, Debug)]
pub struct Picked {
    /// The instance to call.
    pub instance: Arc<Instance>,
    /// Whether the cache could not be confirmed current (registry unreachable).
    pub stale: bool,
    /// Registry or static fallback.
    pub source: PickSource,
}

impl Picked {
    /// `host:port` of the instance (IPv6 addresses in brackets).
    pub fn authority(&self) -> String {
        authority(&self.instance.address, self.instance.port)
    }

    /// `http://host:port/path`.
    pub fn url(&self, path: &str) -> String {
        let slash = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{slash}{path}", self.authority())
    }
}

/// `host:port`, bracketing an IPv6 address.
pub(crate) fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One instance as [`Resolver::status`] reports it.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceStatus {
    /// Instance id (`host:port` for fallback entries).
    pub instance_id: String,
    /// `host:port`.
    pub address: String,
    /// Its health in the registry.
    pub health: Health,
    /// Its zone.
    pub zone: String,
    /// Its weight.
    pub weight: u32,
    /// Its circuit breaker.
    pub breaker: BreakerState,
    /// Failures in a row reported for it.
    pub consecutive_failures: u32,
}

/// A snapshot of a resolver, for status pages.
#[derive(Clone, Debug, Serialize)]
pub struct ResolverStatus {
    /// The service.
    pub service: String,
    /// Its namespace (empty: `default`).
    pub namespace: String,
    /// Registry or fallback.
    pub source: PickSource,
    /// Whether the cache could not be confirmed current.
    pub stale: bool,
    /// The registry revision the cache reflects (0 before the first answer).
    pub revision: Revision,
    /// Milliseconds since the registry was last heard from, if ever.
    pub ms_since_last_update: Option<u64>,
    /// The last error from the registry, while stale.
    pub last_error: Option<String>,
    /// Every known instance.
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Default)]
struct Cache {
    by_id: BTreeMap<String, Arc<Instance>>,
    /// `by_id`'s values, rebuilt on change so that a pick does not collect them.
    list: Arc<[Arc<Instance>]>,
    revision: Revision,
    /// The registry has answered for this service at least once.
    seen: bool,
    stale: bool,
    last_heard: Option<Instant>,
    last_error: Option<String>,
}

impl Cache {
    fn rebuild(&mut self) {
        self.list = self.by_id.values().cloned().collect();
    }

    fn replace(&mut self, instances: Vec<Instance>, revision: Revision) {
        self.by_id = instances
            .into_iter()
            .map(|i| (i.instance_id.clone(), Arc::new(i)))
            .collect();
        self.revision = revision;
        self.rebuild();
    }

    /// Applies one watch item; items at or below the cache's revision are ignored.
    fn apply(&mut self, item: WatchItem) {
        match item {
            WatchItem::Reset { revision, instances } => self.replace(instances, revision),
            WatchItem::Progress(revision) => self.revision = self.revision.max(revision),
            WatchItem::Event(event) => {
                if event.revision <= self.revision {
                    return;
                }
                self.revision = event.revision;
                match event.kind {
                    EventKind::Put(instance) => {
                        self.by_id.insert(instance.instance_id.clone(), instance);
                    }
                    EventKind::Delete { key, .. } => {
                        self.by_id.remove(&key.instance_id);
                    }
                }
                self.rebuild();
            }
        }
    }

    fn heard(&mut self) {
        self.seen = true;
        self.stale = false;
        self.last_error = None;
        self.last_heard = Some(Instant::now());
    }
}

#[derive(Debug)]
struct Shared {
    service: String,
    options: ResolverOptions,
    cache: RwLock<Cache>,
    /// The fallback's addresses as instances (empty when there is none).
    fallback: Arc<[Arc<Instance>]>,
    picker: Mutex<Picker>,
    breakers: Mutex<Breakers>,
    /// Bumped on every change of the cache, for [`Resolver::changed`].
    version: watch::Sender<u64>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    task: AbortHandle,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A service's instances in memory, kept current by a watch. Cheap to clone;
/// the watch stops when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Resolver {
    handle: Arc<Handle>,
}

/// An instance known only by its address (a fallback entry): passing, weight 1.
pub(crate) fn bare_instance(service: &str, instance_id: &str, address: &str, port: u16) -> Instance {
    Instance {
        namespace: "".into(),
        service: service.into(),
        instance_id: instance_id.to_string(),
        address: address.to_string(),
        port,
        ports: Default::default(),
        tags: Vec::new(),
        metadata: Default::default(),
        weight: 1,
        zone: String::new(),
        health: Health::Passing,
        lease_id: None,
        create_revision: 0,
        mod_revision: 0,
        registered_at_ms: 0,
        updated_at_ms: 0,
        checks: Vec::new(),
    }
}

fn fallback_instances(service: &str, endpoints: &[StaticEndpoint]) -> Arc<[Arc<Instance>]> {
    endpoints
        .iter()
        .map(|e| Arc::new(bare_instance(service, &authority(&e.host, e.port), &e.host, e.port)))
        .collect()
}

/// A lock that a panic elsewhere poisoned still holds consistent data here: every
/// writer finishes its update before anything can panic.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Resolver {
    /// Starts the cache of `service` and waits up to
    /// [`ResolverOptions::first_sync_timeout`] for the registry's first answer.
    pub(crate) async fn start(
        client: Client,
        service: &str,
        options: ResolverOptions,
        fallback: &StaticFallback,
    ) -> Resolver {
        let (version, mut changed) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            service: service.to_string(),
            fallback: fallback_instances(service, fallback.lookup(service)),
            picker: Mutex::new(Picker::new(options.strategy)),
            breakers: Mutex::new(Breakers::new(options.breaker.clone())),
            cache: RwLock::new(Cache::default()),
            options,
            version,
        });
        let task = tokio::spawn(follow(client, shared.clone())).abort_handle();
        let resolver = Resolver {
            handle: Arc::new(Handle { shared, task }),
        };
        let first_answer = async {
            while !resolver.has_registry_answer() {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(resolver.shared().options.first_sync_timeout, first_answer).await;
        resolver
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The service this resolver follows.
    pub fn service(&self) -> &str {
        &self.shared().service
    }

    /// Whether the registry has answered for the service at least once.
    pub fn has_registry_answer(&self) -> bool {
        read(&self.shared().cache).seen
    }

    /// Whether the cache could not be confirmed current: the registry has not been
    /// heard from for [`ResolverOptions::stale_after`], or its watch failed, or it
    /// has never answered.
    pub fn is_stale(&self) -> bool {
        let cache = read(&self.shared().cache);
        !cache.seen || cache.stale
    }

    /// The registry revision the cache reflects (0 before the first answer).
    pub fn revision(&self) -> Revision {
        read(&self.shared().cache).revision
    }

    /// Every instance known, whatever its health, from the registry (or the
    /// fallback while the registry has never answered).
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        let cache = read(&self.shared().cache);
        if cache.seen {
            cache.list.to_vec()
        } else {
            self.shared().fallback.to_vec()
        }
    }

    /// Waits until the cache changes (an instance added, changed or removed, or
    /// the staleness changing).
    pub async fn changed(&self) {
        let mut rx = self.shared().version.subscribe();
        let _ = rx.changed().await;
    }

    /// The next instance to call, from memory: healthy ones only (passing, or
    /// warning when none passes), skipping open circuit breakers, preferring the
    /// configured zone, spread by the configured strategy.
    pub fn pick(&self) -> Result<Picked, ClientError> {
        self.pick_excluding(&[])
    }

    /// [`Resolver::pick`] leaving out the instances in `avoid` (say, the one a call
    /// just failed on, to retry elsewhere); an error when no other is usable.
    pub fn pick_excluding(&self, avoid: &[&str]) -> Result<Picked, ClientError> {
        let shared = self.shared();
        let (list, stale, source) = {
            let cache = read(&shared.cache);
            if cache.seen {
                (cache.list.clone(), cache.stale, PickSource::Registry)
            } else if !shared.fallback.is_empty() {
                (shared.fallback.clone(), true, PickSource::Fallback)
            } else {
                let reason = match &cache.last_error {
                    Some(e) => format!("the registry has not answered ({e}) and there is no static fallback"),
                    None => "the registry has not answered yet and there is no static fallback".to_string(),
                };
                return Err(ClientError::NoInstance {
                    service: shared.service.clone(),
                    reason,
                });
            }
        };
        let now = Instant::now();
        let mut breakers = lock(&shared.breakers);
        let candidates = usable(&list, shared.options.prefer_zone.as_deref(), |id| {
            !avoid.contains(&id) && breakers.allows(id, now)
        })
        .map_err(|reason| ClientError::NoInstance {
            service: shared.service.clone(),
            reason: if avoid.is_empty() {
                reason
            } else {
                format!("{reason} (leaving out {})", avoid.join(", "))
            },
        })?;
        let index = lock(&shared.picker).pick(&candidates);
        let instance = Arc::clone(candidates[index]);
        breakers.on_pick(&instance.instance_id, now);
        Ok(Picked {
            instance,
            stale,
            source,
        })
    }

    /// `http://host:port/path` of the next instance to call.
    pub fn url(&self, path: &str) -> Result<String, ClientError> {
        Ok(self.pick()?.url(path))
    }

    /// Reports that a call to `instance_id` succeeded (closes its breaker).
    pub fn record_success(&self, instance_id: &str) {
        lock(&self.shared().breakers).record_success(instance_id);
    }

    /// Reports that a call to `instance_id` failed; after
    /// [`BreakerPolicy::failure_threshold`] failures in a row the instance is
    /// skipped for [`BreakerPolicy::cool_down`]. Answers whether this failure
    /// opened (or re-opened) the breaker.
    pub fn record_failure(&self, instance_id: &str) -> bool {
        let opened = lock(&self.shared().breakers).record_failure(instance_id, Instant::now());
        if opened {
            tracing::warn!(service = %self.service(), instance = instance_id, "circuit breaker opened");
        }
        opened
    }

    /// The state of `instance_id`'s circuit breaker now.
    pub fn breaker_state(&self, instance_id: &str) -> BreakerState {
        lock(&self.shared().breakers).state(instance_id, Instant::now())
    }

    /// A snapshot of the cache and the breakers.
    pub fn status(&self) -> ResolverStatus {
        let shared = self.shared();
        let cache = read(&shared.cache);
        let now = Instant::now();
        let breakers = lock(&shared.breakers);
        let (list, source) = if cache.seen || shared.fallback.is_empty() {
            (cache.list.clone(), PickSource::Registry)
        } else {
            (shared.fallback.clone(), PickSource::Fallback)
        };
        ResolverStatus {
            service: shared.service.clone(),
            namespace: shared.options.namespace.clone(),
            source,
            stale: !cache.seen || cache.stale,
            revision: cache.revision,
            ms_since_last_update: cache
                .last_heard
                .map(|t| u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX)),
            last_error: cache.last_error.clone(),
            instances: list
                .iter()
                .map(|i| InstanceStatus {
                    instance_id: i.instance_id.clone(),
                    address: authority(&i.address, i.port),
                    health: i.health,
                    zone: i.zone.clone(),
                    weight: i.weight,
                    breaker: breakers.state(&i.instance_id, now),
                    consecutive_failures: breakers.failures(&i.instance_id),
                })
                .collect(),
        }
    }
}

impl Shared {
    fn update(&self, change: impl FnOnce(&mut Cache)) {
        {
            let mut cache = write(&self.cache);
            change(&mut cache);
            let cache = &*cache;
            lock(&self.breakers)
                .retain(|id| cache.by_id.contains_key(id) || self.fallback.iter().any(|f| f.instance_id == id));
        }
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn mark_stale(&self, error: Option<String>) {
        let already = {
            let cache = read(&self.cache);
            cache.stale && (error.is_none() || cache.last_error == error)
        };
        if already {
            return;
        }
        tracing::warn!(service = %self.service, error = error.as_deref().unwrap_or("no news"), "registry unreachable; answering from the cache");
        self.update(|cache| {
            cache.stale = true;
            if error.is_some() {
                cache.last_error = error;
            }
        });
    }
}

/// Keeps the cache current until the resolver is dropped: read, follow the watch,
/// and on failure read again after a backoff.
async fn follow(client: Client, shared: Arc<Shared>) {
    let all_health = DiscoverOptions {
        namespace: shared.options.namespace.clone(),
        health: vec![Health::Passing, Health::Warning, Health::Critical],
        ..DiscoverOptions::default()
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match client.discover(&shared.service, &all_health).await {
            Err(e) => shared.mark_stale(Some(e.to_string())),
            Ok((instances, header)) => {
                delay = Duration::from_millis(100);
                shared.update(|cache| {
                    cache.replace(instances, header.revision);
                    cache.heard();
                });
                let failure = follow_watch(&client, &shared, header.revision + 1).await;
                shared.mark_stale(Some(failure));
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(shared.options.max_reconnect_delay);
    }
}

/// Applies the watch from `from` until it fails; returns why.
async fn follow_watch(client: &Client, shared: &Shared, from: Revision) -> String {
    let mut stream = client.watch(&shared.options.namespace, &shared.service, from);
    loop {
        let next = tokio::time::timeout(shared.options.stale_after, stream.next()).await;
        match next {
            Err(_) => shared.mark_stale(None),
            Ok(None) => return "the watch ended".into(),
            Ok(Some(Err(e))) => return e.to_string(),
            Ok(Some(Ok(item))) => shared.update(|cache| {
                cache.apply(item);
                cache.heard();
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_core::{DeleteReason, Event, InstanceKey};

    fn inst(id: &str, revision: Revision) -> Instance {
        Instance {
            mod_revision: revision,
            ..bare_instance("web", id, "10.0.0.1", 80)
        }
    }

    fn ids(cache: &Cache) -> Vec<&str> {
        cache.list.iter().map(|i| i.instance_id.as_str()).collect()
    }

    #[test]
    fn the_cache_follows_puts_deletes_and_resets() {
        let mut cache = Cache::default();
        cache.replace(vec![inst("a", 3)], 5);
        cache.apply(WatchItem::Event(Event {
            revision: 6,
            kind: EventKind::Put(Arc::new(inst("b", 6))),
        }));
        assert_eq!(ids(&cache), ["a", "b"]);
        cache.apply(WatchItem::Event(Event {
            revision: 7,
            kind: EventKind::Delete {
                key: InstanceKey::new("default", "web", "a"),
                reason: DeleteReason::LeaseExpired,
            },
        }));
        assert_eq!(ids(&cache), ["b"]);
        assert_eq!(cache.revision, 7);
        // An event the cache already reflects is not applied twice.
        cache.apply(WatchItem::Event(Event {
            revision: 6,
            kind: EventKind::Put(Arc::new(inst("a", 6))),
        }));
        assert_eq!(ids(&cache), ["b"]);
        cache.apply(WatchItem::Reset {
            revision: 20,
            instances: vec![inst("c", 19)],
        });
        assert_eq!(ids(&cache), ["c"]);
        cache.apply(WatchItem::Progress(25));
        assert_eq!(cache.revision, 25);
    }

    #[test]
    fn urls_bracket_ipv6_and_add_the_slash() {
        let picked = Picked {
            instance: Arc::new(bare_instance("web", "w1", "::1", 8080)),
            stale: false,
            source: PickSource::Registry,
        };
        assert_eq!(picked.url("/a/b?c=1"), "http://[::1]:8080/a/b?c=1");
        assert_eq!(picked.url("x"), "http://[::1]:8080/x");
        assert_eq!(authority("10.0.0.1", 80), "10.0.0.1:80");
    }

    #[tokio::test]
    async fn with_no_reachable_node_the_fallback_answers_and_breakers_apply() {
        let options = crate::ClientOptions {
            connect_timeout: Duration::from_millis(50),
            retry: crate::RetryPolicy {
                max_elapsed: Duration::from_millis(100),
                ..crate::RetryPolicy::default()
            },
            ..crate::ClientOptions::default()
        };
        let client = Client::connect_with(vec!["127.0.0.1:1".into()], options).await.unwrap();
        let mut fallback = StaticFallback::none();
        fallback.insert(
            "web",
            vec![
                StaticEndpoint::parse("10.0.0.1:80").unwrap(),
                StaticEndpoint::parse("10.0.0.2:80").unwrap(),
            ],
        );
        let resolver_options = ResolverOptions {
            first_sync_timeout: Duration::from_millis(10),
            breaker: BreakerPolicy {
                failure_threshold: 1,
                cool_down: Duration::from_secs(60),
            },
            ..ResolverOptions::default()
        };
        let web = Resolver::start(client.clone(), "web", resolver_options.clone(), &fallback).await;
        let first = web.pick().unwrap();
        assert_eq!(first.source, PickSource::Fallback);
        assert!(first.stale);
        let second = web.pick().unwrap();
        assert_ne!(first.instance.instance_id, second.instance.instance_id);
        let other = web.pick_excluding(&["10.0.0.1:80"]).unwrap();
        assert_eq!(other.instance.instance_id, "10.0.0.2:80");
        let none = web.pick_excluding(&["10.0.0.1:80", "10.0.0.2:80"]).unwrap_err();
        assert!(none.to_string().contains("leaving out"), "{none}");
        assert!(
            web.record_failure("10.0.0.1:80"),
            "the first failure opens a breaker of threshold 1"
        );
        for _ in 0..4 {
            assert_eq!(web.url("/x").unwrap(), "http://10.0.0.2:80/x");
        }
        assert_eq!(web.status().instances.len(), 2);

        let unknown = Resolver::start(client, "unknown", resolver_options, &fallback).await;
        let err = unknown.pick().unwrap_err();
        assert!(
            matches!(&err, ClientError::NoInstance { service, .. } if service == "unknown"),
            "{err:?}"
        );
    }
}
