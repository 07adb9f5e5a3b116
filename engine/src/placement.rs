//! Placement: which host a new session runs on, decided from the hosts' latest reports (pure).
//!
//! A host that holds a copy of the session's workspace comes first (its files are there: open is a
//! revalidation, not a download), then the host with the most free memory, then the most free
//! CPU, then the fewest sessions; the host id breaks ties so every replica decides alike. A host
//! fits when one more session's memory and CPU stay within its budget, counting what the engine
//! itself committed there (its own accounting, atomic with each commit) — never the report's own
//! count, which lags.

use crate::admission::Committed;

/// One host as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub id: String,
    pub budget_memory_mib: u64,
    pub budget_cpu_millis: u64,
    /// What the engine's live threds placed there hold.
    pub committed: Committed,
    /// Session containers the host reported.
    pub sessions: u64,
    /// The host reported a copy of the workspace being placed.
    pub has_workspace: bool,
}

impl HostView {
    fn free_memory_mib(&self) -> u64 {
        self.budget_memory_mib.saturating_sub(self.committed.memory_mib)
    }

    fn free_cpu_millis(&self) -> u64 {
        self.budget_cpu_millis.saturating_sub(self.committed.cpu_millis)
    }

    /// Whether one more session needing `need` fits.
    pub fn fits(&self, need: Committed) -> bool {
        self.committed.memory_mib + need.memory_mib <= self.budget_memory_mib
            && self.committed.cpu_millis + need.cpu_millis <= self.budget_cpu_millis
    }
}

/// The host a session needing `need` goes to, or `None` when no host has room (it waits in the
/// admission queue).
pub fn place(need: Committed, hosts: &[HostView]) -> Option<&HostView> {
    hosts.iter().filter(|host| host.fits(need)).min_by(|a, b| {
        b.has_workspace
            .cmp(&a.has_workspace)
            .then_with(|| b.free_memory_mib().cmp(&a.free_memory_mib()))
            .then_with(|| b.free_cpu_millis().cmp(&a.free_cpu_millis()))
            .then_with(|| a.sessions.cmp(&b.sessions))
            .then_with(|| a.id.cmp(&b.id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEED: Committed = Committed { memory_mib: 4096, cpu_millis: 2000 };

    /// A host of 20 GiB and 16 CPUs with `sessions` sessions of [`NEED`] placed on it.
    fn host(id: &str, sessions: u64, has_workspace: bool) -> HostView {
        HostView {
            id: id.to_owned(),
            budget_memory_mib: 5 * 4096,
            budget_cpu_millis: 16_000,
            committed: Committed { memory_mib: sessions * NEED.memory_mib, cpu_millis: sessions * NEED.cpu_millis },
            sessions,
            has_workspace,
        }
    }

    #[track_caller]
    fn check(hosts: &[HostView], expected: Option<&str>) {
        assert_eq!(place(NEED, hosts).map(|host| host.id.as_str()), expected);
    }

    #[test]
    fn the_most_free_capacity_wins() {
        check(&[host("a", 3, false), host("b", 1, false), host("c", 2, false)], Some("b"));
        // Equal: the host id decides, so two replicas agree.
        check(&[host("b", 1, false), host("a", 1, false)], Some("a"));
    }

    #[test]
    fn a_cached_workspace_wins_over_free_capacity() {
        check(&[host("a", 0, false), host("b", 4, true)], Some("b"));
        // ...but only where it fits.
        check(&[host("a", 0, false), host("b", 5, true)], Some("a"));
    }

    #[test]
    fn no_room_anywhere_is_none() {
        check(&[host("a", 5, false), host("b", 5, true)], None);
        check(&[], None);
    }

    #[test]
    fn cpu_counts_too() {
        let mut tight = host("a", 0, false);
        tight.budget_cpu_millis = 1000;
        check(&[tight.clone()], None);
        tight.budget_cpu_millis = 2000;
        check(&[tight, host("b", 4, false)], Some("a"));
    }
}
