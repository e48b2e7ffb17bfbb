//! The data directory remembers which node and which cluster it belongs to, so a
//! node started with another node's directory, another cluster's directory, or a
//! peer list that contradicts the one it was created with refuses to start instead
//! of joining and corrupting a cluster.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;
use crate::node::NodeError;

const FILE: &str = "identity.json";

#[derive(Serialize, Deserialize)]
struct Identity {
    node_id: u64,
    /// The `--initial-cluster` the directory was created with (id → peer address);
    /// empty for a node that joined.
    #[serde(default)]
    initial_cluster: BTreeMap<u64, String>,
}

fn describe(cluster: &BTreeMap<u64, String>) -> String {
    cluster
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a recorded identity refuses a configuration, if it does.
fn conflict(recorded: &Identity, config: &NodeConfig) -> Option<String> {
    if recorded.node_id != config.id {
        return Some(format!(
            "this directory holds the data of node {}, not node {}; start with --id {} or use an empty --data-dir",
            recorded.node_id, config.id, recorded.node_id
        ));
    }
    // Members present in both lists must have the same addresses: a different
    // address for the same id means another cluster's directory or a wrong list.
    // Ids added or removed since are fine (the data directory holds the live
    // membership; --initial-cluster only seeds a new cluster).
    let clashes: Vec<String> = recorded
        .initial_cluster
        .iter()
        .filter_map(|(id, addr)| {
            let now = config.initial_cluster.get(id)?;
            (now != addr).then(|| format!("node {id} was {addr}, now {now}"))
        })
        .collect();
    if !clashes.is_empty() {
        return Some(format!(
            "--initial-cluster {} contradicts the cluster this directory was created in ({}): {}; \
             this is another cluster's data or a mistyped peer list — fix --initial-cluster or use an empty --data-dir",
            describe(&config.initial_cluster),
            describe(&recorded.initial_cluster),
            clashes.join("; ")
        ));
    }
    None
}

/// Checks `data_dir/identity.json` against the configuration, or writes it.
pub fn check_or_record(config: &NodeConfig) -> Result<(), NodeError> {
    let path = config.data_dir.join(FILE);
    let err = |message: String| NodeError::DataDir {
        path: config.data_dir.display().to_string(),
        message,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let recorded: Identity = serde_json::from_slice(&bytes).map_err(|e| {
                err(format!(
                    "{FILE} is unreadable ({e}); restore it or start with an empty directory"
                ))
            })?;
            match conflict(&recorded, config) {
                Some(message) => Err(err(message)),
                None => Ok(()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Hidden files and a file system's lost+found do not count as data.
            let has_data = std::fs::read_dir(&config.data_dir)
                .map(|mut d| {
                    d.any(|e| {
                        e.map(|e| {
                            let name = e.file_name().to_string_lossy().into_owned();
                            !name.starts_with('.') && name != "lost+found"
                        })
                        .unwrap_or(false)
                    })
                })
                .unwrap_or(false);
            if has_data {
                return Err(err(format!(
                    "the directory is not empty but has no {FILE}; it was not written by a Muster node — use an empty --data-dir"
                )));
            }
            let identity = Identity {
                node_id: config.id,
                initial_cluster: config.initial_cluster.clone(),
            };
            let bytes = serde_json::to_vec_pretty(&identity).map_err(|e| err(e.to_string()))?;
            muster_store::state_machine::write_file_durably(&config.data_dir, FILE, &bytes)
                .map_err(|e| err(e.to_string()))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: u64, cluster: &[(u64, &str)]) -> NodeConfig {
        let mut c = NodeConfig::new(
            id,
            "/nonexistent".into(),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
        );
        c.initial_cluster = cluster.iter().map(|(i, a)| (*i, a.to_string())).collect();
        c
    }

    fn identity(id: u64, cluster: &[(u64, &str)]) -> Identity {
        Identity {
            node_id: id,
            initial_cluster: cluster.iter().map(|(i, a)| (*i, a.to_string())).collect(),
        }
    }

    #[test]
    fn another_nodes_directory_is_refused() {
        let msg = conflict(&identity(1, &[]), &config(2, &[])).unwrap();
        assert!(msg.contains("node 1, not node 2"), "{msg}");
    }

    #[test]
    fn another_clusters_directory_is_refused() {
        let recorded = identity(1, &[(1, "a:7300"), (2, "b:7300"), (3, "c:7300")]);
        let msg = conflict(&recorded, &config(1, &[(1, "x:7300"), (2, "y:7300"), (3, "z:7300")])).unwrap();
        assert!(msg.contains("node 1 was a:7300, now x:7300"), "{msg}");
    }

    #[test]
    fn members_added_or_removed_since_are_accepted() {
        let recorded = identity(1, &[(1, "a:7300"), (2, "b:7300"), (3, "c:7300")]);
        assert_eq!(
            conflict(&recorded, &config(1, &[(1, "a:7300"), (2, "b:7300"), (4, "d:7300")])),
            None
        );
        assert_eq!(conflict(&recorded, &config(1, &[])), None);
    }
}
