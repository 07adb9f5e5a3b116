//! Failover: the sessions of a host that stays gone reopen on another host, and what the host held
//! is saved as a recovered copy when it returns.
//!
//! A host is gone when its container report expired (`notice_gone_hosts`, which notes it here:
//! `<prefix>:gone`, host → ms; the failover round does nothing while that is empty). Once a host has been gone for the profile's
//! `hosts.failover_after`, every live session placed there gets `session.failover` (its id derived
//! from the thred's version, like `session.move`): the session pattern goes to `moving` (the user
//! is told that changes since the last sync stayed on that host), then, at the next round, to the
//! queue, from which admission places it on a host that reports and it materializes from the
//! object store. No task goes to the gone host for it, and none of its old tasks is re-sent: they
//! stay on that host's queue.
//!
//! The engine records which sessions it moved off which host (`<prefix>:failed-over:<host>`,
//! session → ms). When that host's agents come back their inventories list those directories and
//! containers: a directory gets a `recover` task (the workspace agent uploads it under
//! `recovered/<host>/<session>/`, confirms it by listing, removes it and answers
//! `workspace.recovered`), and only then its container a `remove`; the user is notified. Answers
//! from a host the thred no longer lives on are stale and dropped (`is_stale_answer`), and the
//! moved session's fence in the store (`.berth/owner.json`, written by its materialize) makes the
//! workspace agent refuse a stale sync there.

use redis::AsyncCommands;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{notification_message, task_message_on, Engine};
use crate::core::Thred;
use crate::Result;
use protocol::events::{kind, SessionFailover};
use protocol::{AgentKind, CloudEvent, Notification, Task};

/// What the engine sends a live session placed on a host gone for `hosts.failover_after`.
pub const SESSION_FAILOVER: &str = kind::SESSION_FAILOVER;
/// What the workspace agent answers once a returning host's copy of a moved session is stored.
pub const WORKSPACE_RECOVERED: &str = kind::WORKSPACE_RECOVERED;
/// Where a returning host's copy of a session that lives elsewhere (or ended) is stored, under the
/// object store's root: never a key of any workspace, so it overwrites nobody's newer work.
pub fn recovered_prefix(host: &str, session: &str) -> String {
    format!("recovered/{host}/{session}")
}

fn gone_key(engine: &Engine) -> String {
    format!("{}:gone", engine.inner.keys.prefix)
}

fn failed_over_key(engine: &Engine, host: &str) -> String {
    format!("{}:failed-over:{host}", engine.inner.keys.prefix)
}

fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms).map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// An answer (`container.*`, `workspace.*`) from another host than the one `thred` lives on now:
/// a task that waited on a gone host's queue, run when that host came back after its session
/// moved. Answers that name no host (agents older than hosts) are taken as they are.
pub fn is_stale_answer(event: &CloudEvent, thred: &Thred) -> bool {
    let from_host_agent = event.event_type.starts_with("container.") || event.event_type.starts_with("workspace.");
    match (event.extension("host"), thred.host.as_deref()) {
        (Some(from), Some(placed)) => from_host_agent && from != placed,
        _ => false,
    }
}

/// The text the user is told when their session leaves a gone host.
fn failover_message(from: &str, gone_since: Option<&str>, last_synced: Option<&str>) -> String {
    let since = gone_since.map(|time| format!(" since {time}")).unwrap_or_default();
    let base = match last_synced {
        Some(time) => format!("its last sync at {time}"),
        None => "the workspace as last stored".to_owned(),
    };
    format!(
        "host {from} has been unreachable{since}: the session reopens on another host from {base}; changes made on {from} after that \
         stayed there and will be saved as a recovered copy (not over your newer work) when {from} returns"
    )
}

impl Engine {
    /// One failover round (the admitter runs it every second): notes when hosts went and came
    /// back, and sends `session.failover` to the live sessions of hosts gone long enough.
    pub(super) async fn fail_over_gone_hosts(&self) -> Result<()> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let after_ms = self.inner.profile.failover_after().as_millis() as i64;
        let gone_key = gone_key(self);
        let mut gone: std::collections::HashMap<String, i64> =
            redis.zrange_withscores::<_, Vec<(String, i64)>>(&gone_key, 0, -1).await?.into_iter().collect();
        if gone.is_empty() {
            // The usual case: no live thred is looked at.
            return Ok(());
        }
        // A host that reports again is back: the next time it goes, it is gone from then on.
        for host in gone.keys().cloned().collect::<Vec<_>>() {
            let reporting: bool = redis.exists(keys.host_report(&host, AgentKind::Container)).await?;
            if reporting {
                let _: () = redis.zrem(&gone_key, &host).await?;
                gone.remove(&host);
                tracing::info!(host = %host, "host reports again");
            }
        }
        // Only hosts gone long enough matter; none yet is the common case while one is away.
        if !gone.values().any(|since| now_ms - since >= after_ms) {
            return Ok(());
        }
        for pattern in self.inner.patterns.iter().filter(|pattern| pattern.start.admission.is_some() && pattern.knows(SESSION_FAILOVER)) {
            let waiting: &[String] = pattern.start.admission.as_ref().map(|spec| spec.waiting_states.as_slice()).unwrap_or_default();
            for thred in self.live_threds_of(pattern).await? {
                let Some(host) = thred.host.clone() else { continue };
                if thred.ended || waiting.contains(&thred.state) {
                    continue;
                }
                // A host not noted gone reports (or `notice_gone_hosts`, earlier in the same round,
                // notes it the moment its report expires).
                let Some(gone_since) = gone.get(&host).copied() else { continue };
                if now_ms - gone_since < after_ms {
                    continue;
                }
                self.send_failover(&thred, &host, gone_since, after_ms).await?;
            }
        }
        Ok(())
    }

    async fn send_failover(&self, thred: &Thred, host: &str, gone_since_ms: i64, after_ms: i64) -> Result<()> {
        let mut redis = self.inner.redis.clone();
        let gone_since = rfc3339(gone_since_ms);
        let last_synced = thred.context.get("last_synced_ms").and_then(Value::as_i64).filter(|ms| *ms > 0).and_then(rfc3339);
        let data = SessionFailover {
            from: host.to_owned(),
            message: failover_message(host, gone_since.as_deref(), last_synced.as_deref()),
            gone_since,
            failover_after_secs: (after_ms / 1000) as u64,
            last_synced_at: last_synced,
            recovered_prefix: recovered_prefix(host, &thred.key),
        };
        // Recorded before the event goes: when the host returns, its copy of this session is
        // saved apart (never synced over the moved session's work).
        let _: () = redis.hset(failed_over_key(self, host), &thred.key, chrono::Utc::now().timestamp_millis()).await?;
        let mut event = CloudEvent::of("/berth/engine/failover", Some(&thred.key), &data).with_extension("thredid", thred.id.clone());
        event.id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-failover/{}/{}", thred.id, thred.version).as_bytes()).to_string();
        tracing::warn!(session = %thred.key, host, state = %thred.state, gone_ms = chrono::Utc::now().timestamp_millis() - gone_since_ms,
            "host gone past hosts.failover_after; moving the session to another host from its last sync");
        self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &event).await?;
        Ok(())
    }

    /// Notes that `host` is gone from now (kept if it was already noted): failover counts from here.
    pub(super) async fn note_gone(&self, host: &str) -> Result<()> {
        let mut redis = self.inner.redis.clone();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let _: () = redis::cmd("ZADD").arg(gone_key(self)).arg("NX").arg(now_ms).arg(host).query_async(&mut redis).await?;
        Ok(())
    }

    /// Whether `session`, found on `host` by its inventory, was moved off that host by a failover
    /// (its copy there is recovered apart, not synced back into the workspace).
    pub(super) async fn failed_over_from(&self, host: &str, session: &str) -> Result<bool> {
        let mut redis = self.inner.redis.clone();
        Ok(redis.hexists(failed_over_key(self, host), session).await?)
    }

    /// The task that saves a returning host's copy of a session it no longer runs:
    /// `recover {user, workspace, host, prefix}` to that host's workspace agent.
    pub(super) fn recover_task(
        &self,
        cause: &CloudEvent,
        index: usize,
        host: &str,
        session: &str,
        user: &str,
        workspace: &str,
    ) -> Result<super::OutboxMessage> {
        let task = Task {
            id: Task::stable_id(&cause.id, index),
            agent: AgentKind::Workspace,
            action: "recover".to_owned(),
            session: Some(session.to_owned()),
            thred: None,
            cause: Some(cause.id.clone()),
            args: json!({"user": user, "workspace": workspace, "host": host, "prefix": recovered_prefix(host, session)}),
        };
        task_message_on(&self.inner.config, &task, Some(host))
    }

    /// After `workspace.recovered`: the copy is stored and the directory gone, so the container goes
    /// too (on the host that answered), the host forgets the session, and the user is told where
    /// the copy is (`detail.recovered`).
    pub(super) async fn after_recovered(&self, event: &CloudEvent) -> Result<()> {
        let (Some(session), Some(host)) = (event.subject.as_deref(), event.data.get("host").and_then(Value::as_str)) else {
            return Ok(());
        };
        if !protocol::profile::is_deployment_id(host) {
            return Ok(());
        }
        let task = Task {
            id: Task::stable_id(&event.id, 0),
            agent: AgentKind::Container,
            action: "remove".to_owned(),
            session: Some(session.to_owned()),
            thred: None,
            cause: Some(event.id.clone()),
            args: json!({}),
        };
        let mut messages = vec![task_message_on(&self.inner.config, &task, Some(host))?];
        if let Some(user) = event.data.get("user").and_then(Value::as_str) {
            // The session itself is where it is (running elsewhere, typically): the notification
            // carries its state, so no client takes the copy for the session's end. Only a session
            // that ended meanwhile is told `recovered`, the recovery pattern's end.
            let state = match self.live_threds(session).await?.into_iter().find(|thred| !thred.ended) {
                Some(thred) => thred.state,
                None => "recovered".to_owned(),
            };
            let notification = Notification {
                id: Task::stable_id(&event.id, 1),
                user: user.to_owned(),
                session: Some(session.to_owned()),
                state,
                detail: json!({"recovered": event.data}),
                cause: Some(event.id.clone()),
            };
            messages.push(notification_message(&self.inner.config, &notification)?);
        }
        self.publish_messages(&messages).await?;
        let mut redis = self.inner.redis.clone();
        let _: () = redis.hdel(failed_over_key(self, host), session).await?;
        tracing::info!(session, host, prefix = ?event.data.get("prefix"), "a returning host's copy of a moved session is saved apart");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thred_on(host: Option<&str>) -> Thred {
        Thred {
            id: "t".to_owned(),
            pattern: "p".to_owned(),
            key: "s".to_owned(),
            exclusive: None,
            state: "running".to_owned(),
            context: serde_json::Map::new(),
            timers: std::collections::BTreeMap::new(),
            last_timer_generation: 0,
            version: 1,
            created_ms: 0,
            updated_ms: 0,
            ended: false,
            host: host.map(str::to_owned),
        }
    }

    #[track_caller]
    fn check(event_type: &str, from: Option<&str>, placed: Option<&str>, stale: bool) {
        let mut event = CloudEvent::new(event_type, "/t", Some("s"), json!({}));
        if let Some(from) = from {
            event = event.with_extension("host", from.to_owned());
        }
        assert_eq!(is_stale_answer(&event, &thred_on(placed)), stale, "{event_type} from {from:?} to a thred on {placed:?}");
    }

    #[test]
    fn only_an_answer_from_another_host_is_stale() {
        check("workspace.synced", Some("h2"), Some("local"), true);
        check("container.exited", Some("h2"), Some("local"), true);
        check("workspace.synced", Some("local"), Some("local"), false);
        // No host on either side: as before hosts.
        check("workspace.synced", None, Some("local"), false);
        check("workspace.synced", Some("h2"), None, false);
        // Not an agent's answer.
        check("session.close", Some("h2"), Some("local"), false);
    }

    #[test]
    fn the_message_says_what_stayed_behind() {
        let text = failover_message("h2", Some("2026-12-01T15:00:00Z"), Some("2026-12-01T14:59:58Z"));
        assert!(text.contains("since 2026-12-01T15:00:00Z") && text.contains("last sync at 2026-12-01T14:59:58Z"), "{text}");
        assert!(text.contains("recovered copy") && text.contains("when h2 returns"), "{text}");
        assert!(failover_message("h2", None, None).contains("as last stored"));
    }
}
