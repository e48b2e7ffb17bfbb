//! Filters for discovery and watches.

use crate::event::{Event, EventKind};
use crate::types::{Health, Instance};

/// Which instances of one service a discovery returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoverFilter {
    /// Every one of these tags must be present.
    pub tags: Vec<String>,
    /// Only this zone, if set.
    pub zone: Option<String>,
    /// Only these health states; empty means all.
    pub health: Vec<Health>,
}

impl DiscoverFilter {
    /// Whether `instance` passes the filter.
    pub fn matches(&self, instance: &Instance) -> bool {
        self.tags.iter().all(|t| instance.tags.contains(t))
            && self.zone.as_ref().is_none_or(|z| &instance.zone == z)
            && (self.health.is_empty() || self.health.contains(&instance.health))
    }
}

/// Which events a watch receives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchFilter {
    /// Only this namespace, if set.
    pub namespace: Option<String>,
    /// Only this service, if set.
    pub service: Option<String>,
}

impl WatchFilter {
    /// Whether an event about `(namespace, service)` passes.
    pub fn matches_service(&self, namespace: &str, service: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace) && self.service.as_deref().is_none_or(|s| s == service)
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &Event) -> bool {
        let (namespace, service) = event.service();
        self.matches_service(namespace, service)
    }

    /// Whether `instance` passes (used to build a `Reset` snapshot).
    pub fn matches_instance(&self, instance: &Instance) -> bool {
        self.matches_service(&instance.namespace, &instance.service)
    }
}

impl EventKind {
    /// Whether this is a removal.
    pub fn is_delete(&self) -> bool {
        matches!(self, EventKind::Delete { .. })
    }
}
