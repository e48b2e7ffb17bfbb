//! Parsers for flag values. Each error says what was expected and what was given.

use std::collections::BTreeMap;
use std::time::Duration;

/// `--initial-cluster`: node id → peer address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialCluster(pub BTreeMap<u64, String>);

/// Parses `1=HOST:PORT,2=HOST:PORT,...`.
pub fn parse_initial_cluster(s: &str) -> Result<InitialCluster, String> {
    let mut members = BTreeMap::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, addr) = entry
            .split_once('=')
            .ok_or_else(|| format!("expected ID=HOST:PORT, got {entry:?}"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("node id {:?} in {entry:?} is not a number", id.trim()))?;
        if id == 0 {
            return Err(format!("node ids start at 1, got 0 in {entry:?}"));
        }
        let addr = addr.trim();
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("address {addr:?} of node {id} has no port (expected HOST:PORT)"))?;
        if host.is_empty() {
            return Err(format!("address {addr:?} of node {id} has no host"));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("port {port:?} of node {id} is not in 1..65535")),
        }
        if members.insert(id, addr.to_string()).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    if members.is_empty() {
        return Err("expected at least one ID=HOST:PORT".into());
    }
    Ok(InitialCluster(members))
}

/// Parses `KEY=VALUE` (the value may contain `=`; the key may not be empty).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if key.is_empty() {
        return Err(format!("the key is empty in {s:?}"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Parses `NAME=PORT`.
pub fn parse_port_name(s: &str) -> Result<(String, u16), String> {
    let (name, port) = parse_key_value(s)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((name, p)),
        _ => Err(format!("port {port:?} of {name:?} is not in 1..65535")),
    }
}

/// Parses a human duration: `10s`, `1m30s`, `500ms`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        if s.trim().chars().all(|c| c.is_ascii_digit()) && !s.trim().is_empty() {
            format!("{s:?} has no unit; write e.g. {s}s or {s}ms")
        } else {
            format!("{s:?} is not a duration ({e}); write e.g. 10s, 1m30s or 500ms")
        }
    })
}

/// Parses a listen address; `:PORT` means every interface.
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    let s = s.trim();
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .map_err(|_| format!("{s:?} is not an address; write HOST:PORT (e.g. 0.0.0.0:8080) or :PORT"))
}

/// Parses a pick strategy (`round_robin`, `weighted`, `random`).
pub fn parse_strategy(s: &str) -> Result<muster_client::PickStrategy, String> {
    s.trim().parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_initial_cluster_of_three_parses() {
        let c = parse_initial_cluster("1=127.0.0.1:7300, 2=127.0.0.1:7301,3=node3.example:7302").unwrap();
        assert_eq!(c.0.len(), 3);
        assert_eq!(c.0[&2], "127.0.0.1:7301");
        assert_eq!(c.0[&3], "node3.example:7302");
    }

    #[test]
    fn an_ipv6_peer_address_keeps_its_brackets() {
        let c = parse_initial_cluster("1=[::1]:7300").unwrap();
        assert_eq!(c.0[&1], "[::1]:7300");
    }

    #[test]
    fn initial_cluster_mistakes_are_named() {
        assert!(parse_initial_cluster("127.0.0.1:7300")
            .unwrap_err()
            .contains("ID=HOST:PORT"));
        assert!(parse_initial_cluster("x=h:1").unwrap_err().contains("not a number"));
        assert!(parse_initial_cluster("0=h:1").unwrap_err().contains("start at 1"));
        assert!(parse_initial_cluster("1=h").unwrap_err().contains("no port"));
        assert!(parse_initial_cluster("1=h:0").unwrap_err().contains("1..65535"));
        assert!(parse_initial_cluster("1=h:99999").unwrap_err().contains("1..65535"));
        assert!(parse_initial_cluster("1=:7300").unwrap_err().contains("no host"));
        assert!(parse_initial_cluster("1=h:1,1=h:2").unwrap_err().contains("twice"));
        assert!(parse_initial_cluster(" , ").unwrap_err().contains("at least one"));
    }

    #[test]
    fn metadata_values_may_contain_equals_signs() {
        assert_eq!(
            parse_key_value("url=http://x/?a=b").unwrap(),
            ("url".to_string(), "http://x/?a=b".to_string())
        );
        assert_eq!(parse_key_value("empty=").unwrap(), ("empty".to_string(), String::new()));
    }

    #[test]
    fn metadata_without_a_key_or_equals_sign_is_refused() {
        assert!(parse_key_value("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_key_value("=v").unwrap_err().contains("key is empty"));
    }

    #[test]
    fn named_ports_parse_and_bad_ports_are_refused() {
        assert_eq!(parse_port_name("health=8081").unwrap(), ("health".to_string(), 8081));
        assert!(parse_port_name("health=0").is_err());
        assert!(parse_port_name("health=http").is_err());
    }

    #[test]
    fn durations_take_human_units() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration(" 2h ").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn a_duration_without_unit_says_to_add_one() {
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("soon").unwrap_err().contains("not a duration"));
    }
}
