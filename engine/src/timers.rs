//! Timers: a Redis key with a TTL per timer (`<prefix>:timer:<member>`) and a durable deadline
//! index (sorted set `<prefix>:deadlines`, score = deadline in ms), both written by the commit.
//!
//! The `expired` keyspace notification fires a timer on time; because notifications are
//! fire-and-forget, the index is also swept at start-up and every second. Firing = publishing a
//! `timer.fired` event whose id is derived from the timer, then moving its index entry
//! [`REFIRE_AFTER`] into the future. The entry leaves the index only when the engine commits the
//! event it fired (or finds it needs nothing), so a `timer.fired` lost on the way is fired again.
//! A timer fired twice (a sweep racing a notification, a re-fire, a crash in between) yields the
//! same event id, which the engine's dedupe absorbs. A cancelled timer is no longer in the index,
//! and the core drops any generation that is not the thred's current one, so it never fires.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use protocol::events::TimerFired;
use protocol::{Bus, CloudEvent};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::pattern::TIMER_FIRED;
use crate::service::Keys;
use crate::Result;

/// Timers fired per sweep round at most (the next round takes the rest).
const SWEEP_BATCH: isize = 1000;
/// Timers being fired at once: each firing waits for a broker confirm, so firing one after the
/// other would make a burst of due timers late.
const FIRING_CONCURRENCY: usize = 64;
/// A fired timer whose event the engine has not committed yet is fired again after this long.
pub const REFIRE_AFTER: Duration = Duration::from_secs(15);
/// How often ended threds past their retention are deleted.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// One timer as stored in Redis: `<thred id>|<generation>|<timer>|<thred key>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerMember {
    pub thred_id: String,
    pub generation: u64,
    pub timer: String,
    pub thred_key: String,
}

impl TimerMember {
    pub fn new(thred_id: &str, generation: u64, timer: &str, thred_key: &str) -> TimerMember {
        TimerMember { thred_id: thred_id.to_owned(), generation, timer: timer.to_owned(), thred_key: thred_key.to_owned() }
    }

    pub fn encode(&self) -> String {
        format!("{}|{}|{}|{}", self.thred_id, self.generation, self.timer, self.thred_key)
    }

    /// The key comes last because only it may contain `|`.
    pub fn decode(text: &str) -> Option<TimerMember> {
        let mut parts = text.splitn(4, '|');
        let thred_id = parts.next()?;
        let generation = parts.next()?.parse().ok()?;
        let timer = parts.next()?;
        let thred_key = parts.next()?;
        Some(TimerMember::new(thred_id, generation, timer, thred_key))
    }

    /// The `timer.fired` event; its id depends only on the timer, so firing twice is one event.
    pub fn fired_event(&self, key_prefix: &str, deadline_ms: i64) -> CloudEvent {
        let fired = TimerFired { timer: self.timer.clone(), generation: self.generation, deadline_ms };
        let mut event =
            CloudEvent::of("/berth/engine/timers", Some(&self.thred_key), &fired).with_extension("thredid", self.thred_id.clone());
        event.id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-timer/{key_prefix}/{}", self.encode()).as_bytes()).to_string();
        event
    }
}

/// Adds `E` (keyevent) and `x` (expired) to `notify-keyspace-events`, keeping other flags.
pub async fn enable_keyspace_notifications(redis: &mut impl redis::aio::ConnectionLike) -> Result<()> {
    let current: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(redis).await?;
    let mut flags = current.get(1).cloned().unwrap_or_default();
    let has_keyevent = flags.contains('E');
    let has_expired = flags.contains('x') || flags.contains('A');
    if has_keyevent && has_expired {
        return Ok(());
    }
    if !has_keyevent {
        flags.push('E');
    }
    if !has_expired {
        flags.push('x');
    }
    let _: () = redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(&flags).query_async(redis).await?;
    Ok(())
}

/// What noticed that a timer was due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FiredBy {
    Notification,
    Sweep,
}

/// Listens for expiries and sweeps the deadline index.
#[derive(Clone)]
pub struct TimerService {
    client: redis::Client,
    redis: ConnectionManager,
    bus: Bus,
    keys: Keys,
    events_exchange: String,
    metrics: Arc<Metrics>,
    /// Poked when a commit starts a timer, so the sweeper can wake for an earlier deadline.
    wake: Arc<tokio::sync::Notify>,
    refire_after: Duration,
}

impl TimerService {
    pub fn new(
        client: redis::Client,
        redis: ConnectionManager,
        bus: Bus,
        keys: Keys,
        events_exchange: String,
        metrics: Arc<Metrics>,
        wake: Arc<tokio::sync::Notify>,
    ) -> TimerService {
        TimerService { client, redis, bus, keys, events_exchange, metrics, wake, refire_after: REFIRE_AFTER }
    }

    /// Fires an uncommitted timer again after `refire_after` instead of [`REFIRE_AFTER`].
    pub fn refiring_after(mut self, refire_after: Duration) -> TimerService {
        self.refire_after = refire_after;
        self
    }

    /// Adds `E` (keyevent) and `x` (expired) to `notify-keyspace-events`, keeping other flags.
    pub async fn enable_notifications(&self) -> Result<()> {
        let mut redis = self.redis.clone();
        enable_keyspace_notifications(&mut redis).await
    }

    /// Subscribes to `__keyevent@<db>__:expired` and fires our timers as their keys expire.
    /// Reconnects after errors; the sweep covers whatever expired in between.
    pub async fn listen(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let database = self.client.get_connection_info().redis.db;
        let channel = format!("__keyevent@{database}__:expired");
        let timer_prefix = self.keys.timer_prefix();
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            }
            .await;
            let pubsub = match subscribed {
                Ok(pubsub) => {
                    // A Redis that restarted forgot the CONFIG SET: turn the notifications on again
                    // (until then, and if this fails, the sweep fires the timers).
                    if let Err(error) = self.enable_notifications().await {
                        tracing::warn!(%error, "cannot turn keyspace notifications on again; timers fire by sweep");
                    }
                    pubsub
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot subscribe to expiry notifications; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            let mut messages = pubsub.into_on_message();
            let slots = Arc::new(tokio::sync::Semaphore::new(FIRING_CONCURRENCY));
            let mut firing = tokio::task::JoinSet::new();
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = stop.changed() => return,
                };
                let Some(message) = message else { break };
                let Ok(expired_key) = message.get_payload::<String>() else { continue };
                let Some(member) = expired_key.strip_prefix(&timer_prefix) else { continue };
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                let service = self.clone();
                let member = member.to_owned();
                firing.spawn(async move {
                    if let Err(error) = service.fire(&member, FiredBy::Notification).await {
                        tracing::warn!(%error, member, "could not fire timer; the sweep will retry");
                    }
                    drop(permit);
                });
                while firing.try_join_next().is_some() {}
            }
            tracing::warn!("expiry notification stream ended; resubscribing");
        }
    }

    /// Sweeps now, then again at the earliest deadline in the index (at most `interval` later),
    /// until stopped. Waking for the next deadline keeps timers on time even when Redis expires
    /// keys late, which it does when many keys carry a TTL.
    pub async fn sweep_forever(self, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last_purge = tokio::time::Instant::now();
        loop {
            if interval.is_zero() {
                // Start-up sweep only (tests use this to prove the notifications alone fire timers).
                if let Err(error) = self.sweep().await {
                    tracing::warn!(%error, "timer sweep failed");
                }
                // Then idle until stopped: a sweeper that ends stops the engine.
                let _ = stop.changed().await;
                return;
            }
            if let Err(error) = self.sweep().await {
                tracing::warn!(%error, "timer sweep failed");
            }
            if last_purge.elapsed() >= PURGE_INTERVAL {
                last_purge = tokio::time::Instant::now();
                if let Err(error) = self.purge_ended().await {
                    tracing::warn!(%error, "purging ended threds failed");
                }
            }
            let wait = match self.next_deadline_ms().await {
                Ok(Some(deadline_ms)) => {
                    let until = (deadline_ms - chrono::Utc::now().timestamp_millis()).max(0) as u64;
                    Duration::from_millis(until).min(interval)
                }
                Ok(None) => interval,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the next timer deadline");
                    interval
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn next_deadline_ms(&self) -> Result<Option<i64>> {
        let mut redis = self.redis.clone();
        let first: Vec<(String, f64)> = redis.zrange_withscores(self.keys.deadlines(), 0, 0).await?;
        Ok(first.first().map(|(_, score)| *score as i64))
    }

    /// Deletes threds that ended longer ago than the retention.
    pub async fn purge_ended(&self) -> Result<usize> {
        let mut redis = self.redis.clone();
        let cutoff = chrono::Utc::now().timestamp_millis() - crate::service::ENDED_THRED_RETENTION_MS;
        let expired: Vec<String> = redis.zrangebyscore_limit(self.keys.ended(), "-inf", cutoff, 0, SWEEP_BATCH).await?;
        if expired.is_empty() {
            return Ok(0);
        }
        let mut pipeline = redis::pipe();
        for thred_id in &expired {
            pipeline.del(self.keys.thred(thred_id)).ignore().zrem(self.keys.ended(), thred_id).ignore();
        }
        let _: () = pipeline.query_async(&mut redis).await?;
        Ok(expired.len())
    }

    /// Fires every timer whose deadline has passed. Returns how many it fired.
    pub async fn sweep(&self) -> Result<usize> {
        let mut redis = self.redis.clone();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let due: Vec<String> = redis.zrangebyscore_limit(self.keys.deadlines(), "-inf", now_ms, 0, SWEEP_BATCH).await?;
        let slots = Arc::new(tokio::sync::Semaphore::new(FIRING_CONCURRENCY));
        let mut firing = tokio::task::JoinSet::new();
        for member in due {
            let Ok(permit) = slots.clone().acquire_owned().await else { break };
            let service = self.clone();
            firing.spawn(async move {
                let outcome = service.fire(&member, FiredBy::Sweep).await;
                drop(permit);
                outcome
            });
        }
        let mut fired = 0;
        let mut first_error = None;
        while let Some(joined) = firing.join_next().await {
            match joined {
                Ok(Ok(true)) => fired += 1,
                Ok(Ok(false)) => {}
                Ok(Err(error)) => first_error = first_error.or(Some(error)),
                Err(join_error) => tracing::warn!(%join_error, "timer firing task failed"),
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(fired),
        }
    }

    /// Publishes `timer.fired` for a timer still in the index, then schedules its re-fire; the
    /// engine's commit of the event removes it from the index.
    async fn fire(&self, member_text: &str, fired_by: FiredBy) -> Result<bool> {
        let mut redis = self.redis.clone();
        let deadline: Option<f64> = redis.zscore(self.keys.deadlines(), member_text).await?;
        let Some(deadline) = deadline else { return Ok(false) };
        let Some(member) = TimerMember::decode(member_text) else {
            tracing::warn!(member = member_text, "malformed timer in the deadline index; dropped");
            let _: () = redis.zrem(self.keys.deadlines(), member_text).await?;
            return Ok(false);
        };
        let event = member.fired_event(&self.keys.timer_prefix(), deadline as i64);
        let properties = protocol::Properties::cloud_event().with_message_id(&event.id);
        let body = event.encode().map_err(|source| crate::Error::Encode { what: "timer.fired event", source })?;
        self.bus.publish(&self.events_exchange, TIMER_FIRED, &body, properties).await?;
        let refire_at = chrono::Utc::now().timestamp_millis() + self.refire_after.as_millis() as i64;
        // XX: only while still indexed, since the engine may have committed the event already.
        let _: usize =
            redis::cmd("ZADD").arg(self.keys.deadlines()).arg("XX").arg(refire_at).arg(member_text).query_async(&mut redis).await?;
        Metrics::count(&self.metrics.timers_fired);
        match fired_by {
            FiredBy::Notification => Metrics::count(&self.metrics.timers_fired_by_notification),
            FiredBy::Sweep => Metrics::count(&self.metrics.timers_fired_by_sweep),
        }
        tracing::debug!(thred = %member.thred_id, timer = %member.timer, generation = member.generation, late_ms = chrono::Utc::now().timestamp_millis() - deadline as i64, "timer fired");
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip_even_with_bars_in_the_key() {
        let member = TimerMember::new("t-1", 7, "idle", "session|with|bars");
        assert_eq!(TimerMember::decode(&member.encode()), Some(member.clone()));
        assert_eq!(member.fired_event("p", 1).id, member.fired_event("p", 1).id);
        assert_ne!(member.fired_event("p", 1).id, TimerMember::new("t-1", 8, "idle", "k").fired_event("p", 1).id);
        assert_eq!(TimerMember::decode("no-bars"), None);
    }
}
