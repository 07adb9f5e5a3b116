//! The work probe behind the idle rule: what a running session's container has been doing, as
//! figures the engine's pattern compares against the previous probe (`container.probed`).
//!
//! Three signals, each the cheapest one that is reliable:
//! - **CPU**: the container's cumulative CPU time (`cpu_stats.cpu_usage.total_usage` from one
//!   Docker stats sample, i.e. the cgroup's counter), in nanoseconds. The engine keeps the previous
//!   figure in the thred, so the CPU share is measured over the whole interval, not a 1 s sample,
//!   and the agent keeps no state.
//! - **Workspace writes**: the age of the newest inode change (`ctime`) under the session's host
//!   directory, directories included, so a write, a new file, a removal or a rename all count.
//!   `ctime` rather than `mtime` because a program can set `mtime` (to the future, or the past) and
//!   cannot set `ctime`. The walk never follows symlinks and stops after [`SCAN_LIMIT`] entries.
//! - **Terminal commands**: the processes whose parent is the shell of a running terminal (a Docker
//!   exec with a TTY, as the session agent's terminal starts). A command in the foreground or in the
//!   background of a terminal shell is its child; the idle shell alone is not.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// At most this many entries are looked at per probe; a larger workspace reports `truncated`.
pub const SCAN_LIMIT: u64 = 200_000;

/// What a walk of the workspace directory found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteScan {
    pub newest_change_age: Duration,
    pub scanned: u64,
    pub truncated: bool,
}

/// Walks `directory` (not following symlinks) for its newest inode change time. Unreadable
/// subdirectories (`lost+found` of an image-backed workspace) are skipped; a missing directory
/// reads as unchanged for as long as the clock goes back.
pub fn scan_writes(directory: &Path, limit: u64) -> WriteScan {
    use std::os::unix::fs::MetadataExt;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut newest = Duration::ZERO;
    let mut scanned = 0u64;
    let mut truncated = false;
    let mut pending = vec![directory.to_path_buf()];
    if let Ok(metadata) = std::fs::symlink_metadata(directory) {
        newest = change_time(metadata.ctime(), metadata.ctime_nsec());
    }
    'walk: while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            if scanned >= limit {
                truncated = true;
                break 'walk;
            }
            scanned += 1;
            let Ok(metadata) = entry.metadata() else { continue };
            newest = newest.max(change_time(metadata.ctime(), metadata.ctime_nsec()));
            // `DirEntry::metadata` does not follow symlinks, so a link to a folder is not entered.
            if metadata.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    WriteScan { newest_change_age: now.saturating_sub(newest), scanned, truncated }
}

fn change_time(seconds: i64, nanoseconds: i64) -> Duration {
    if seconds < 0 {
        return Duration::ZERO;
    }
    Duration::new(seconds as u64, nanoseconds.clamp(0, 999_999_999) as u32)
}

/// Counts the processes whose parent is one of `shell_pids`, from `docker top` rows of
/// `pid ppid` (host pids, as Docker's exec inspection reports them too).
pub fn terminal_commands(shell_pids: &[i64], rows: &[Vec<String>]) -> u64 {
    rows.iter()
        .filter_map(|row| row.get(1).and_then(|ppid| ppid.trim().parse::<i64>().ok()))
        .filter(|ppid| shell_pids.contains(ppid))
        .count() as u64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure
mod tests {
    use super::*;

    fn rows(pairs: &[(&str, &str)]) -> Vec<Vec<String>> {
        pairs.iter().map(|(pid, ppid)| vec![(*pid).to_owned(), (*ppid).to_owned()]).collect()
    }

    #[test]
    fn only_children_of_a_terminal_shell_are_commands() {
        let top = rows(&[("10", "1"), ("20", "10"), ("30", "20"), ("40", "99"), ("x", "y")]);
        assert_eq!(terminal_commands(&[20], &top), 1, "30 runs under the shell 20");
        assert_eq!(terminal_commands(&[10, 20], &top), 2);
        assert_eq!(terminal_commands(&[], &top), 0);
        assert_eq!(terminal_commands(&[50], &top), 0, "an idle shell is not a command");
    }

    #[test]
    fn a_new_file_deep_down_is_a_recent_change_and_the_limit_truncates() {
        let root = std::env::temp_dir().join(format!("berth-work-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/b/c/file"), b"x").unwrap();
        let scan = scan_writes(&root, SCAN_LIMIT);
        assert!(scan.newest_change_age < Duration::from_secs(60), "{scan:?}");
        assert_eq!((scan.scanned, scan.truncated), (4, false));
        let limited = scan_writes(&root, 2);
        assert_eq!((limited.scanned, limited.truncated), (2, true));
        std::fs::remove_dir_all(&root).unwrap();
        let missing = scan_writes(&root, SCAN_LIMIT);
        assert!(missing.newest_change_age > Duration::from_secs(365 * 24 * 3600), "{missing:?}");
    }
}
