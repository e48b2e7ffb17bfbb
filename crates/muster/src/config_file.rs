//! `muster server --config FILE`: a TOML file whose keys are the server's flags.
//!
//! The file is read before clap parses and each key it sets is exported as the
//! flag's `MUSTER_*` variable, unless that variable is already set. So a flag beats
//! the environment, the environment beats the file, and the file beats the
//! defaults, with clap doing all the parsing and validation in one place.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::CommandFactory;

use crate::cli::Cli;

/// The path given with `--config` (or `MUSTER_CONFIG` for `muster server`).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    let is_server = args.iter().skip(1).any(|a| a == "server");
    match std::env::var_os("MUSTER_CONFIG") {
        Some(path) if is_server && !path.is_empty() => Some(PathBuf::from(path)),
        _ => None,
    }
}

/// Flag name (long, without dashes) → environment variable, for `muster server`.
pub fn server_flag_env() -> BTreeMap<String, String> {
    let cli = Cli::command();
    let Some(server) = cli.find_subcommand("server") else {
        return BTreeMap::new();
    };
    server
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let env = arg.get_env()?;
            (long != "config").then(|| (long.to_string(), env.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Turns the file's keys into `(VARIABLE, value)` pairs.
pub fn env_from_toml(text: &str, known: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let Some(env) = known.get(&flag) else {
            return Err(format!(
                "unknown key {key:?}; known keys: {}",
                known.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        };
        let text = match value {
            // `tag = ["a", "b"]` style lists become comma-separated values.
            toml::Value::Array(items) => items
                .iter()
                .map(|v| scalar(&key, v))
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            // `[initial-cluster]` with `1 = "host:7300"` lines.
            toml::Value::Table(t) => t
                .iter()
                .map(|(k, v)| Ok(format!("{k}={}", scalar(&key, v)?)))
                .collect::<Result<Vec<_>, String>>()?
                .join(","),
            other => scalar(&key, &other)?,
        };
        out.push((env.clone(), text));
    }
    Ok(out)
}

/// A single value as a flag would be written.
fn scalar(key: &str, value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(format!("key {key:?}: expected a string, number or boolean")),
    }
}

/// Loads the config file named on the command line, if any, into the environment.
///
/// Must run before any thread is started (it sets environment variables).
pub fn load_into_env(args: &[OsString]) -> anyhow::Result<()> {
    let Some(path) = config_path(args) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config file {}", path.display()))?;
    let pairs = match env_from_toml(&text, &server_flag_env()) {
        Ok(pairs) => pairs,
        Err(e) => bail!("config file {}: {e}", path.display()),
    };
    for (env, value) in pairs {
        if std::env::var_os(&env).is_none() {
            std::env::set_var(env, value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_flag_has_a_key() {
        let known = server_flag_env();
        assert_eq!(known["grpc-addr"], "MUSTER_GRPC_ADDR");
        assert_eq!(known["initial-cluster"], "MUSTER_INITIAL_CLUSTER");
        assert_eq!(known["lease-expiry-rate"], "MUSTER_LEASE_EXPIRY_RATE");
        assert!(!known.contains_key("config"));
    }

    #[test]
    fn keys_become_variables_in_either_spelling() {
        let text = r#"
            id = 2
            data_dir = "/var/lib/muster"
            grpc-addr = "0.0.0.0:7100"
            lease-expiry-rate = 0.25
            [initial-cluster]
            1 = "10.0.0.1:7300"
            2 = "10.0.0.2:7300"
        "#;
        let mut pairs = env_from_toml(text, &server_flag_env()).unwrap();
        pairs.sort();
        assert!(pairs.contains(&("MUSTER_ID".into(), "2".into())));
        assert!(pairs.contains(&("MUSTER_DATA_DIR".into(), "/var/lib/muster".into())));
        assert!(pairs.contains(&("MUSTER_LEASE_EXPIRY_RATE".into(), "0.25".into())));
        assert!(pairs.contains(&(
            "MUSTER_INITIAL_CLUSTER".into(),
            "1=10.0.0.1:7300,2=10.0.0.2:7300".into()
        )));
        let parsed = crate::parse::parse_initial_cluster("1=10.0.0.1:7300,2=10.0.0.2:7300").unwrap();
        assert_eq!(parsed.0.len(), 2);
    }

    #[test]
    fn an_unknown_key_is_refused_naming_it() {
        let err = env_from_toml("grpc-adr = \"x\"", &server_flag_env()).unwrap_err();
        assert!(err.contains("grpc-adr") && err.contains("grpc-addr"), "{err}");
    }

    #[test]
    fn the_config_flag_is_found_in_both_forms() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&args(&["muster", "server", "--config", "/etc/m.toml"])),
            Some(PathBuf::from("/etc/m.toml"))
        );
        assert_eq!(
            config_path(&args(&["muster", "server", "--config=/etc/m.toml"])),
            Some(PathBuf::from("/etc/m.toml"))
        );
    }
}
