//! What a sync does, decided without touching anything: from the manifest (what this session last
//! agreed with the store) and the scan of the directory (what is there now), [`plan_sync`] says
//! which files are unchanged, which need their content hashed to tell, which go up, which objects
//! are deleted and what is skipped, or that the workspace is over its quota. The agent
//! (`agent.rs`) executes the plan; an object changed in the store by another writer shows there,
//! when the conditional upload or delete finds another version than the manifest's (a conflict).
//! [`changes_since_final_sync`] is the same comparison as a yes/no: whether `remove` (and a cache
//! entry's reopen) still has anything unsynced.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::fsops::{LocalFile, Scan};
use crate::manifest::Manifest;

/// What [`plan_sync`] decided for one sync.
#[derive(Debug, Clone)]
pub struct SyncPlan {
    /// Files with the size and mtime the manifest recorded: nothing to do.
    pub unchanged: usize,
    /// Files with the recorded size but another mtime, with the recorded content hash: a hash of
    /// the content decides ([`after_hash`]).
    pub to_hash: Vec<(LocalFile, String)>,
    /// Files the manifest does not know, or whose size changed: uploaded.
    pub to_upload: Vec<LocalFile>,
    /// Paths the manifest lists that are gone locally: their objects are deleted. Only those: an
    /// object never downloaded (an interrupted materialize) is not in the manifest, so it is never
    /// deleted.
    pub to_delete: Vec<String>,
    /// What the scan found that can't be stored: (path, reason), reported, never uploaded.
    pub skipped: Vec<(String, String)>,
}

/// What a hashed file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashed {
    /// Same content as recorded: only its mtime moved (the manifest takes the new one).
    Unchanged,
    /// Other content: uploaded.
    Changed,
}

/// Plans one sync. `quota`: the bytes the workspace's files may hold; `None` when the session has
/// a file system of its own (an image is the bound itself: whatever fits in it is the user's work
/// and is saved, never refused).
pub fn plan_sync(manifest: &Manifest, scan: &Scan, quota: Option<u64>) -> Result<SyncPlan> {
    let local_bytes = scan.file_bytes();
    if let Some(quota) = quota {
        if local_bytes > quota {
            return Err(Error::QuotaExceeded { bytes: local_bytes, quota });
        }
    }
    // Size and mtime first; a content hash confirms when only the mtime moved.
    let mut plan = SyncPlan {
        unchanged: 0,
        to_hash: Vec::new(),
        to_upload: Vec::new(),
        to_delete: Vec::new(),
        skipped: scan.unsyncable.iter().map(|entry| (entry.path.clone(), entry.reason.clone())).collect(),
    };
    for file in &scan.files {
        match manifest.files.get(file.path.as_str()) {
            Some(entry) if entry.size == file.size && entry.mtime_ns == file.mtime_ns => plan.unchanged += 1,
            Some(entry) if entry.size == file.size => plan.to_hash.push((file.clone(), entry.sha256.clone())),
            _ => plan.to_upload.push(file.clone()),
        }
    }
    let local_paths: BTreeSet<&str> = scan.files.iter().map(|file| file.path.as_str()).collect();
    plan.to_delete = manifest.files.keys().filter(|path| !local_paths.contains(path.as_str())).cloned().collect();
    Ok(plan)
}

/// Decides a file of [`SyncPlan::to_hash`] once its content is hashed.
pub fn after_hash(hash: &str, known_hash: &str) -> Hashed {
    if hash == known_hash {
        Hashed::Unchanged
    } else {
        Hashed::Changed
    }
}

/// What differs between a workspace and its manifest (`None`: nothing that needs a sync).
pub fn changes_since_final_sync(manifest: &Manifest, scan: &Scan) -> Option<String> {
    let changed = scan
        .files
        .iter()
        .filter(|file| {
            !manifest.files.get(file.path.as_str()).is_some_and(|entry| entry.size == file.size && entry.mtime_ns == file.mtime_ns)
        })
        .count();
    let local_paths: BTreeSet<&str> = scan.files.iter().map(|file| file.path.as_str()).collect();
    let missing = manifest.files.keys().filter(|path| !local_paths.contains(path.as_str())).count();
    if changed > 0 || missing > 0 {
        return Some(format!("{changed} file(s) changed or added and {missing} removed"));
    }
    if scan.tree != manifest.tree {
        return Some("symlinks, folders or modes changed".to_owned());
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fsops::Unsyncable;
    use crate::keys::WorkspacePath;
    use crate::manifest::FileEntry;

    fn local(path: &str, size: u64, mtime_ns: i64) -> LocalFile {
        LocalFile { path: WorkspacePath::parse(path).unwrap(), size, mtime_ns, mode: 0o644 }
    }

    fn entry(size: u64, mtime_ns: i64, sha256: &str) -> FileEntry {
        FileEntry { size, mtime_ns, sha256: sha256.to_owned(), e_tag: Some("\"e\"".to_owned()), version: None }
    }

    fn manifest(files: &[(&str, FileEntry)]) -> Manifest {
        let mut manifest = Manifest::new("session", "user", "workspace", "profile", "user/workspace");
        manifest.files = files.iter().map(|(path, entry)| ((*path).to_owned(), entry.clone())).collect();
        manifest
    }

    fn paths(files: &[LocalFile]) -> Vec<&str> {
        files.iter().map(|file| file.path.as_str()).collect()
    }

    /// Each kind of change lands in its own list, and nothing is in two.
    #[test]
    fn the_table_of_cases() {
        let manifest = manifest(&[
            ("unchanged.txt", entry(5, 100, "aaaa")),
            ("touched.txt", entry(5, 100, "bbbb")),
            ("grown.txt", entry(5, 100, "cccc")),
            ("deleted.txt", entry(5, 100, "dddd")),
            ("dir/deleted-too.txt", entry(1, 1, "eeee")),
        ]);
        let scan = Scan {
            files: vec![local("unchanged.txt", 5, 100), local("touched.txt", 5, 200), local("grown.txt", 6, 100), local("new.txt", 3, 300)],
            unsyncable: vec![Unsyncable {
                parent: None,
                name: "fifo".into(),
                path: "fifo".to_owned(),
                reason: "special file (socket, FIFO or device) can't be stored".to_owned(),
            }],
            ..Scan::default()
        };
        let plan = plan_sync(&manifest, &scan, Some(1024)).unwrap();
        assert_eq!(plan.unchanged, 1, "same size and mtime");
        assert_eq!(
            plan.to_hash.iter().map(|(file, known)| (file.path.as_str(), known.as_str())).collect::<Vec<_>>(),
            [("touched.txt", "bbbb")]
        );
        assert_eq!(paths(&plan.to_upload), ["grown.txt", "new.txt"], "changed size, and unknown to the manifest");
        assert_eq!(plan.to_delete, ["deleted.txt", "dir/deleted-too.txt"], "listed in the manifest, gone locally");
        assert_eq!(plan.skipped, [("fifo".to_owned(), "special file (socket, FIFO or device) can't be stored".to_owned())]);
    }

    /// An object the manifest never listed (never downloaded here) is not deleted, and an empty
    /// directory with an empty manifest plans nothing.
    #[test]
    fn only_what_the_manifest_lists_is_deleted() {
        let plan = plan_sync(&manifest(&[]), &Scan::default(), Some(0)).unwrap();
        assert_eq!(plan.unchanged, 0);
        assert!(plan.to_hash.is_empty() && plan.to_upload.is_empty() && plan.to_delete.is_empty() && plan.skipped.is_empty());
    }

    /// Over the quota nothing is planned, unless the session's own file system is the bound.
    #[test]
    fn over_the_quota_is_refused_unless_an_image_bounds_it() {
        let scan = Scan { files: vec![local("a", 600, 1), local("b", 500, 1)], ..Scan::default() };
        match plan_sync(&manifest(&[]), &scan, Some(1000)) {
            Err(Error::QuotaExceeded { bytes, quota }) => assert_eq!((bytes, quota), (1100, 1000)),
            other => panic!("expected QuotaExceeded, got {other:?}"),
        }
        assert!(plan_sync(&manifest(&[]), &scan, Some(1100)).is_ok(), "exactly the quota fits");
        let plan = plan_sync(&manifest(&[]), &scan, None).unwrap();
        assert_eq!(paths(&plan.to_upload), ["a", "b"]);
    }

    /// Any changed, added or removed file, or a changed tree, is a change since the final sync.
    #[test]
    fn changes_since_the_final_sync() {
        let synced = manifest(&[("a", entry(5, 100, "aaaa"))]);
        let same = Scan { files: vec![local("a", 5, 100)], ..Scan::default() };
        assert_eq!(changes_since_final_sync(&synced, &same), None);
        let touched = Scan { files: vec![local("a", 5, 101)], ..Scan::default() };
        assert_eq!(changes_since_final_sync(&synced, &touched).as_deref(), Some("1 file(s) changed or added and 0 removed"));
        assert_eq!(changes_since_final_sync(&synced, &Scan::default()).as_deref(), Some("0 file(s) changed or added and 1 removed"));
        let mut linked = Scan { files: vec![local("a", 5, 100)], ..Scan::default() };
        linked.tree.links.insert("link".to_owned(), "a".to_owned());
        assert_eq!(changes_since_final_sync(&synced, &linked).as_deref(), Some("symlinks, folders or modes changed"));
    }

    /// A hashed file is unchanged only when its content hash is the recorded one.
    #[test]
    fn a_hash_decides_a_touched_file() {
        assert_eq!(after_hash("bbbb", "bbbb"), Hashed::Unchanged);
        assert_eq!(after_hash("ffff", "bbbb"), Hashed::Changed);
    }
}
