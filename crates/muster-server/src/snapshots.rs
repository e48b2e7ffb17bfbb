//! Snapshots by volume of change, not only by count of log entries.
//!
//! openraft builds a snapshot every `snapshot_every` log entries. Since concurrent
//! writes share entries ([`crate::write_batch`]), one entry may carry hundreds of
//! commands, and the log kept in memory until the next snapshot could hold
//! hundreds of thousands of them. This task also asks for a snapshot once the
//! registry's revision has moved `snapshot_every` past where the last snapshot
//! (built by either trigger) left it.

use std::sync::Arc;

use crate::node::NodeCore;

/// Triggers snapshots by revision until the node stops.
pub async fn run(core: Arc<NodeCore>) {
    let every = core.config.raft.snapshot_every.max(1);
    let mut revisions = core.shared.revision();
    let metrics = core.raft.metrics();
    let mut snapshot_index = metrics.borrow().snapshot.map(|l| l.index);
    let mut since = *revisions.borrow();
    loop {
        // Looked at when the revision moves: a snapshot only matters once it has.
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            changed = revisions.changed() => if changed.is_err() { return },
        }
        let current = metrics.borrow().snapshot.map(|l| l.index);
        if current != snapshot_index {
            // A snapshot was built (by openraft's entry count or by us).
            snapshot_index = current;
            since = *revisions.borrow();
            continue;
        }
        let revision = *revisions.borrow();
        if revision.saturating_sub(since) >= every {
            tracing::debug!(revision, since, "snapshot after {every} revisions");
            since = revision;
            if let Err(e) = core.raft.trigger().snapshot().await {
                tracing::warn!(error = %e, "could not trigger a snapshot");
                return;
            }
        }
    }
}
