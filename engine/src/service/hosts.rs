//! Hosts, engine side: the reports hosts send (kept in Redis for their gone interval), the view
//! of live hosts placement decides on, placing a thred that takes capacity, moving sessions off
//! drained hosts and noticing hosts that went silent. The decision is pure, in
//! `crate::placement`; the commit checks the chosen host's capacity again, atomically.

use std::collections::BTreeMap;

use protocol::host::HostReport;
use protocol::{AgentKind, CloudEvent};
use redis::AsyncCommands;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{Engine, EventFate, SESSION_MOVE};
use crate::admission::{self, Committed};
use crate::core::Thred;
use crate::pattern::Pattern;
use crate::placement::{self, HostView};
use crate::{Error, Result};

/// Where placement put a thred about to take capacity.
pub(super) enum Placed {
    Here(HostView),
    /// Not placed: it takes no capacity now, or no host reports (the one-host budget applies).
    Unplaced,
    /// Hosts report and none can take it: no room, drained, or not placeable yet.
    NoRoom,
}

/// `user/workspace` of a session thred, as workspace agents report the copies they hold.
fn thred_workspace(thred: &Thred) -> Option<String> {
    let text = |field: &str| thred.context.get(field).and_then(Value::as_str).filter(|value| !value.is_empty());
    Some(format!("{}/{}", text("user")?, text("workspace")?))
}

/// A thred of `user`'s `workspace` and nothing else: what placement reads of a session.
fn probe_thred(user: &str, workspace: &str) -> Thred {
    let mut context = Map::new();
    context.insert("user".to_owned(), json!(user));
    context.insert("workspace".to_owned(), json!(workspace));
    Thred {
        id: String::new(),
        pattern: String::new(),
        key: String::new(),
        exclusive: None,
        state: String::new(),
        context,
        timers: BTreeMap::new(),
        last_timer_generation: 0,
        version: 0,
        created_ms: 0,
        updated_ms: 0,
        ended: false,
        host: None,
    }
}

/// Lua `read_hosts(hosts, draining, host key prefix, capacity key prefix)`: what placement needs of
/// every reporting host in one step, read by [`hosts_read_script`] and inside the bind read (see
/// `store`). Reply: the number of reporting hosts, then for each one not drained its id, container
/// report, workspace report and committed memory and CPU (`false` = none).
pub(super) const READ_HOSTS_LUA: &str = r#"
local function read_hosts(hosts_key, draining_key, host_prefix, capacity_prefix)
  local reporting = redis.call('ZRANGE', hosts_key, 0, -1)
  local reply = {#reporting}
  if #reporting == 0 then return reply end
  local drained = {}
  for _, id in ipairs(redis.call('ZRANGE', draining_key, 0, -1)) do drained[id] = true end
  for _, id in ipairs(reporting) do
    if not drained[id] then
      table.insert(reply, id)
      table.insert(reply, redis.call('GET', host_prefix .. id .. ':container'))
      table.insert(reply, redis.call('GET', host_prefix .. id .. ':workspace'))
      table.insert(reply, redis.call('HGET', capacity_prefix .. id, 'memory'))
      table.insert(reply, redis.call('HGET', capacity_prefix .. id, 'cpu'))
    end
  end
  return reply
end
"#;

/// The live-host view alone (the admitter, a waiting thred let go, tools).
/// KEYS: 1 hosts, 2 draining; ARGV: 1 host report key prefix, 2 per-host capacity key prefix.
pub(super) fn hosts_read_script() -> String {
    format!("{READ_HOSTS_LUA}\nreturn read_hosts(KEYS[1], KEYS[2], ARGV[1], ARGV[2])\n")
}

/// What the hosts' reports allow placing on.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum LiveHosts {
    /// No host reports: a one-host deployment, placed on no host (the profile's own budget applies).
    NoneReporting,
    /// Hosts report, and these may be placed on, each with whether it reported the thred's
    /// workspace. Empty = no room anywhere: every reporting host is drained or not placeable yet,
    /// and an open waits in the queue rather than going to the shared queues, where a drained
    /// host's agents could take it.
    Reporting(Vec<HostView>),
}

/// The hosts `read_hosts` replied. A host is placeable only once both its agents report: each
/// declares its host queue before its first report, and a task sent to a host queue not declared
/// yet would be dropped by the broker (seen when a container agent reported before its host's
/// workspace agent had started: the session's materialize was lost). A host without a readable
/// container report is not placeable either.
pub(super) fn hosts_of(reply: &[redis::Value], thred: &Thred) -> LiveHosts {
    let reporting = reply.first().and_then(|count| redis::from_redis_value::<u64>(count).ok()).unwrap_or(0);
    if reporting == 0 {
        return LiveHosts::NoneReporting;
    }
    let text = |value: &redis::Value| redis::from_redis_value::<Option<String>>(value).ok().flatten();
    let number = |value: &redis::Value| redis::from_redis_value::<Option<u64>>(value).ok().flatten().unwrap_or(0);
    let workspace = thred_workspace(thred);
    let mut hosts = Vec::new();
    for entry in reply[1..].chunks(5) {
        let [id, container, workspace_report, memory, cpu] = entry else { continue };
        let Some(id) = text(id) else { continue };
        let Some(container) = text(container) else { continue };
        let Ok(container) = serde_json::from_str::<HostReport>(&container) else { continue };
        let Some(capacity) = container.capacity else { continue };
        let Some(workspace_report) = text(workspace_report) else { continue };
        let cached: Vec<String> =
            serde_json::from_str::<HostReport>(&workspace_report).ok().and_then(|report| report.workspaces).unwrap_or_default();
        hosts.push(HostView {
            id,
            budget_memory_mib: capacity.memory_mib,
            budget_cpu_millis: capacity.cpu_millis,
            committed: Committed { memory_mib: number(memory), cpu_millis: number(cpu) },
            sessions: capacity.sessions,
            has_workspace: workspace.as_ref().is_some_and(|workspace| cached.contains(workspace)),
        });
    }
    LiveHosts::Reporting(hosts)
}

impl Engine {
    /// Keeps a host's report (`container.host_report`, `workspace.host_report`) for
    /// [`topology::HOST_GONE_AFTER_REPORTS`] of its intervals: the host is gone when it expires. A
    /// report older than that (redelivered late) is dropped, so it cannot bring a gone host back.
    pub(super) async fn record_host_report(&self, event: &CloudEvent) -> Result<EventFate> {
        let report = match HostReport::from_event(event) {
            Ok(report) => report,
            Err(reason) => return Ok(EventFate::Refused(reason)),
        };
        if report.deployment != self.inner.profile.deployment() {
            tracing::debug!(deployment = %report.deployment, "host report of another deployment ignored");
            return Ok(EventFate::Done);
        }
        let now_ms = self.inner.clock.now_ms();
        let age_ms = event.time.map_or(0, |time| now_ms - time.timestamp_millis()).max(0) as u64;
        if age_ms >= report.gone_after_ms() {
            tracing::debug!(host = %report.host, age_ms, "stale host report dropped");
            return Ok(EventFate::Done);
        }
        let text = serde_json::to_string(&report).map_err(|source| Error::Encode { what: "host report", source })?;
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(keys.host_report(&report.host, report.agent))
            .arg(text)
            .arg("PX")
            .arg(report.gone_after_ms() - age_ms)
            .ignore()
            .zadd(keys.hosts(), &report.host, now_ms)
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(EventFate::Done)
    }

    /// The hosts that are not gone, each with what this engine's threds hold there and whether it
    /// reported `thred`'s workspace.
    pub(super) async fn live_hosts(&self, thred: &Thred) -> Result<LiveHosts> {
        let keys = &self.inner.keys;
        let mut invocation = self.inner.hosts_read.prepare_invoke();
        invocation.key(keys.hosts()).key(keys.draining()).arg(keys.host_report_prefix()).arg(keys.capacity_of(Some("")));
        let mut redis = self.inner.redis.clone();
        let reply: Vec<redis::Value> = invocation.invoke_async(&mut redis).await?;
        Ok(hosts_of(&reply, thred))
    }

    /// The host placement would pick now for a new session of `user`'s `workspace`, with the same
    /// reads and decision as a real open, committing nothing (benchmarks and tools). `None` when no
    /// host reports or none has room.
    pub async fn placement_decision(&self, user: &str, workspace: &str) -> Result<Option<String>> {
        let probe = probe_thred(user, workspace);
        match self.live_hosts(&probe).await? {
            LiveHosts::NoneReporting => Ok(None),
            LiveHosts::Reporting(hosts) => Ok(placement::place(self.need(), &hosts).map(|host| host.id.clone())),
        }
    }

    /// What one session of an admitted pattern holds.
    pub(super) fn need(&self) -> Committed {
        Committed { memory_mib: self.inner.capacity.need_memory_mib, cpu_millis: self.inner.capacity.need_cpu_millis }
    }

    /// Whether the next waiting thred would fit now: on a host that reports, or (no host reports)
    /// in the profile's one-host budget next to `committed`.
    pub(super) async fn has_room(&self, thred: &Thred, committed: Committed) -> Result<bool> {
        match self.live_hosts(thred).await? {
            LiveHosts::NoneReporting => Ok(self.inner.capacity.fits(committed)),
            LiveHosts::Reporting(hosts) => Ok(placement::place(self.need(), &hosts).is_some()),
        }
    }

    /// Places a thred that is about to take capacity (a new session admitted, or a waiting one let
    /// go) on a host and records it on the thred; its tasks for host-affine agents follow it there.
    /// A thred of a pattern without admission takes the host its starting event names (the
    /// reconciler's `session.recover` names the host whose inventory found the directory).
    /// `hosts_read`: the hosts admission just read for this thred, if it did. Reusing them saves a
    /// round trip per open; the commit checks the chosen host's capacity again, atomically, so a
    /// view that went stale meanwhile costs a retry, never an overcommitted host.
    pub(super) async fn place(
        &self,
        pattern: &Pattern,
        previous: Option<&Thred>,
        event: &CloudEvent,
        thred: &mut Thred,
        hosts_read: Option<LiveHosts>,
    ) -> Result<Placed> {
        let Some(spec) = &pattern.start.admission else {
            if previous.is_none() {
                thred.host = event
                    .data
                    .get("host")
                    .and_then(Value::as_str)
                    .filter(|host| protocol::profile::is_deployment_id(host))
                    .map(str::to_owned);
            }
            return Ok(Placed::Unplaced);
        };
        let acquires =
            admission::holds_capacity(spec, thred) && !previous.is_some_and(|previous| admission::holds_capacity(spec, previous));
        if !acquires {
            return Ok(Placed::Unplaced);
        }
        let began = std::time::Instant::now();
        let hosts = match hosts_read {
            Some(hosts) => hosts,
            None => self.live_hosts(thred).await?,
        };
        let LiveHosts::Reporting(hosts) = hosts else {
            thred.host = None;
            return Ok(Placed::Unplaced);
        };
        let Some(host) = placement::place(self.need(), &hosts) else { return Ok(Placed::NoRoom) };
        tracing::info!(thred = %thred.id, session = %thred.key, host = %host.id, cached = host.has_workspace,
            free_memory_mib = host.budget_memory_mib.saturating_sub(host.committed.memory_mib), hosts = hosts.len(),
            placement_us = began.elapsed().as_micros() as u64, "placed");
        thred.host = Some(host.id.clone());
        Ok(Placed::Here(host.clone()))
    }

    /// Sends `session.move` to every live thred placed on a drained host that is not moving yet:
    /// the pattern freezes, final-syncs and removes it there, and it is placed again elsewhere
    /// (placement skips drained hosts). The event's id is derived from the thred's version, so each
    /// replica and each round sends it once per version; a thred in a state that does not move
    /// (starting, stopping) gets it again once its version changed.
    pub(super) async fn move_off_draining_hosts(&self) -> Result<()> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let draining: Vec<String> = redis.zrange(keys.draining(), 0, -1).await?;
        if draining.is_empty() {
            return Ok(());
        }
        for pattern in self.inner.patterns.iter().filter(|pattern| pattern.start.admission.is_some() && pattern.knows(SESSION_MOVE)) {
            for thred in self.live_threds_of(pattern).await? {
                let on_drained = thred.host.as_ref().is_some_and(|host| draining.contains(host));
                let moving = thred.context.get("moving").and_then(Value::as_bool).unwrap_or(false);
                if thred.ended || !on_drained || moving {
                    continue;
                }
                let data = protocol::events::SessionMove { from: thred.host.clone() };
                let mut event = CloudEvent::of("/berth/engine/drain", Some(&thred.key), &data).with_extension("thredid", thred.id.clone());
                event.id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-move/{}/{}", thred.id, thred.version).as_bytes()).to_string();
                tracing::info!(session = %thred.key, host = ?thred.host, state = %thred.state, "host drained; moving the session");
                self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &event).await?;
            }
        }
        Ok(())
    }

    /// Forgets hosts whose container report expired (they are gone: placement no longer sees
    /// them), logging each once. Tasks already on a gone host's queue wait there for it.
    pub(super) async fn notice_gone_hosts(&self) -> Result<()> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let ids: Vec<(String, i64)> = redis.zrange_withscores(keys.hosts(), 0, -1).await?;
        for (id, last_ms) in ids {
            let reporting: bool = redis.exists(keys.host_report(&id, AgentKind::Container)).await?;
            if reporting {
                continue;
            }
            // Noted first (idempotent), so failover counts from here whichever replica logs it.
            self.note_gone(&id).await?;
            // Only the replica whose ZREM takes it out logs it.
            let removed: u64 = redis::cmd("ZREM").arg(keys.hosts()).arg(&id).query_async(&mut redis).await?;
            if removed > 0 {
                let silent_ms = self.inner.clock.now_ms() - last_ms;
                tracing::warn!(host = %id, silent_ms, "host gone: no report within its gone interval; no session is placed on it");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thred() -> Thred {
        probe_thred("alice", "w")
    }

    fn report(agent: AgentKind, workspaces: Option<Vec<String>>) -> redis::Value {
        let capacity = (agent == AgentKind::Container).then_some(protocol::host::HostCapacity {
            memory_mib: 8192,
            cpu_millis: 4000,
            committed_memory_mib: 0,
            committed_cpu_millis: 0,
            free_memory_mib: 8192,
            free_cpu_millis: 4000,
            sessions: 0,
        });
        let report = HostReport { host: "h1".to_owned(), deployment: "d".to_owned(), agent, interval_secs: 1, capacity, workspaces };
        redis::Value::BulkString(serde_json::to_vec(&report).expect("report encodes"))
    }

    fn text(value: &str) -> redis::Value {
        redis::Value::BulkString(value.as_bytes().to_vec())
    }

    #[test]
    fn no_report_at_all_is_a_one_host_deployment() {
        assert_eq!(hosts_of(&[redis::Value::Int(0)], &thred()), LiveHosts::NoneReporting);
    }

    #[test]
    fn a_host_is_placeable_once_both_its_agents_report() {
        let both = [
            redis::Value::Int(1),
            text("h1"),
            report(AgentKind::Container, None),
            report(AgentKind::Workspace, Some(vec!["alice/w".to_owned()])),
            text("4096"),
            redis::Value::Nil,
        ];
        let LiveHosts::Reporting(hosts) = hosts_of(&both, &thred()) else { panic!("hosts report") };
        assert_eq!(hosts.len(), 1);
        assert!(hosts[0].has_workspace, "the workspace agent reported alice/w");
        assert_eq!(hosts[0].committed, Committed { memory_mib: 4096, cpu_millis: 0 });
    }

    #[test]
    fn reporting_hosts_none_placeable_is_no_room_not_no_hosts() {
        // Only its container agent reports: not placeable, and not a one-host deployment either
        // (an open sent to the shared queues could be taken by a drained host's agents).
        let container_only =
            [redis::Value::Int(1), text("h1"), report(AgentKind::Container, None), redis::Value::Nil, redis::Value::Nil, redis::Value::Nil];
        assert_eq!(hosts_of(&container_only, &thred()), LiveHosts::Reporting(Vec::new()));
        // Every reporting host drained: `read_hosts` lists none of them.
        assert_eq!(hosts_of(&[redis::Value::Int(2)], &thred()), LiveHosts::Reporting(Vec::new()));
    }
}
