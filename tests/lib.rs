//! Integration tests live in the test targets of this package; this library holds
//! the client calls several of them share.

use anyhow::Result;
use muster_proto::v1 as pb;
use muster_proto::v1::registry_client::RegistryClient;
use tonic::transport::Channel;

/// An instance of `service` on 10.0.0.1:`port`, tagged `v1`.
pub fn instance(service: &str, id: &str, port: u32) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "10.0.0.1".into(),
        port,
        tags: vec!["v1".into()],
        ..Default::default()
    }
}

/// Registers `inst` with a lease of `ttl_ms` (0: none).
pub async fn register(
    client: &mut RegistryClient<Channel>,
    inst: pb::Instance,
    ttl_ms: u64,
) -> Result<pb::RegisterResponse> {
    Ok(client
        .register(pb::RegisterRequest {
            instance: Some(inst),
            ttl_ms,
        })
        .await?
        .into_inner())
}

/// Discovers `service` in `mode`, waiting for `min_revision`.
pub async fn discover(
    client: &mut RegistryClient<Channel>,
    service: &str,
    mode: pb::ReadMode,
    min_revision: u64,
) -> Result<pb::DiscoverResponse> {
    Ok(client
        .discover(pb::DiscoverRequest {
            service: service.into(),
            mode: mode as i32,
            min_revision,
            ..Default::default()
        })
        .await?
        .into_inner())
}
