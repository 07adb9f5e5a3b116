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
//!
//! **Both records are bounded for a host that never returns.** `gone` matters only while a live
//! thred is still placed on the host: once the host has been gone for `failover_after` and none is
//! (all its sessions reopened elsewhere or ended), the round drops it, so a dead host does not keep
//! the round walking every live thred each second forever. Its `failed-over:<host>` is what a
//! return needs, so it stays, indexed in `<prefix>:failed-over` (host → its latest failover, ms),
//! until the profile's `hosts.forget_after` has passed since that failover; then both go (one
//! script, so a failover recorded meanwhile is kept). A host back later still cannot write over a
//! moved session (the fence refuses its syncs); its copies then stay on it for an operator.

use redis::AsyncCommands;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{notification_message, task_message_on, Engine};
use crate::core::Thred;
use crate::Result;
use protocol::events::{kind, SessionFailover};
use protocol::ids::{UserId, WorkspaceId};
use protocol::tasks::{ContainerRemove, WorkspaceRecover};
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

/// The hosts with a `failed-over:<host>` record, each scored by its latest failover (ms).
fn failed_over_index_key(engine: &Engine) -> String {
    format!("{}:failed-over", engine.inner.keys.prefix)
}

/// Drops a host's failed-over record (KEYS[2]) and its index entry (KEYS[1], member ARGV[1]) if
/// its latest failover is still at or before ARGV[2]: a failover another replica recorded since
/// the index was read keeps the record.
const FORGET_FAILED_OVER: &str = r"
local latest = redis.call('ZSCORE', KEYS[1], ARGV[1])
if latest and tonumber(latest) <= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
";

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
    /// One failover round (the admitter runs it every second): forgets failovers older than
    /// `hosts.forget_after`, notes when hosts went and came back, sends `session.failover` to the
    /// live sessions of hosts gone long enough, and drops a gone host none of them is placed on.
    pub(super) async fn fail_over_gone_hosts(&self) -> Result<()> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let now_ms = self.inner.clock.now_ms();
        let after_ms = self.inner.profile.failover_after().as_millis() as i64;
        self.forget_old_failovers(now_ms).await?;
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
        // The gone hosts some live thred is still placed on (in any state: one waiting for its
        // host, or queued before it is placed again, may still need the host noted).
        let mut occupied = std::collections::HashSet::new();
        for pattern in self.inner.patterns.iter().filter(|pattern| pattern.start.admission.is_some() && pattern.knows(SESSION_FAILOVER)) {
            let waiting: &[String] = pattern.start.admission.as_ref().map(|spec| spec.waiting_states.as_slice()).unwrap_or_default();
            for thred in self.live_threds_of(pattern).await? {
                let Some(host) = thred.host.clone() else { continue };
                if thred.ended {
                    continue;
                }
                if gone.contains_key(&host) {
                    occupied.insert(host.clone());
                }
                if waiting.contains(&thred.state) {
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
        // A host gone past failover_after that no live thred is placed on has nothing left to
        // fail over: dropped, so the round is back to doing nothing. No thred is placed on it
        // meanwhile (placement takes only reporting hosts); if it reports again, it is a host
        // like any other, noted gone afresh should it go again. Its failed-over record stays.
        for (host, since) in &gone {
            if now_ms - since >= after_ms && !occupied.contains(host) {
                let removed: u64 = redis.zrem(&gone_key, host).await?;
                if removed > 0 {
                    tracing::info!(host = %host, "gone host has no live session left on it; no longer watched for failover");
                }
            }
        }
        Ok(())
    }

    /// Drops the failed-over record of every host whose latest failover is older than
    /// `hosts.forget_after`: a host that never returns is not remembered forever.
    async fn forget_old_failovers(&self, now_ms: i64) -> Result<()> {
        let mut redis = self.inner.redis.clone();
        let index = failed_over_index_key(self);
        let cutoff_ms = now_ms - self.inner.profile.forget_after().as_millis() as i64;
        let old: Vec<(String, i64)> = redis.zrangebyscore_withscores(&index, "-inf", cutoff_ms).await?;
        for (host, latest_ms) in old {
            let forgotten: u64 = redis::Script::new(FORGET_FAILED_OVER)
                .key(&index)
                .key(failed_over_key(self, &host))
                .arg(&host)
                .arg(cutoff_ms)
                .invoke_async(&mut redis)
                .await?;
            if forgotten > 0 {
                tracing::info!(host = %host, last_failover = ?rfc3339(latest_ms),
                    "host not back within hosts.forget_after of its last failover; forgot which sessions moved off it");
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
        // saved apart (never synced over the moved session's work). The index entry, in the same
        // transaction, is what lets the record be forgotten if the host never returns.
        let now_ms = self.inner.clock.now_ms();
        let _: () = redis::pipe()
            .atomic()
            .hset(failed_over_key(self, host), &thred.key, now_ms)
            .ignore()
            .zadd(failed_over_index_key(self), host, now_ms)
            .ignore()
            .query_async(&mut redis)
            .await?;
        let mut event = CloudEvent::of("/berth/engine/failover", Some(&thred.key), &data).with_extension("thredid", thred.id.clone());
        event.id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-failover/{}/{}", thred.id, thred.version).as_bytes()).to_string();
        tracing::warn!(session = %thred.key, host, state = %thred.state, gone_ms = now_ms - gone_since_ms,
            "host gone past hosts.failover_after; moving the session to another host from its last sync");
        self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &event).await?;
        Ok(())
    }

    /// Notes that `host` is gone from now (kept if it was already noted): failover counts from here.
    pub(super) async fn note_gone(&self, host: &str) -> Result<()> {
        let mut redis = self.inner.redis.clone();
        let now_ms = self.inner.clock.now_ms();
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
        user: &UserId,
        workspace: &WorkspaceId,
    ) -> Result<super::OutboxMessage> {
        let args = WorkspaceRecover {
            user: user.clone(),
            workspace: workspace.clone(),
            host: host.to_owned(),
            prefix: recovered_prefix(host, session),
        };
        let task = Task { cause: Some(cause.id.clone()), ..Task::of(Task::stable_id(&cause.id, index), Some(session), &args) };
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
        let remove = ContainerRemove { container_id: None };
        let task = Task { cause: Some(event.id.clone()), ..Task::of(Task::stable_id(&event.id, 0), Some(session), &remove) };
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
