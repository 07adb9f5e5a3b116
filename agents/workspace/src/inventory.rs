//! What lives in this deployment's part of the host: one entry per session directory with the
//! manifest that says whose it is. The agent publishes it as `workspace.inventory` (the engine
//! decides what is stranded) and uses it to find sibling directories of a workspace.
//! Blocking: call from `spawn_blocking`.

use std::path::Path;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::manifest::{self, ManifestHeader, Phase};

/// One session directory of this deployment.
#[derive(Debug, Clone)]
pub struct Found {
    pub session: String,
    /// Whose it is; `None` without a readable manifest.
    pub manifest: Option<ManifestHeader>,
    /// Newest modification time of the directory and its manifest.
    pub modified: DateTime<Utc>,
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::symlink_metadata(path).and_then(|metadata| metadata.modified()).ok()
}

/// Every session directory under `deployment_root` (dot-folders are bookkeeping, not sessions).
/// A manifest that can't be read is reported as absent rather than hiding the directory.
pub fn list(deployment_root: &Path) -> Result<Vec<Found>> {
    let entries = match std::fs::read_dir(deployment_root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::io("listing", deployment_root, source)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::io("listing", deployment_root, source))?;
        let Ok(session) = entry.file_name().into_string() else { continue };
        if session.starts_with('.') || !entry.file_type().is_ok_and(|file_type| file_type.is_dir()) {
            continue;
        }
        let manifest_path = manifest::manifest_path(deployment_root, &session);
        let manifest = match manifest::load_header_blocking(&manifest_path) {
            Ok(manifest) => manifest,
            Err(error) => {
                tracing::warn!(session, %error, "unreadable manifest; listed without one");
                None
            }
        };
        if manifest.as_ref().is_some_and(|manifest| manifest.phase == Phase::Removed) {
            // A removed session whose directory came back (a redelivered materialize) is listed as it is.
            tracing::debug!(session, "directory of a removed session");
        }
        let newest = [modified(&entry.path()), modified(&manifest_path)].into_iter().flatten().max();
        let modified = newest.map(DateTime::<Utc>::from).unwrap_or_else(Utc::now);
        found.push(Found { session, manifest, modified });
    }
    found.sort_by(|left, right| left.session.cmp(&right.session));
    Ok(found)
}

/// Folder (in the manifests folder) with one empty marker file per session of each workspace
/// prefix, so a materialize finds its siblings without reading every manifest of the deployment.
pub const BY_WORKSPACE_DIR: &str = "by-workspace";

fn index_folder(deployment_root: &Path, prefix: &str) -> std::path::PathBuf {
    use sha2::Digest;
    let digest = crate::fsops::hex(&sha2::Sha256::digest(prefix.as_bytes()));
    deployment_root.join(manifest::MANIFESTS_DIR).join(BY_WORKSPACE_DIR).join(&digest[..32])
}

/// Records that `session` holds a directory of the workspace at `prefix`.
pub fn mark(deployment_root: &Path, prefix: &str, session: &str) -> Result<()> {
    let folder = index_folder(deployment_root, prefix);
    std::fs::create_dir_all(&folder).map_err(|source| Error::io("creating workspace index", &folder, source))?;
    let marker = folder.join(session);
    std::fs::File::create(&marker).map(drop).map_err(|source| Error::io("writing workspace index", &marker, source))
}

/// Forgets that `session` holds a directory of the workspace at `prefix`.
pub fn unmark(deployment_root: &Path, prefix: &str, session: &str) {
    let marker = index_folder(deployment_root, prefix).join(session);
    if let Err(error) = std::fs::remove_file(&marker) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(session, %error, "could not update the workspace index");
        }
    }
}

/// The sessions recorded for the workspace at `prefix`.
pub fn marked(deployment_root: &Path, prefix: &str) -> Result<Vec<String>> {
    let folder = index_folder(deployment_root, prefix);
    let entries = match std::fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::io("listing workspace index", &folder, source)),
    };
    let mut sessions = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::io("listing workspace index", &folder, source))?;
        if let Ok(session) = entry.file_name().into_string() {
            sessions.push(session);
        }
    }
    sessions.sort();
    Ok(sessions)
}
