//! Fuzzing of what comes from the network, on stable Rust (proptest): arbitrary
//! bytes decoded as every client request message and as every peer message, and
//! arbitrary (structurally valid) messages run through the validating conversions of
//! `muster_proto::convert` and `muster_core::validate`. Nothing may panic; what the
//! conversions accept must be valid, and what they refuse must name a field.
//!
//! 512 cases per target by default; `MUSTER_FUZZ_CASES=200000` runs long.

use std::collections::BTreeMap;

use muster_core::validate;
use muster_proto::convert;
use muster_proto::v1 as pb;
use muster_server::forward::ForwardRequest;
use muster_store::TypeConfig;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use proptest::prelude::*;
use prost::Message;

fn cases() -> u32 {
    std::env::var("MUSTER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Decodes `bytes` as `M`; when it decodes, re-encoding and decoding again gives the
/// same message.
fn decode_roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<M> {
    let m = M::decode(bytes).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("a decoded message re-encodes");
    assert_eq!(m, again);
    Some(m)
}

/// Runs every conversion a request's fields go through on the server.
fn convert_instance(i: pb::Instance) {
    let back = convert::instance_from_pb(&i);
    let _ = pb::Instance::from(&back);
    match convert::spec_from_pb(i) {
        Ok(spec) => {
            validate::instance_spec(&spec).expect("an accepted spec is valid");
            assert!(spec.port >= 1);
        }
        Err(e) => assert!(!e.field.is_empty(), "a refusal names its field: {e:?}"),
    }
}

fn convert_key(namespace: &str, service: &str, instance_id: &str) {
    match convert::key_from_parts(namespace, service, instance_id) {
        Ok(key) => validate::instance_key(&key).expect("an accepted key is valid"),
        Err(e) => assert!(!e.field.is_empty()),
    }
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec(any::<u8>(), 0..2048),
    ]
}

/// Names that hit the validation's edges: valid labels, upper case, underscores,
/// dots, empty, too long, non-ASCII.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{0,70}",
        "[a-zA-Z0-9_.-]{0,10}",
        any::<String>(),
        Just(String::new()),
        Just("a".repeat(63)),
        Just("a".repeat(64)),
    ]
}

fn instance() -> impl Strategy<Value = pb::Instance> {
    (
        (name(), name(), name(), name()),
        (any::<u32>(), prop::collection::btree_map(name(), any::<u32>(), 0..4)),
        (
            prop::collection::vec(name(), 0..70),
            prop::collection::btree_map(name(), ".{0,300}", 0..70),
        ),
        (any::<u32>(), name(), any::<i32>(), any::<u64>()),
    )
        .prop_map(
            |(
                (namespace, service, instance_id, address),
                (port, ports),
                (tags, metadata),
                (weight, zone, health, lease_id),
            )| {
                pb::Instance {
                    namespace,
                    service,
                    instance_id,
                    address,
                    port,
                    ports: ports.into_iter().collect(),
                    tags,
                    metadata: metadata.into_iter().collect::<BTreeMap<_, _>>().into_iter().collect(),
                    weight,
                    zone,
                    health,
                    lease_id,
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_as_any_client_request_never_panic(bytes in any_bytes()) {
        if let Some(m) = decode_roundtrip::<pb::RegisterRequest>(&bytes) {
            if let Some(i) = m.instance { convert_instance(i); }
            let _ = validate::ttl_ms(m.ttl_ms);
        }
        if let Some(m) = decode_roundtrip::<pb::DeregisterRequest>(&bytes) {
            convert_key(&m.namespace, &m.service, &m.instance_id);
        }
        if let Some(m) = decode_roundtrip::<pb::GrantLeaseRequest>(&bytes) {
            let _ = validate::ttl_ms(m.ttl_ms);
        }
        if let Some(m) = decode_roundtrip::<pb::RevokeLeaseRequest>(&bytes) {
            let _ = validate::lease_id(m.lease_id);
        }
        let _ = decode_roundtrip::<pb::KeepAliveRequest>(&bytes);
        if let Some(m) = decode_roundtrip::<pb::SetHealthRequest>(&bytes) {
            convert_key(&m.namespace, &m.service, &m.instance_id);
            let _ = convert::health_from_pb("health", m.health);
        }
        if let Some(m) = decode_roundtrip::<pb::SetMaintenanceRequest>(&bytes) {
            convert_key(&m.namespace, &m.service, &m.instance_id);
            let _ = validate::maintenance_reason(&m.reason);
        }
        if let Some(m) = decode_roundtrip::<pb::DiscoverRequest>(&bytes) {
            let _ = convert::health_filter_from_pb(&m.health);
            let _ = validate::namespace(&m.namespace);
            let _ = validate::dns_label("service", &m.service);
            let _ = pb::ReadMode::try_from(m.mode);
        }
        if let Some(m) = decode_roundtrip::<pb::ListServicesRequest>(&bytes) {
            let _ = validate::namespace(&m.namespace);
        }
        if let Some(m) = decode_roundtrip::<pb::WatchRequest>(&bytes) {
            let _ = validate::namespace(&m.namespace);
            let _ = validate::dns_label("service", &m.service);
        }
        let _ = decode_roundtrip::<pb::StatusRequest>(&bytes);
        let _ = decode_roundtrip::<pb::MembersRequest>(&bytes);
        let _ = decode_roundtrip::<pb::AddLearnerRequest>(&bytes);
        let _ = decode_roundtrip::<pb::PromoteRequest>(&bytes);
        let _ = decode_roundtrip::<pb::RemoveMemberRequest>(&bytes);
    }

    #[test]
    fn arbitrary_bytes_as_any_peer_message_never_panic(bytes in any_bytes()) {
        // What the peer service does with `PeerMessage.data` (bincode).
        let _ = decode_roundtrip::<pb::peer::PeerMessage>(&bytes);
        let _ = bincode::deserialize::<ForwardRequest>(&bytes);
        let _ = bincode::deserialize::<VoteRequest<u64>>(&bytes);
        let _ = bincode::deserialize::<AppendEntriesRequest<TypeConfig>>(&bytes);
        let _ = bincode::deserialize::<InstallSnapshotRequest<TypeConfig>>(&bytes);
    }

    #[test]
    fn arbitrary_registrations_are_accepted_only_when_valid(i in instance(), ttl in any::<u64>()) {
        let bytes = pb::RegisterRequest { instance: Some(i.clone()), ttl_ms: ttl }.encode_to_vec();
        let decoded = pb::RegisterRequest::decode(bytes.as_slice()).expect("own encoding decodes");
        prop_assert_eq!(decoded.instance.as_ref(), Some(&i));
        convert_instance(i);
        if validate::ttl_ms(ttl).is_ok() {
            prop_assert!((1_000..=86_400_000).contains(&ttl));
        }
    }

    #[test]
    fn arbitrary_keys_and_filters_are_accepted_only_when_valid(
        namespace in name(), service in name(), id in name(), health in prop::collection::vec(any::<i32>(), 0..5)
    ) {
        convert_key(&namespace, &service, &id);
        match convert::health_filter_from_pb(&health) {
            Ok(h) => prop_assert_eq!(h.len(), health.len()),
            Err(e) => prop_assert!(e.field.starts_with("health[")),
        }
    }
}
