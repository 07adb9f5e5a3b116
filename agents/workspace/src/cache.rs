//! The local workspace cache: after a confirmed final sync a closed session's directory (or its
//! whole image) and manifest may stay on the host, so that reopening the same workspace fetches
//! only what changed in the store instead of everything. Blocking: call from `spawn_blocking`.
//!
//! Layout, under `<deployment_root>/.berth-cache/` (a dot-folder: never listed as a session
//! directory, so the engine's reconciler never takes a cached workspace for stranded work):
//!
//! - `<key>/` one entry per (profile, user, workspace) of this deployment ([`key`]), holding
//!   `entry.json` (a [`Record`]: whose it is, its size, when it was closed, and the manifest of
//!   the confirmed final sync) and either `workspace/` (a plain directory) or `workspace.img`
//!   (the session's ext4 image, unmounted);
//! - `.incoming-<session>/`, `.adopting-<session>/`, `.evicting-<id>/`: an entry being put in,
//!   taken out or deleted. Each step is one rename, so a crash leaves at most one such folder,
//!   and [`sweep`] deletes them at start: everything in them was covered by a confirmed final
//!   sync with nothing changed since, exactly like a directory `remove` deletes.
//!
//! Only the agent reads or writes here; no container ever sees it. The engine is not told about
//! entries: a reopen finds its entry by key (a different user or workspace has another key, and
//! the record is checked against the asking session's too).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::volume::{self, Volume};

/// Folder (under the deployment root) holding the cached workspaces.
pub const CACHE_DIR: &str = ".berth-cache";
const RECORD_FILE: &str = "entry.json";
const DIRECTORY_NAME: &str = "workspace";
const IMAGE_NAME: &str = "workspace.img";
const INCOMING_PREFIX: &str = ".incoming-";
const ADOPTING_PREFIX: &str = ".adopting-";
const EVICTING_PREFIX: &str = ".evicting-";
const RECORD_VERSION: u32 = 1;

/// What holds a cached workspace's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holder {
    Directory,
    Image,
}

/// `entry.json`: whose a cached workspace is and what its files were at the confirmed final sync.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    pub profile: String,
    pub user: String,
    pub workspace: String,
    pub prefix: String,
    pub holder: Holder,
    /// Disk it takes: the files' bytes for a directory, the blocks allocated for an image.
    pub bytes: u64,
    /// When it was closed: the least recently closed entry is evicted first.
    pub cached_at: DateTime<Utc>,
    /// The session's manifest as of the confirmed final sync.
    pub manifest: Manifest,
}

/// Whose workspace a cache entry must be to be handed to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub profile: String,
    pub user: String,
    pub workspace: String,
    pub prefix: String,
}

impl Owner {
    /// The entry's folder name: a digest, so no id ever becomes a path of its own here.
    pub fn key(&self) -> String {
        let mut hasher = sha2::Sha256::new();
        for part in [&self.profile, &self.user, &self.workspace, &self.prefix] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        crate::fsops::hex(&hasher.finalize())[..32].to_owned()
    }

    fn owns(&self, record: &Record) -> bool {
        record.profile == self.profile && record.user == self.user && record.workspace == self.workspace && record.prefix == self.prefix
    }
}

impl Record {
    pub fn new(owner: &Owner, holder: Holder, bytes: u64, manifest: Manifest) -> Record {
        Record {
            version: RECORD_VERSION,
            profile: owner.profile.clone(),
            user: owner.user.clone(),
            workspace: owner.workspace.clone(),
            prefix: owner.prefix.clone(),
            holder,
            bytes,
            cached_at: Utc::now(),
            manifest,
        }
    }

    fn owner(&self) -> Owner {
        Owner { profile: self.profile.clone(), user: self.user.clone(), workspace: self.workspace.clone(), prefix: self.prefix.clone() }
    }
}

/// What goes into the cache at `remove`.
pub enum Source {
    /// A plain session directory: moved whole.
    Directory(PathBuf),
    /// An image-backed session: unmounted, then its image moved.
    Image(Volume),
}

pub fn cache_root(deployment_root: &Path) -> PathBuf {
    deployment_root.join(CACHE_DIR)
}

fn read_record(folder: &Path) -> Result<Record> {
    let path = folder.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(|source| Error::io("reading cache entry", &path, source))?;
    let record: Record =
        serde_json::from_slice(&bytes).map_err(|error| Error::Manifest { path: path.clone(), reason: error.to_string() })?;
    if record.version != RECORD_VERSION {
        return Err(Error::Manifest {
            path,
            reason: format!("cache entry version {} is not the {RECORD_VERSION} this build reads", record.version),
        });
    }
    Ok(record)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| Error::io("moving", from, source))
}

/// Deletes a cache folder (unmounting anything left mounted in it first): renamed out of the way
/// first, so a half-deleted entry is never taken for a whole one.
pub fn discard(folder: &Path) -> Result<()> {
    if std::fs::symlink_metadata(folder).is_err() {
        return Ok(());
    }
    let parent = folder.parent().unwrap_or(Path::new("."));
    let doomed = parent.join(format!("{EVICTING_PREFIX}{}", Uuid::new_v4().simple()));
    volume::unmount_all_under(folder)?;
    rename(folder, &doomed)?;
    std::fs::remove_dir_all(&doomed).map_err(|source| Error::io("deleting cache entry", &doomed, source))
}

/// Puts a closed session's workspace into the cache, replacing an older entry of the same
/// workspace (the newer close was confirmed in the store after it). The caller has checked that
/// a confirmed final sync covers it and nothing changed since.
pub fn insert(deployment_root: &Path, session: &str, record: &Record, source: Source) -> Result<PathBuf> {
    let root = cache_root(deployment_root);
    std::fs::create_dir_all(&root).map_err(|source| Error::io("creating cache folder", &root, source))?;
    let incoming = root.join(format!("{INCOMING_PREFIX}{session}"));
    discard(&incoming)?;
    std::fs::create_dir(&incoming).map_err(|source| Error::io("creating cache entry", &incoming, source))?;
    let bytes =
        serde_json::to_vec(record).map_err(|error| Error::Manifest { path: incoming.join(RECORD_FILE), reason: error.to_string() })?;
    std::fs::write(incoming.join(RECORD_FILE), bytes)
        .map_err(|source| Error::io("writing cache entry", incoming.join(RECORD_FILE), source))?;
    match source {
        Source::Directory(directory) => rename(&directory, &incoming.join(DIRECTORY_NAME))?,
        Source::Image(volume) => {
            volume::detach(&volume)?;
            rename(&volume.image, &incoming.join(IMAGE_NAME))?;
        }
    }
    let entry = root.join(record.owner().key());
    discard(&entry)?;
    rename(&incoming, &entry)?;
    Ok(entry)
}

/// A cache entry taken out for one session: nobody else can take it any more.
#[derive(Debug)]
pub struct Taken {
    pub record: Record,
    pub folder: PathBuf,
}

impl Taken {
    /// The cached plain directory.
    pub fn directory(&self) -> PathBuf {
        self.folder.join(DIRECTORY_NAME)
    }

    /// The cached image, with mount points inside the entry's folder, to look into it before it
    /// becomes the session's.
    pub fn volume(&self) -> Volume {
        Volume { image: self.folder.join(IMAGE_NAME), mount_point: self.folder.join("fs"), session_dir: self.folder.join("mounted") }
    }
}

/// Takes `owner`'s entry for `session`, if there is one. An entry whose record doesn't match
/// (another owner under a colliding key, an unreadable record) is deleted, never handed out.
pub fn take(deployment_root: &Path, owner: &Owner, session: &str) -> Result<Option<Taken>> {
    let root = cache_root(deployment_root);
    let entry = root.join(owner.key());
    if std::fs::symlink_metadata(&entry).is_err() {
        return Ok(None);
    }
    let record = match read_record(&entry) {
        Ok(record) if owner.owns(&record) => record,
        Ok(_) | Err(_) => {
            tracing::warn!(entry = %entry.display(), "cache entry is not this workspace's; deleted");
            discard(&entry)?;
            return Ok(None);
        }
    };
    let adopting = root.join(format!("{ADOPTING_PREFIX}{session}"));
    discard(&adopting)?;
    rename(&entry, &adopting)?;
    Ok(Some(Taken { record, folder: adopting }))
}

/// One entry of the cache, as eviction sees it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub folder: PathBuf,
    /// `None`: unreadable (deleted by the next eviction).
    pub record: Option<Record>,
}

/// The whole entries (not those being put in, taken out or deleted).
pub fn list(deployment_root: &Path) -> Result<Vec<Listed>> {
    let root = cache_root(deployment_root);
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::io("listing cache", &root, source)),
    };
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::io("listing cache", &root, source))?;
        let Ok(key) = entry.file_name().into_string() else { continue };
        if key.starts_with('.') {
            continue;
        }
        let folder = entry.path();
        let record = read_record(&folder).ok();
        listed.push(Listed { key, folder, record });
    }
    listed.sort_by(|left, right| left.key.cmp(&right.key));
    Ok(listed)
}

/// The entries to evict so the rest fit in `budget_bytes`: unreadable ones, then the least
/// recently closed beyond the budget.
pub fn over_budget(listed: Vec<Listed>, budget_bytes: u64) -> Vec<Listed> {
    let (mut readable, mut evict): (Vec<Listed>, Vec<Listed>) = listed.into_iter().partition(|entry| entry.record.is_some());
    readable.sort_by_key(|entry| std::cmp::Reverse(entry.record.as_ref().map(|record| record.cached_at)));
    let mut kept_bytes: u64 = 0;
    for entry in readable {
        let bytes = entry.record.as_ref().map_or(0, |record| record.bytes);
        if kept_bytes.saturating_add(bytes) <= budget_bytes {
            kept_bytes += bytes;
        } else {
            evict.push(entry);
        }
    }
    evict
}

/// Deletes what interrupted insertions, adoptions and evictions left (at start, before any task).
pub fn sweep(deployment_root: &Path) -> Result<usize> {
    let root = cache_root(deployment_root);
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(Error::io("listing cache", &root, source)),
    };
    let mut swept = 0;
    for entry in entries {
        let entry = entry.map_err(|source| Error::io("listing cache", &root, source))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if [INCOMING_PREFIX, ADOPTING_PREFIX, EVICTING_PREFIX].iter().any(|prefix| name.starts_with(prefix)) {
            volume::unmount_all_under(&entry.path())?;
            std::fs::remove_dir_all(entry.path()).map_err(|source| Error::io("deleting cache leftover", entry.path(), source))?;
            swept += 1;
        }
    }
    Ok(swept)
}

/// Bytes an image really takes on disk (it is sparse).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).map_err(|source| Error::io("inspecting", path, source))?;
    Ok(metadata.blocks() * 512)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn listed(key: &str, bytes: u64, minutes_ago: i64) -> Listed {
        let owner = Owner { profile: "p".into(), user: "u".into(), workspace: key.into(), prefix: format!("p/u/{key}") };
        let mut record = Record::new(&owner, Holder::Directory, bytes, Manifest::new("s", "u", key, "p", "x"));
        record.cached_at = Utc::now() - chrono::Duration::minutes(minutes_ago);
        Listed { key: key.into(), folder: PathBuf::from(key), record: Some(record) }
    }

    #[test]
    fn the_least_recently_closed_go_first() {
        let entries = vec![listed("old", 40, 30), listed("new", 40, 1), listed("mid", 40, 10)];
        let evicted: Vec<String> = over_budget(entries, 100).into_iter().map(|entry| entry.key).collect();
        assert_eq!(evicted, ["old"]);
    }

    #[test]
    fn unreadable_entries_and_those_over_the_whole_budget_go() {
        let mut broken = listed("broken", 1, 0);
        broken.record = None;
        let evicted: Vec<String> =
            over_budget(vec![broken, listed("huge", 500, 0), listed("small", 10, 5)], 100).into_iter().map(|entry| entry.key).collect();
        assert_eq!(evicted, ["broken", "huge"]);
    }

    #[test]
    fn keys_differ_per_user_and_workspace() {
        let owner = |user: &str, workspace: &str| Owner {
            profile: "dev".into(),
            user: user.into(),
            workspace: workspace.into(),
            prefix: format!("dev/{user}/{workspace}"),
        };
        assert_ne!(owner("alice", "w").key(), owner("bob", "w").key());
        assert_ne!(owner("alice", "w").key(), owner("alice", "v").key());
        assert_eq!(owner("alice", "w").key(), owner("alice", "w").key());
    }
}
