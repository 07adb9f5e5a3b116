//! The engine's `/metrics`: its counters, and every user's usage in the current day and month.
//!
//! Usage totals live in Redis (`usage:<user>:<period>`, written by the meter of every replica), so
//! any replica exports the same figures; they are read every [`USAGE_REFRESH`] into memory because a
//! scrape encodes synchronously. One series per user and period is the price of per-user usage in
//! metrics: the user base bounds it, and only users metered in the current period appear.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use chrono::Utc;
use protocol::metrics::prometheus_client::collector::Collector;
use protocol::metrics::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use protocol::metrics::prometheus_client::metrics::counter::ConstCounter;
use protocol::metrics::prometheus_client::metrics::gauge::ConstGauge;
use protocol::metrics::prometheus_client::registry::Registry;
use redis::AsyncCommands;

use crate::metrics::Metrics;
use crate::service::{Engine, Keys};
use crate::usage::Budget;

/// How often the usage totals are read from Redis.
pub const USAGE_REFRESH: Duration = Duration::from_secs(15);

/// One user's totals in one period, as the meter stored them.
#[derive(Debug, Clone, PartialEq)]
pub struct UserUsage {
    pub user: String,
    /// `day` or `month`.
    pub period: &'static str,
    pub fields: Vec<(String, f64)>,
}

/// Encodes the engine's counters and the latest usage read on each scrape.
#[derive(Debug)]
pub struct EngineCollector {
    metrics: Arc<Metrics>,
    usage: Arc<RwLock<Vec<UserUsage>>>,
}

impl EngineCollector {
    pub fn new(metrics: Arc<Metrics>) -> EngineCollector {
        EngineCollector { metrics, usage: Arc::new(RwLock::new(Vec::new())) }
    }

    /// The registry `berth engine` serves.
    pub fn registry(self) -> Registry {
        let mut registry = Registry::with_prefix("berth_engine");
        registry.register_collector(Box::new(self));
        registry
    }

    /// Where [`refresh_usage_forever`] writes.
    pub fn usage(&self) -> Arc<RwLock<Vec<UserUsage>>> {
        self.usage.clone()
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.metrics.snapshot();
        let counters: [(&str, &str, u64); 15] = [
            ("events_handled", "events consumed and handled", snapshot.events_handled),
            ("transitions", "thred transitions committed", snapshot.transitions),
            ("duplicates", "events seen before (dedupe)", snapshot.duplicates),
            ("orphans", "events no thred takes", snapshot.orphans),
            ("joins", "opens that joined the workspace's live session", snapshot.joins),
            ("recoveries", "session.recover events published for stranded work", snapshot.recoveries),
            ("rejected", "events refused by validation", snapshot.rejected),
            ("dead_lettered", "events dead-lettered with a reason", snapshot.dead_lettered),
            ("conflicts", "commits retried after a concurrent write", snapshot.conflicts),
            ("timers_fired", "timers fired", snapshot.timers_fired),
            ("timers_fired_by_notification", "timers fired from Redis key-expiry notifications", snapshot.timers_fired_by_notification),
            ("timers_fired_by_sweep", "timers fired by the deadline sweep", snapshot.timers_fired_by_sweep),
            ("stale_timers", "timers that fired for a thred that had moved on", snapshot.stale_timers),
            ("outboxes_replayed", "outboxes published after a crash", snapshot.outboxes_replayed),
            ("tasks_published", "tasks published to agents", snapshot.tasks_published),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let lag = ConstGauge::new(snapshot.max_lag_ms);
        lag.encode(encoder.encode_descriptor(
            "max_lag_ms",
            "longest delay seen between an event's time and its handling",
            None,
            lag.metric_type(),
        )?)?;

        let usage = self.usage.read().unwrap_or_else(PoisonError::into_inner);
        for field in ["running_secs", "idle_secs", "cpu_secs", "gib_secs", "cost"] {
            let name = format!("usage_{field}");
            let help = format!("each user's metered {field} in the current UTC day and month");
            let gauge_type = ConstGauge::new(0.0).metric_type();
            let mut family = encoder.encode_descriptor(&name, &help, None, gauge_type)?;
            for row in usage.iter() {
                let Some((_, value)) = row.fields.iter().find(|(name, _)| name == field) else { continue };
                let labels = [("user", row.user.as_str()), ("period", row.period)];
                ConstGauge::new(*value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Serves `engine`'s `/metrics` on `listener` (its counters, its buses' counters, and the usage
/// its meters keep in the Redis at `redis_url`) until `shutdown` completes.
pub async fn serve(
    engine: &Engine,
    redis_url: &str,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let collector = EngineCollector::new(engine.metrics());
    let mut redis = redis::Client::open(redis_url)?.get_connection_manager().await?;
    // The first figures before the first scrape.
    *collector.usage.write().unwrap_or_else(PoisonError::into_inner) = read_usage(&mut redis, engine.keys()).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let refresher = tokio::spawn(refresh_usage_forever(redis, engine.keys().clone(), collector.usage(), stopped));
    let mut registry = collector.registry();
    engine.register_bus_metrics(&mut registry);
    let served = protocol::metrics::serve(listener, registry, token, shutdown).await;
    let _ = stop.send(true);
    let _ = refresher.await;
    Ok(served?)
}

/// Reads every user's usage of the current day and month from Redis into `usage` every
/// [`USAGE_REFRESH`] until `stop` turns true. A failed read keeps the previous figures.
pub async fn refresh_usage_forever(
    mut redis: redis::aio::ConnectionManager,
    keys: Keys,
    usage: Arc<RwLock<Vec<UserUsage>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(USAGE_REFRESH) => {}
            _ = stop.changed() => return,
        }
        match read_usage(&mut redis, &keys).await {
            Ok(rows) => *usage.write().unwrap_or_else(PoisonError::into_inner) = rows,
            Err(error) => tracing::warn!(%error, "usage for /metrics not read; keeping the last figures"),
        }
    }
}

/// Every user's totals in the current day and month.
pub async fn read_usage(redis: &mut redis::aio::ConnectionManager, keys: &Keys) -> redis::RedisResult<Vec<UserUsage>> {
    let now = Utc::now();
    let mut rows = Vec::new();
    for (budget, period) in [(Budget::Daily, "day"), (Budget::Monthly, "month")] {
        let key_period = budget.period(now);
        // `usage:<user>:<period>`: the user sits between the fixed prefix and the period.
        let prefix = keys.usage("", "");
        let prefix = prefix.trim_end_matches(':').to_owned() + ":";
        let prefix = prefix.as_str();
        let suffix = format!(":{key_period}");
        let pattern = format!("{prefix}*{suffix}");
        let mut found: Vec<String> = Vec::new();
        {
            let mut scan = redis.scan_match::<_, String>(&pattern).await?;
            while let Some(key) = scan.next_item().await {
                found.push(key);
            }
        }
        for key in found {
            let Some(user) = key.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(&suffix)) else { continue };
            let values: Vec<(String, f64)> = redis.hgetall(&key).await?;
            rows.push(UserUsage { user: user.to_owned(), period, fields: values });
        }
    }
    rows.sort_by(|left, right| (left.period, &left.user).cmp(&(right.period, &right.user)));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_usage_encode_as_openmetrics() {
        let metrics = Arc::new(Metrics::default());
        Metrics::count(&metrics.events_handled);
        let collector = EngineCollector::new(metrics);
        let usage = collector.usage();
        *usage.write().unwrap_or_else(PoisonError::into_inner) =
            vec![UserUsage { user: "ada".into(), period: "day", fields: vec![("cost".into(), 1.5), ("cpu_secs".into(), 30.0)] }];
        let text = protocol::metrics::encode(&collector.registry());
        assert!(text.contains("berth_engine_events_handled_total 1"), "{text}");
        assert!(text.contains("berth_engine_usage_cost{user=\"ada\",period=\"day\"} 1.5"), "{text}");
        assert!(text.contains("berth_engine_usage_cpu_secs{user=\"ada\",period=\"day\"} 30.0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
