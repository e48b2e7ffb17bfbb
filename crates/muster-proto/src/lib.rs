//! Muster's gRPC API, generated from `proto/muster/v1`, and the one place where
//! protobuf messages are converted to and from `muster-core` types.
#![forbid(unsafe_code)]

/// The client API (`muster.v1`): services `Registry` and `Cluster`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("muster.v1");

    /// The peer API (`muster.v1.peer`): Raft traffic and forwarding.
    pub mod peer {
        tonic::include_proto!("muster.v1.peer");
    }
}

/// The encoded file descriptor set of every Muster proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/muster_descriptor.bin"));

pub mod convert;
