//! Counters for `GET /metrics`, rendered in the Prometheus text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// One instance's counters. Cheap to bump from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_open: AtomicI64,
    pub connections_total: AtomicU64,
    pub connections_refused_limit: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_refused: AtomicU64,
    pub auth_failures: AtomicU64,
    pub notifications_received: AtomicU64,
    pub notifications_delivered: AtomicU64,
    pub notifications_dropped: AtomicU64,
    pub activity_events_published: AtomicU64,
    pub activity_debounced: AtomicU64,
    pub sockets_dropped_heartbeat: AtomicU64,
    /// `open` answered with the live session of the workspace instead of a new one.
    pub opens_joined: AtomicU64,
    /// `open` whose engine answer did not come in time.
    pub opens_timed_out: AtomicU64,
    /// TCP connections refused at `session.max_connections` (503 `server_busy`).
    pub connections_refused_busy: AtomicU64,
    /// WebSocket upgrades refused for a foreign `Origin`.
    pub origins_refused: AtomicU64,
    /// Authentication failures by reason (`expired`, `signature`, …).
    auth_failures_by_reason: Mutex<BTreeMap<&'static str, u64>>,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Counts one refused authentication.
    pub fn record_auth_failure(&self, reason: &'static str) {
        bump(&self.auth_failures);
        *self.auth_failures_by_reason.lock().unwrap_or_else(PoisonError::into_inner).entry(reason).or_insert(0) += 1;
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        counter("berth_session_connections_total", "WebSocket connections accepted.", load(&self.connections_total));
        counter(
            "berth_session_connections_refused_total",
            "Connections refused because the user already holds the maximum.",
            load(&self.connections_refused_limit),
        );
        counter("berth_session_frames_received_total", "Frames received from clients.", load(&self.frames_received));
        counter("berth_session_frames_sent_total", "Frames sent to clients.", load(&self.frames_sent));
        counter("berth_session_frames_refused_total", "Client frames answered with an error.", load(&self.frames_refused));
        counter("berth_session_auth_failures_total", "Requests refused with 401.", load(&self.auth_failures));
        counter("berth_session_notifications_received_total", "Notifications consumed from berth.notify.", load(&self.notifications_received));
        counter("berth_session_notifications_delivered_total", "Status frames queued to sockets.", load(&self.notifications_delivered));
        counter(
            "berth_session_notifications_dropped_total",
            "Status frames dropped because a socket fell behind (the socket is closed and resyncs on reconnect).",
            load(&self.notifications_dropped),
        );
        counter("berth_session_activity_events_total", "session.activity events published.", load(&self.activity_events_published));
        counter("berth_session_activity_debounced_total", "Activity folded into an earlier event.", load(&self.activity_debounced));
        counter("berth_session_heartbeat_drops_total", "Sockets dropped for missing heartbeats.", load(&self.sockets_dropped_heartbeat));
        counter("berth_session_opens_joined_total", "Opens answered with the workspace's live session.", load(&self.opens_joined));
        counter("berth_session_opens_timed_out_total", "Opens the engine did not answer in time.", load(&self.opens_timed_out));
        counter("berth_session_connections_refused_busy_total", "TCP connections refused at session.max_connections.", load(&self.connections_refused_busy));
        counter("berth_session_origins_refused_total", "WebSocket upgrades refused for a foreign Origin.", load(&self.origins_refused));
        let by_reason = self.auth_failures_by_reason.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let _ = writeln!(
            text,
            "# HELP berth_session_auth_failures_by_reason_total Requests refused with 401, by reason.\n# TYPE berth_session_auth_failures_by_reason_total counter"
        );
        for (reason, count) in by_reason {
            let _ = writeln!(text, "berth_session_auth_failures_by_reason_total{{reason=\"{reason}\"}} {count}");
        }
        let open = self.connections_open.load(Ordering::Relaxed);
        let _ = writeln!(
            text,
            "# HELP berth_session_connections Open WebSocket connections.\n# TYPE berth_session_connections gauge\nberth_session_connections {open}"
        );
        text
    }
}
