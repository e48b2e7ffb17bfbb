//! The openraft type configuration shared by storage, network and runtime.

use std::io::Cursor;

use muster_core::{ApplyResult, Command};

openraft::declare_raft_types!(
    /// Muster's Raft types: entries carry a [`Command`], applying one answers an
    /// [`ApplyResult`]; nodes are known by their peer address.
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A node id.
pub type NodeId = u64;
/// openraft's storage error for Muster.
pub type StorageError = openraft::StorageError<NodeId>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A stored membership.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
