//! Validation of everything a client can submit. Every frontend (gRPC, REST,
//! Consul-compatible) calls these functions and maps [`ValidationError`] to its own
//! status, so the rules live here once.

use std::collections::BTreeMap;

use crate::types::{Check, CheckSpec, InstanceKey, InstanceSpec};

/// Longest DNS label.
pub const MAX_NAME_LEN: usize = 63;
/// Longest instance id.
pub const MAX_INSTANCE_ID_LEN: usize = 128;
/// Most tags on one instance.
pub const MAX_TAGS: usize = 64;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 255;
/// Most metadata entries on one instance.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Most bytes of metadata (keys plus values) on one instance.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// Most named extra ports on one instance.
pub const MAX_NAMED_PORTS: usize = 16;
/// Longest address (a DNS name is at most 253 characters).
pub const MAX_ADDRESS_LEN: usize = 253;
/// Highest weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Shortest lease TTL.
pub const MIN_TTL_MS: u64 = 1_000;
/// Longest lease TTL.
pub const MAX_TTL_MS: u64 = 24 * 60 * 60 * 1_000;
/// Most checks on one instance.
pub const MAX_CHECKS: usize = 16;
/// Longest check id.
pub const MAX_CHECK_ID_LEN: usize = 128;
/// Longest check name.
pub const MAX_CHECK_NAME_LEN: usize = 256;
/// Longest check notes.
pub const MAX_CHECK_NOTES_LEN: usize = 1024;
/// Longest check output (Consul's default `check_output_max_size`).
pub const MAX_CHECK_OUTPUT_LEN: usize = 4096;
/// Longest time a check may stay critical before its instance is removed.
pub const MAX_DEREGISTER_AFTER_MS: u64 = 30 * 24 * 60 * 60 * 1_000;

/// A refused input: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("invalid {field}: {reason}")]
pub struct ValidationError {
    /// The field, named as clients spell it (`service`, `tags[3]`, `metadata`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ValidationError {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks a DNS label: `[a-z0-9-]`, 1..=63 characters, not starting or ending with `-`.
pub fn dns_label(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_NAME_LEN} characters, got {}", value.len()),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(ValidationError::new(
            field,
            format!("may contain only a-z, 0-9 and '-', found {c:?}"),
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(ValidationError::new(field, "must not start or end with '-'"));
    }
    Ok(())
}

/// Checks a namespace: empty (meaning `default`) or a DNS label.
pub fn namespace(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        Ok(())
    } else {
        dns_label("namespace", value)
    }
}

/// Checks an instance id: 1..=128 of `[A-Za-z0-9._:-]`.
pub fn instance_id(value: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "instance_id";
    if value.is_empty() {
        return Err(ValidationError::new(FIELD, "must not be empty"));
    }
    if value.len() > MAX_INSTANCE_ID_LEN {
        return Err(ValidationError::new(
            FIELD,
            format!("must be at most {MAX_INSTANCE_ID_LEN} characters, got {}", value.len()),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(ValidationError::new(
            FIELD,
            format!("may contain only A-Z, a-z, 0-9, '.', '_', ':' and '-', found {c:?}"),
        ));
    }
    Ok(())
}

/// Checks an instance key (namespace, service, instance id).
pub fn instance_key(key: &InstanceKey) -> Result<(), ValidationError> {
    namespace(&key.namespace)?;
    dns_label("service", &key.service)?;
    instance_id(&key.instance_id)
}

/// Checks an address: a host name or an IP literal, 1..=253 characters.
pub fn address(value: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "address";
    if value.is_empty() {
        return Err(ValidationError::new(FIELD, "must not be empty"));
    }
    if value.len() > MAX_ADDRESS_LEN {
        return Err(ValidationError::new(
            FIELD,
            format!("must be at most {MAX_ADDRESS_LEN} characters, got {}", value.len()),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_' | '[' | ']' | '%')))
    {
        return Err(ValidationError::new(
            FIELD,
            format!("must be a host name or IP address, found {c:?}"),
        ));
    }
    Ok(())
}

/// Checks a port number: 1..=65535.
pub fn port(field: &str, value: u32) -> Result<u16, ValidationError> {
    if value == 0 || value > u16::MAX as u32 {
        return Err(ValidationError::new(
            field,
            format!("must be between 1 and 65535, got {value}"),
        ));
    }
    Ok(value as u16)
}

/// Checks tags: at most 64, each 1..=255 printable characters.
pub fn tags(tags: &[String]) -> Result<(), ValidationError> {
    if tags.len() > MAX_TAGS {
        return Err(ValidationError::new(
            "tags",
            format!("at most {MAX_TAGS} tags are allowed, got {}", tags.len()),
        ));
    }
    for (i, tag) in tags.iter().enumerate() {
        let field = format!("tags[{i}]");
        if tag.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if tag.len() > MAX_TAG_LEN {
            return Err(ValidationError::new(
                field,
                format!("must be at most {MAX_TAG_LEN} bytes, got {}", tag.len()),
            ));
        }
        if tag.chars().any(char::is_control) {
            return Err(ValidationError::new(field, "must not contain control characters"));
        }
    }
    Ok(())
}

/// Checks metadata: at most 64 entries, at most 4 KiB of keys plus values.
pub fn metadata(metadata: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(ValidationError::new(
            "metadata",
            format!(
                "at most {MAX_METADATA_ENTRIES} entries are allowed, got {}",
                metadata.len()
            ),
        ));
    }
    let mut total = 0usize;
    for (key, value) in metadata {
        let field = format!("metadata[{key:?}]");
        if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN {
            return Err(ValidationError::new(
                field,
                format!("key must be 1 to {MAX_METADATA_KEY_LEN} bytes"),
            ));
        }
        if let Some(c) = key
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
        {
            return Err(ValidationError::new(
                field,
                format!("key may contain only A-Z, a-z, 0-9, '.', '_', '-' and '/', found {c:?}"),
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_BYTES {
        return Err(ValidationError::new(
            "metadata",
            format!("must be at most {MAX_METADATA_BYTES} bytes in all, got {total}"),
        ));
    }
    Ok(())
}

/// Checks named extra ports: at most 16, names are DNS labels, values 1..=65535.
pub fn named_ports(ports: &BTreeMap<String, u16>) -> Result<(), ValidationError> {
    if ports.len() > MAX_NAMED_PORTS {
        return Err(ValidationError::new(
            "ports",
            format!("at most {MAX_NAMED_PORTS} named ports are allowed, got {}", ports.len()),
        ));
    }
    for (name, value) in ports {
        dns_label(&format!("ports[{name:?}]"), name)?;
        port(&format!("ports[{name:?}]"), u32::from(*value))?;
    }
    Ok(())
}

/// Checks a weight: 0 (default) to 10000.
pub fn weight(value: u32) -> Result<(), ValidationError> {
    if value > MAX_WEIGHT {
        return Err(ValidationError::new(
            "weight",
            format!("must be at most {MAX_WEIGHT}, got {value}"),
        ));
    }
    Ok(())
}

/// Checks a zone: empty or a DNS label.
pub fn zone(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        Ok(())
    } else {
        dns_label("zone", value)
    }
}

/// Checks a lease TTL: 1 s to 24 h.
pub fn ttl_ms(value: u64) -> Result<(), ValidationError> {
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&value) {
        return Err(ValidationError::new(
            "ttl",
            format!("must be between 1s and 24h, got {value}ms"),
        ));
    }
    Ok(())
}

/// Checks a lease id: must not be 0.
pub fn lease_id(value: u64) -> Result<(), ValidationError> {
    if value == 0 {
        return Err(ValidationError::new("lease_id", "must not be 0"));
    }
    Ok(())
}

/// Checks a check id: 1..=128 printable characters (no control characters, no
/// whitespace).
pub fn check_id(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_CHECK_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_CHECK_ID_LEN} bytes, got {}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(ValidationError::new(
            field,
            format!("must be printable characters without spaces, found {c:?}"),
        ));
    }
    Ok(())
}

/// Checks a check's output: at most 4 KiB.
pub fn check_output(value: &str) -> Result<(), ValidationError> {
    if value.len() > MAX_CHECK_OUTPUT_LEN {
        return Err(ValidationError::new(
            "output",
            format!("must be at most {MAX_CHECK_OUTPUT_LEN} bytes, got {}", value.len()),
        ));
    }
    Ok(())
}

/// Refuses reports on a check without a TTL: the maintenance check, which only
/// ending maintenance removes.
pub fn check_takes_reports(check: &Check) -> Result<(), ValidationError> {
    if check.has_ttl() {
        return Ok(());
    }
    Err(ValidationError::new(
        "check_id",
        format!(
            "{:?} is the maintenance check, which takes no reports; end maintenance instead",
            check.id
        ),
    ))
}

/// Checks the reason given for maintenance: at most 1 KiB, no control characters.
pub fn maintenance_reason(value: &str) -> Result<(), ValidationError> {
    bounded_text("reason".to_string(), value, MAX_CHECK_NOTES_LEN)
}

fn bounded_text(field: String, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.len() > max {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} bytes, got {}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// Checks TTL checks: at most 16, unique ids, TTL 1 s..24 h, deregistration after
/// 1 s..30 days.
pub fn checks(checks: &[CheckSpec]) -> Result<(), ValidationError> {
    if checks.len() > MAX_CHECKS {
        return Err(ValidationError::new(
            "checks",
            format!("at most {MAX_CHECKS} checks are allowed, got {}", checks.len()),
        ));
    }
    for (i, check) in checks.iter().enumerate() {
        check_id(&format!("checks[{i}].id"), &check.id)?;
        if checks[..i].iter().any(|c| c.id == check.id) {
            return Err(ValidationError::new(
                format!("checks[{i}].id"),
                format!("duplicate check id {:?}", check.id),
            ));
        }
        bounded_text(format!("checks[{i}].name"), &check.name, MAX_CHECK_NAME_LEN)?;
        bounded_text(format!("checks[{i}].notes"), &check.notes, MAX_CHECK_NOTES_LEN)?;
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&check.ttl_ms) {
            return Err(ValidationError::new(
                format!("checks[{i}].ttl"),
                format!("must be between 1s and 24h, got {}ms", check.ttl_ms),
            ));
        }
        if let Some(after) = check.deregister_critical_after_ms {
            if !(MIN_TTL_MS..=MAX_DEREGISTER_AFTER_MS).contains(&after) {
                return Err(ValidationError::new(
                    format!("checks[{i}].deregister_critical_after"),
                    format!("must be between 1s and 30 days, got {after}ms"),
                ));
            }
        }
    }
    Ok(())
}

/// Checks a whole registration.
pub fn instance_spec(spec: &InstanceSpec) -> Result<(), ValidationError> {
    namespace(&spec.namespace)?;
    dns_label("service", &spec.service)?;
    instance_id(&spec.instance_id)?;
    address(&spec.address)?;
    port("port", u32::from(spec.port))?;
    named_ports(&spec.ports)?;
    tags(&spec.tags)?;
    metadata(&spec.metadata)?;
    weight(spec.weight)?;
    zone(&spec.zone)?;
    if let Some(id) = spec.lease_id {
        lease_id(id)?;
    }
    checks(&spec.checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            service: "web".into(),
            instance_id: "web-1".into(),
            address: "10.0.0.1".into(),
            port: 8080,
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_plain_registration() {
        assert_eq!(instance_spec(&spec()), Ok(()));
    }

    #[test]
    fn refuses_uppercase_service_names_naming_the_field() {
        let mut s = spec();
        s.service = "Web".into();
        assert_eq!(instance_spec(&s).unwrap_err().field, "service");
    }

    #[test]
    fn refuses_names_longer_than_a_dns_label() {
        assert!(dns_label("service", &"a".repeat(63)).is_ok());
        assert_eq!(dns_label("service", &"a".repeat(64)).unwrap_err().field, "service");
    }

    #[test]
    fn refuses_port_zero() {
        let mut s = spec();
        s.port = 0;
        assert_eq!(instance_spec(&s).unwrap_err().field, "port");
        assert!(port("port", 65536).is_err());
        assert!(port("port", 65535).is_ok());
    }

    #[test]
    fn refuses_the_65th_tag_and_empty_tags() {
        let mut s = spec();
        s.tags = (0..64).map(|i| format!("t{i}")).collect();
        assert!(instance_spec(&s).is_ok());
        s.tags.push("one-too-many".into());
        assert_eq!(instance_spec(&s).unwrap_err().field, "tags");
        s.tags = vec!["ok".into(), String::new()];
        assert_eq!(instance_spec(&s).unwrap_err().field, "tags[1]");
    }

    #[test]
    fn refuses_metadata_over_4_kib_or_64_entries() {
        let mut s = spec();
        s.metadata.insert("big".into(), "x".repeat(4093));
        assert!(instance_spec(&s).is_ok());
        s.metadata.insert("big".into(), "x".repeat(4094));
        assert_eq!(instance_spec(&s).unwrap_err().field, "metadata");
        s.metadata = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(instance_spec(&s).unwrap_err().field, "metadata");
    }

    #[test]
    fn ttl_must_be_between_one_second_and_a_day() {
        assert!(ttl_ms(999).is_err());
        assert!(ttl_ms(1_000).is_ok());
        assert!(ttl_ms(86_400_000).is_ok());
        assert_eq!(ttl_ms(86_400_001).unwrap_err().field, "ttl");
    }

    fn ttl_check(id: &str) -> CheckSpec {
        CheckSpec {
            id: id.into(),
            ttl_ms: 10_000,
            ..Default::default()
        }
    }

    #[test]
    fn checks_need_unique_printable_ids_and_a_ttl_between_one_second_and_a_day() {
        let mut s = spec();
        s.checks = vec![ttl_check("service:web-1")];
        assert!(instance_spec(&s).is_ok());
        s.checks.push(ttl_check("service:web-1"));
        assert_eq!(instance_spec(&s).unwrap_err().field, "checks[1].id");
        s.checks[1] = ttl_check("has space");
        assert_eq!(instance_spec(&s).unwrap_err().field, "checks[1].id");
        s.checks[1] = ttl_check("");
        assert_eq!(instance_spec(&s).unwrap_err().field, "checks[1].id");
        s.checks[1] = ttl_check(&"c".repeat(129));
        assert_eq!(instance_spec(&s).unwrap_err().field, "checks[1].id");
        s.checks[1] = ttl_check("service:web-1:2");
        s.checks[1].ttl_ms = 999;
        assert_eq!(instance_spec(&s).unwrap_err().field, "checks[1].ttl");
        s.checks[1].ttl_ms = 86_400_001;
        assert_eq!(instance_spec(&s).unwrap_err().field, "checks[1].ttl");
        s.checks[1].ttl_ms = 1_000;
        s.checks[1].deregister_critical_after_ms = Some(500);
        assert_eq!(
            instance_spec(&s).unwrap_err().field,
            "checks[1].deregister_critical_after"
        );
        s.checks[1].deregister_critical_after_ms = Some(60_000);
        assert!(instance_spec(&s).is_ok());
    }

    #[test]
    fn refuses_the_17th_check() {
        let mut s = spec();
        s.checks = (0..16).map(|i| ttl_check(&format!("c{i}"))).collect();
        assert!(instance_spec(&s).is_ok());
        s.checks.push(ttl_check("c16"));
        assert_eq!(instance_spec(&s).unwrap_err().field, "checks");
    }

    #[test]
    fn check_output_is_at_most_4_kib() {
        assert!(check_output(&"x".repeat(4096)).is_ok());
        assert_eq!(check_output(&"x".repeat(4097)).unwrap_err().field, "output");
    }

    #[test]
    fn refuses_addresses_with_spaces() {
        let mut s = spec();
        s.address = "10.0.0.1 ".into();
        assert_eq!(instance_spec(&s).unwrap_err().field, "address");
        s.address = "[::1]".into();
        assert!(instance_spec(&s).is_ok());
    }
}
