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
