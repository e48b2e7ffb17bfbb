//! Resumes stalled replication. openraft 0.9 drops a replication request that fails
//! (peer unreachable, timeout) and sends the missing entries again only when a new
//! entry is appended; heartbeats alone do not carry them. So a follower that comes
//! back while the cluster is idle would stay behind until the next write. The leader
//! watches each follower's matched index and, when one lags without progress,
//! proposes a [`Command::Barrier`] (an entry that changes nothing), which makes
//! openraft replicate again. Nudges back off while the follower stays unreachable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use muster_core::Command;
use openraft::ServerState;

use crate::node::NodeCore;

const CHECK_EVERY: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs until the node stops.
pub async fn run(core: Arc<NodeCore>) {
    let mut interval = tokio::time::interval(CHECK_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut backoff = CHECK_EVERY;
    let mut next_nudge = Instant::now();
    loop {
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let m = core.raft.metrics().borrow().clone();
        let replication = match (m.state, m.replication) {
            (ServerState::Leader, Some(r)) => r,
            _ => {
                seen.clear();
                continue;
            }
        };
        let last_log = m.last_log_index.unwrap_or(0);
        let matched = replication.iter().map(|(id, l)| (*id, l.map_or(0, |l| l.index)));
        let Progress { stalled, progressed } = assess(&mut seen, matched, last_log);
        if progressed && !stalled {
            backoff = CHECK_EVERY;
        }
        if stalled && Instant::now() >= next_nudge {
            tracing::debug!(
                last_log,
                ?replication,
                "a follower lags without progress; proposing a barrier"
            );
            if let Err(e) = core.propose_on_leader(Command::Barrier).await {
                tracing::debug!(error = %e, "barrier not proposed");
            }
            next_nudge = Instant::now() + backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// What one look at the followers' matched indexes found.
#[derive(Debug, PartialEq, Eq)]
struct Progress {
    /// A follower is behind the leader's log and has not moved since the last look.
    stalled: bool,
    /// A follower moved forward since the last look.
    progressed: bool,
}

/// Compares each follower's matched index with the last look (`seen`, updated).
fn assess(seen: &mut BTreeMap<u64, u64>, matched: impl IntoIterator<Item = (u64, u64)>, last_log: u64) -> Progress {
    let mut progress = Progress {
        stalled: false,
        progressed: false,
    };
    for (id, index) in matched {
        match seen.insert(id, index) {
            Some(before) if index < last_log && before == index => progress.stalled = true,
            Some(before) if index > before => progress.progressed = true,
            _ => {}
        }
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_behind_without_progress_between_two_looks_is_stalled() {
        let mut seen = BTreeMap::new();
        // First look: nothing to compare with.
        assert_eq!(
            assess(&mut seen, [(2, 5), (3, 10)], 10),
            Progress {
                stalled: false,
                progressed: false
            }
        );
        // Node 2 still at 5 while the log is at 10: stalled; node 3 is caught up.
        assert_eq!(
            assess(&mut seen, [(2, 5), (3, 10)], 10),
            Progress {
                stalled: true,
                progressed: false
            }
        );
        // Node 2 moves: progress, not stalled.
        assert_eq!(
            assess(&mut seen, [(2, 7), (3, 10)], 10),
            Progress {
                stalled: false,
                progressed: true
            }
        );
        // Caught up and idle: neither.
        assert_eq!(
            assess(&mut seen, [(2, 10), (3, 10)], 10),
            Progress {
                stalled: false,
                progressed: true
            }
        );
        assert_eq!(
            assess(&mut seen, [(2, 10), (3, 10)], 10),
            Progress {
                stalled: false,
                progressed: false
            }
        );
    }
}
