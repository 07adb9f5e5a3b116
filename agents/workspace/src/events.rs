//! Where answers go: the bus in production, a collector in tests. Events follow
//! `protocol/CATALOGUE.md`: subject = the task's session, `thredid` and `taskid` extensions.

use std::sync::Mutex;

use protocol::events::EventData;
use protocol::{Bus, CloudEvent, Task};

use crate::error::{Error, Result};

/// The `source` of every event this agent publishes.
pub const EVENT_SOURCE: &str = "/berth/agent/workspace";

/// Receives the events the agent answers with.
#[async_trait::async_trait]
pub trait EventSink: Send + Sync {
    async fn emit(&self, event: CloudEvent) -> Result<()>;
}

/// Publishes on `berth.events` with confirms. Every event names this agent's host (extension
/// `host`), so the engine can tell an answer from a host a session has left.
pub struct BusEvents {
    pub bus: Bus,
    pub host: String,
}

#[async_trait::async_trait]
impl EventSink for BusEvents {
    async fn emit(&self, event: CloudEvent) -> Result<()> {
        let event = event.with_extension("host", self.host.clone());
        self.bus.publish_event(&event).await.map_err(|error| Error::Publish(error.to_string()))
    }
}

/// Keeps events in memory and optionally inspects each one as it is emitted (tests, benchmarks).
pub struct CollectedEvents {
    events: Mutex<Vec<CloudEvent>>,
    #[allow(clippy::type_complexity)]
    inspector: Option<Box<dyn Fn(&CloudEvent) + Send + Sync>>,
}

impl CollectedEvents {
    pub fn new() -> CollectedEvents {
        CollectedEvents { events: Mutex::new(Vec::new()), inspector: None }
    }

    /// Calls `inspector` synchronously with each event before the agent continues: what it sees on
    /// disk is exactly the state at the moment the event was sent.
    pub fn inspecting(inspector: impl Fn(&CloudEvent) + Send + Sync + 'static) -> CollectedEvents {
        CollectedEvents { events: Mutex::new(Vec::new()), inspector: Some(Box::new(inspector)) }
    }

    pub fn events(&self) -> Vec<CloudEvent> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Forgets everything collected so far.
    pub fn take(&self) -> Vec<CloudEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

impl Default for CollectedEvents {
    fn default() -> Self {
        CollectedEvents::new()
    }
}

#[async_trait::async_trait]
impl EventSink for CollectedEvents {
    async fn emit(&self, event: CloudEvent) -> Result<()> {
        if let Some(inspector) = &self.inspector {
            inspector(&event);
        }
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(event);
        Ok(())
    }
}

/// Builds the answers to one task.
#[derive(Debug, Clone)]
pub struct Reply {
    pub session: Option<String>,
    pub thred: Option<String>,
    pub task_id: String,
}

impl Reply {
    pub fn to(task: &Task) -> Reply {
        Reply { session: task.session.clone(), thred: task.thred.clone(), task_id: task.id.to_string() }
    }

    /// The answer carrying `data` (its type says the event's).
    pub fn event<T: EventData>(&self, data: &T) -> CloudEvent {
        let mut event = CloudEvent::of(EVENT_SOURCE, self.session.as_deref(), data).with_extension("taskid", self.task_id.clone());
        if let Some(thred) = &self.thred {
            event = event.with_extension("thredid", thred.clone());
        }
        event
    }
}
