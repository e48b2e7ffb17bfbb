//! Decoding Consul requests the way Consul's own agent does: JSON keys matched
//! case-insensitively with snake_case aliases (py-consul sends `name`, `checks`,
//! `DeregisterCriticalServiceAfter` side by side), durations as Go duration strings
//! (`"10s"`, `"1m30s"`) or numbers of nanoseconds (a marshalled `time.Duration`).
//!
//! Pure functions over bytes and JSON values, so every rule is unit-tested here.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use muster_core::types::DEFAULT_NAMESPACE;
use muster_core::validate::{self, ValidationError};
use muster_core::{CheckSpec, Health, InstanceSpec};
use serde_json::Value;

/// A request that cannot be decoded, naming the field as the client spelled it
/// (Consul's spelling when the client used another).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The field, e.g. `Port`, `Checks[1].TTL`, or `body`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl DecodeError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        DecodeError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field == "body" {
            write!(f, "Request decode failed: {}", self.reason)
        } else {
            write!(f, "Invalid {}: {}", self.field, self.reason)
        }
    }
}

/// Normalizes a JSON key: lowercase, without `_` or `-`, so `ServiceID`,
/// `service_id` and `serviceid` are the same key.
fn norm(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A JSON object whose keys are matched case-insensitively.
pub struct Obj<'a> {
    /// Where the object sits, for error messages (`""` for the body).
    path: String,
    fields: HashMap<String, &'a Value>,
}

impl<'a> Obj<'a> {
    /// Wraps `value`, which must be an object.
    pub fn new(path: &str, value: &'a Value) -> Result<Self, DecodeError> {
        let Value::Object(map) = value else {
            let field = if path.is_empty() { "body" } else { path };
            return Err(DecodeError::new(field, "must be a JSON object"));
        };
        Ok(Obj {
            path: path.to_string(),
            fields: map.iter().map(|(k, v)| (norm(k), v)).collect(),
        })
    }

    /// The full name of a field of this object, in Consul's spelling.
    fn name(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    /// The value under `key` (Consul spelling), `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.fields.get(&norm(key)).copied().filter(|v| !v.is_null())
    }

    /// The first of several aliases that is present.
    fn get_any(&self, keys: &[&str]) -> Option<&'a Value> {
        keys.iter().find_map(|k| self.get(k))
    }

    /// A string field ("" when absent).
    pub fn string(&self, key: &str) -> Result<String, DecodeError> {
        self.string_any(&[key])
    }

    fn string_any(&self, keys: &[&str]) -> Result<String, DecodeError> {
        match self.get_any(keys) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(DecodeError::new(self.name(keys[0]), "must be a string")),
        }
    }

    /// A boolean field (false when absent).
    pub fn boolean(&self, key: &str) -> Result<bool, DecodeError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(DecodeError::new(self.name(key), "must be true or false")),
        }
    }

    /// An unsigned integer field, at most `max`.
    pub fn uint(&self, key: &str, max: u64) -> Result<Option<u64>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= max => Ok(Some(v)),
                _ => Err(DecodeError::new(
                    self.name(key),
                    format!("must be a whole number between 0 and {max}, got {n}"),
                )),
            },
            Some(_) => Err(DecodeError::new(self.name(key), "must be a number")),
        }
    }

    /// A list of strings (empty when absent).
    pub fn strings(&self, key: &str) -> Result<Vec<String>, DecodeError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(DecodeError::new(format!("{}[{i}]", self.name(key)), "must be a string")),
                })
                .collect(),
            Some(_) => Err(DecodeError::new(self.name(key), "must be a list of strings")),
        }
    }

    /// A string-to-string map (empty when absent).
    pub fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>, DecodeError> {
        match self.get(key) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(DecodeError::new(
                        format!("{}[{k:?}]", self.name(key)),
                        "must be a string",
                    )),
                })
                .collect(),
            Some(_) => Err(DecodeError::new(self.name(key), "must be an object of strings")),
        }
    }

    /// A duration field in milliseconds: a Go duration string or nanoseconds.
    pub fn duration_ms(&self, key: &str) -> Result<Option<u64>, DecodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(v) => duration_value(v)
                .map(|d| Some(d.as_millis().min(u128::from(u64::MAX)) as u64))
                .map_err(|reason| DecodeError::new(self.name(key), reason)),
        }
    }

    /// Whether any of these keys is present.
    fn has(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| !matches!(v, Value::String(s) if s.is_empty()))
    }
}

/// A duration as Consul accepts it in JSON: a Go duration string, or a number of
/// nanoseconds.
pub fn duration_value(value: &Value) -> Result<Duration, String> {
    match value {
        Value::String(s) => parse_go_duration(s),
        Value::Number(n) => {
            if let Some(ns) = n.as_u64() {
                Ok(Duration::from_nanos(ns))
            } else if n.as_i64().is_some() {
                Err("must not be negative".into())
            } else {
                Err(format!(
                    "a number is read as nanoseconds and must be a whole number, got {n}; use a string like \"10s\""
                ))
            }
        }
        _ => Err("must be a duration like \"10s\" or a number of nanoseconds".into()),
    }
}

/// Parses a Go duration string: `"300ms"`, `"1.5h"`, `"2h45m"`, `"0"`. Units: ns,
/// us (µs), ms, s, m, h.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like \"10s\", \"1m30s\" or \"500ms\"");
    let s = text.trim();
    if s.starts_with('-') {
        return Err("must not be negative".into());
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let int_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(f) => {
                let len = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
                f.split_at(len)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| bad())?
        };
        let mut value = int.checked_mul(unit_ns).ok_or_else(bad)?;
        if !frac_part.is_empty() {
            // Keep 18 digits at most: beyond that nothing is left of a nanosecond.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| bad())?;
            value += frac * unit_ns / 10u128.pow(digits.len() as u32);
        }
        total = total.checked_add(value).ok_or_else(bad)?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| bad())?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// A registration decoded from `PUT /v1/agent/service/register`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The instance to register (namespace `default`).
    pub spec: InstanceSpec,
    /// How the client named each check (`Check`, `Checks[0]`, ...), in the order of
    /// `spec.checks`, to name the field in validation errors.
    pub check_fields: Vec<String>,
}

impl Registration {
    /// Maps a core validation error's field to the Consul field the client sent.
    pub fn consul_error(&self, e: &ValidationError) -> DecodeError {
        DecodeError::new(consul_field(&e.field, &self.check_fields), e.reason.clone())
    }
}

/// Consul's name for a core field (`service` → `Name`, `checks[1].ttl` →
/// `Checks[1].TTL`); `check_fields` names the checks as the client sent them.
pub fn consul_field(field: &str, check_fields: &[String]) -> String {
    if let Some(rest) = field.strip_prefix("checks[") {
        if let Some((index, tail)) = rest.split_once(']') {
            let base = index
                .parse::<usize>()
                .ok()
                .and_then(|i| check_fields.get(i).cloned())
                .unwrap_or_else(|| format!("Checks[{index}]"));
            let tail = match tail {
                ".id" => ".CheckID",
                ".ttl" => ".TTL",
                ".name" => ".Name",
                ".notes" => ".Notes",
                ".deregister_critical_after" => ".DeregisterCriticalServiceAfter",
                other => other,
            };
            return format!("{base}{tail}");
        }
    }
    if let Some(rest) = field.strip_prefix("tags") {
        return format!("Tags{rest}");
    }
    if let Some(rest) = field.strip_prefix("metadata") {
        return format!("Meta{rest}");
    }
    match field {
        "service" => "Name",
        "instance_id" => "ID",
        "address" => "Address",
        "port" => "Port",
        "weight" => "Weights.Passing",
        "checks" => "Checks",
        "check_id" => "CheckID",
        "output" => "Output",
        "namespace" => "Namespace",
        other => other,
    }
    .to_string()
}

/// Check types other than TTL, by their Consul key: Muster only keeps TTL checks
/// (the owner reports; nothing is probed).
const PROBE_KEYS: &[&str] = &[
    "HTTP",
    "TCP",
    "GRPC",
    "UDP",
    "H2PING",
    "Args",
    "ScriptArgs",
    "Script",
    "DockerContainerID",
    "AliasService",
    "AliasNode",
    "OSService",
];

/// Decodes one check definition.
fn check(value: &Value, field: &str) -> Result<CheckSpec, DecodeError> {
    let obj = Obj::new(field, value)?;
    for key in PROBE_KEYS {
        if obj.has(key) {
            return Err(DecodeError::new(
                obj.name(key),
                "only TTL checks are supported: the service reports with /v1/agent/check/pass|warn|fail",
            ));
        }
    }
    let ttl = obj
        .duration_ms("TTL")?
        .ok_or_else(|| DecodeError::new(obj.name("TTL"), "is required: only TTL checks are supported"))?;
    let initial_status = match obj.string("Status")?.as_str() {
        "" => Health::Critical,
        s => Health::parse(s)
            .ok_or_else(|| DecodeError::new(obj.name("Status"), "must be passing, warning or critical"))?,
    };
    Ok(CheckSpec {
        id: obj.string_any(&["CheckID", "ID"])?,
        name: obj.string("Name")?,
        notes: obj.string("Notes")?,
        ttl_ms: ttl,
        deregister_critical_after_ms: obj.duration_ms("DeregisterCriticalServiceAfter")?,
        initial_status,
    })
}

/// Decodes a service registration body. `default_address` stands in for a missing
/// `Address` (Consul uses the agent's address).
pub fn registration(body: &[u8], default_address: &str) -> Result<Registration, DecodeError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| DecodeError::new("body", e.to_string()))?;
    let obj = Obj::new("", &value)?;
    let name = obj.string_any(&["Name", "Service"])?;
    if name.is_empty() {
        return Err(DecodeError::new("Name", "is required"));
    }
    let id = match obj.string("ID")? {
        id if id.is_empty() => name.clone(),
        id => id,
    };
    match obj.string("Kind")?.as_str() {
        "" | "typical" => {}
        other => {
            return Err(DecodeError::new(
                "Kind",
                format!("{other:?} services are not supported; only typical services are"),
            ))
        }
    }
    match obj.string("Namespace")?.as_str() {
        "" | DEFAULT_NAMESPACE => {}
        other => {
            return Err(DecodeError::new(
                "Namespace",
                format!("the Consul API serves namespace \"default\" only, got {other:?}"),
            ))
        }
    }
    let address = match obj.string("Address")? {
        a if a.is_empty() => default_address.to_string(),
        a => a,
    };
    let port = obj.uint("Port", u64::from(u16::MAX))?.unwrap_or(0) as u16;
    obj.boolean("EnableTagOverride")?;
    let weight = match obj.get("Weights") {
        None => 0,
        Some(w) => {
            let weights = Obj::new("Weights", w)?;
            let passing = weights.uint("Passing", u64::from(validate::MAX_WEIGHT))?.unwrap_or(0);
            weights.uint("Warning", u64::from(u32::MAX))?;
            passing as u32
        }
    };

    let mut checks = Vec::new();
    let mut check_fields = Vec::new();
    if let Some(c) = obj.get("Check") {
        // An empty object is no check (Go clients marshal an empty struct).
        if !matches!(c, Value::Object(m) if m.is_empty()) {
            checks.push(check(c, "Check")?);
            check_fields.push("Check".to_string());
        }
    }
    match obj.get("Checks") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, c) in items.iter().enumerate() {
                let field = format!("Checks[{i}]");
                checks.push(check(c, &field)?);
                check_fields.push(field);
            }
        }
        Some(_) => return Err(DecodeError::new("Checks", "must be a list of checks")),
    }
    // Consul's default check ids and names.
    let several = checks.len() > 1;
    for (i, c) in checks.iter_mut().enumerate() {
        if c.id.is_empty() {
            c.id = if several {
                format!("service:{id}:{}", i + 1)
            } else {
                format!("service:{id}")
            };
        }
        if c.name.is_empty() {
            c.name = format!("Service '{name}' check");
        }
    }

    let registration = Registration {
        spec: InstanceSpec {
            namespace: DEFAULT_NAMESPACE.to_string(),
            service: name,
            instance_id: id,
            address,
            port,
            tags: obj.strings("Tags")?,
            metadata: obj.string_map("Meta")?,
            weight,
            checks,
            ..Default::default()
        },
        check_fields,
    };
    validate::instance_spec(&registration.spec).map_err(|e| registration.consul_error(&e))?;
    Ok(registration)
}

/// The instance id a Consul check id of the default form names: `service:<id>` or
/// `service:<id>:<n>`. Returns the candidates to look up, most specific first.
pub fn instance_ids_of_check(check_id: &str) -> Vec<&str> {
    let Some(rest) = check_id.strip_prefix("service:") else {
        return Vec::new();
    };
    let mut ids = vec![rest];
    if let Some((id, n)) = rest.rsplit_once(':') {
        if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
            ids.push(id);
        }
    }
    ids
}

/// Cuts a check output to Consul's 4 KiB (at a character boundary).
pub fn truncate_output(mut output: String) -> String {
    let max = validate::MAX_CHECK_OUTPUT_LEN;
    if output.len() > max {
        let mut cut = max;
        while !output.is_char_boundary(cut) {
            cut -= 1;
        }
        output.truncate(cut);
    }
    output
}

/// Reads a check status as Consul spells it.
pub fn status(field: &str, value: &str) -> Result<Health, DecodeError> {
    match value {
        "passing" => Ok(Health::Passing),
        "warning" => Ok(Health::Warning),
        "critical" => Ok(Health::Critical),
        _ => Err(DecodeError::new(
            field,
            format!("must be passing, warning or critical, got {value:?}"),
        )),
    }
}

/// The state of `GET /v1/health/state/:state`: a check status, or `any` (`None`).
pub fn check_state(value: &str) -> Result<Option<Health>, DecodeError> {
    match value {
        "any" => Ok(None),
        _ => status("state", value).map(Some).map_err(|_| {
            DecodeError::new(
                "state",
                format!("must be any, passing, warning or critical, got {value:?}"),
            )
        }),
    }
}

/// The `enable` parameter of `PUT /v1/agent/service/maintenance/:id`: required, a
/// boolean as Go's `strconv.ParseBool` reads one (`true`, `1`, `t`, `false`, ...).
pub fn maintenance_enable(value: Option<&str>) -> Result<bool, DecodeError> {
    match value {
        None => Err(DecodeError::new("enable", "is required (true or false)")),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(DecodeError::new(
            "enable",
            format!("must be true or false, got {other:?}"),
        )),
    }
}

/// The body of `PUT /v1/agent/check/update/:check_id`: `{Status, Output}`.
pub fn check_update(body: &[u8]) -> Result<(Health, String), DecodeError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| DecodeError::new("body", e.to_string()))?;
    let obj = Obj::new("", &value)?;
    let health = status("Status", &obj.string("Status")?)?;
    Ok((health, truncate_output(obj.string("Output")?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(json: &str) -> Result<Registration, DecodeError> {
        registration(json.as_bytes(), "127.0.0.1")
    }

    #[test]
    fn maintenance_enable_is_required_and_read_as_go_reads_a_boolean() {
        assert!(maintenance_enable(Some("true")).unwrap());
        assert!(maintenance_enable(Some("1")).unwrap());
        assert!(!maintenance_enable(Some("False")).unwrap());
        assert_eq!(maintenance_enable(None).unwrap_err().field, "enable");
        let e = maintenance_enable(Some("yes")).unwrap_err();
        assert_eq!(e.field, "enable");
        assert!(e.reason.contains("\"yes\""), "{}", e.reason);
    }

    #[test]
    fn go_durations_parse_like_go() {
        let ms = |s: &str| parse_go_duration(s).map(|d| d.as_millis());
        assert_eq!(ms("10s"), Ok(10_000));
        assert_eq!(ms("1m"), Ok(60_000));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("1.5h"), Ok(5_400_000));
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("2h45m"), Ok(9_900_000));
        assert_eq!(ms("0"), Ok(0));
        assert_eq!(parse_go_duration("1500us").map(|d| d.as_micros()), Ok(1500));
        assert_eq!(parse_go_duration("1µs").map(|d| d.as_nanos()), Ok(1000));
        for bad in [
            "",
            "10",
            "s",
            "10x",
            "1..5s",
            "-1s",
            "ten seconds",
            "99999999999999999999999h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn numbers_are_nanoseconds_as_in_go() {
        assert_eq!(
            duration_value(&serde_json::json!(10_000_000_000u64)),
            Ok(Duration::from_secs(10))
        );
        assert!(duration_value(&serde_json::json!(-1)).is_err());
        assert!(duration_value(&serde_json::json!(1.5)).is_err());
        assert!(duration_value(&serde_json::json!(true)).is_err());
    }

    #[test]
    fn keys_match_case_insensitively_with_snake_case_aliases() {
        let pascal = reg(r#"{"Name":"web","ID":"web-1","Port":80,"Tags":["a"],"Meta":{"v":"1"},
            "Check":{"TTL":"10s","DeregisterCriticalServiceAfter":"1m"}}"#)
        .unwrap();
        let lower = reg(r#"{"name":"web","id":"web-1","port":80,"tags":["a"],"meta":{"v":"1"},
            "checks":[{"ttl":"10s","deregister_critical_service_after":"1m"}]}"#)
        .unwrap();
        assert_eq!(pascal.spec, lower.spec);
        let c = &pascal.spec.checks[0];
        assert_eq!(c.id, "service:web-1");
        assert_eq!(c.name, "Service 'web' check");
        assert_eq!(c.ttl_ms, 10_000);
        assert_eq!(c.deregister_critical_after_ms, Some(60_000));
        assert_eq!(c.initial_status, Health::Critical);
        assert_eq!(pascal.spec.address, "127.0.0.1");
    }

    #[test]
    fn several_checks_get_numbered_ids_check_first_then_checks() {
        let r = reg(r#"{"Name":"web","Port":80,"Check":{"TTL":"10s"},
            "Checks":[{"TTL":"20s"},{"CheckID":"mine","TTL":"30s","Status":"passing"}]}"#)
        .unwrap();
        let ids: Vec<&str> = r.spec.checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["service:web:1", "service:web:2", "mine"]);
        assert_eq!(r.spec.instance_id, "web");
        assert_eq!(r.spec.checks[2].initial_status, Health::Passing);
        assert_eq!(r.check_fields, ["Check", "Checks[0]", "Checks[1]"]);
    }

    #[test]
    fn bad_input_names_the_consul_field() {
        let field = |json: &str| reg(json).unwrap_err().field;
        assert_eq!(field(r#"{"Name":"Web_Service","Port":80}"#), "Name");
        assert_eq!(field(r#"{"Port":80}"#), "Name");
        assert_eq!(field(r#"{"Name":"web","Port":"80"}"#), "Port");
        assert_eq!(field(r#"{"Name":"web","Port":70000}"#), "Port");
        assert_eq!(field(r#"{"Name":"web"}"#), "Port");
        assert_eq!(field(r#"{"Name":"web","Port":80,"ID":"has space"}"#), "ID");
        assert_eq!(field(r#"{"Name":"web","Port":80,"Tags":"a"}"#), "Tags");
        assert_eq!(field(r#"{"Name":"web","Port":80,"Tags":["a",""]}"#), "Tags[1]");
        assert_eq!(field(r#"{"Name":"web","Port":80,"Meta":{"k":1}}"#), r#"Meta["k"]"#);
        assert_eq!(field(r#"{"Name":"web","Port":80,"Check":{"TTL":"10"}}"#), "Check.TTL");
        assert_eq!(
            field(r#"{"Name":"web","Port":80,"Check":{"TTL":"100ms"}}"#),
            "Check.TTL"
        );
        assert_eq!(
            field(r#"{"Name":"web","Port":80,"Checks":[{"TTL":"1s"},{"TTL":"25h"}]}"#),
            "Checks[1].TTL"
        );
        assert_eq!(
            field(r#"{"Name":"web","Port":80,"Check":{"HTTP":"http://x/health","Interval":"10s"}}"#),
            "Check.HTTP"
        );
        assert_eq!(
            field(r#"{"Name":"web","Port":80,"Check":{}}"#.replace("{}", r#"{"Notes":"x"}"#).as_str()),
            "Check.TTL"
        );
        assert_eq!(
            field(r#"{"Name":"web","Port":80,"Check":{"TTL":"10s","Status":"ok"}}"#),
            "Check.Status"
        );
        assert_eq!(field("{not json"), "body");
        assert_eq!(field("[1,2]"), "body");
        assert_eq!(field(r#"{"Name":"web","Port":80,"Kind":"connect-proxy"}"#), "Kind");
        assert!(reg(r#"{"Name":"Web","Port":80}"#)
            .unwrap_err()
            .to_string()
            .starts_with("Invalid Name: "));
    }

    #[test]
    fn an_empty_check_object_is_no_check() {
        let r = reg(r#"{"Name":"web","Port":80,"Check":{},"Checks":null}"#).unwrap();
        assert!(r.spec.checks.is_empty());
    }

    #[test]
    fn default_check_ids_lead_back_to_the_instance() {
        assert_eq!(instance_ids_of_check("service:web-1"), ["web-1"]);
        assert_eq!(instance_ids_of_check("service:web-1:2"), ["web-1:2", "web-1"]);
        assert!(instance_ids_of_check("mine").is_empty());
    }

    #[test]
    fn outputs_are_cut_at_4_kib_on_a_character_boundary() {
        let long = "é".repeat(3000);
        let cut = truncate_output(long);
        assert!(cut.len() <= 4096);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn check_updates_need_a_known_status() {
        assert_eq!(
            check_update(br#"{"Status":"passing","Output":"ok"}"#),
            Ok((Health::Passing, "ok".into()))
        );
        assert_eq!(check_update(br#"{"status":"up"}"#).unwrap_err().field, "Status");
    }
}
