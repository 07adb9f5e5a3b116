//! Local file-system work, all blocking (callers run it in `spawn_blocking`): walking a workspace
//! without following symlinks, opening files and folders so that nothing outside the workspace is
//! ever read or written, and placing downloaded files atomically.
//!
//! The workspace is writable by the user's container while we work in it, so checking a path and
//! then using it would race. Instead every folder is opened with `O_NOFOLLOW | O_DIRECTORY`
//! starting from the workspace root, one component at a time, through `/proc/self/fd/<fd>/<name>`
//! (which resolves to the already opened folder, whatever the path looks like now): a symlink
//! planted anywhere on the way makes the open fail instead of leading out.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::keys::WorkspacePath;

/// Owner given to everything created in a workspace, so a non-root container user can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
}

impl Ownership {
    /// Parses the profile's `uid[:gid]`; names can't be resolved on the host and give `None`.
    pub fn parse(user: &str) -> Option<Ownership> {
        let (uid, gid) = user.split_once(':').unwrap_or((user, user));
        Some(Ownership { uid: uid.parse().ok()?, gid: gid.parse().ok()? })
    }
}

/// A regular file found in a workspace.
#[derive(Debug, Clone)]
pub struct LocalFile {
    pub path: WorkspacePath,
    pub size: u64,
    pub mtime_ns: i64,
}

/// Something in the workspace that is not synced, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// The regular files of a workspace, and what was left out.
#[derive(Debug, Default)]
pub struct Scan {
    pub files: Vec<LocalFile>,
    pub skipped: Vec<Skipped>,
}

pub fn mtime_ns(metadata: &Metadata) -> i64 {
    metadata.mtime().saturating_mul(1_000_000_000).saturating_add(metadata.mtime_nsec())
}

/// Walks `root` without following symlinks. Symlinks, sockets, FIFOs and devices are skipped and
/// reported; names that are not valid UTF-8 or not safe as object keys are skipped and reported.
///
/// Folders are opened relative to their already opened parent with `O_NOFOLLOW`, so a folder
/// swapped for a symlink during the walk is reported, not entered.
pub fn scan(root: &Path) -> Result<Scan> {
    enum Pending {
        Root(File),
        Child { parent: std::sync::Arc<File>, name: String, relative: String },
    }
    let mut scan = Scan::default();
    let root_folder = open_folder_nofollow(root).map_err(|source| Error::io("opening workspace", root, source))?;
    let mut folders = vec![Pending::Root(root_folder)];
    while let Some(pending) = folders.pop() {
        let (folder, relative_folder) = match pending {
            Pending::Root(folder) => (folder, String::new()),
            Pending::Child { parent, name, relative } => match open_folder_nofollow(&proc_path(&parent, &name)) {
                Ok(folder) => (folder, format!("{relative}/")),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) if matches!(error.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    scan.skipped.push(Skipped { path: relative, reason: "folder replaced by a symlink or file during the walk".to_owned() });
                    continue;
                }
                Err(source) => return Err(Error::io("opening folder", root.join(&relative), source)),
            },
        };
        let folder = std::sync::Arc::new(folder);
        let listing_error = |source| Error::io("listing", root.join(&relative_folder), source);
        let entries = std::fs::read_dir(proc_path(&folder, "")).map_err(listing_error)?;
        for entry in entries {
            let entry = entry.map_err(listing_error)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                scan.skipped.push(Skipped { path: format!("{relative_folder}{}", name.to_string_lossy()), reason: "name is not UTF-8".to_owned() });
                continue;
            };
            let relative = format!("{relative_folder}{name}");
            // `DirEntry::file_type` and `DirEntry::metadata` do not follow symlinks.
            let file_type = match entry.file_type() {
                Ok(file_type) => file_type,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(Error::io("inspecting", root.join(&relative), source)),
            };
            if file_type.is_symlink() {
                scan.skipped.push(Skipped { path: relative, reason: "symlink (never followed)".to_owned() });
            } else if file_type.is_dir() {
                folders.push(Pending::Child { parent: folder.clone(), name: name.to_owned(), relative });
            } else if file_type.is_file() {
                let path = match WorkspacePath::parse(&relative) {
                    Ok(path) => path,
                    Err(reason) => {
                        scan.skipped.push(Skipped { path: relative, reason });
                        continue;
                    }
                };
                let metadata = match entry.metadata() {
                    Ok(metadata) => metadata,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(Error::io("inspecting", root.join(&relative), source)),
                };
                scan.files.push(LocalFile { path, size: metadata.len(), mtime_ns: mtime_ns(&metadata) });
            } else {
                scan.skipped.push(Skipped { path: relative, reason: "special file (socket, FIFO or device)".to_owned() });
            }
        }
    }
    scan.files.sort_by(|left, right| left.path.cmp(&right.path));
    Ok(scan)
}

/// A workspace root opened once; everything below is reached through it.
pub struct Confined {
    root: File,
    root_path: PathBuf,
}

fn proc_path(folder: &File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", folder.as_raw_fd()))
}

fn open_folder_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

impl Confined {
    pub fn open(root: &Path) -> Result<Confined> {
        let root_file = open_folder_nofollow(root).map_err(|source| Error::io("opening workspace", root, source))?;
        Ok(Confined { root: root_file, root_path: root.to_path_buf() })
    }

    fn refused(&self, relative: &str, reason: &str) -> Error {
        Error::UnsafeNames(format!("{relative:?} in {}: {reason}", self.root_path.display()))
    }

    /// Opens (and with `owner`, creates) the folder holding `path`, never through a symlink.
    fn parent_folder(&self, path: &WorkspacePath, create: Option<Option<Ownership>>) -> Result<File> {
        let segments: Vec<&str> = path.as_str().split('/').collect();
        let mut folder = self.root.try_clone().map_err(|source| Error::io("opening workspace", &self.root_path, source))?;
        for segment in &segments[..segments.len() - 1] {
            let next = proc_path(&folder, segment);
            if let Some(owner) = create {
                match std::fs::create_dir(&next) {
                    Ok(()) => {
                        if let Some(owner) = owner {
                            change_owner(&next, owner);
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(Error::io("creating folder", path.under(&self.root_path), source)),
                }
            }
            folder = open_folder_nofollow(&next).map_err(|error| match error.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => self.refused(path.as_str(), "a folder on the way is a symlink or a file"),
                _ => Error::io("opening folder", path.under(&self.root_path), error),
            })?;
        }
        Ok(folder)
    }

    /// Creates a folder (and its parents) inside the workspace, owned by `owner`.
    pub fn create_folder(&self, relative: &WorkspacePath, owner: Option<Ownership>) -> Result<()> {
        let placeholder = WorkspacePath::parse(&format!("{relative}/x")).map_err(|reason| self.refused(relative.as_str(), &reason))?;
        self.parent_folder(&placeholder, Some(owner)).map(drop)
    }

    /// Opens a regular file for reading: never through a symlink, never a FIFO or device.
    pub fn open_file(&self, path: &WorkspacePath) -> Result<(File, Metadata)> {
        let folder = self.parent_folder(path, None)?;
        let name = path.as_str().rsplit('/').next().unwrap_or(path.as_str());
        // O_NONBLOCK: opening a FIFO someone swapped in must not hang the agent.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(proc_path(&folder, name))
            .map_err(|error| match error.raw_os_error() {
                Some(libc::ELOOP) => self.refused(path.as_str(), "is a symlink (never followed)"),
                _ => Error::io("opening", path.under(&self.root_path), error),
            })?;
        let metadata = file.metadata().map_err(|source| Error::io("inspecting", path.under(&self.root_path), source))?;
        if !metadata.is_file() {
            return Err(self.refused(path.as_str(), "is not a regular file"));
        }
        Ok((file, metadata))
    }

    /// Links a fully written staged file into place at `path`.
    pub fn place(&self, staged: &Path, path: &WorkspacePath, placement: Placement, owner: Option<Ownership>) -> Result<Placed> {
        let folder = self.parent_folder(path, Some(owner))?;
        let name = path.as_str().rsplit('/').next().unwrap_or(path.as_str());
        let target = proc_path(&folder, name);
        // A hard link never replaces an existing name: a file the user created meanwhile stays.
        match std::fs::hard_link(staged, &target) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => match placement {
                Placement::KeepExisting => {
                    let _ = std::fs::remove_file(staged);
                    return Ok(Placed::KeptExisting);
                }
                Placement::ReplaceExisting => {
                    // Before the container starts nobody else writes here: replace a leftover.
                    std::fs::rename(staged, &target).map_err(|source| Error::io("placing", path.under(&self.root_path), source))?;
                    return Ok(Placed::Placed);
                }
            },
            Err(source) => return Err(Error::io("placing", path.under(&self.root_path), source)),
        }
        std::fs::remove_file(staged).map_err(|source| Error::io("removing staged copy of", path.under(&self.root_path), source))?;
        Ok(Placed::Placed)
    }
}

/// What to do when the target name already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Before `workspace.materialized`: only leftovers of an interrupted run can be there.
    ReplaceExisting,
    /// After the container started: the user's own file wins.
    KeepExisting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Placed,
    KeptExisting,
}

/// Changes owner without following symlinks; a non-root agent can't, and says so once per call.
pub fn change_owner(path: &Path, owner: Ownership) {
    if let Err(error) = std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid)) {
        tracing::debug!(path = %path.display(), %error, "could not change owner");
    }
}

/// A file being written in the staging folder, hashed as it goes.
pub struct StagedFile {
    pub path: PathBuf,
    file: File,
    hasher: Sha256,
    written: u64,
}

/// What a finished staged file holds.
#[derive(Debug, Clone)]
pub struct StagedContent {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub mtime_ns: i64,
}

impl StagedFile {
    pub fn create(staging: &Path) -> Result<StagedFile> {
        std::fs::create_dir_all(staging).map_err(|source| Error::io("creating staging folder", staging, source))?;
        let path = staging.join(Uuid::new_v4().to_string());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|source| Error::io("creating", &path, source))?;
        Ok(StagedFile { path, file, hasher: Sha256::new(), written: 0 })
    }

    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.hasher.update(chunk);
        self.written += chunk.len() as u64;
        self.file.write_all(chunk).map_err(|source| Error::io("writing", &self.path, source))
    }

    /// Closes the file, gives it to `owner`, and reports its size, hash and mtime.
    pub fn finish(self, owner: Option<Ownership>) -> Result<StagedContent> {
        if let Some(owner) = owner {
            if let Err(error) = std::os::unix::fs::fchown(&self.file, Some(owner.uid), Some(owner.gid)) {
                tracing::debug!(path = %self.path.display(), %error, "could not change owner");
            }
        }
        let metadata = self.file.metadata().map_err(|source| Error::io("inspecting", &self.path, source))?;
        Ok(StagedContent { path: self.path, size: self.written, sha256: hex(&self.hasher.finalize()), mtime_ns: mtime_ns(&metadata) })
    }

    /// Removes a staged file that will not be placed.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads a whole file and hashes it.
pub fn read_and_hash(mut file: File, size_hint: u64) -> Result<(Vec<u8>, String)> {
    let mut content = Vec::with_capacity(usize::try_from(size_hint).unwrap_or(0));
    file.read_to_end(&mut content).map_err(|source| Error::io("reading", PathBuf::from("(workspace file)"), source))?;
    let digest = Sha256::digest(&content);
    Ok((content, hex(&digest)))
}

/// Hashes a file by streaming it.
pub fn hash_file(mut file: File) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file.read(&mut buffer).map_err(|source| Error::io("reading", PathBuf::from("(workspace file)"), source))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let directory = std::env::temp_dir().join(format!("berth-fsops-{}", Uuid::new_v4()));
        std::fs::create_dir_all(directory.join("workspace/a")).unwrap();
        std::fs::create_dir_all(directory.join("outside")).unwrap();
        std::fs::write(directory.join("outside/file"), b"host secret").unwrap();
        std::fs::write(directory.join("workspace/a/file"), b"mine").unwrap();
        directory
    }

    /// A folder swapped for a symlink after the walk can't lead a read or a write outside.
    #[test]
    fn a_folder_swapped_for_a_symlink_leads_nowhere() {
        let directory = scratch();
        let workspace = directory.join("workspace");
        let confined = Confined::open(&workspace).unwrap();
        let path = WorkspacePath::parse("a/file").unwrap();
        assert_eq!(read_and_hash(confined.open_file(&path).unwrap().0, 4).unwrap().0, b"mine");

        std::fs::remove_dir_all(workspace.join("a")).unwrap();
        std::os::unix::fs::symlink(directory.join("outside"), workspace.join("a")).unwrap();
        let refused = confined.open_file(&path).unwrap_err();
        assert!(matches!(refused, Error::UnsafeNames(_)), "{refused}");
        let mut staged = StagedFile::create(&directory.join("staging")).unwrap();
        staged.write(b"downloaded").unwrap();
        let staged = staged.finish(None).unwrap();
        let refused = confined.place(&staged.path, &WorkspacePath::parse("a/new").unwrap(), Placement::KeepExisting, None).unwrap_err();
        assert!(matches!(refused, Error::UnsafeNames(_)), "{refused}");
        assert!(!directory.join("outside/new").exists());
        assert_eq!(std::fs::read(directory.join("outside/file")).unwrap(), b"host secret");

        let scan = scan(&workspace).unwrap();
        assert!(scan.files.is_empty());
        assert_eq!(scan.skipped.len(), 1);
        assert_eq!(scan.skipped[0].path, "a");
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// Placing never replaces a file the user created meanwhile, unless told to.
    #[test]
    fn placement_keeps_or_replaces_existing_files() {
        let directory = scratch();
        let workspace = directory.join("workspace");
        let confined = Confined::open(&workspace).unwrap();
        let path = WorkspacePath::parse("a/file").unwrap();
        for (placement, expected, content) in [
            (Placement::KeepExisting, Placed::KeptExisting, b"mine".as_slice()),
            (Placement::ReplaceExisting, Placed::Placed, b"from the store".as_slice()),
        ] {
            let mut staged = StagedFile::create(&directory.join("staging")).unwrap();
            staged.write(b"from the store").unwrap();
            let staged = staged.finish(None).unwrap();
            assert_eq!(confined.place(&staged.path, &path, placement, None).unwrap(), expected);
            assert_eq!(std::fs::read(workspace.join("a/file")).unwrap(), content);
            assert!(!staged.path.exists(), "the staged copy is gone either way");
        }
        let nested = WorkspacePath::parse("b/c/d.txt").unwrap();
        let mut staged = StagedFile::create(&directory.join("staging")).unwrap();
        staged.write(b"deep").unwrap();
        let staged = staged.finish(None).unwrap();
        assert_eq!(confined.place(&staged.path, &nested, Placement::KeepExisting, None).unwrap(), Placed::Placed);
        assert_eq!(std::fs::read(workspace.join("b/c/d.txt")).unwrap(), b"deep");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
