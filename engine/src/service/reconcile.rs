//! Reconciliation: the container and workspace agents' periodic inventories against the live
//! threds. A container or host directory no live thred owns (past a grace period) is recovered
//! (`session.recover`: the recovery pattern saves it before anything is removed); a container
//! whose owner is unknown is removed, its directory left for the workspace inventory.

use protocol::events::{kind, SessionRecover};
use protocol::ids::{UserId, WorkspaceId};
use protocol::tasks::ContainerRemove;
use protocol::{CloudEvent, Task};
use redis::AsyncCommands;
use serde_json::Value;
use uuid::Uuid;

use super::keys::SEEN_BUCKET_TTL_SECS;
use super::outbox::task_message_on;
use super::{Engine, EventFate, Keys};
use crate::metrics::Metrics;
use crate::Result;

/// The event type of the container agent's periodic inventory (reconciliation).
pub const CONTAINER_INVENTORY: &str = kind::CONTAINER_INVENTORY;
/// The event type of the workspace agent's periodic inventory of host directories.
pub const WORKSPACE_INVENTORY: &str = kind::WORKSPACE_INVENTORY;
/// What the reconciler publishes for a workspace no live thred owns: the recovery pattern
/// freezes, final-syncs and then removes it.
pub const SESSION_RECOVER: &str = kind::SESSION_RECOVER;

impl Engine {
    /// An inventory (`container.inventory`, `workspace.inventory`): every listed container or host
    /// directory whose session has no live thred and that is older than the grace period gets a
    /// `session.recover` event, so the recovery pattern saves it before anything is removed.
    /// Living ones are kept. Inventories of another deployment are ignored.
    pub(super) async fn reconcile(&self, inventory: Inventory, event: &CloudEvent) -> Result<EventFate> {
        let Some(entries) = event.data.get(inventory.list_field()).and_then(Value::as_array) else {
            return Ok(EventFate::Refused(format!("{} without a `{}` list", event.event_type, inventory.list_field())));
        };
        let deployment = self.inner.profile.deployment();
        if let Some(other) = event.data.get("deployment").and_then(Value::as_str).filter(|other| *other != deployment) {
            tracing::debug!(deployment = other, "inventory of another deployment ignored");
            return Ok(EventFate::Done);
        }
        // Which host found what it lists (none from agents older than hosts): its recovery and its
        // removals go to that host's queues.
        let inventory_host = event.data.get("host").and_then(Value::as_str).filter(|host| protocol::profile::is_deployment_id(host));
        let mut redis = self.inner.redis.clone();
        let (seen_today, seen_yesterday) = self.inner.keys.seen(self.inner.clock.now_ms());
        let (seen_recently, seen_before): (bool, bool) =
            redis::pipe().sismember(&seen_today, &event.id).sismember(&seen_yesterday, &event.id).query_async(&mut redis).await?;
        if seen_recently || seen_before {
            return self.finish_duplicate(event).await;
        }
        let now = self.inner.clock.now();
        let grace = chrono::Duration::seconds(self.inner.config.orphan_grace_secs as i64);
        if inventory == Inventory::Containers {
            self.reconcile_pool(entries, event).await?;
        }
        let mut removals = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let Some(session) = entry.get("session").and_then(Value::as_str).filter(|session| !session.is_empty()) else {
                continue;
            };
            // A session failed over from this host: its copy here is saved apart, then removed (no
            // grace: it is not starting here, and its container may still be writing).
            if let Some(host) = inventory_host {
                if self.failed_over_from(host, session).await? {
                    let text = |field: &str| entry.get(field).and_then(Value::as_str).filter(|value| !value.is_empty());
                    if let (Inventory::Directories, Some(user), Some(workspace)) = (inventory, text("user"), text("workspace")) {
                        // Ids the workspace agent would refuse (a manifest Berth did not write): left alone.
                        let (Ok(user), Ok(workspace)) = (UserId::parse(user), WorkspaceId::parse(workspace)) else {
                            tracing::warn!(
                                session,
                                host,
                                user,
                                workspace,
                                "failed-over directory's owner is no valid user and workspace id; left alone"
                            );
                            continue;
                        };
                        tracing::info!(session, host, "a session moved off this host by failover left its directory; recovering it apart");
                        removals.push(self.recover_task(event, index, host, session, &user, &workspace)?);
                    }
                    continue;
                }
            }
            let since = entry.get(inventory.time_field()).and_then(created_time);
            if since.is_some_and(|since| now - since < grace) {
                continue;
            }
            let live: usize = redis.scard(self.inner.keys.live(session)).await?;
            if live > 0 {
                continue;
            }
            let text = |field: &str| entry.get(field).and_then(Value::as_str).filter(|value| !value.is_empty());
            match (text("user"), text("workspace")) {
                (Some(user), Some(workspace)) => {
                    // Ids no reader would accept (a label or a manifest Berth did not write): left alone.
                    let (Ok(user_id), Ok(workspace_id)) = (UserId::parse(user), WorkspaceId::parse(workspace)) else {
                        tracing::warn!(
                            session,
                            user,
                            workspace,
                            what = inventory.what(),
                            "owner is no valid user and workspace id; left alone"
                        );
                        continue;
                    };
                    let recover = recover_event(&self.inner.keys, inventory, session, &user_id, &workspace_id, entry, inventory_host);
                    tracing::info!(session, user, workspace, what = inventory.what(), "no live session owns it; recovering");
                    self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &recover).await?;
                    Metrics::count(&self.inner.metrics.recoveries);
                }
                // An inventory from an agent that does not report whose it is: a container can still
                // go (its directory stays, and the workspace inventory recovers it); a directory
                // cannot be saved without knowing its prefix, so it is left alone.
                _ => {
                    let Some(container_id) = text("container_id").filter(|_| inventory == Inventory::Containers) else {
                        tracing::warn!(session, "stranded directory without user and workspace; left alone");
                        continue;
                    };
                    tracing::info!(session, container_id, "orphan container without user and workspace; removing it, its directory stays");
                    let remove = ContainerRemove { container_id: Some(container_id.to_owned()) };
                    let task =
                        Task { cause: Some(event.id.clone()), ..Task::of(Task::stable_id(&event.id, index), Some(session), &remove) };
                    // To the host whose inventory found it: another host's agent would not see it.
                    removals.push(task_message_on(&self.inner.config, &task, inventory_host)?);
                }
            }
        }
        self.publish_messages(&removals).await?;
        let _: () = redis::pipe()
            .sadd(&seen_today, &event.id)
            .ignore()
            .expire(&seen_today, SEEN_BUCKET_TTL_SECS as i64)
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(EventFate::Done)
    }
}

/// Which agent's inventory an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Inventory {
    Containers,
    Directories,
}

impl Inventory {
    pub(super) fn of(event_type: &str) -> Option<Inventory> {
        match event_type {
            CONTAINER_INVENTORY => Some(Inventory::Containers),
            WORKSPACE_INVENTORY => Some(Inventory::Directories),
            _ => None,
        }
    }

    fn list_field(self) -> &'static str {
        match self {
            Inventory::Containers => "containers",
            Inventory::Directories => "directories",
        }
    }

    /// The entry's age is measured from this field: a young one may belong to a starting session.
    fn time_field(self) -> &'static str {
        match self {
            Inventory::Containers => "created",
            Inventory::Directories => "modified",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Inventory::Containers => "orphan container",
            Inventory::Directories => "stranded directory",
        }
    }
}

/// The `session.recover` event for one inventory entry. Its id is derived from what was found
/// (the container, or the directory as last modified), so the same finding reported by several
/// inventories starts one recovery. It names the host whose inventory found it (`data.host`): the
/// recovery thred is placed there, so its freeze, sync and removal run where the finding is.
fn recover_event(
    keys: &Keys,
    inventory: Inventory,
    session: &str,
    user: &UserId,
    workspace: &WorkspaceId,
    entry: &Value,
    host: Option<&str>,
) -> CloudEvent {
    let finding = match inventory {
        Inventory::Containers => format!("container/{}", entry.get("container_id").and_then(Value::as_str).unwrap_or_default()),
        Inventory::Directories => format!("directory/{}", entry.get("modified").and_then(Value::as_str).unwrap_or_default()),
    };
    let data = SessionRecover {
        user: user.clone(),
        workspace: workspace.clone(),
        reason: inventory.what().to_owned(),
        container_id: entry.get("container_id").and_then(Value::as_str).map(str::to_owned),
        host: host.map(str::to_owned),
    };
    let finding = match host {
        Some(host) => format!("{host}/{finding}"),
        None => finding,
    };
    let mut event = CloudEvent::of("/berth/engine/reconciler", Some(session), &data);
    event.id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-recover/{}/{session}/{finding}", keys.prefix).as_bytes()).to_string();
    event
}

pub(super) fn created_time(value: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    match value {
        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text).ok().map(|time| time.with_timezone(&chrono::Utc)),
        Value::Number(number) => chrono::DateTime::from_timestamp(number.as_i64()?, 0),
        _ => None,
    }
}
