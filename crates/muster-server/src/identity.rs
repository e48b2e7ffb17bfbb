//! The data directory remembers which node it belongs to, so a node started with
//! another node's directory (or a reused id) refuses to start instead of corrupting
//! the cluster.

use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;
use crate::node::NodeError;

const FILE: &str = "identity.json";

#[derive(Serialize, Deserialize)]
struct Identity {
    node_id: u64,
}

/// Checks `data_dir/identity.json` against the configured id, or writes it.
pub fn check_or_record(config: &NodeConfig) -> Result<(), NodeError> {
    let path = config.data_dir.join(FILE);
    let err = |message: String| NodeError::DataDir {
        path: config.data_dir.display().to_string(),
        message,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let id: Identity = serde_json::from_slice(&bytes).map_err(|e| {
                err(format!(
                    "{FILE} is unreadable ({e}); restore it or start with an empty directory"
                ))
            })?;
            if id.node_id != config.id {
                return Err(err(format!(
                    "this directory holds the data of node {}, not node {}; start with --id {} or use an empty --data-dir",
                    id.node_id, config.id, id.node_id
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = serde_json::to_vec(&Identity { node_id: config.id }).map_err(|e| err(e.to_string()))?;
            muster_store::state_machine::write_file_durably(&config.data_dir, FILE, &bytes)
                .map_err(|e| err(e.to_string()))
        }
        Err(e) => Err(err(e.to_string())),
    }
}
