//! Change events: what `apply` emits and watchers receive.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::{Instance, InstanceKey, Revision};

/// Why an instance was removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeleteReason {
    /// Its owner deregistered it.
    Deregistered,
    /// Its lease expired.
    LeaseExpired,
    /// Its lease was revoked.
    LeaseRevoked,
    /// A health policy removed it.
    HealthEvicted,
}

impl DeleteReason {
    /// The snake_case name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::Deregistered => "deregistered",
            DeleteReason::LeaseExpired => "lease_expired",
            DeleteReason::LeaseRevoked => "lease_revoked",
            DeleteReason::HealthEvicted => "health_evicted",
        }
    }
}

/// One change, stamped with the revision it created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The revision this change produced.
    pub revision: Revision,
    /// What changed.
    pub kind: EventKind,
}

/// What changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// An instance was registered or updated; this is its new state.
    Put(Arc<Instance>),
    /// An instance was removed.
    Delete {
        /// The instance removed.
        key: InstanceKey,
        /// Why.
        reason: DeleteReason,
    },
}

impl Event {
    /// The namespace and service this event is about.
    pub fn service(&self) -> (&str, &str) {
        match &self.kind {
            EventKind::Put(instance) => (&instance.namespace, &instance.service),
            EventKind::Delete { key, .. } => (&key.namespace, &key.service),
        }
    }
}
