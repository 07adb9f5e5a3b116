//! Per-session file systems: with `workspace.filesystem = "image"` each session's workspace is an
//! ext4 image of its own, so `quota_mib` is a hard limit (`ENOSPC` inside the container) and a full
//! workspace can't fill the disk Docker, Redis and RabbitMQ share. Blocking: call from
//! `spawn_blocking`.
//!
//! Layout, all under `<deployment_root>/.berth-images/` (outside what the container sees):
//!
//! - `<session>.img`: a sparse file of about `quota_mib` (see [`image_bytes`]) holding the ext4;
//! - `<session>.fs/`: where the image is mounted (`loop,nodev,nosuid`); inside it `workspace/` (the
//!   user's files), `staging/` (downloads, hard-linked into `workspace/`: same file system, so a
//!   download in progress counts against the quota too) and ext4's `lost+found`;
//! - `Profile::session_dir(session)` is a bind mount of `<session>.fs/workspace`: the path the
//!   container agent bind-mounts into the container, as with a plain directory.
//!
//! The image file is the record that a session is image-backed: while it exists the directory is
//! (re-)mounted before anything reads or writes it, and a sync of an image-backed session whose
//! mount can't be made is refused (an unmounted mount point is an empty folder: syncing it would
//! look like "the user deleted everything"). [`release`] removes the image last.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::fsops::{self, Ownership};

/// Folder of images and their mount points, next to the manifests.
pub const IMAGES_DIR: &str = ".berth-images";
const WORKSPACE_FOLDER: &str = "workspace";
const STAGING_FOLDER: &str = "staging";
/// ext4 metadata (inode tables, bitmaps, a 4 MiB journal) takes about 5 % of an image: the image
/// is this much larger than the quota, so a workspace of exactly `quota_mib` still fits.
const OVERHEAD_PERCENT: u64 = 6;
const OVERHEAD_FIXED_BYTES: u64 = 8 * 1024 * 1024;
/// Free space below this (or no free inode) counts as full.
const FULL_BELOW_BYTES: u64 = 1024 * 1024;

/// The size of the image for a quota: enough for `quota_bytes` of files plus ext4's metadata.
pub fn image_bytes(quota_bytes: u64) -> u64 {
    let bytes = quota_bytes + quota_bytes / 100 * OVERHEAD_PERCENT + OVERHEAD_FIXED_BYTES;
    bytes.div_ceil(4096) * 4096
}

/// Where the parts of one session's image live.
#[derive(Debug, Clone)]
pub struct Volume {
    pub image: PathBuf,
    pub mount_point: PathBuf,
    /// `Profile::session_dir`: the bind mount the container sees.
    pub session_dir: PathBuf,
}

impl Volume {
    pub fn of(deployment_root: &Path, session: &str) -> Volume {
        let images = deployment_root.join(IMAGES_DIR);
        Volume {
            image: images.join(format!("{session}.img")),
            mount_point: images.join(format!("{session}.fs")),
            session_dir: deployment_root.join(session),
        }
    }

    /// The workspace as the agent reads and writes it (inside the image's own mount, so staged
    /// downloads can be hard-linked into it).
    pub fn workspace(&self) -> PathBuf {
        self.mount_point.join(WORKSPACE_FOLDER)
    }

    pub fn staging(&self) -> PathBuf {
        self.mount_point.join(STAGING_FOLDER)
    }

    pub fn exists(&self) -> bool {
        std::fs::symlink_metadata(&self.image).is_ok()
    }

    /// An image-backed session whose image is gone (its mount point is still there): its
    /// directory must not be taken for an empty workspace.
    pub fn lost(&self) -> bool {
        !self.exists() && std::fs::symlink_metadata(&self.mount_point).is_ok()
    }
}

/// Free and used space of a mounted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub available_inodes: u64,
}

impl Usage {
    pub fn full(&self) -> bool {
        self.available_bytes < FULL_BELOW_BYTES || self.available_inodes == 0
    }
}

fn failed(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Filesystem(format!("{what}: {detail}"))
}

fn run(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|error| failed(&shown, error))?;
    if output.status.success() {
        return Ok(());
    }
    Err(failed(&shown, format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim())))
}

/// Decodes a mountinfo path (`\040` for a space and the like).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && index + 3 < bytes.len() && bytes[index + 1..index + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[index + 1] - b'0') * 64 + (bytes[index + 2] - b'0') * 8 + (bytes[index + 3] - b'0');
            out.push(value);
            index += 4;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/self/mountinfo`: device, root within it, mount point.
#[derive(Debug, Clone)]
struct MountEntry {
    device: String,
    root: String,
    mount_point: PathBuf,
}

fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::io("reading", "/proc/self/mountinfo", source))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            Some(MountEntry {
                device: fields.get(2)?.to_string(),
                root: unescape(fields.get(3)?),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
            })
        })
        .collect())
}

/// `path` as the kernel names it (symlinks in its parents resolved).
fn kernel_path(path: &Path) -> PathBuf {
    match (path.parent().and_then(|parent| std::fs::canonicalize(parent).ok()), path.file_name()) {
        (Some(parent), Some(name)) => parent.join(name),
        _ => path.to_path_buf(),
    }
}

/// The topmost mount at `path`, if any.
fn mount_at(entries: &[MountEntry], path: &Path) -> Option<MountEntry> {
    let wanted = kernel_path(path);
    entries.iter().rev().find(|entry| entry.mount_point == wanted).cloned()
}

/// The mount table at one moment, for checking many volumes with one read of it.
pub struct MountTable(Vec<MountEntry>);

impl MountTable {
    pub fn read() -> Result<MountTable> {
        mounts().map(MountTable)
    }

    /// Whether the image is mounted and the session directory is its bind mount.
    pub fn attached(&self, volume: &Volume) -> bool {
        attached_in(&self.0, volume)
    }
}

/// Whether the image is mounted and the session directory is its bind mount.
pub fn is_attached(volume: &Volume) -> Result<bool> {
    Ok(attached_in(&mounts()?, volume))
}

fn attached_in(entries: &[MountEntry], volume: &Volume) -> bool {
    let (Some(image), Some(bound)) = (mount_at(entries, &volume.mount_point), mount_at(entries, &volume.session_dir)) else { return false };
    image.root == "/" && bound.device == image.device && bound.root == format!("/{WORKSPACE_FOLDER}")
}

fn folder_is_empty(path: &Path) -> Result<bool> {
    match std::fs::read_dir(path) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(Error::io("listing", path, source)),
    }
}

/// Creates the image (when `create` and it doesn't exist yet) and mounts it with the session
/// directory bound to its workspace folder. Idempotent: whatever part is already in place stays.
/// Returns `false` when there is no image and none was to be made.
pub fn attach(volume: &Volume, quota_bytes: u64, owner: Option<Ownership>, create: bool) -> Result<bool> {
    if !volume.exists() {
        if !create {
            return Ok(false);
        }
        if !folder_is_empty(&volume.session_dir)? {
            return Err(failed(
                &volume.session_dir.display().to_string(),
                "is a plain directory with content; it is not hidden under a new image (sync and remove it first)",
            ));
        }
        make_image(volume, quota_bytes)?;
    }
    let entries = mounts()?;
    let image_mount = mount_at(&entries, &volume.mount_point);
    if image_mount.is_none() {
        std::fs::create_dir_all(&volume.mount_point).map_err(|source| Error::io("creating mount point", &volume.mount_point, source))?;
        run(Command::new("mount").arg("-t").arg("ext4").arg("-o").arg("loop,nodev,nosuid").arg(&volume.image).arg(&volume.mount_point))?;
    }
    for folder in [volume.workspace(), volume.staging()] {
        match std::fs::create_dir(&folder) {
            Ok(()) => {
                if let Some(owner) = owner.filter(|_| folder == volume.workspace()) {
                    fsops::change_owner(&folder, owner);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(Error::io("creating folder in image", &folder, source)),
        }
    }
    if mount_at(&mounts()?, &volume.session_dir).is_none() {
        std::fs::create_dir_all(&volume.session_dir).map_err(|source| Error::io("creating mount point", &volume.session_dir, source))?;
        if !folder_is_empty(&volume.session_dir)? {
            return Err(failed(&volume.session_dir.display().to_string(), "has content of its own; the image is not mounted over it"));
        }
        run(Command::new("mount").arg("--bind").arg(volume.workspace()).arg(&volume.session_dir))?;
    }
    if !is_attached(volume)? {
        return Err(failed(&volume.session_dir.display().to_string(), "is not the bind mount of its image after mounting"));
    }
    Ok(true)
}

/// A sparse file, `mkfs.ext4` (4 KiB blocks, one inode per 8 KiB, a 4 MiB journal so a host crash
/// needs no fsck, nothing reserved for root), made under a temporary name and renamed into place,
/// so an image that exists is always a complete file system.
fn make_image(volume: &Volume, quota_bytes: u64) -> Result<()> {
    let folder = volume.image.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(|source| Error::io("creating images folder", folder, source))?;
    remove_unfinished_images(volume);
    let temporary = volume.image.with_extension(format!("img.{}", uuid::Uuid::new_v4().simple()));
    let made = (|| {
        let file = std::fs::File::create_new(&temporary).map_err(|source| Error::io("creating image", &temporary, source))?;
        file.set_len(image_bytes(quota_bytes)).map_err(|source| Error::io("sizing image", &temporary, source))?;
        drop(file);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-i", "8192", "-I", "256", "-m", "0", "-J", "size=4", "-O", "^resize_inode"])
            .args(["-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&temporary))?;
        std::fs::rename(&temporary, &volume.image).map_err(|source| Error::io("placing image", &volume.image, source))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    made
}

/// Deletes this session's half-made images (`<session>.img.<id>`): an agent killed while making one
/// leaves it behind, and nothing else ever would (found by the faults bench: a SIGKILL during a
/// materialize left a 512 MiB sparse file for good). Only one task works on a session at a time.
fn remove_unfinished_images(volume: &Volume) {
    let Some(folder) = volume.image.parent() else { return };
    let Some(name) = volume.image.file_name().and_then(|name| name.to_str()) else { return };
    let prefix = format!("{name}.");
    let Ok(entries) = std::fs::read_dir(folder) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(|other| other.starts_with(&prefix)) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(image = %entry.path().display(), "removed a half-made workspace image"),
                Err(error) => tracing::warn!(image = %entry.path().display(), %error, "cannot remove a half-made workspace image"),
            }
        }
    }
}

/// A mount Docker is copying into a container it is creating at this moment is busy for that
/// moment (the unmount propagates to the copy): such an unmount is tried again for about 2 s.
const UNMOUNT_ATTEMPTS: u32 = 40;
const UNMOUNT_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

fn unmount(path: &Path) -> Result<()> {
    let mut attempt = 0;
    while mount_at(&mounts()?, path).is_some() {
        match run(Command::new("umount").arg(path)) {
            Ok(()) => {}
            Err(error) if attempt + 1 < UNMOUNT_ATTEMPTS && error.to_string().contains("busy") => {
                attempt += 1;
                std::thread::sleep(UNMOUNT_RETRY_PAUSE);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Unmounts the session directory and the image and removes both mount points, keeping the
/// image (the workspace cache moves it away whole). Idempotent.
pub fn detach(volume: &Volume) -> Result<()> {
    unmount(&volume.session_dir)?;
    unmount(&volume.mount_point)?;
    for folder in [&volume.session_dir, &volume.mount_point] {
        match std::fs::remove_dir(folder) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::io("removing mount point", folder, source)),
        }
    }
    Ok(())
}

/// Unmounts the session directory and the image, removes both mount points, then the image
/// (last: until it is gone the session counts as image-backed). Idempotent.
pub fn release(volume: &Volume) -> Result<()> {
    detach(volume)?;
    remove_unfinished_images(volume);
    match std::fs::remove_file(&volume.image) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::io("removing image", &volume.image, source)),
    }
}

/// Space used and left in a mounted image.
pub fn usage(volume: &Volume) -> Result<Usage> {
    let stats = rustix::fs::statvfs(&volume.mount_point).map_err(|error| Error::io("statvfs", &volume.mount_point, error.into()))?;
    let fragment = stats.f_frsize.max(1);
    Ok(Usage {
        used_bytes: stats.f_blocks.saturating_sub(stats.f_bfree) * fragment,
        available_bytes: stats.f_bavail * fragment,
        available_inodes: stats.f_favail,
    })
}

/// The sessions that have an image in this deployment.
pub fn sessions_with_images(deployment_root: &Path) -> Result<Vec<String>> {
    let folder = deployment_root.join(IMAGES_DIR);
    let entries = match std::fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::io("listing images", &folder, source)),
    };
    let mut sessions = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::io("listing images", &folder, source))?;
        if let Some(session) = entry.file_name().to_str().and_then(|name| name.strip_suffix(".img")) {
            sessions.push(session.to_owned());
        }
    }
    sessions.sort();
    Ok(sessions)
}

/// Unmounts every mount at or below `path`, deepest first (tests and tools tidying a scratch root).
pub fn unmount_all_under(path: &Path) -> Result<()> {
    let root = kernel_path(path);
    let mut below: Vec<PathBuf> = mounts()?.into_iter().map(|entry| entry.mount_point).filter(|point| point.starts_with(&root)).collect();
    below.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    below.dedup();
    for point in below {
        unmount(&point)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn images_hold_the_quota_and_their_metadata() {
        assert_eq!(image_bytes(512 * 1024 * 1024) % 4096, 0);
        assert!(image_bytes(512 * 1024 * 1024) > 512 * 1024 * 1024);
        assert!(image_bytes(0) >= OVERHEAD_FIXED_BYTES);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}
