//! Container statistics computed from Docker's stats document the way `docker stats` does it.

use bollard::container::{MemoryStatsStats, Stats};
/// The data of a `container.stats` event.
pub use protocol::events::ContainerStats;

/// Computes the figures from one stats sample (which carries the previous sample as `precpu`).
///
/// CPU: the container's share of the host's CPU time between the two samples, times the number of
/// online CPUs, so one busy core reads 100% on any machine (the seed forgot the CPU count and read
/// 50% on two cores). Memory: usage minus the inactive page cache, like `docker stats`.
pub fn compute(stats: &Stats) -> ContainerStats {
    let container_delta = stats.cpu_stats.cpu_usage.total_usage.saturating_sub(stats.precpu_stats.cpu_usage.total_usage);
    let system_delta = stats.cpu_stats.system_cpu_usage.unwrap_or(0).saturating_sub(stats.precpu_stats.system_cpu_usage.unwrap_or(0));
    let online_cpus = stats
        .cpu_stats
        .online_cpus
        .filter(|count| *count > 0)
        .or_else(|| stats.cpu_stats.cpu_usage.percpu_usage.as_ref().map(|per_cpu| per_cpu.len() as u64))
        .unwrap_or(1);
    let cpu_percent = if system_delta > 0 && container_delta > 0 {
        container_delta as f64 / system_delta as f64 * online_cpus as f64 * 100.0
    } else {
        0.0
    };
    let usage = stats.memory_stats.usage.unwrap_or(0);
    let inactive_cache = match stats.memory_stats.stats {
        Some(MemoryStatsStats::V1(v1)) => v1.total_inactive_file,
        Some(MemoryStatsStats::V2(v2)) => v2.inactive_file,
        None => 0,
    };
    let (network_rx, network_tx) = stats
        .networks
        .as_ref()
        .map(|networks| networks.values().fold((0, 0), |(rx, tx), network| (rx + network.rx_bytes, tx + network.tx_bytes)))
        .unwrap_or((0, 0));
    ContainerStats {
        cpu_percent: (cpu_percent * 100.0).round() / 100.0,
        memory_used: usage.saturating_sub(inactive_cache),
        memory_limit: stats.memory_stats.limit.unwrap_or(0),
        network_rx,
        network_tx,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure
mod tests {
    use super::*;

    fn sample(total: u64, system: u64, pre_total: u64, pre_system: u64, online: Option<u64>) -> Stats {
        let document = serde_json::json!({
            "read": "2026-11-22T07:00:01Z", "preread": "2026-11-22T07:00:00Z", "num_procs": 0,
            "pids_stats": {"current": 3},
            "networks": {"eth0": {"rx_bytes": 100, "tx_bytes": 40, "rx_dropped": 0, "rx_errors": 0, "tx_packets": 1,
                                   "tx_dropped": 0, "rx_packets": 1, "tx_errors": 0},
                          "eth1": {"rx_bytes": 1, "tx_bytes": 2, "rx_dropped": 0, "rx_errors": 0, "tx_packets": 1,
                                   "tx_dropped": 0, "rx_packets": 1, "tx_errors": 0}},
            "memory_stats": {"usage": 10_000_000, "limit": 134_217_728,
                             "stats": {"inactive_file": 1_000_000, "anon": 0, "file": 0, "kernel_stack": 0, "slab": 0, "sock": 0,
                                       "shmem": 0, "file_mapped": 0, "file_dirty": 0, "file_writeback": 0, "anon_thp": 0,
                                       "inactive_anon": 0, "active_anon": 0, "active_file": 0, "unevictable": 0,
                                       "slab_reclaimable": 0, "slab_unreclaimable": 0, "pgfault": 0, "pgmajfault": 0,
                                       "workingset_refault": 0, "workingset_activate": 0, "workingset_nodereclaim": 0,
                                       "pgrefill": 0, "pgscan": 0, "pgsteal": 0, "pgactivate": 0, "pgdeactivate": 0,
                                       "pglazyfree": 0, "pglazyfreed": 0, "thp_fault_alloc": 0, "thp_collapse_alloc": 0}},
            "blkio_stats": {},
            "cpu_stats": {"cpu_usage": {"total_usage": total, "usage_in_usermode": 0, "usage_in_kernelmode": 0,
                                        "percpu_usage": [0, 0, 0, 0]},
                          "system_cpu_usage": system, "online_cpus": online,
                          "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}},
            "precpu_stats": {"cpu_usage": {"total_usage": pre_total, "usage_in_usermode": 0, "usage_in_kernelmode": 0},
                             "system_cpu_usage": pre_system,
                             "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}},
            "storage_stats": {}
        });
        serde_json::from_value(document).unwrap()
    }

    #[test]
    fn one_busy_core_of_two_reads_one_hundred_percent() {
        // The container used 1 s of CPU while the host's two CPUs together ran 2 s.
        let stats = compute(&sample(2_000_000_000, 4_000_000_000, 1_000_000_000, 2_000_000_000, Some(2)));
        assert_eq!(stats.cpu_percent, 100.0);
        assert_eq!(stats.memory_used, 9_000_000);
        assert_eq!(stats.memory_limit, 134_217_728);
        assert_eq!((stats.network_rx, stats.network_tx), (101, 42));
    }

    #[test]
    fn cpu_count_falls_back_to_the_per_cpu_list() {
        let stats = compute(&sample(1_500_000_000, 4_000_000_000, 1_000_000_000, 2_000_000_000, None));
        assert_eq!(stats.cpu_percent, 100.0);
    }

    #[test]
    fn no_previous_sample_reads_zero() {
        let stats = compute(&sample(2_000_000_000, 4_000_000_000, 0, 0, Some(2)));
        assert!(stats.cpu_percent > 0.0);
        let idle = compute(&sample(1, 4_000_000_000, 1, 4_000_000_000, Some(2)));
        assert_eq!(idle.cpu_percent, 0.0);
    }
}
