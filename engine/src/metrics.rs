//! Engine metrics, kept in memory: counters and a lag gauge, snapshotted for logs and the bench.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

/// Counters shared by every task of one engine.
#[derive(Debug, Default)]
pub struct Metrics {
    pub events_handled: AtomicU64,
    pub transitions: AtomicU64,
    pub duplicates: AtomicU64,
    pub orphans: AtomicU64,
    /// Starting events that joined the live owner of their exclusive key.
    pub joins: AtomicU64,
    /// `session.recover` events published for orphan containers and stranded directories.
    pub recoveries: AtomicU64,
    pub rejected: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub conflicts: AtomicU64,
    pub timers_fired: AtomicU64,
    pub timers_fired_by_notification: AtomicU64,
    pub timers_fired_by_sweep: AtomicU64,
    pub stale_timers: AtomicU64,
    pub outboxes_replayed: AtomicU64,
    pub tasks_published: AtomicU64,
    /// Milliseconds between an event's `time` and the moment it was handled, last seen.
    pub last_lag_ms: AtomicI64,
    pub max_lag_ms: AtomicI64,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    pub events_handled: u64,
    pub transitions: u64,
    pub duplicates: u64,
    pub orphans: u64,
    pub joins: u64,
    pub recoveries: u64,
    pub rejected: u64,
    pub dead_lettered: u64,
    pub conflicts: u64,
    pub timers_fired: u64,
    pub timers_fired_by_notification: u64,
    pub timers_fired_by_sweep: u64,
    pub stale_timers: u64,
    pub outboxes_replayed: u64,
    pub tasks_published: u64,
    pub last_lag_ms: i64,
    pub max_lag_ms: i64,
}

impl Metrics {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_lag(&self, lag_ms: i64) {
        self.last_lag_ms.store(lag_ms, Ordering::Relaxed);
        self.max_lag_ms.fetch_max(lag_ms, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            events_handled: read(&self.events_handled),
            transitions: read(&self.transitions),
            duplicates: read(&self.duplicates),
            orphans: read(&self.orphans),
            joins: read(&self.joins),
            recoveries: read(&self.recoveries),
            rejected: read(&self.rejected),
            dead_lettered: read(&self.dead_lettered),
            conflicts: read(&self.conflicts),
            timers_fired: read(&self.timers_fired),
            timers_fired_by_notification: read(&self.timers_fired_by_notification),
            timers_fired_by_sweep: read(&self.timers_fired_by_sweep),
            stale_timers: read(&self.stale_timers),
            outboxes_replayed: read(&self.outboxes_replayed),
            tasks_published: read(&self.tasks_published),
            last_lag_ms: self.last_lag_ms.load(Ordering::Relaxed),
            max_lag_ms: self.max_lag_ms.load(Ordering::Relaxed),
        }
    }
}
