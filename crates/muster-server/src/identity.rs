//! The data directory remembers which node and which cluster it belongs to, so a
//! node started with another node's directory, another cluster's directory, or a
//! peer list that contradicts the one it was created with refuses to start instead
//! of joining and corrupting a cluster.
//!
//! The cluster has an id ([`ClusterIdentity`]) that every peer request carries, so a
//! node never takes a vote or an append from a node of another cluster that reached
//! its address (a peer address reused by another cluster, a stale peer list).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use http::HeaderValue;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::NodeConfig;
use crate::node::NodeError;

const FILE: &str = "identity.json";

/// The request header naming the sender's cluster on the peer port.
pub const CLUSTER_ID_HEADER: &str = "muster-cluster-id";

#[derive(Serialize, Deserialize)]
struct Identity {
    node_id: u64,
    /// The `--initial-cluster` the directory was created with (id → peer address);
    /// empty for a node that joined.
    #[serde(default)]
    initial_cluster: BTreeMap<u64, String>,
    /// The cluster's id, 16 hex digits: derived from `initial_cluster` by the founding
    /// members, learned from the cluster by a node that joined. Absent in directories
    /// written before ids existed (then derived again from `initial_cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
}

/// The id of the cluster founded with `initial_cluster`: the first 8 bytes of the
/// SHA-256 of its `id=address` lines. Every founding member computes the same id
/// from the same list, without talking to the others; two clusters differ in at
/// least one peer address, so in their ids.
pub fn founding_cluster_id(initial_cluster: &BTreeMap<u64, String>) -> u64 {
    let mut hasher = Sha256::new();
    for (id, addr) in initial_cluster {
        hasher.update(format!("{id}={addr}\n").as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// A cluster id as written in `identity.json` and the peer header.
pub fn format_cluster_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Reads a cluster id written by [`format_cluster_id`].
pub fn parse_cluster_id(text: &str) -> Option<u64> {
    (text.len() == 16).then(|| u64::from_str_radix(text, 16).ok()).flatten()
}

/// Why a peer request was refused by [`ClusterIdentity::admit`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForeignPeer {
    /// The header is not 16 hex digits.
    #[error("peer header {CLUSTER_ID_HEADER} is not 16 hex digits: {0:?}")]
    Malformed(String),
    /// The sender belongs to another cluster.
    #[error("the peer belongs to cluster {theirs}, this node to cluster {ours}; check the peer addresses")]
    OtherCluster {
        /// The sender's cluster id.
        theirs: String,
        /// This node's cluster id.
        ours: String,
    },
    /// This node joins a cluster and has not yet learned its id from the node named
    /// by `--join`, so it cannot tell whether the sender belongs to it.
    #[error("the peer names cluster {theirs}, but this node has not yet learned its cluster's id from the node it joins (--join)")]
    NotJoinedYet {
        /// The sender's cluster id.
        theirs: String,
    },
}

/// A known cluster id, with the header value that names it on peer requests.
#[derive(Debug)]
struct KnownCluster {
    id: u64,
    header: HeaderValue,
}

impl KnownCluster {
    fn new(id: u64) -> Self {
        KnownCluster {
            id,
            header: HeaderValue::from_str(&format_cluster_id(id)).expect("hex digits are a valid header value"),
        }
    }
}

/// This node's cluster id, once known, and where to record it when learned.
#[derive(Debug, Default)]
pub struct ClusterIdentity {
    known: OnceLock<KnownCluster>,
    /// The data directory whose `identity.json` records a learned id (`None`: not
    /// recorded).
    data_dir: Option<PathBuf>,
}

impl ClusterIdentity {
    /// An identity already known (`Some`) or to be learned from the node this one
    /// joins through ([`ClusterIdentity::adopt`]; `None`: a node started with `--join`
    /// that has not learned it yet), recorded then in `data_dir`.
    pub fn new(id: Option<u64>, data_dir: Option<PathBuf>) -> Self {
        ClusterIdentity {
            known: id.map(KnownCluster::new).map(OnceLock::from).unwrap_or_default(),
            data_dir,
        }
    }

    /// The cluster id, when known.
    pub fn id(&self) -> Option<u64> {
        self.known.get().map(|k| k.id)
    }

    /// The [`CLUSTER_ID_HEADER`] value of this node's requests, when the id is known.
    pub fn header(&self) -> Option<&HeaderValue> {
        self.known.get().map(|k| &k.header)
    }

    /// Whether to serve a peer request whose [`CLUSTER_ID_HEADER`] is `header`.
    ///
    /// A request naming another cluster is refused, and so is every request naming a
    /// cluster while this node has not yet learned its own: a peer that happens to
    /// reach a joining node first (a reused address, a stale peer list) must not make
    /// it a member of its cluster. One naming none comes from a node of an earlier
    /// version and is served.
    pub fn admit(&self, header: Option<&[u8]>) -> Result<(), ForeignPeer> {
        let Some(bytes) = header else { return Ok(()) };
        let theirs = std::str::from_utf8(bytes)
            .ok()
            .and_then(parse_cluster_id)
            .ok_or_else(|| ForeignPeer::Malformed(String::from_utf8_lossy(bytes).into_owned()))?;
        match self.known.get() {
            Some(ours) if ours.id == theirs => Ok(()),
            Some(ours) => Err(ForeignPeer::OtherCluster {
                theirs: format_cluster_id(theirs),
                ours: format_cluster_id(ours.id),
            }),
            None => Err(ForeignPeer::NotJoinedYet {
                theirs: format_cluster_id(theirs),
            }),
        }
    }

    /// Takes `id`, as the node named by `--join` reports it, as this node's cluster id
    /// and records it; refused if this node already belongs to another cluster (its
    /// data directory was written in another cluster than the one it now joins).
    pub fn adopt(&self, id: u64) -> Result<(), ForeignPeer> {
        let ours = self.known.get_or_init(|| self.learn(id)).id;
        if ours == id {
            Ok(())
        } else {
            Err(ForeignPeer::OtherCluster {
                theirs: format_cluster_id(id),
                ours: format_cluster_id(ours),
            })
        }
    }

    /// Records `id` as this node's cluster id in its data directory.
    fn learn(&self, id: u64) -> KnownCluster {
        if let Some(dir) = &self.data_dir {
            if let Err(e) = record_cluster_id(dir, id) {
                tracing::warn!(error = %e, "could not record the cluster id; it will be learned again after a restart");
            }
        }
        tracing::info!(cluster = %format_cluster_id(id), "learned this node's cluster id");
        KnownCluster::new(id)
    }
}

/// Writes `id` into `data_dir/identity.json`.
fn record_cluster_id(data_dir: &Path, id: u64) -> Result<(), String> {
    let bytes = std::fs::read(data_dir.join(FILE)).map_err(|e| e.to_string())?;
    let mut identity: Identity = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    identity.cluster_id = Some(format_cluster_id(id));
    let bytes = serde_json::to_vec_pretty(&identity).map_err(|e| e.to_string())?;
    muster_store::state_machine::write_file_durably(data_dir, FILE, &bytes).map_err(|e| e.to_string())
}

/// The cluster id recorded in `identity`, or derived from its initial cluster.
fn cluster_id_of(identity: &Identity) -> Option<u64> {
    match &identity.cluster_id {
        Some(text) => parse_cluster_id(text),
        None if identity.initial_cluster.is_empty() => None,
        None => Some(founding_cluster_id(&identity.initial_cluster)),
    }
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

/// Checks `data_dir/identity.json` against the configuration, or writes it; returns
/// the cluster id, when known (a node that joined learns it from its first peer).
pub fn check_or_record(config: &NodeConfig) -> Result<Option<u64>, NodeError> {
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
                None => Ok(cluster_id_of(&recorded)),
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
            let cluster_id = (!config.initial_cluster.is_empty()).then(|| founding_cluster_id(&config.initial_cluster));
            let identity = Identity {
                node_id: config.id,
                initial_cluster: config.initial_cluster.clone(),
                cluster_id: cluster_id.map(format_cluster_id),
            };
            let bytes = serde_json::to_vec_pretty(&identity).map_err(|e| err(e.to_string()))?;
            muster_store::state_machine::write_file_durably(&config.data_dir, FILE, &bytes)
                .map_err(|e| err(e.to_string()))?;
            Ok(cluster_id)
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
            cluster_id: None,
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

    fn cluster(members: &[(u64, &str)]) -> BTreeMap<u64, String> {
        members.iter().map(|(i, a)| (*i, a.to_string())).collect()
    }

    #[test]
    fn founding_members_agree_on_the_cluster_id_and_other_clusters_differ() {
        let ours = cluster(&[(1, "a:7300"), (2, "b:7300"), (3, "c:7300")]);
        let id = founding_cluster_id(&ours);
        assert_eq!(id, founding_cluster_id(&ours.clone()));
        assert_ne!(
            id,
            founding_cluster_id(&cluster(&[(1, "a:7300"), (2, "b:7300"), (3, "c:7301")]))
        );
        assert_ne!(id, founding_cluster_id(&cluster(&[(1, "a:7300"), (2, "b:7300")])));
        assert_eq!(parse_cluster_id(&format_cluster_id(id)), Some(id));
        // A directory written before ids existed derives the same id again.
        let mut old = identity(1, &[(1, "a:7300"), (2, "b:7300"), (3, "c:7300")]);
        assert_eq!(cluster_id_of(&old), Some(id));
        old.cluster_id = Some(format_cluster_id(7));
        assert_eq!(cluster_id_of(&old), Some(7));
        assert_eq!(cluster_id_of(&identity(4, &[])), None);
    }

    #[test]
    fn peers_of_another_cluster_are_refused_and_unnamed_ones_served() {
        let ours = ClusterIdentity::new(Some(0xabc), None);
        assert_eq!(ours.admit(Some(b"0000000000000abc")), Ok(()));
        assert_eq!(ours.admit(None), Ok(()));
        let refused = ours.admit(Some(b"0000000000000abd")).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "the peer belongs to cluster 0000000000000abd, this node to cluster 0000000000000abc; check the peer addresses"
        );
        let malformed = ours.admit(Some(b"abc")).unwrap_err();
        assert!(malformed.to_string().contains(CLUSTER_ID_HEADER), "{malformed}");
    }

    #[test]
    fn a_joining_node_serves_no_named_cluster_until_it_adopts_and_records_the_one_it_joins() {
        let dir = tempfile::tempdir().unwrap();
        let mut joiner = config(4, &[]);
        joiner.data_dir = dir.path().to_path_buf();
        assert_eq!(check_or_record(&joiner).unwrap(), None);
        let learner = ClusterIdentity::new(None, Some(dir.path().to_path_buf()));
        assert_eq!(learner.admit(None), Ok(()));
        // A peer of some cluster reaching it first is refused and teaches it nothing.
        let early = learner.admit(Some(b"00000000000000bb")).unwrap_err();
        assert_eq!(
            early,
            ForeignPeer::NotJoinedYet {
                theirs: "00000000000000bb".into()
            }
        );
        assert!(early.to_string().contains("--join"), "{early}");
        assert_eq!(learner.id(), None);
        // The id reported by the node it joins through is taken.
        assert_eq!(learner.adopt(0xaa), Ok(()));
        assert_eq!(learner.id(), Some(0xaa));
        assert_eq!(learner.admit(Some(b"00000000000000aa")), Ok(()));
        assert!(matches!(
            learner.admit(Some(b"00000000000000bb")),
            Err(ForeignPeer::OtherCluster { .. })
        ));
        // Adopting again is idempotent for the same cluster and refused for another.
        assert_eq!(learner.adopt(0xaa), Ok(()));
        assert!(matches!(learner.adopt(0xbb), Err(ForeignPeer::OtherCluster { .. })));
        // After a restart the node knows it from its directory.
        assert_eq!(check_or_record(&joiner).unwrap(), Some(0xaa));
    }
}
