//! Which commands every member can apply, so a rolling upgrade cannot stall writes.
//!
//! Each node answers every peer call with its command level
//! ([`muster_core::COMMAND_LEVEL`]) in the [`COMMAND_LEVEL_HEADER`]; a node of a
//! build before the header answers without it, which reads as level 1. The node that
//! sent the call records the level by peer ([`MemberLevels::record`]): a candidate
//! hears from the voters in its vote round, a leader from every member with each
//! append.
//!
//! A command above level 1 is proposed only while no member is known to run a lower
//! level ([`MemberLevels::check`]). Without this, one maintenance request during a
//! rolling upgrade would put an entry in the log that the older members cannot
//! decode: they would stop replicating at it, and with a majority of them every
//! later write would wait until they were upgraded. A member not heard from yet
//! (down, or not reached since this node started) does not block: if it comes back
//! with an older build only it stops, at that entry, and its log says why.

use std::collections::HashMap;
use std::sync::Mutex;

use muster_core::COMMAND_LEVEL;

use crate::error::ApiError;

/// The peer header carrying the sender's command level (answers carry it too).
pub const COMMAND_LEVEL_HEADER: &str = "muster-command-level";

/// The level a peer answer states: its [`COMMAND_LEVEL_HEADER`], or 1 when the
/// header is absent (a build from before levels) or unreadable.
pub fn level_of(header: Option<&[u8]>) -> u32 {
    header
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| h.parse().ok())
        .filter(|level| *level >= 1)
        .unwrap_or(1)
}

/// This node's command level, and the one each peer last stated.
#[derive(Debug)]
pub struct MemberLevels {
    own: u32,
    levels: Mutex<HashMap<u64, u32>>,
}

impl Default for MemberLevels {
    fn default() -> Self {
        MemberLevels::new(COMMAND_LEVEL)
    }
}

impl MemberLevels {
    /// Levels for a node that states `own` (this build's [`COMMAND_LEVEL`], or a
    /// lower one it is pinned to by `--command-level`).
    pub fn new(own: u32) -> Self {
        MemberLevels {
            own,
            levels: Mutex::default(),
        }
    }

    /// The level this node states in its peer calls and answers.
    pub fn own(&self) -> u32 {
        self.own
    }

    /// Records `level`, read with [`level_of`] from the [`COMMAND_LEVEL_HEADER`] of a
    /// call or answer of `peer`. Called for every Raft call: no allocation once the
    /// peer is known.
    pub fn record(&self, peer: u64, level: u32) {
        let previous = self
            .levels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, level);
        if previous.is_some_and(|p| p != level) {
            tracing::info!(peer, level, "peer now runs another command level");
        }
    }

    /// The level `peer` last answered with, if it answered.
    pub fn level(&self, peer: u64) -> Option<u32> {
        self.levels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .copied()
    }

    /// Refuses a command that needs level `needed` when this node or one of
    /// `members` (the other members) is known to state a lower level.
    pub fn check(&self, members: impl IntoIterator<Item = u64>, needed: u32) -> Result<(), ApiError> {
        if needed <= 1 {
            return Ok(());
        }
        if needed > self.own {
            return Err(ApiError::ClusterTooOld(format!(
                "this write needs command level {needed}, and this node is pinned to level {} \
                 (--command-level); raise it on every node first",
                self.own
            )));
        }
        let levels = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        let mut behind: Vec<(u64, u32)> = members
            .into_iter()
            .filter_map(|m| levels.get(&m).map(|l| (m, *l)))
            .filter(|(_, level)| *level < needed)
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        behind.sort_unstable();
        let nodes: Vec<String> = behind
            .iter()
            .map(|(node, level)| format!("node {node} (level {level})"))
            .collect();
        Err(ApiError::ClusterTooOld(format!(
            "this write needs command level {needed}, and {} runs an older Muster that cannot \
             apply it; upgrade every node first",
            nodes.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_unreadable_header_reads_as_level_one() {
        assert_eq!(level_of(None), 1);
        assert_eq!(level_of(Some(b"x")), 1);
        assert_eq!(level_of(Some(b"0")), 1);
        assert_eq!(level_of(Some(b"2")), 2);
    }

    #[test]
    fn a_command_above_level_one_waits_for_every_known_member_to_reach_its_level() {
        let levels = MemberLevels::default();
        assert!(levels.check([1, 2, 3], 1).is_ok());
        assert!(
            levels.check([1, 2, 3], 2).is_ok(),
            "members not heard from do not block"
        );
        levels.record(2, level_of(Some(b"2")));
        levels.record(3, level_of(None));
        let refused = levels.check([1, 2, 3], 2).unwrap_err();
        assert!(matches!(refused, ApiError::ClusterTooOld(_)));
        let message = refused.to_string();
        assert!(
            message.contains("node 3 (level 1)") && !message.contains("node 2"),
            "{message}"
        );
        assert!(levels.check([1, 2, 3], 1).is_ok(), "level 1 commands always go");
        assert!(levels.check([1, 2], 2).is_ok(), "a removed member no longer counts");
        levels.record(3, COMMAND_LEVEL);
        assert!(levels.check([1, 2, 3], 2).is_ok(), "upgraded");
        assert_eq!(levels.level(3), Some(COMMAND_LEVEL));
    }

    #[test]
    fn a_node_pinned_to_a_lower_level_states_it_and_refuses_what_needs_more() {
        let pinned = MemberLevels::new(1);
        assert_eq!(pinned.own(), 1);
        let refused = pinned.check([], 2).unwrap_err().to_string();
        assert!(refused.contains("--command-level"), "{refused}");
        assert!(pinned.check([], 1).is_ok());
        assert!(MemberLevels::default().check([], COMMAND_LEVEL + 1).is_err());
    }
}
