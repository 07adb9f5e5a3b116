//! Local file-system work, all blocking (callers run it in `spawn_blocking`): walking a workspace
//! without following symlinks, opening files and folders so that nothing outside the workspace is
//! ever read or written, and placing downloaded files atomically.
//!
//! The workspace is writable by the user's container while we work in it, so checking a path and
//! then using it would race. Instead the workspace root is opened once and everything below it is
//! reached from that descriptor with `openat2(2)` and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: the
//! kernel refuses, in the same call that opens it, a path that would leave the root or that meets
//! a symlink anywhere on the way (a symlink planted there makes the open fail instead of leading
//! out). Names are then created, linked, renamed and removed with the `*at` calls inside the
//! opened parent folder, never through a path. A kernel without `openat2` (Linux before 5.6) gets
//! a clear error, never a weaker fallback.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, OFlags, ResolveFlags, StatxFlags};
use rustix::io::Errno;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::keys::WorkspacePath;
use crate::tree::{self, Mode, Tree};

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
    /// Permission bits (`MODE_MASK`).
    pub mode: u32,
}

/// Something in the workspace that can't be stored, and why. `remove` moves it to the preserved
/// area instead of deleting it. Its parent folder always has a storable name (the walk never
/// enters a folder whose name can't be a key; such a folder is one unsyncable entry).
#[derive(Debug, Clone)]
pub struct Unsyncable {
    /// The folder holding it (`None`: the workspace root).
    pub parent: Option<WorkspacePath>,
    /// Its name, byte for byte.
    pub name: OsString,
    /// The relative path for people: lossy UTF-8.
    pub path: String,
    pub reason: String,
}

/// What a walk of a workspace found.
#[derive(Debug, Default)]
pub struct Scan {
    pub files: Vec<LocalFile>,
    /// Symlinks, directories and non-default modes, as the sidecar records them.
    pub tree: Tree,
    pub unsyncable: Vec<Unsyncable>,
    /// Newest modification time of anything seen (nanoseconds since the epoch).
    pub newest_mtime_ns: i64,
}

pub fn mtime_ns(metadata: &Metadata) -> i64 {
    metadata.mtime().saturating_mul(1_000_000_000).saturating_add(metadata.mtime_nsec())
}

/// Walks `root` without following symlinks: regular files, directories and symlinks (their
/// target text) are recorded; names that can't be object keys, the reserved top-level `.berth`,
/// sockets, FIFOs and devices are reported as unsyncable (and never entered).
///
/// Folders are opened relative to their already opened parent with `openat2` refusing symlinks, so a folder
/// swapped for a symlink during the walk is reported, not entered.
pub fn scan(root: &Path) -> Result<Scan> {
    scan_within(root, &ScanLimits::UNBOUNDED)
}

/// Caps on what one walk takes in: a workspace is the user's, its size is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanLimits {
    /// More entries (files, folders, links, unsyncable ones) than this fail the walk.
    pub max_entries: usize,
    /// Folders deeper than this many levels are not entered: one unsyncable entry each.
    pub max_depth: usize,
}

impl ScanLimits {
    pub const UNBOUNDED: ScanLimits = ScanLimits { max_entries: usize::MAX, max_depth: usize::MAX };
}

/// [`scan`] within `limits`: `Error::OverLimit` past `max_entries`, and folders below
/// `max_depth` reported as unsyncable (kept, preserved at `remove`, never entered).
pub fn scan_within(root: &Path, limits: &ScanLimits) -> Result<Scan> {
    struct Pending {
        /// `None`: the root itself.
        relative: Option<WorkspacePath>,
        parent: Option<std::sync::Arc<File>>,
        name: OsString,
    }
    let mut scan = Scan::default();
    let root_folder = open_folder_nofollow(root).map_err(|source| Error::io("opening workspace", root, source))?;
    let root_folder = std::sync::Arc::new(root_folder);
    let mut folders = vec![Pending { relative: None, parent: None, name: OsString::new() }];
    while let Some(pending) = folders.pop() {
        let folder = match (&pending.parent, &pending.relative) {
            (None, _) | (_, None) => root_folder.clone(),
            (Some(parent), Some(relative)) => match open_beneath(parent.as_ref(), &pending.name, OFlags::DIRECTORY) {
                Ok(folder) => std::sync::Arc::new(folder),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) if matches!(error.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    scan.tree.directories.remove(relative.as_str());
                    scan.unsyncable.push(Unsyncable {
                        parent: relative.parent(),
                        name: pending.name.clone(),
                        path: relative.to_string(),
                        reason: "folder replaced by a symlink or file during the walk".to_owned(),
                    });
                    continue;
                }
                Err(source) => return Err(Error::io("opening folder", relative.under(root), source)),
            },
        };
        let relative_folder = pending.relative.clone();
        let prefix = relative_folder.as_ref().map(|folder| format!("{folder}/")).unwrap_or_default();
        let listing_error = |source| Error::io("listing", root.join(&prefix), source);
        for name in folder_names(&folder).map_err(listing_error)? {
            let name = name.map_err(listing_error)?;
            let seen = scan.files.len() + scan.tree.directories.len() + scan.tree.links.len() + scan.unsyncable.len();
            if seen >= limits.max_entries {
                return Err(Error::OverLimit(format!(
                    "{} holds more than {} entries (files, folders, links): nothing was synced; remove some",
                    root.display(),
                    limits.max_entries
                )));
            }
            let display = format!("{prefix}{}", name.to_string_lossy());
            let unsyncable =
                |reason: String| Unsyncable { parent: relative_folder.clone(), name: name.clone(), path: display.clone(), reason };
            // statx with AT_SYMLINK_NOFOLLOW: a symlink's own type, never its target's.
            let stat = match stat_at(folder.as_ref(), &name) {
                Ok(stat) => stat,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(Error::io("inspecting", root.join(&display), source)),
            };
            scan.newest_mtime_ns = scan.newest_mtime_ns.max(stat.mtime_ns);
            let Some(text) = name.to_str() else {
                scan.unsyncable.push(unsyncable("name is not UTF-8".to_owned()));
                continue;
            };
            let path = match WorkspacePath::parse(&format!("{prefix}{text}")) {
                Ok(path) => path,
                Err(reason) => {
                    scan.unsyncable.push(unsyncable(format!("name can't be an object key: {reason}")));
                    continue;
                }
            };
            if relative_folder.is_none() && text == tree::RESERVED_NAME {
                scan.unsyncable.push(unsyncable(format!("{} is reserved for Berth's tree metadata", tree::RESERVED_NAME)));
                continue;
            }
            let mode = stat.mode & tree::MODE_MASK;
            match stat.file_type {
                FileType::Symlink => match read_link_at(folder.as_ref(), &name) {
                    Ok(target) => match target.into_os_string().into_string() {
                        Ok(target) => {
                            scan.tree.links.insert(path.as_str().to_owned(), target);
                        }
                        Err(_) => scan.unsyncable.push(unsyncable("symlink target is not UTF-8".to_owned())),
                    },
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(Error::io("reading link", path.under(root), source)),
                },
                FileType::Directory if path.as_str().split('/').count() >= limits.max_depth => {
                    scan.unsyncable.push(unsyncable(format!("folder deeper than {} levels: not entered", limits.max_depth)));
                }
                FileType::Directory => {
                    scan.tree.directories.insert(path.as_str().to_owned(), Mode(mode));
                    folders.push(Pending { relative: Some(path), parent: Some(folder.clone()), name: name.clone() });
                }
                FileType::RegularFile => {
                    if mode != tree::DEFAULT_FILE_MODE {
                        scan.tree.modes.insert(path.as_str().to_owned(), Mode(mode));
                    }
                    scan.files.push(LocalFile { path, size: stat.size, mtime_ns: stat.mtime_ns, mode });
                }
                _ => scan.unsyncable.push(unsyncable("special file (socket, FIFO or device) can't be stored".to_owned())),
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

/// Resolution for every open below a workspace (or preserved) folder: `openat2(2)` refuses a
/// path that would leave the folder it starts from (`RESOLVE_BENEATH`: no `..` out, no absolute
/// path) and any symlink anywhere on the way, the last component included
/// (`RESOLVE_NO_SYMLINKS`), in one call that checks each component as the kernel walks it.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);

/// Opens `path` below the opened `folder` with `openat2` and [`BENEATH`]. `O_NOFOLLOW` and
/// `O_CLOEXEC` are always added. A kernel without `openat2` (before Linux 5.6, or a seccomp
/// filter that refuses it) is an error that says so: there is no weaker fallback.
fn open_beneath(folder: &File, path: impl AsRef<OsStr>, flags: OFlags) -> std::io::Result<File> {
    let path = path.as_ref();
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // EAGAIN: the kernel could not rule out a `..` race (never in a parsed key); its advice is to retry.
    let mut attempts = 0;
    loop {
        match rustix::fs::openat2(folder, path, flags, rustix::fs::Mode::empty(), BENEATH) {
            Ok(opened) => return Ok(File::from(opened)),
            Err(Errno::AGAIN) if attempts < 8 => attempts += 1,
            Err(Errno::NOSYS) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "openat2 is not available (it needs Linux 5.6 or later, and no seccomp filter refusing it): \
                     workspace files are only opened through it, so that nothing outside the workspace is reached",
                ))
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// What `statx` says of one entry, never following it.
struct EntryStat {
    file_type: FileType,
    mode: u32,
    size: u64,
    mtime_ns: i64,
}

fn stat_at(folder: &File, name: &OsStr) -> std::io::Result<EntryStat> {
    let wanted = StatxFlags::TYPE | StatxFlags::MODE | StatxFlags::SIZE | StatxFlags::MTIME;
    let stat = rustix::fs::statx(folder, name, AtFlags::SYMLINK_NOFOLLOW, wanted)?;
    let mode = u32::from(stat.stx_mode);
    Ok(EntryStat {
        file_type: FileType::from_raw_mode(mode),
        mode: mode & 0o7777,
        size: stat.stx_size,
        mtime_ns: stat.stx_mtime.tv_sec.saturating_mul(1_000_000_000).saturating_add(i64::from(stat.stx_mtime.tv_nsec)),
    })
}

/// `std`'s metadata of the entry at `path` below `folder`, never following it: the entry is
/// opened with `O_PATH | O_NOFOLLOW` (a symlink gives a descriptor of the link itself).
fn metadata_beneath(folder: &File, path: impl AsRef<OsStr>) -> std::io::Result<Metadata> {
    open_beneath(folder, path, OFlags::PATH)?.metadata()
}

/// The names in an opened folder (without `.` and `..`), read through its descriptor.
fn folder_names(folder: &File) -> std::io::Result<impl Iterator<Item = std::io::Result<OsString>>> {
    let listing = rustix::fs::Dir::read_from(folder)?;
    Ok(listing.filter_map(|entry| match entry {
        Ok(entry) => match entry.file_name().to_bytes() {
            b"." | b".." => None,
            name => Some(Ok(OsStr::from_bytes(name).to_os_string())),
        },
        Err(error) => Some(Err(error.into())),
    }))
}

/// A symlink's target text, read from its folder's descriptor (never resolved).
fn read_link_at(folder: &File, name: &OsStr) -> std::io::Result<PathBuf> {
    let target = rustix::fs::readlinkat(folder, name, Vec::new())?;
    Ok(PathBuf::from(OsString::from_vec(target.into_bytes())))
}

/// Changes the owner of `name` in `folder` without following it (see [`change_owner`]).
fn change_owner_at(folder: &File, name: &OsStr, owner: Ownership) {
    let (uid, gid) = (rustix::fs::Uid::from_raw(owner.uid), rustix::fs::Gid::from_raw(owner.gid));
    if let Err(error) = rustix::fs::chownat(folder, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW) {
        tracing::debug!(name = %name.to_string_lossy(), %error, "could not change owner");
    }
}

/// Removes the folder `name` in `folder` and everything in it, descending through descriptors:
/// every folder is opened with [`open_beneath`] (a folder swapped for a symlink meanwhile makes
/// this fail, it is never entered) and links are removed as links.
fn remove_all_at(folder: &File, name: &OsStr) -> std::io::Result<()> {
    let inner = open_beneath(folder, name, OFlags::DIRECTORY)?;
    for entry in folder_names(&inner)? {
        let entry = entry?;
        let removed = match stat_at(&inner, &entry) {
            Ok(stat) if stat.file_type == FileType::Directory => remove_all_at(&inner, &entry),
            Ok(_) => rustix::fs::unlinkat(&inner, &entry, AtFlags::empty()).map_err(std::io::Error::from),
            Err(error) => Err(error),
        };
        match removed {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    rustix::fs::unlinkat(folder, name, AtFlags::REMOVEDIR)?;
    Ok(())
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

    /// The error of an `openat2` below the root: a symlink or a file on the way (or an escape,
    /// which a parsed key can't express) is refused; anything else is an I/O error.
    fn open_error(&self, action: &'static str, path: &WorkspacePath, reason: &str, error: std::io::Error) -> Error {
        match error.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => self.refused(path.as_str(), reason),
            Some(libc::EXDEV) => self.refused(path.as_str(), "leads outside the workspace"),
            _ => Error::io(action, path.under(&self.root_path), error),
        }
    }

    /// Opens (and with `owner`, creates) the folder holding `path`, never through a symlink: one
    /// `openat2` when the folders are there; otherwise each missing folder is made in its opened
    /// parent and opened in turn.
    fn parent_folder(&self, path: &WorkspacePath, create: Option<Option<Ownership>>) -> Result<File> {
        const ON_THE_WAY: &str = "a folder on the way is a symlink or a file";
        let Some(parent) = path.parent() else {
            return self.root.try_clone().map_err(|source| Error::io("opening workspace", &self.root_path, source));
        };
        let missing = match open_beneath(&self.root, parent.as_str(), OFlags::DIRECTORY) {
            Ok(folder) => return Ok(folder),
            Err(error) if create.is_some() && error.kind() == std::io::ErrorKind::NotFound => error,
            Err(error) => return Err(self.open_error("opening folder", path, ON_THE_WAY, error)),
        };
        let Some(owner) = create else {
            return Err(Error::io("opening folder", path.under(&self.root_path), missing));
        };
        let mut folder = self.root.try_clone().map_err(|source| Error::io("opening workspace", &self.root_path, source))?;
        for segment in parent.as_str().split('/') {
            match rustix::fs::mkdirat(&folder, segment, rustix::fs::Mode::from_raw_mode(0o777)) {
                Ok(()) => {
                    if let Some(owner) = owner {
                        change_owner_at(&folder, OsStr::new(segment), owner);
                    }
                }
                Err(Errno::EXIST) => {}
                Err(error) => return Err(Error::io("creating folder", path.under(&self.root_path), error.into())),
            }
            folder = open_beneath(&folder, segment, OFlags::DIRECTORY)
                .map_err(|error| self.open_error("opening folder", path, ON_THE_WAY, error))?;
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
        // O_NONBLOCK: opening a FIFO someone swapped in must not hang the agent.
        let file = open_beneath(&self.root, path.as_str(), OFlags::RDONLY | OFlags::NONBLOCK).map_err(|error| {
            self.open_error("opening", path, "is a symlink, or a folder on the way is a symlink or a file (never followed)", error)
        })?;
        let metadata = file.metadata().map_err(|source| Error::io("inspecting", path.under(&self.root_path), source))?;
        if !metadata.is_file() {
            return Err(self.refused(path.as_str(), "is not a regular file"));
        }
        Ok((file, metadata))
    }

    /// Opens a folder inside the workspace (creating it and its parents with `owner` when asked).
    pub fn folder(&self, relative: Option<&WorkspacePath>, create: Option<Option<Ownership>>) -> Result<File> {
        let Some(relative) = relative else {
            return self.root.try_clone().map_err(|source| Error::io("opening workspace", &self.root_path, source));
        };
        let placeholder = WorkspacePath::parse(&format!("{relative}/x")).map_err(|reason| self.refused(relative.as_str(), &reason))?;
        self.parent_folder(&placeholder, create)
    }

    /// Gives a folder its permission bits.
    pub fn set_folder_mode(&self, relative: &WorkspacePath, mode: u32) -> Result<()> {
        let folder = self.folder(Some(relative), None)?;
        folder
            .set_permissions(std::fs::Permissions::from_mode(mode & tree::MODE_MASK))
            .map_err(|source| Error::io("setting mode of", relative.under(&self.root_path), source))
    }

    /// Creates a symlink holding `target` verbatim, inside the opened parent folder: the link is
    /// never followed, wherever it points. An existing link with the same target is left alone;
    /// with `Placement::ReplaceExisting` another link or file in its place is replaced.
    pub fn create_symlink(&self, path: &WorkspacePath, target: &str, placement: Placement, owner: Option<Ownership>) -> Result<Placed> {
        let folder = self.parent_folder(path, Some(owner))?;
        let name = OsStr::new(path.file_name());
        for _ in 0..2 {
            match rustix::fs::symlinkat(target, &folder, name) {
                Ok(()) => {
                    if let Some(owner) = owner {
                        change_owner_at(&folder, name, owner);
                    }
                    return Ok(Placed::Placed);
                }
                Err(Errno::EXIST) => {
                    let existing = stat_at(&folder, name).map_err(|source| Error::io("inspecting", path.under(&self.root_path), source))?;
                    if existing.file_type == FileType::Symlink && read_link_at(&folder, name).is_ok_and(|found| found.as_os_str() == target)
                    {
                        return Ok(Placed::Placed);
                    }
                    if placement == Placement::KeepExisting || existing.file_type == FileType::Directory {
                        return Ok(Placed::KeptExisting);
                    }
                    rustix::fs::unlinkat(&folder, name, AtFlags::empty())
                        .map_err(|source| Error::io("replacing", path.under(&self.root_path), source.into()))?;
                }
                Err(source) => return Err(Error::io("creating link", path.under(&self.root_path), source.into())),
            }
        }
        Ok(Placed::KeptExisting)
    }

    /// The workspace folder this was opened on.
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// What is at `path`, never following it (a symlink is reported as a symlink); `None` when
    /// nothing is there, or a folder on the way is missing.
    pub fn entry_metadata(&self, path: &WorkspacePath) -> Result<Option<Metadata>> {
        match metadata_beneath(&self.root, path.as_str()) {
            Ok(metadata) => Ok(Some(metadata)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(self.open_error("inspecting", path, "a folder on the way is a symlink or a file", error)),
        }
    }

    /// The entries of a folder (`None`: the workspace root), none of them followed, in name order.
    pub fn list_folder(&self, relative: Option<&WorkspacePath>) -> Result<Vec<FolderEntry>> {
        let folder = self.folder(relative, None)?;
        let shown = relative.map(|relative| relative.under(&self.root_path)).unwrap_or_else(|| self.root_path.clone());
        let listing_error = |source| Error::io("listing", shown.clone(), source);
        let mut entries = Vec::new();
        for name in folder_names(&folder).map_err(listing_error)? {
            let name = name.map_err(listing_error)?;
            let metadata = match metadata_beneath(&folder, &name) {
                Ok(metadata) => metadata,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(Error::io("inspecting", shown.join(&name), source)),
            };
            let link_target = if metadata.file_type().is_symlink() { read_link_at(&folder, &name).ok() } else { None };
            entries.push(FolderEntry { name, metadata, link_target });
        }
        entries.sort_by(|left, right| left.name.cmp(&right.name));
        Ok(entries)
    }

    /// Removes what is at `path` without following it: a file, symlink or special file; a folder
    /// when it is empty, or with everything in it under [`Removal::Recursive`] (whose walk opens
    /// every folder with `openat2` refusing symlinks and removes links as links).
    pub fn remove_entry(&self, path: &WorkspacePath, removal: Removal) -> Result<()> {
        let folder = self.parent_folder(path, None)?;
        let name = OsStr::new(path.file_name());
        let stat = stat_at(&folder, name).map_err(|source| Error::io("inspecting", path.under(&self.root_path), source))?;
        let removed = match (stat.file_type == FileType::Directory, removal) {
            (false, _) => rustix::fs::unlinkat(&folder, name, AtFlags::empty()).map_err(std::io::Error::from),
            (true, Removal::EmptyFolder) => rustix::fs::unlinkat(&folder, name, AtFlags::REMOVEDIR).map_err(std::io::Error::from),
            (true, Removal::Recursive) => remove_all_at(&folder, name),
        };
        removed.map_err(|source| Error::io("removing", path.under(&self.root_path), source))
    }

    /// Moves the entry at `from` to `to` inside the workspace (creating `to`'s folders, owned by
    /// `owner`), never following either name and never replacing anything: `Ok(false)` when `to`
    /// is taken. Files, links and special files move by link(2) then unlink, which cannot
    /// replace; folders by rename(2) after checking `to` is free (rename onto a non-empty folder
    /// fails anyway, so only an empty folder created in that instant could be replaced).
    pub fn rename_entry(&self, from: &WorkspacePath, to: &WorkspacePath, owner: Option<Ownership>) -> Result<bool> {
        let from_folder = self.parent_folder(from, None)?;
        let source = OsStr::new(from.file_name());
        let stat = stat_at(&from_folder, source).map_err(|source| Error::io("inspecting", from.under(&self.root_path), source))?;
        let to_folder = self.parent_folder(to, Some(owner))?;
        let destination = OsStr::new(to.file_name());
        let moved = |error: Errno| Error::io("moving", from.under(&self.root_path), error.into());
        if stat.file_type != FileType::Directory {
            // linkat without AT_SYMLINK_FOLLOW links a symlink itself, never its target.
            match rustix::fs::linkat(&from_folder, source, &to_folder, destination, AtFlags::empty()) {
                Ok(()) => {
                    rustix::fs::unlinkat(&from_folder, source, AtFlags::empty()).map_err(moved)?;
                    return Ok(true);
                }
                Err(Errno::EXIST) => return Ok(false),
                // protected_hardlinks refuses linking another user's file for a non-root agent.
                Err(Errno::PERM) => {}
                Err(error) => return Err(moved(error)),
            }
        }
        match stat_at(&to_folder, destination) {
            Ok(_) => return Ok(false),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::io("inspecting", to.under(&self.root_path), source)),
        }
        rustix::fs::renameat(&from_folder, source, &to_folder, destination).map_err(moved)?;
        Ok(true)
    }

    /// Whether anything (a file, folder, link, …) has the name `path`; never follows a link.
    pub fn exists(&self, path: &WorkspacePath) -> Result<bool> {
        match metadata_beneath(&self.root, path.as_str()) {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(self.open_error("inspecting", path, "a folder on the way is a symlink or a file", error)),
        }
    }

    /// Renames the regular file at `path` to `new_path` in the same folder, never replacing
    /// anything. `Ok(false)` when `new_path` is taken.
    pub fn rename_aside(&self, path: &WorkspacePath, new_path: &WorkspacePath) -> Result<bool> {
        let folder = self.parent_folder(path, None)?;
        let from = OsStr::new(path.file_name());
        // link(2) doesn't follow `from` and never replaces `to`.
        match rustix::fs::linkat(&folder, from, &folder, new_path.file_name(), AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Ok(false),
            Err(source) => return Err(Error::io("keeping a conflict copy of", path.under(&self.root_path), source.into())),
        }
        rustix::fs::unlinkat(&folder, from, AtFlags::empty())
            .map_err(|source| Error::io("moving aside", path.under(&self.root_path), source.into()))?;
        Ok(true)
    }

    /// Moves one entry (by its raw name in an opened folder) to `destination`, outside the
    /// workspace. When the workspace is a file system of its own (`EXDEV`: an image-backed
    /// workspace) the entry is copied (flushed), then deleted here.
    pub fn move_out(&self, parent: Option<&WorkspacePath>, name: &OsStr, destination: &Path) -> Result<()> {
        let folder = self.folder(parent, None)?;
        match rustix::fs::renameat(&folder, name, rustix::fs::CWD, destination) {
            Ok(()) => Ok(()),
            Err(Errno::XDEV) => {
                copy_entry_at(&folder, name, destination)?;
                let is_folder = stat_at(&folder, name).is_ok_and(|stat| stat.file_type == FileType::Directory);
                let removed = if is_folder {
                    remove_all_at(&folder, name)
                } else {
                    rustix::fs::unlinkat(&folder, name, AtFlags::empty()).map_err(std::io::Error::from)
                };
                removed.map_err(|error| Error::io("removing the preserved original", destination, error))
            }
            Err(source) => Err(Error::io("preserving", destination, source.into())),
        }
    }

    /// Links a fully written staged file into place at `path`, with permission bits `mode`.
    pub fn place(&self, staged: &Path, path: &WorkspacePath, placement: Placement, owner: Option<Ownership>, mode: u32) -> Result<Placed> {
        // The staged file is ours (outside the workspace): give it its mode before anyone sees it.
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(mode & tree::MODE_MASK))
            .map_err(|source| Error::io("setting mode of", staged, source))?;
        let folder = self.parent_folder(path, Some(owner))?;
        let name = path.file_name();
        // A hard link never replaces an existing name: a file the user created meanwhile stays.
        match rustix::fs::linkat(rustix::fs::CWD, staged, &folder, name, AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::EXIST) => match placement {
                Placement::KeepExisting => {
                    let _ = std::fs::remove_file(staged);
                    return Ok(Placed::KeptExisting);
                }
                Placement::ReplaceExisting => {
                    // Before the container starts nobody else writes here: replace a leftover.
                    rustix::fs::renameat(rustix::fs::CWD, staged, &folder, name)
                        .map_err(|source| Error::io("placing", path.under(&self.root_path), source.into()))?;
                    return Ok(Placed::Placed);
                }
            },
            Err(source) => return Err(Error::io("placing", path.under(&self.root_path), source.into())),
        }
        std::fs::remove_file(staged).map_err(|source| Error::io("removing staged copy of", path.under(&self.root_path), source))?;
        Ok(Placed::Placed)
    }
}

/// [`copy_entry_at`] of the entry at a path (its folder opened first).
#[cfg(test)]
fn copy_entry(source: &Path, destination: &Path) -> Result<()> {
    let failed = |error: std::io::Error| Error::io("opening the original of", destination, error);
    let name = source.file_name().ok_or_else(|| failed(std::io::Error::other("no name to copy")))?;
    let parent = source.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let folder = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(parent).map_err(failed)?;
    copy_entry_at(&folder, name, destination)
}

/// Copies the entry `name` of an opened folder without following links, descending through
/// descriptors: files with their bits (flushed), folders recursively, links as links, FIFOs
/// recreated. Sockets and devices can't be copied: an error, so the directory they are in is kept.
fn copy_entry_at(folder: &File, name: &OsStr, destination: &Path) -> Result<()> {
    let failed = |action: &'static str| move |error: std::io::Error| Error::io(action, destination, error);
    let stat = stat_at(folder, name).map_err(failed("inspecting the original of"))?;
    let mode = stat.mode & tree::MODE_MASK;
    match stat.file_type {
        FileType::Symlink => {
            let target = read_link_at(folder, name).map_err(failed("reading the link for"))?;
            std::os::unix::fs::symlink(target, destination).map_err(failed("copying link to"))
        }
        FileType::Directory => {
            std::fs::create_dir(destination).map_err(failed("creating"))?;
            let inner = open_beneath(folder, name, OFlags::DIRECTORY).map_err(failed("opening the original of"))?;
            for entry in folder_names(&inner).map_err(failed("listing the original of"))? {
                let entry = entry.map_err(failed("listing the original of"))?;
                copy_entry_at(&inner, &entry, &destination.join(&entry))?;
            }
            std::fs::set_permissions(destination, std::fs::Permissions::from_mode(mode)).map_err(failed("setting mode of"))
        }
        FileType::RegularFile => {
            let mut input = open_beneath(folder, name, OFlags::RDONLY | OFlags::NONBLOCK).map_err(failed("opening the original of"))?;
            let mut output = OpenOptions::new().write(true).create_new(true).mode(mode).open(destination).map_err(failed("creating"))?;
            std::io::copy(&mut input, &mut output).map_err(failed("copying to"))?;
            output.sync_all().map_err(failed("flushing"))
        }
        FileType::Fifo => {
            // std has no mkfifo and this crate forbids unsafe code: the coreutils/busybox tool does it.
            let made = std::process::Command::new("mkfifo").arg("-m").arg(format!("{mode:o}")).arg(destination).status();
            match made {
                Ok(status) if status.success() => Ok(()),
                Ok(status) => Err(Error::io("recreating FIFO", destination, std::io::Error::other(format!("mkfifo exited with {status}")))),
                Err(error) => Err(Error::io("recreating FIFO", destination, error)),
            }
        }
        _ => Err(Error::io("preserving", destination, std::io::Error::other("a socket or device can't be copied to another file system"))),
    }
}

/// One entry of a folder as [`Confined::list_folder`] found it, never followed.
#[derive(Debug)]
pub struct FolderEntry {
    /// Its name, byte for byte.
    pub name: OsString,
    /// Of the entry itself (a symlink's own metadata).
    pub metadata: Metadata,
    /// A symlink's target text, never resolved.
    pub link_target: Option<PathBuf>,
}

/// How much [`Confined::remove_entry`] may remove when the entry is a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Only an empty folder.
    EmptyFolder,
    /// The folder and everything in it.
    Recursive,
}

impl Scan {
    /// The bytes of all regular files found: what the profile's `quota_mib` limits.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|file| file.size).sum()
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

/// Reads a file and hashes it: at most `size` bytes (its size when it was inspected), so a file
/// that grows meanwhile is not read forever.
pub fn read_and_hash(file: File, size: u64) -> Result<(Vec<u8>, String)> {
    let mut content = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(size).read_to_end(&mut content).map_err(|source| Error::io("reading", PathBuf::from("(workspace file)"), source))?;
    let digest = Sha256::digest(&content);
    Ok((content, hex(&digest)))
}

/// Hashes a file by streaming it: at most the size it had when this started.
pub fn hash_file(file: File) -> Result<String> {
    let size = file.metadata().map_err(|source| Error::io("inspecting", PathBuf::from("(workspace file)"), source))?.len();
    let mut file = file.take(size);
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
        let refused =
            confined.place(&staged.path, &WorkspacePath::parse("a/new").unwrap(), Placement::KeepExisting, None, 0o644).unwrap_err();
        assert!(matches!(refused, Error::UnsafeNames(_)), "{refused}");
        assert!(!directory.join("outside/new").exists());
        assert_eq!(std::fs::read(directory.join("outside/file")).unwrap(), b"host secret");

        let scan = scan(&workspace).unwrap();
        assert!(scan.files.is_empty());
        assert!(scan.unsyncable.is_empty());
        assert_eq!(
            scan.tree.links.get("a").map(String::as_str),
            Some(directory.join("outside").to_str().unwrap()),
            "kept as a link, never entered"
        );
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// `openat2` itself refuses what no parsed key can express: `..` out of the workspace, an
    /// absolute path, a symlink as the last component; a recursive removal removes a link inside
    /// as a link and leaves what it points to alone.
    #[test]
    fn openat2_refuses_escapes_and_links() {
        let directory = scratch();
        let workspace = directory.join("workspace");
        let root = open_folder_nofollow(&workspace).unwrap();
        for escape in ["../outside/file", "a/../../outside/file"] {
            let refused = open_beneath(&root, escape, OFlags::RDONLY).unwrap_err();
            assert_eq!(refused.raw_os_error(), Some(libc::EXDEV), "{escape}: {refused}");
        }
        let absolute = directory.join("outside/file");
        assert_eq!(open_beneath(&root, &absolute, OFlags::RDONLY).unwrap_err().raw_os_error(), Some(libc::EXDEV));
        std::os::unix::fs::symlink(directory.join("outside/file"), workspace.join("a/link")).unwrap();
        assert_eq!(open_beneath(&root, "a/link", OFlags::RDONLY).unwrap_err().raw_os_error(), Some(libc::ELOOP));

        let confined = Confined::open(&workspace).unwrap();
        let link = WorkspacePath::parse("a/link").unwrap();
        assert!(confined.entry_metadata(&link).unwrap().unwrap().file_type().is_symlink(), "the link itself, not its target");
        confined.remove_entry(&WorkspacePath::parse("a").unwrap(), Removal::Recursive).unwrap();
        assert!(!workspace.join("a").exists());
        assert_eq!(std::fs::read(directory.join("outside/file")).unwrap(), b"host secret");
        std::fs::remove_dir_all(&directory).unwrap();
    }

    /// The cross-file-system fallback of preserving keeps names, bytes, bits, links and FIFOs.
    #[test]
    fn copy_entry_keeps_what_it_copies() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::FileTypeExt;
        let directory = scratch();
        let source = directory.join("bad\\folder");
        std::fs::create_dir_all(source.join("inner")).unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"caf\xe9");
        std::fs::write(source.join("inner").join(odd), b"bytes").unwrap();
        std::fs::set_permissions(source.join("inner").join(odd), std::fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", source.join("link")).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(source.join("pipe")).status().unwrap().success());
        let copy = directory.join("copy");
        copy_entry(&source, &copy).unwrap();
        let file = copy.join("inner").join(odd);
        assert_eq!(std::fs::read(&file).unwrap(), b"bytes");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o751);
        assert_eq!(std::fs::read_link(copy.join("link")).unwrap(), PathBuf::from("/etc/passwd"));
        assert!(std::fs::symlink_metadata(copy.join("pipe")).unwrap().file_type().is_fifo());
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
            assert_eq!(confined.place(&staged.path, &path, placement, None, 0o644).unwrap(), expected);
            assert_eq!(std::fs::read(workspace.join("a/file")).unwrap(), content);
            assert!(!staged.path.exists(), "the staged copy is gone either way");
        }
        let nested = WorkspacePath::parse("b/c/d.txt").unwrap();
        let mut staged = StagedFile::create(&directory.join("staging")).unwrap();
        staged.write(b"deep").unwrap();
        let staged = staged.finish(None).unwrap();
        assert_eq!(confined.place(&staged.path, &nested, Placement::KeepExisting, None, 0o644).unwrap(), Placed::Placed);
        assert_eq!(std::fs::read(workspace.join("b/c/d.txt")).unwrap(), b"deep");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
