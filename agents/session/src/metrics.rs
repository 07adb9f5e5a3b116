//! Counters for `GET /metrics`, encoded by `prometheus-client` on each scrape.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use protocol::metrics::prometheus_client::collector::Collector;
use protocol::metrics::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use protocol::metrics::prometheus_client::metrics::counter::ConstCounter;
use protocol::metrics::prometheus_client::metrics::gauge::ConstGauge;
use protocol::metrics::prometheus_client::registry::Registry;

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

    /// The instance's registry for `GET /metrics`: these counters and the bus's.
    pub fn registry(self: &Arc<Self>, bus: &protocol::Bus) -> Registry {
        let mut registry = Registry::with_prefix("berth_session");
        registry.register_collector(Box::new(Collected(self.clone())));
        bus.register_metrics(&mut registry);
        registry
    }
}

/// Encodes a [`Metrics`] on each scrape.
#[derive(Debug)]
struct Collected(Arc<Metrics>);

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = &self.0;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters: [(&str, &str, u64); 15] = [
            ("connections", "WebSocket connections accepted", load(&metrics.connections_total)),
            (
                "connections_refused",
                "connections refused because the user already holds the maximum",
                load(&metrics.connections_refused_limit),
            ),
            ("frames_received", "frames received from clients", load(&metrics.frames_received)),
            ("frames_sent", "frames sent to clients", load(&metrics.frames_sent)),
            ("frames_refused", "client frames answered with an error", load(&metrics.frames_refused)),
            ("auth_failures", "requests refused with 401", load(&metrics.auth_failures)),
            ("notifications_received", "notifications consumed from berth.notify", load(&metrics.notifications_received)),
            ("notifications_delivered", "status frames queued to sockets", load(&metrics.notifications_delivered)),
            (
                "notifications_dropped",
                "status frames dropped because a socket fell behind (the socket is closed and resyncs on reconnect)",
                load(&metrics.notifications_dropped),
            ),
            ("activity_events", "session.activity events published", load(&metrics.activity_events_published)),
            ("activity_debounced", "activity folded into an earlier event", load(&metrics.activity_debounced)),
            ("heartbeat_drops", "sockets dropped for missing heartbeats", load(&metrics.sockets_dropped_heartbeat)),
            ("opens_joined", "opens answered with the workspace's live session", load(&metrics.opens_joined)),
            ("opens_timed_out", "opens the engine did not answer in time", load(&metrics.opens_timed_out)),
            ("connections_refused_busy", "TCP connections refused at session.max_connections", load(&metrics.connections_refused_busy)),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let origins = ConstCounter::new(load(&metrics.origins_refused));
        origins.encode(encoder.encode_descriptor(
            "origins_refused",
            "WebSocket upgrades refused for a foreign Origin",
            None,
            origins.metric_type(),
        )?)?;
        let by_reason = metrics.auth_failures_by_reason.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut family =
            encoder.encode_descriptor("auth_failures_by_reason", "requests refused with 401, by reason", None, origins.metric_type())?;
        for (reason, count) in by_reason {
            ConstCounter::new(count).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        let open = ConstGauge::new(metrics.connections_open.load(Ordering::Relaxed));
        open.encode(encoder.encode_descriptor("connections_open", "open WebSocket connections", None, open.metric_type())?)?;
        Ok(())
    }
}
