//! The outbox: the messages a committed step sends (tasks, notifications, store operations),
//! written by the commit script with the thred, published with confirms after the commit, then
//! deleted in batches. A crash between the commit and the deletion leaves the outbox, which
//! start-up (or the event's redelivery, as a duplicate) publishes again; agents absorb the repeat
//! by message id.

use protocol::store::{GroupArgs, Operation, PutArgs, UpsertArgs};
use protocol::{topology, CloudEvent, Notification, Properties, Task};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{Engine, EngineConfig, EventFate, Keys};
use crate::core::{Effect, Step, Thred};
use crate::metrics::Metrics;
use crate::pattern::PersistOperation;
use crate::{Error, Result};

/// One message waiting in an outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: String,
    pub body: String,
    /// A task for one host's queue: published `mandatory`, so a queue that is missing (its agent
    /// not started yet, or the queue deleted) fails the event, which is retried with its outbox
    /// kept, instead of the broker dropping the task. Shared queues are declared by the topology.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub must_be_routed: bool,
}

/// The wire body of a message: one that does not encode fails the event (dead-lettered with the
/// reason) rather than going out empty.
fn body_of(encoded: std::result::Result<Vec<u8>, serde_json::Error>, what: &'static str) -> Result<String> {
    let bytes = encoded.map_err(|source| Error::Encode { what, source })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub(super) fn notification_message(config: &EngineConfig, notification: &Notification) -> Result<OutboxMessage> {
    Ok(OutboxMessage {
        exchange: config.notify_exchange.clone(),
        routing_key: notification.routing_key(),
        message_id: notification.id.to_string(),
        body: body_of(notification.encode(), "notification")?,
        must_be_routed: false,
    })
}

/// A notification the engine sends on its own (not a pattern's effect) to a thred's user; its id
/// is derived from `id_name`, so sending it twice is one notification. `None` without a user.
pub(super) fn notification_to_owner(thred: &Thred, state: &str, detail: Value, id_name: &str) -> Option<Notification> {
    let user = thred.context.get("user").and_then(Value::as_str)?;
    Some(Notification {
        id: Uuid::new_v5(&Uuid::NAMESPACE_OID, id_name.as_bytes()),
        user: user.to_owned(),
        session: Some(thred.key.clone()),
        state: state.to_owned(),
        detail,
        cause: None,
    })
}

pub(super) fn task_message(config: &EngineConfig, task: &Task) -> Result<OutboxMessage> {
    task_message_on(config, task, None)
}

/// A task for the agents of `host`, when its agent kind is host-affine and there is a host; for
/// any agent of its kind (the shared queue) otherwise.
pub(super) fn task_message_on(config: &EngineConfig, task: &Task, host: Option<&str>) -> Result<OutboxMessage> {
    let (routing_key, must_be_routed) = match host {
        Some(host) if topology::is_host_affine(task.agent) => (topology::host_routing_key(task.agent, host), true),
        _ => (task.agent.as_str().to_owned(), false),
    };
    Ok(OutboxMessage {
        exchange: config.tasks_exchange.clone(),
        routing_key,
        message_id: task.id.to_string(),
        body: body_of(task.encode(), "task")?,
        must_be_routed,
    })
}

/// Deletes published outboxes in batches until stopped, then deletes the rest.
pub(super) async fn delete_published_outboxes(
    mut redis: ConnectionManager,
    keys: Keys,
    mut published: tokio::sync::mpsc::Receiver<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            match published.try_recv() {
                Ok(key) => key,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                key = published.recv() => match key {
                    Some(key) => key,
                    None => return,
                },
                _ = stop.changed() => {
                    stopping = true;
                    continue;
                }
            }
        };
        let mut batch = vec![first];
        while batch.len() < 500 {
            match published.try_recv() {
                Ok(key) => batch.push(key),
                Err(_) => break,
            }
        }
        let mut pipeline = redis::pipe();
        pipeline.del(&batch).ignore().srem(keys.outboxes(), &batch).ignore();
        if let Err(error) = pipeline.query_async::<()>(&mut redis).await {
            tracing::warn!(%error, outboxes = batch.len(), "could not delete published outboxes; a restart will publish them again");
        }
    }
}

impl Engine {
    /// Publishes every outbox a crash left behind. One that cannot be published now (a host queue
    /// gone) is kept for its event's redelivery or the next start, and the others still go.
    pub async fn replay_outboxes(&self) -> Result<usize> {
        let mut redis = self.inner.redis.clone();
        let outboxes: Vec<String> = redis.smembers(self.inner.keys.outboxes()).await?;
        let mut replayed = 0;
        for outbox_key in &outboxes {
            match self.publish_outbox_at(outbox_key).await {
                Ok(()) => {
                    replayed += 1;
                    Metrics::count(&self.inner.metrics.outboxes_replayed);
                }
                Err(Error::Bus(error @ protocol::bus::BusError::Unroutable { .. })) => {
                    tracing::warn!(outbox = %outbox_key, %error, "outbox not published: kept for a later attempt");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(replayed)
    }

    pub(super) async fn publish_outbox_at(&self, outbox_key: &str) -> Result<()> {
        let mut redis = self.inner.redis.clone();
        let stored: Option<String> = redis.get(outbox_key).await?;
        if let Some(text) = stored {
            let messages: Vec<OutboxMessage> =
                serde_json::from_str(&text).map_err(|error| Error::Corrupt { key: outbox_key.to_owned(), reason: error.to_string() })?;
            self.publish_messages(&messages).await?;
        }
        let mut pipeline = redis::pipe();
        pipeline.del(outbox_key).ignore().srem(self.inner.keys.outboxes(), outbox_key).ignore();
        let _: () = pipeline.query_async(&mut redis).await?;
        Ok(())
    }

    pub(super) async fn publish_messages(&self, messages: &[OutboxMessage]) -> Result<()> {
        let bus = &self.inner.publisher;
        let publishes = messages.iter().map(|message| {
            let properties = Properties::json().with_message_id(&message.message_id);
            let properties = if message.must_be_routed { properties.must_be_routed() } else { properties };
            bus.publish(&message.exchange, &message.routing_key, message.body.as_bytes(), properties)
        });
        for published in futures::future::join_all(publishes).await {
            published?;
        }
        Ok(())
    }

    /// A redelivered event: its commit happened, but its outbox may not have been published.
    pub(super) async fn finish_duplicate(&self, event: &CloudEvent) -> Result<EventFate> {
        Metrics::count(&self.inner.metrics.duplicates);
        tracing::debug!(event_id = %event.id, "duplicate event");
        self.publish_outbox_at(&self.inner.keys.outbox(&event.id)).await?;
        self.forget_fired_timer(event).await?;
        Ok(EventFate::Done)
    }

    /// Turns effects into wire messages; timers are handled by the commit itself.
    pub(super) fn outbox_messages(&self, event: &CloudEvent, step: &Step) -> Result<Vec<OutboxMessage>> {
        let config = &self.inner.config;
        let thred = &step.thred;
        let mut messages = Vec::new();
        let mut persist_operations: Vec<(usize, Operation)> = Vec::new();
        for (index, effect) in step.effects.iter().enumerate() {
            let id = Task::stable_id(&event.id, index);
            match effect {
                Effect::Task { agent, action, args } => {
                    let task = Task {
                        id,
                        agent: *agent,
                        action: action.clone(),
                        session: Some(thred.key.clone()),
                        thred: Some(thred.id.clone()),
                        cause: Some(event.id.clone()),
                        args: args.clone(),
                    };
                    messages.push(task_message_on(config, &task, thred.host.as_deref())?);
                }
                Effect::Persist { operation, collection, id: record_id, doc } => {
                    let record_id = record_id.clone().unwrap_or_else(|| id.to_string());
                    // Always a map: the core refuses a persisted document that is not one.
                    let doc = doc.as_object().cloned().unwrap_or_default();
                    let collection = collection.clone();
                    let operation = match operation {
                        PersistOperation::Put => Operation::Put(PutArgs { collection, id: Some(record_id), doc }),
                        PersistOperation::Upsert => Operation::Upsert(UpsertArgs { collection, id: record_id, doc }),
                    };
                    persist_operations.push((index, operation));
                }
                Effect::Notify { user, state, detail } => {
                    let Some(user) = user else {
                        tracing::warn!(thred = %thred.id, "notification without a user in the thred context; dropped");
                        continue;
                    };
                    let notification = Notification {
                        id,
                        user: user.clone(),
                        session: Some(thred.key.clone()),
                        state: state.clone(),
                        detail: detail.clone(),
                        cause: Some(event.id.clone()),
                    };
                    messages.push(notification_message(config, &notification)?);
                }
                Effect::StartTimer { .. } | Effect::CancelTimer { .. } => {}
            }
        }
        // A step's records (typically the session upsert and the audit put) travel as one
        // all-or-nothing `group`: one message instead of several, and never half applied.
        if let Some(&(first_index, _)) = persist_operations.first() {
            let mut operations: Vec<Operation> = persist_operations.into_iter().map(|(_, operation)| operation).collect();
            let operation = if operations.len() == 1 { operations.remove(0) } else { Operation::Group(GroupArgs { operations }) };
            let task = Task {
                session: Some(thred.key.clone()),
                thred: Some(thred.id.clone()),
                cause: Some(event.id.clone()),
                ..operation.to_task(Task::stable_id(&event.id, first_index))
            };
            messages.push(task_message(config, &task)?);
        }
        Ok(messages)
    }
}
