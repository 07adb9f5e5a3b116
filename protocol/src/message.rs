//! Task and notification messages: what the engine sends to agents and to users.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The agents that take tasks. The routing key on `berth.tasks` is [`AgentKind::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    Container,
    Workspace,
    Persistence,
    Session,
}

impl AgentKind {
    pub const ALL: [AgentKind; 4] = [AgentKind::Container, AgentKind::Workspace, AgentKind::Persistence, AgentKind::Session];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Container => "container",
            AgentKind::Workspace => "workspace",
            AgentKind::Persistence => "persistence",
            AgentKind::Session => "session",
        }
    }
}

impl fmt::Display for AgentKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for AgentKind {
    type Err = String;
    fn from_str(text: &str) -> Result<AgentKind, String> {
        AgentKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| format!("unknown agent kind {text:?} (expected container, workspace, persistence or session)"))
    }
}

/// A unit of work for one agent. Agents must be idempotent by `id`: delivery is at least once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Stable id: the same causing event and effect index always give the same id.
    pub id: Uuid,
    pub agent: AgentKind,
    /// What to do, e.g. `provision`, `materialize`, `sync`, `put`.
    pub action: String,
    /// The session (thred key) this task belongs to, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The thred that emitted the task, so the agent's answer can be routed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thred: Option<String>,
    /// The id of the event that caused this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(default)]
    pub args: Value,
}

impl Task {
    /// The stable id of the `effect_index`th effect caused by event `cause_event_id`.
    pub fn stable_id(cause_event_id: &str, effect_index: usize) -> Uuid {
        Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth/{cause_event_id}/{effect_index}").as_bytes())
    }

    pub fn decode(bytes: &[u8]) -> Result<Task, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The encoded task; the bus publishes this, so a task that does not encode is an error.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// [`Task::encode`] for tests and logs: a failure is logged and gives no bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode().unwrap_or_else(|error| {
            tracing::error!(task_id = %self.id, %error, "a task did not encode");
            Vec::new()
        })
    }
}

/// A message for the sockets of one user, routed on `berth.notify` with key `user.<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    /// Stable id, like a task's, so a redelivered notification can be recognised.
    pub id: Uuid,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The session's state after the transition (`running`, `idle`, …).
    pub state: String,
    /// Anything else the pattern chose to tell: progress, host and port, error.
    #[serde(default)]
    pub detail: Value,
    /// The id of the event whose handling produced this notification, so whoever published that
    /// event (the session agent answering an `open`) can tell which session it ended up in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl Notification {
    pub fn routing_key(&self) -> String {
        crate::topology::user_routing_key(&self.user)
    }

    pub fn decode(bytes: &[u8]) -> Result<Notification, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The encoded notification; the bus publishes this.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// [`Notification::encode`] for tests and logs: a failure is logged and gives no bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode().unwrap_or_else(|error| {
            tracing::error!(notification_id = %self.id, %error, "a notification did not encode");
            Vec::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_ids_are_stable_and_distinct() {
        assert_eq!(Task::stable_id("e1", 0), Task::stable_id("e1", 0));
        assert_ne!(Task::stable_id("e1", 0), Task::stable_id("e1", 1));
        assert_ne!(Task::stable_id("e1", 0), Task::stable_id("e2", 0));
    }

    #[test]
    fn unknown_task_fields_are_refused() {
        let text = r#"{"id":"01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f","agent":"container","action":"pause","bogus":1}"#;
        let error = Task::decode(text.as_bytes()).unwrap_err().to_string();
        assert!(error.contains("unknown field `bogus`"), "{error}");
    }

    #[test]
    fn agent_kinds_parse() {
        assert_eq!("workspace".parse::<AgentKind>(), Ok(AgentKind::Workspace));
        assert!("docker".parse::<AgentKind>().is_err());
    }
}
