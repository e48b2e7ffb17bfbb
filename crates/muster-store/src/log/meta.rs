//! The small metadata file beside the segments: vote, last purged and committed log ids.
//!
//! It is rewritten whole on every change and replaced atomically (write a temporary file,
//! fdatasync it, rename it over the old one, fsync the directory), so after a crash it holds
//! either the old or the new contents, never a mix. It uses the same checksummed framing as
//! segment records so that a damaged file is reported instead of silently read as "no vote".

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use openraft::{LogId, NodeId, Vote};
use serde::{Deserialize, Serialize};

use super::record::{decode_record, encode_record, Decoded};
use super::LogError;

/// File name of the metadata file inside the log directory.
pub(crate) const META_FILE: &str = "log-meta";
/// Temporary name the metadata is written under before it is renamed into place.
pub(crate) const META_TMP_FILE: &str = "log-meta.tmp";

/// Format version written into the metadata, so a future layout can be told apart.
const META_VERSION: u32 = 1;

/// The durable, non-entry state of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub(crate) struct Meta<NID: NodeId> {
    pub(crate) version: u32,
    pub(crate) vote: Option<Vote<NID>>,
    pub(crate) last_purged: Option<LogId<NID>>,
    pub(crate) committed: Option<LogId<NID>>,
}

impl<NID: NodeId> Default for Meta<NID> {
    fn default() -> Self {
        Self {
            version: META_VERSION,
            vote: None,
            last_purged: None,
            committed: None,
        }
    }
}

impl<NID: NodeId> Meta<NID> {
    /// The framed bytes of the metadata file.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, LogError> {
        let payload = bincode::serialize(self).map_err(|e| LogError::Encode {
            what: "log metadata".to_string(),
            reason: e.to_string(),
        })?;
        let mut out = Vec::new();
        encode_record(&payload, &mut out).ok_or_else(|| LogError::Encode {
            what: "log metadata".to_string(),
            reason: "too large".to_string(),
        })?;
        Ok(out)
    }

    /// Reads the metadata file in `dir`; a missing file means a fresh log.
    pub(crate) fn load(dir: &Path) -> Result<Self, LogError> {
        let path = dir.join(META_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(LogError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        let corrupt = |reason: String| LogError::CorruptMeta {
            path: path.clone(),
            reason,
        };
        let payload = match decode_record(&bytes, 0) {
            Decoded::Record { payload, next } if next == bytes.len() => payload,
            Decoded::Record { .. } => return Err(corrupt("trailing bytes after the record".into())),
            Decoded::End => return Err(corrupt("file is empty".into())),
            Decoded::Bad(bad) => return Err(corrupt(bad.to_string())),
        };
        let meta: Self = bincode::deserialize(payload).map_err(|e| corrupt(e.to_string()))?;
        if meta.version != META_VERSION {
            return Err(corrupt(format!(
                "unsupported format version {} (this build reads {META_VERSION})",
                meta.version
            )));
        }
        Ok(meta)
    }
}

/// Atomically replaces the metadata file in `dir` with `bytes` and makes that durable.
pub(crate) fn write_meta_file(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(META_TMP_FILE);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    drop(file);
    fs::rename(&tmp, dir.join(META_FILE))?;
    sync_dir(dir)
}

/// Makes file creations, renames and deletions in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
