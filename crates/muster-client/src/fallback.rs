//! Static fallback addresses for services the registry has never answered for:
//! a TOML file of `service = ["host:port", ...]` and `MUSTER_FALLBACK_<SERVICE>`
//! environment variables.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::ClientError;

/// Environment variable naming a TOML fallback file.
pub const FALLBACK_FILE_ENV: &str = "MUSTER_FALLBACK_FILE";
/// Prefix of per-service fallback variables: `MUSTER_FALLBACK_ORDERS_API=h1:80,h2:80`
/// answers for the service `orders-api` (upper case, `-` and `.` as `_`).
pub const FALLBACK_ENV_PREFIX: &str = "MUSTER_FALLBACK_";

/// One static address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StaticEndpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl StaticEndpoint {
    /// Reads `host:port` (`[v6]:port` for IPv6).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} is not host:port"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return Err(format!("{text:?} has no host"));
        }
        if host.contains(char::is_whitespace) || host.contains('/') {
            return Err(format!("{text:?} has an invalid host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{text:?} has no valid port (1-65535)"))?;
        Ok(StaticEndpoint {
            host: host.to_string(),
            port,
        })
    }
}

/// Static addresses by service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StaticFallback {
    /// Exact service names, from a TOML file or [`StaticFallback::insert`].
    by_service: BTreeMap<String, Vec<StaticEndpoint>>,
    /// Normalised names (upper case, `_` for `-` and `.`), from the environment.
    by_env_name: BTreeMap<String, Vec<StaticEndpoint>>,
}

/// The environment-variable form of a service name.
fn env_name(service: &str) -> String {
    service
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

fn parse_list<'a>(
    items: impl IntoIterator<Item = &'a str>,
    source: &str,
    service: &str,
) -> Result<Vec<StaticEndpoint>, ClientError> {
    items
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            StaticEndpoint::parse(s).map_err(|reason| ClientError::InvalidFallback {
                origin: source.to_string(),
                reason: format!("{service}: {reason}"),
            })
        })
        .collect()
}

impl StaticFallback {
    /// No fallback addresses.
    pub fn none() -> Self {
        StaticFallback::default()
    }

    /// Reads a TOML document of `service = ["host:port", ...]`.
    pub fn from_toml_str(text: &str, source: &str) -> Result<Self, ClientError> {
        let table: BTreeMap<String, Vec<String>> = toml::from_str(text).map_err(|e| ClientError::InvalidFallback {
            origin: source.to_string(),
            reason: e.to_string().trim().to_string(),
        })?;
        let mut fallback = StaticFallback::default();
        for (service, list) in &table {
            let endpoints = parse_list(list.iter().map(String::as_str), source, service)?;
            fallback.by_service.insert(service.clone(), endpoints);
        }
        Ok(fallback)
    }

    /// Reads a TOML fallback file.
    pub fn from_toml_file(path: &Path) -> Result<Self, ClientError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ClientError::InvalidFallback {
            origin: source.clone(),
            reason: e.to_string(),
        })?;
        StaticFallback::from_toml_str(&text, &source)
    }

    /// Reads the environment: the file named by `MUSTER_FALLBACK_FILE`, if set,
    /// and every `MUSTER_FALLBACK_<SERVICE>=host:port,host:port` variable.
    pub fn from_env() -> Result<Self, ClientError> {
        StaticFallback::from_vars(std::env::vars())
    }

    /// [`StaticFallback::from_env`] over the given variables.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ClientError> {
        let mut fallback = StaticFallback::default();
        for (name, value) in vars {
            if name == FALLBACK_FILE_ENV {
                let file = StaticFallback::from_toml_file(Path::new(&value))?;
                fallback.by_service.extend(file.by_service);
            } else if let Some(service) = name.strip_prefix(FALLBACK_ENV_PREFIX) {
                let endpoints = parse_list(value.split(','), &name, service)?;
                fallback.by_env_name.insert(env_name(service), endpoints);
            }
        }
        Ok(fallback)
    }

    /// Adds (or replaces) the addresses of `service`.
    pub fn insert(&mut self, service: &str, endpoints: Vec<StaticEndpoint>) {
        self.by_service.insert(service.to_string(), endpoints);
    }

    /// The addresses of `service`: the exact name first, then its environment form.
    pub fn lookup(&self, service: &str) -> &[StaticEndpoint] {
        self.by_service
            .get(service)
            .or_else(|| self.by_env_name.get(&env_name(service)))
            .map_or(&[], Vec::as_slice)
    }

    /// Whether no service has a fallback.
    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty() && self.by_env_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(host: &str, port: u16) -> StaticEndpoint {
        StaticEndpoint {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn host_port_forms_are_read_and_bad_ones_named() {
        assert_eq!(StaticEndpoint::parse("10.0.0.1:80").unwrap(), ep("10.0.0.1", 80));
        assert_eq!(StaticEndpoint::parse(" [::1]:8080 ").unwrap(), ep("::1", 8080));
        assert_eq!(StaticEndpoint::parse("db.local:5432").unwrap(), ep("db.local", 5432));
        assert!(StaticEndpoint::parse("nohost").unwrap_err().contains("host:port"));
        assert!(StaticEndpoint::parse(":80").unwrap_err().contains("no host"));
        assert!(StaticEndpoint::parse("h:0").unwrap_err().contains("port"));
        assert!(StaticEndpoint::parse("h:99999").unwrap_err().contains("port"));
    }

    #[test]
    fn a_toml_file_lists_services() {
        let f = StaticFallback::from_toml_str(
            "orders = [\"10.0.0.7:8080\", \"10.0.0.8:8080\"]\n\"billing-api\" = [\"b:1\"]\n",
            "fallback.toml",
        )
        .unwrap();
        assert_eq!(f.lookup("orders"), &[ep("10.0.0.7", 8080), ep("10.0.0.8", 8080)]);
        assert_eq!(f.lookup("billing-api"), &[ep("b", 1)]);
        assert!(f.lookup("unknown").is_empty());
    }

    #[test]
    fn a_bad_toml_entry_names_the_file_and_the_service() {
        let err = StaticFallback::from_toml_str("orders = [\"10.0.0.7\"]", "fallback.toml").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("fallback.toml") && text.contains("orders"), "{text}");
        let err = StaticFallback::from_toml_str("orders = 3", "fallback.toml").unwrap_err();
        assert!(err.to_string().contains("fallback.toml"), "{err}");
    }

    #[test]
    fn environment_variables_answer_for_the_normalised_name() {
        let f = StaticFallback::from_vars([
            ("MUSTER_FALLBACK_ORDERS_API".to_string(), "h1:80, h2:81".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .unwrap();
        assert_eq!(f.lookup("orders-api"), &[ep("h1", 80), ep("h2", 81)]);
        assert_eq!(f.lookup("orders.api"), &[ep("h1", 80), ep("h2", 81)]);
        let err = StaticFallback::from_vars([("MUSTER_FALLBACK_X".to_string(), "h1".to_string())]).unwrap_err();
        assert!(err.to_string().contains("MUSTER_FALLBACK_X"), "{err}");
    }

    #[test]
    fn the_file_named_in_the_environment_is_read() {
        let dir = std::env::temp_dir().join(format!("muster-fallback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fallback.toml");
        std::fs::write(&path, "web = [\"127.0.0.1:9000\"]\n").unwrap();
        let f = StaticFallback::from_vars([(FALLBACK_FILE_ENV.to_string(), path.display().to_string())]).unwrap();
        assert_eq!(f.lookup("web"), &[ep("127.0.0.1", 9000)]);
        std::fs::remove_dir_all(&dir).unwrap();
        let err = StaticFallback::from_vars([(FALLBACK_FILE_ENV.to_string(), "/nonexistent/f.toml".to_string())])
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/f.toml"), "{err}");
    }
}
