//! The activity gate: decides whether user input on a socket becomes a `session.activity` event.
//!
//! Two levels. A local debouncer folds bursts on this instance without any IO. When Redis is
//! configured, a `SET NX PX` on a per-session key then makes the interval hold across every
//! instance, so a user with tabs on two instances still produces one event per interval. Redis
//! trouble fails open (the event is published): a spare activity event only resets a timer, a lost
//! one could pause a session under a working user.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::time::Instant;

use crate::throttle::ActivityDebouncer;

/// How long admission waits for Redis before publishing anyway.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How long start-up waits for Redis before running with the local debouncer only.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether an activity was turned into an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Publish,
    /// Folded into an event already published within the interval (here or on another instance).
    Debounced,
}

pub struct ActivityGate {
    interval: Duration,
    local: Mutex<ActivityDebouncer>,
    shared: Option<ConnectionManager>,
}

impl std::fmt::Debug for ActivityGate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ActivityGate").field("interval", &self.interval).field("shared", &self.shared.is_some()).finish()
    }
}

impl ActivityGate {
    /// A gate debouncing over `interval`; across instances when `redis_url` is given and reachable.
    pub async fn new(interval: Duration, redis_url: Option<&str>) -> ActivityGate {
        let shared = match redis_url {
            None => None,
            Some(url) => match connect(url).await {
                Ok(manager) => Some(manager),
                Err(error) => {
                    tracing::warn!(%error, "redis unavailable; activity is debounced per instance only");
                    None
                }
            },
        };
        ActivityGate { interval, local: Mutex::new(ActivityDebouncer::new(interval)), shared }
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub async fn admit(&self, session: &str) -> Admission {
        let locally_admitted = self.local.lock().unwrap_or_else(PoisonError::into_inner).admit(session, Instant::now());
        if !locally_admitted {
            return Admission::Debounced;
        }
        let Some(manager) = &self.shared else { return Admission::Publish };
        let mut manager = manager.clone();
        let interval_millis = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut command = redis::cmd("SET");
        command.arg(activity_key(session)).arg(1).arg("NX").arg("PX").arg(interval_millis);
        let claim = command.query_async::<Option<String>>(&mut manager);
        match tokio::time::timeout(REDIS_TIMEOUT, claim).await {
            Ok(Ok(Some(_))) => Admission::Publish,
            Ok(Ok(None)) => Admission::Debounced,
            Ok(Err(error)) => {
                tracing::warn!(session_id = %session, %error, "redis refused the activity claim; publishing anyway");
                Admission::Publish
            }
            Err(_) => {
                tracing::warn!(session_id = %session, "redis did not answer the activity claim in time; publishing anyway");
                Admission::Publish
            }
        }
    }

    /// Whether the shared Redis keeps the engine's thred state across its own restart (the
    /// append-only file is on), for `/readyz`; `None` when Redis is not connected or not answering.
    pub async fn redis_append_only(&self) -> Option<bool> {
        let mut manager = self.shared.clone()?;
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("appendonly");
        let reply = tokio::time::timeout(REDIS_TIMEOUT, command.query_async::<Vec<String>>(&mut manager)).await.ok()?.ok()?;
        Some(reply.get(1).is_some_and(|value| value == "yes"))
    }

    /// Gives the interval back after the event could not be published, so the next input retries.
    pub async fn forget(&self, session: &str) {
        self.local.lock().unwrap_or_else(PoisonError::into_inner).forget(session);
        if let Some(manager) = &self.shared {
            let mut manager = manager.clone();
            let mut command = redis::cmd("DEL");
            command.arg(activity_key(session));
            let release = command.query_async::<i64>(&mut manager);
            let _ = tokio::time::timeout(REDIS_TIMEOUT, release).await;
        }
    }
}

async fn connect(url: &str) -> Result<ConnectionManager, String> {
    let client = redis::Client::open(url).map_err(|error| error.to_string())?;
    match tokio::time::timeout(REDIS_CONNECT_TIMEOUT, client.get_connection_manager()).await {
        Ok(Ok(manager)) => Ok(manager),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {REDIS_CONNECT_TIMEOUT:?}")),
    }
}

fn activity_key(session: &str) -> String {
    format!("berth:session-activity:{session}")
}
