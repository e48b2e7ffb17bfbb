//! Discover answers encoded once per service revision.
//!
//! A service's instances change far less often than they are read, and turning them
//! into protobuf (a message per instance, a string copy per field, a map per
//! metadata set, then the encoding) was a tenth of a follower's CPU per read. The
//! `instances` field of an answer is kept here, encoded, under the service, the
//! filter and the service's revision: every change to a service moves its revision
//! (see `Registry::service_revision`), so while the revision is the same the encoded
//! instances are too, and a read at that revision copies bytes instead.
//!
//! The cache holds at most [`MAX_CACHED_BYTES`]; when an answer would take it past
//! that, everything cached is dropped and it fills again from the reads that follow.
//! Answers larger than [`MAX_ENTRY_BYTES`] are not kept, and a service keeps answers
//! for at most [`MAX_FILTERS_PER_SERVICE`] filters.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use muster_core::{DiscoverFilter, Revision, ServiceKey};

/// Most bytes the cache holds, keys included.
pub const MAX_CACHED_BYTES: usize = 8 * 1024 * 1024;
/// Largest encoded answer kept.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;
/// Most filters kept per service: a new one beyond them displaces the oldest, so a
/// lookup scans a handful of answers whatever filters clients send.
pub const MAX_FILTERS_PER_SERVICE: usize = 8;
/// What an entry costs beyond its bytes and key strings (map slots, the filter's
/// vectors, the entry itself): a rough figure that keeps empty answers from being free.
const ENTRY_OVERHEAD_BYTES: usize = 128;

/// Encoded `instances` fields of Discover answers by service, filter and service
/// revision.
#[derive(Default)]
pub struct DiscoverCache {
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    services: HashMap<ServiceKey, Vec<CachedAnswer>>,
    bytes: usize,
}

struct CachedAnswer {
    filter: DiscoverFilter,
    service_revision: Revision,
    instances: Bytes,
    cost: usize,
}

impl DiscoverCache {
    /// The encoded instances of `service` through `filter` at `service_revision`, if
    /// they are cached.
    pub fn get(&self, service: &ServiceKey, filter: &DiscoverFilter, service_revision: Revision) -> Option<Bytes> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .services
            .get(service)?
            .iter()
            .find(|a| a.service_revision == service_revision && a.filter == *filter)
            .map(|a| a.instances.clone())
    }

    /// Keeps `instances`, the encoded answer for `service` through `filter` at
    /// `service_revision`, replacing an older answer for the same filter. An answer
    /// older than the one held is not kept.
    pub fn insert(&self, service: &ServiceKey, filter: &DiscoverFilter, service_revision: Revision, instances: Bytes) {
        if instances.len() > MAX_ENTRY_BYTES {
            return;
        }
        let cost = instances.len()
            + service.namespace.len()
            + service.service.len()
            + filter.tags.iter().map(String::len).sum::<usize>()
            + filter.zone.as_ref().map_or(0, String::len)
            + ENTRY_OVERHEAD_BYTES;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut freed = 0;
        if let Some(answers) = state.services.get_mut(service) {
            match answers.iter().position(|a| a.filter == *filter) {
                Some(i) if answers[i].service_revision >= service_revision => return,
                Some(i) => freed = answers.remove(i).cost,
                None if answers.len() >= MAX_FILTERS_PER_SERVICE => freed = answers.remove(0).cost,
                None => {}
            }
        }
        state.bytes -= freed;
        if state.bytes + cost > MAX_CACHED_BYTES {
            tracing::debug!(held = state.bytes, "discover cache full: emptied");
            state.services.clear();
            state.bytes = 0;
        }
        state.bytes += cost;
        state.services.entry(service.clone()).or_default().push(CachedAnswer {
            filter: filter.clone(),
            service_revision,
            instances,
            cost,
        });
    }

    /// Bytes held, keys included.
    pub fn held_bytes(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_core::Health;

    fn key(service: &str) -> ServiceKey {
        ServiceKey::new("default", service)
    }

    #[test]
    fn an_answer_is_found_only_at_its_revision_and_filter() {
        let cache = DiscoverCache::default();
        let passing = DiscoverFilter {
            health: vec![Health::Passing],
            ..Default::default()
        };
        cache.insert(&key("web"), &DiscoverFilter::default(), 7, Bytes::from_static(b"all"));
        cache.insert(&key("web"), &passing, 7, Bytes::from_static(b"passing"));
        assert_eq!(
            cache.get(&key("web"), &DiscoverFilter::default(), 7).as_deref(),
            Some(&b"all"[..])
        );
        assert_eq!(cache.get(&key("web"), &passing, 7).as_deref(), Some(&b"passing"[..]));
        assert_eq!(cache.get(&key("web"), &DiscoverFilter::default(), 8), None);
        assert_eq!(cache.get(&key("api"), &DiscoverFilter::default(), 7), None);
    }

    #[test]
    fn a_newer_answer_replaces_an_older_one_and_never_the_reverse() {
        let cache = DiscoverCache::default();
        let all = DiscoverFilter::default();
        cache.insert(&key("web"), &all, 7, Bytes::from_static(b"seven"));
        let after_first = cache.held_bytes();
        cache.insert(&key("web"), &all, 9, Bytes::from_static(b"nine!"));
        assert_eq!(cache.held_bytes(), after_first, "replaced, not added");
        cache.insert(&key("web"), &all, 8, Bytes::from_static(b"eight"));
        assert_eq!(cache.get(&key("web"), &all, 9).as_deref(), Some(&b"nine!"[..]));
        assert_eq!(cache.get(&key("web"), &all, 8), None);
        assert_eq!(cache.get(&key("web"), &all, 7), None);
    }

    #[test]
    fn the_cache_stays_within_its_budget() {
        let cache = DiscoverCache::default();
        let answer = Bytes::from(vec![0u8; 100 * 1024]);
        for n in 0..500 {
            cache.insert(&key(&format!("svc-{n}")), &DiscoverFilter::default(), 1, answer.clone());
            assert!(cache.held_bytes() <= MAX_CACHED_BYTES);
        }
        // The last answer is always kept.
        assert!(cache.get(&key("svc-499"), &DiscoverFilter::default(), 1).is_some());
        // Empty answers cost their keys, so distinct services cannot grow it either.
        for n in 0..200_000 {
            cache.insert(&key(&format!("empty-{n}")), &DiscoverFilter::default(), 1, Bytes::new());
            assert!(cache.held_bytes() <= MAX_CACHED_BYTES);
        }
    }

    #[test]
    fn a_service_keeps_answers_for_its_latest_filters_only() {
        let cache = DiscoverCache::default();
        let tagged = |n: usize| DiscoverFilter {
            tags: vec![format!("tag-{n}")],
            ..Default::default()
        };
        for n in 0..MAX_FILTERS_PER_SERVICE + 3 {
            cache.insert(&key("web"), &tagged(n), 1, Bytes::from_static(b"x"));
        }
        let kept = (0..MAX_FILTERS_PER_SERVICE + 3)
            .filter(|n| cache.get(&key("web"), &tagged(*n), 1).is_some())
            .collect::<Vec<_>>();
        assert_eq!(kept, (3..MAX_FILTERS_PER_SERVICE + 3).collect::<Vec<_>>());
    }

    #[test]
    fn an_answer_beyond_the_entry_limit_is_not_kept() {
        let cache = DiscoverCache::default();
        let all = DiscoverFilter::default();
        cache.insert(&key("big"), &all, 1, Bytes::from(vec![0u8; MAX_ENTRY_BYTES + 1]));
        assert_eq!(cache.get(&key("big"), &all, 1), None);
        assert_eq!(cache.held_bytes(), 0);
    }
}
