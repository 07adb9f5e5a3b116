//! The manifest kept next to each session's workspace: what was materialized or last synced
//! (path, size, local mtime, SHA-256, ETag and version of the object), and whether the last final
//! sync was confirmed.
//!
//! It lives at `<deployment_root>/.berth-manifests/<session>.json`, outside the directory that is
//! mounted into the container, so a user can neither read nor forge it (a forged "confirmed" flag
//! would let `remove` delete unsaved work). Session ids never start with a dot, so it can't collide
//! with a session directory. Writes are atomic (temporary file + rename), flushed when they
//! record something deletions depend on.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::tree::Tree;

/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Folder (under the deployment root) holding one manifest per session.
pub const MANIFESTS_DIR: &str = ".berth-manifests";
/// Folder (under the deployment root) where downloads land before they are linked into place, so a
/// half-written file never shows up in the workspace.
pub const STAGING_DIR: &str = ".berth-staging";
/// Folder (under the deployment root) where `remove` keeps what could not be stored (names that
/// can't be object keys, FIFOs, sockets, devices): `<preserved>/<session>/<relative path>`.
pub const PRESERVED_DIR: &str = ".berth-preserved";

/// How far materialization got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Small files are coming in; the container must not start yet.
    Materializing,
    /// Small files are in place (`workspace.materialized` was sent); large files stream in.
    Streaming,
    /// Every file is in place.
    Complete,
    /// The confirmed final sync covers the directory and `remove` is deleting it: what is missing
    /// from it was deleted by the remove, never by the user, so it is never synced again (a sync
    /// would take the half-deleted directory for deletions and delete them in the store too).
    Removing,
    /// The directory was removed after a confirmed final sync.
    Removed,
}

/// One file as last seen in both places.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub size: u64,
    /// Local modification time in nanoseconds since the epoch, for the cheap change check.
    pub mtime_ns: i64,
    /// Hex SHA-256 of the content, to confirm a change the cheap check suspects.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The record of the last final sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinalSync {
    pub task: Uuid,
    /// Every object was read back and matched.
    pub confirmed: bool,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub session: String,
    pub user: String,
    pub workspace: String,
    /// The run-profile's name. Empty in manifests written before it was recorded.
    #[serde(default)]
    pub profile: String,
    /// The object-store prefix (below the store URL's own prefix).
    pub prefix: String,
    pub phase: Phase,
    /// Relative path -> entry. Only files that are really in place (and in the store) are listed.
    pub files: BTreeMap<String, FileEntry>,
    /// Set by a final sync; cleared by anything that may change the workspace afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_sync: Option<FinalSync>,
    /// Symlinks, directories and modes as last agreed with the store's sidecar.
    #[serde(default, skip_serializing_if = "Tree::is_empty")]
    pub tree: Tree,
    /// The sidecar's version as last seen (absent: this session never saw one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_e_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_version: Option<String>,
    /// What `remove` moved to the preserved area (lossy UTF-8), to answer a redelivery the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preserved: Vec<String>,
}

impl Manifest {
    pub fn new(session: &str, user: &str, workspace: &str, profile: &str, prefix: &str) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            session: session.to_owned(),
            user: user.to_owned(),
            workspace: workspace.to_owned(),
            profile: profile.to_owned(),
            prefix: prefix.to_owned(),
            phase: Phase::Materializing,
            files: BTreeMap::new(),
            final_sync: None,
            tree: Tree::default(),
            tree_e_tag: None,
            tree_version: None,
            preserved: Vec::new(),
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|entry| entry.size).sum()
    }

    /// Whether the last thing that happened was a confirmed final sync.
    pub fn final_sync_confirmed(&self) -> bool {
        self.final_sync.as_ref().is_some_and(|record| record.confirmed)
    }
}

/// The fields of a manifest that say whose a directory is, read without building the file list
/// (the inventory reads every manifest of the deployment each minute).
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestHeader {
    pub version: u32,
    pub user: String,
    pub workspace: String,
    #[serde(default)]
    pub profile: String,
    pub prefix: String,
    pub phase: Phase,
    #[serde(default)]
    pub final_sync: Option<FinalSync>,
}

impl ManifestHeader {
    pub fn final_sync_confirmed(&self) -> bool {
        self.final_sync.as_ref().is_some_and(|record| record.confirmed)
    }
}

/// Reads a manifest's header; `None` when there is none. Blocking: call from `spawn_blocking`.
pub fn load_header_blocking(path: &Path) -> Result<Option<ManifestHeader>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::io("reading manifest", path, source)),
    };
    let header: ManifestHeader = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|error| Error::Manifest { path: path.to_owned(), reason: error.to_string() })?;
    if header.version != MANIFEST_VERSION {
        return Err(Error::Manifest {
            path: path.to_owned(),
            reason: format!("version {} is not the {MANIFEST_VERSION} this build reads", header.version),
        });
    }
    Ok(Some(header))
}

/// Where a session's manifest lives.
pub fn manifest_path(deployment_root: &Path, session: &str) -> PathBuf {
    deployment_root.join(MANIFESTS_DIR).join(format!("{session}.json"))
}

/// Where a session's downloads are staged.
pub fn staging_path(deployment_root: &Path, session: &str) -> PathBuf {
    deployment_root.join(STAGING_DIR).join(session)
}

/// Where `remove` keeps a session's entries that could not be stored.
pub fn preserved_path(deployment_root: &Path, session: &str) -> PathBuf {
    deployment_root.join(PRESERVED_DIR).join(session)
}

/// Reads a manifest; `None` when there is none yet. Blocking: call from `spawn_blocking`.
pub fn load_blocking(path: &Path) -> Result<Option<Manifest>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::io("reading manifest", path, source)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|error| Error::Manifest { path: path.to_owned(), reason: error.to_string() })?;
    if manifest.version != MANIFEST_VERSION {
        return Err(Error::Manifest {
            path: path.to_owned(),
            reason: format!("version {} is not the {MANIFEST_VERSION} this build reads", manifest.version),
        });
    }
    Ok(Some(manifest))
}

/// How hard a save insists that the manifest is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync before the rename: for the records that decide deletions (a final sync, a removal).
    Flushed,
    /// Atomic rename only. A host crash may bring back the previous manifest, which costs a
    /// redundant download, upload or hash later, never a file: materialization and routine syncs.
    Ordered,
}

/// Writes a manifest atomically. Blocking: call from `spawn_blocking`.
pub fn save_blocking(path: &Path, manifest: &Manifest, durability: Durability) -> Result<()> {
    let directory = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory).map_err(|source| Error::io("creating manifest folder", directory, source))?;
    let temporary = directory.join(format!(".{}.tmp", Uuid::new_v4()));
    let bytes = serde_json::to_vec(manifest).map_err(|error| Error::Manifest { path: path.to_owned(), reason: error.to_string() })?;
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&bytes)?;
        if durability == Durability::Flushed {
            file.sync_all()?;
        }
        std::fs::rename(&temporary, path)
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io("writing manifest", path, source));
    }
    Ok(())
}

pub async fn load(path: PathBuf) -> Result<Option<Manifest>> {
    tokio::task::spawn_blocking(move || load_blocking(&path)).await?
}

pub async fn save(path: PathBuf, manifest: Manifest, durability: Durability) -> Result<Manifest> {
    tokio::task::spawn_blocking(move || save_blocking(&path, &manifest, durability).map(|()| manifest)).await?
}
