//! The `args` of every task in `protocol/CATALOGUE.md`'s Tasks table, one type per agent and
//! action. Code that sends a task builds it from its type ([`Task::of`]); an agent reads the args
//! back with [`Task::args_as`], which refuses a task of another agent or action and args that do not
//! fit, with the reason an agent dead-letters the task with. A test checks the catalogue's table
//! against these types, so the two cannot drift. The persistence agent's tasks are
//! [`crate::store::Operation`]s.
//!
//! **Unknown arguments.** The workspace agent's tasks and the warm-pool tasks refuse arguments
//! they do not know (`deny_unknown_fields`): a misspelt `final` or `fence` must not silently do the
//! opposite. The container agent's session tasks ignore them, as they always have.
//!
//! **Identifiers.** Users, workspaces, sessions and warm-pool slots are [`UserId`],
//! [`WorkspaceId`] and [`SessionId`]: plain strings on the wire, checked by their one rule when
//! the args are read. A `slot` of `""` (what a pattern sends for "no slot") reads as none.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::events::to_data;
use crate::ids::{SessionId, UserId, WorkspaceId};
use crate::message::{AgentKind, Task};

/// The args of one task action.
pub trait TaskArgs: Serialize + DeserializeOwned {
    /// The agent that takes it.
    const AGENT: AgentKind;
    /// The task's `action`.
    const ACTION: &'static str;
}

/// A task whose args did not match their type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("expected a {expected_agent} `{expected_action}` task, got a {agent} `{action}` one")]
    WrongTask { expected_agent: AgentKind, expected_action: &'static str, agent: AgentKind, action: String },
    #[error("args of `{action}`: {reason}")]
    Invalid { action: String, reason: String },
}

impl Task {
    /// A new task carrying `args`, to the agent and with the action of `T`; no thred, no cause.
    pub fn of<T: TaskArgs>(id: Uuid, session: Option<&str>, args: &T) -> Task {
        Task {
            id,
            agent: T::AGENT,
            action: T::ACTION.to_owned(),
            session: session.map(str::to_owned),
            thred: None,
            cause: None,
            args: to_data(args),
        }
    }

    /// The task's args as `T`, refused when the task is for another agent or action or the args
    /// do not fit. A task without args reads as `{}`, which fits the types whose fields are all
    /// optional.
    pub fn args_as<T: TaskArgs>(&self) -> Result<T, ArgsError> {
        if self.agent != T::AGENT || self.action != T::ACTION {
            return Err(ArgsError::WrongTask {
                expected_agent: T::AGENT,
                expected_action: T::ACTION,
                agent: self.agent,
                action: self.action.clone(),
            });
        }
        let args = if self.args.is_null() { Value::Object(serde_json::Map::new()) } else { self.args.clone() };
        serde_json::from_value(args).map_err(|error| ArgsError::Invalid { action: self.action.clone(), reason: error.to_string() })
    }
}

macro_rules! task_args {
    ($($type:ident => $agent:ident $action:literal),* $(,)?) => {
        $(impl TaskArgs for $type {
            const AGENT: AgentKind = AgentKind::$agent;
            const ACTION: &'static str = $action;
        })*

        /// Each args type's agent, action and wire field names.
        fn registered() -> Vec<(AgentKind, &'static str, &'static [&'static str])> {
            vec![$((AgentKind::$agent, $action, crate::events::introspect::fields::<$type>())),*]
        }
    };
}

task_args! {
    WorkspaceMaterialize => Workspace "materialize",
    WorkspaceSync => Workspace "sync",
    WorkspaceRecover => Workspace "recover",
    WorkspaceRemove => Workspace "remove",
    ContainerProvision => Container "provision",
    ContainerClaim => Container "claim",
    ContainerWake => Container "wake",
    ContainerProbe => Container "probe",
    ContainerPause => Container "pause",
    ContainerResume => Container "resume",
    ContainerStop => Container "stop",
    ContainerRemove => Container "remove",
    ContainerStats => Container "stats",
    ContainerPoolCreate => Container "pool_create",
    ContainerPoolRemove => Container "pool_remove",
}

/// The wire names of the arguments `agent`'s `action` takes, `None` when the catalogue has no such
/// task (so a pattern can be checked at load against what the agent will accept).
pub fn arguments(agent: AgentKind, action: &str) -> Option<&'static [&'static str]> {
    registered().into_iter().find(|(kind, name, _)| *kind == agent && *name == action).map(|(_, _, fields)| fields)
}

/// The actions `agent` takes, in the catalogue's order (none for the persistence agent, whose
/// tasks are `protocol::store` operations, and the session agent, which takes none).
pub fn actions(agent: AgentKind) -> Vec<&'static str> {
    registered().into_iter().filter(|(kind, _, _)| *kind == agent).map(|(_, action, _)| action).collect()
}

/// Reads a `slot`: `""` or `null` is none, anything else a [`SessionId`] (a slot names a
/// container and a directory like a session does).
fn optional_slot<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SessionId>, D::Error> {
    match Option::<String>::deserialize(deserializer)?.as_deref() {
        None | Some("") => Ok(None),
        Some(text) => SessionId::parse(text).map(Some).map_err(|error| D::Error::custom(format!("slot: {error}"))),
    }
}

/// Reads a `slot` that must name one.
fn required_slot<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SessionId, D::Error> {
    optional_slot(deserializer)?.ok_or_else(|| D::Error::custom("a `slot` is needed (\"\" names none)"))
}

// ------------------------------------------------------------------ workspace agent

/// `materialize`: fills the session's directory from the workspace's prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceMaterialize {
    pub user: UserId,
    pub workspace: WorkspaceId,
    /// The warm-pool slot the engine bound to this session (none = a cold open): its empty
    /// directory, already mounted in the slot's container, becomes the session directory.
    #[serde(default, deserialize_with = "optional_slot", skip_serializing_if = "Option::is_none")]
    pub slot: Option<SessionId>,
    /// The session moved here from another host: this host writes the workspace from now on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fence: bool,
}

/// `sync`: uploads the session directory's changes; `final` before anything is removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSync {
    pub user: UserId,
    pub workspace: WorkspaceId,
    #[serde(rename = "final", default)]
    pub final_sync: bool,
}

/// `recover`: saves a host's copy of a session failed over from it apart, at `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceRecover {
    pub user: UserId,
    pub workspace: WorkspaceId,
    /// The host whose copy this is: the receiving agent's own.
    pub host: String,
    /// Where the copy goes: exactly `recovered/<host>/<session>`.
    pub prefix: String,
}

/// `remove`: removes the session's directory once its final sync is confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceRemove {
    /// Keep the directory in the host's workspace cache instead of deleting it, when the profile
    /// gives the cache a budget (`workspace.cache_mib`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache: bool,
}

// ------------------------------------------------------------------ container agent

/// `provision`: the session's container on its directory (or the claimed warm-pool slot's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerProvision {
    pub user: UserId,
    pub workspace: WorkspaceId,
    #[serde(default, deserialize_with = "optional_slot", skip_serializing_if = "Option::is_none")]
    pub slot: Option<SessionId>,
}

/// `claim`: the claim half of a warm provision (identity file and claim index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerClaim {
    pub user: UserId,
    pub workspace: WorkspaceId,
    #[serde(deserialize_with = "required_slot")]
    pub slot: SessionId,
}

/// `wake`: starts a dormant session's stopped container again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerWake {
    pub user: UserId,
    pub workspace: WorkspaceId,
}

/// `probe`: the idle rule's work probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerProbe {}

/// `pause`: freezes the session's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPause {}

/// `resume`: thaws it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerResume {}

/// `stop`: stops it (thawing it first); the container and its directory stay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStop {}

/// `remove`: removes the session's container, or the orphan `container_id` the reconciler found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRemove {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

/// `stats`: the container's resource use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {}

/// `pool_create`: a warm-pool slot's running container (no session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPoolCreate {
    #[serde(deserialize_with = "required_slot")]
    pub slot: SessionId,
}

/// `pool_remove`: removes an unclaimed slot's container and folders (no session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPoolRemove {
    #[serde(deserialize_with = "required_slot")]
    pub slot: SessionId,
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::json;

    use super::*;
    use crate::events::tests::top_level_fields;
    use crate::store::Operation;

    const CATALOGUE: &str = include_str!("../CATALOGUE.md");

    /// The catalogue's Tasks table: each (agent, action) with its args' top-level fields (`?` =
    /// optional), `None` where the args are described in words (the persistence operations).
    fn catalogue_tasks() -> BTreeMap<(String, String), Option<BTreeSet<String>>> {
        let mut tasks = BTreeMap::new();
        let mut in_tasks = false;
        for line in CATALOGUE.lines() {
            if line.starts_with("## ") {
                in_tasks = line == "## Tasks";
                continue;
            }
            let Some(row) = line.strip_prefix("| ").filter(|_| in_tasks) else { continue };
            let cells: Vec<&str> = row.splitn(4, " | ").collect();
            let [agent, actions, args, _] = cells[..] else { continue };
            if agent == "agent" || agent.starts_with("---") {
                continue;
            }
            let fields = top_level_fields(args);
            for action in actions.split('`').skip_while(|part| part.is_empty()).step_by(2) {
                let key = (agent.to_owned(), action.to_owned());
                assert!(tasks.insert(key, fields.clone()).is_none(), "CATALOGUE.md lists {agent} `{action}` twice");
            }
        }
        tasks
    }

    /// The persistence operations' names, as serde lists them when refusing an unknown one.
    fn store_actions() -> BTreeSet<String> {
        let error = serde_json::from_value::<Operation>(json!({"action": "?", "args": {}})).unwrap_err().to_string();
        let listed = error.split_once("expected one of").map(|(_, list)| list).unwrap_or_default();
        let actions: BTreeSet<String> = listed.split('`').skip(1).step_by(2).map(str::to_owned).collect();
        assert!(actions.len() > 3, "serde's refusal no longer lists the operations: {error}");
        actions
    }

    /// Fails when an args type and `protocol/CATALOGUE.md`'s Tasks table disagree: a task in one
    /// and not the other, or an argument missing, extra or renamed. Optional args are `name?` there.
    #[test]
    fn catalogue_matches_the_task_args_types() {
        let catalogue = catalogue_tasks();
        let mut typed: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for (agent, action, fields) in registered() {
            let fields = fields.iter().map(|field| (*field).to_owned()).collect();
            assert!(typed.insert((agent.to_string(), action.to_owned()), fields).is_none(), "{agent} `{action}` has two types");
        }
        let mut problems = Vec::new();
        for ((agent, action), listed) in &catalogue {
            if agent == AgentKind::Persistence.as_str() {
                if !store_actions().contains(action) {
                    problems.push(format!("persistence `{action}` is in CATALOGUE.md but is no protocol::store operation"));
                }
                continue;
            }
            let Some(fields) = typed.get(&(agent.clone(), action.clone())) else {
                problems.push(format!("{agent} `{action}` is in CATALOGUE.md but has no args type in protocol::tasks"));
                continue;
            };
            let Some(listed) = listed else {
                problems.push(format!("{agent} `{action}`: CATALOGUE.md gives no `{{...}}` for its args"));
                continue;
            };
            let listed: BTreeSet<String> = listed.iter().map(|field| field.trim_end_matches('?').to_owned()).collect();
            for missing in listed.difference(fields) {
                problems.push(format!("{agent} `{action}`: CATALOGUE.md lists `{missing}`, the type has no such field"));
            }
            for extra in fields.difference(&listed) {
                problems.push(format!("{agent} `{action}`: the type has `{extra}`, CATALOGUE.md does not list it"));
            }
        }
        for (agent, action) in typed.keys().filter(|key| !catalogue.contains_key(*key)) {
            problems.push(format!("{agent} `{action}` has an args type but is not in CATALOGUE.md"));
        }
        for action in store_actions() {
            if !catalogue.contains_key(&(AgentKind::Persistence.to_string(), action.clone())) {
                problems.push(format!("persistence `{action}` is a protocol::store operation but is not in CATALOGUE.md"));
            }
        }
        assert!(problems.is_empty(), "protocol/CATALOGUE.md and protocol::tasks disagree:\n{}", problems.join("\n"));
    }

    /// The check itself can fail: the table is read row by row, an action listed with others gets
    /// the row's args, and the same action of two agents is two tasks.
    #[test]
    fn the_tasks_table_is_read_per_agent_and_action() {
        assert_eq!(
            top_level_fields("`{user, slot?}` (notes {not, these})"),
            Some(["user", "slot?"].into_iter().map(str::to_owned).collect())
        );
        assert_eq!(top_level_fields("`{}`"), Some(BTreeSet::new()));
        assert_eq!(top_level_fields("described in words"), None);
        assert_eq!(arguments(AgentKind::Workspace, "sync"), Some(&["user", "workspace", "final"][..]));
        assert_eq!(arguments(AgentKind::Container, "materialize"), None);
        assert_eq!(actions(AgentKind::Workspace), ["materialize", "sync", "recover", "remove"]);
        let catalogue = catalogue_tasks();
        let of = |agent: &str, action: &str| catalogue.get(&(agent.to_owned(), action.to_owned())).cloned().flatten();
        assert_eq!(of("workspace", "remove"), Some(["cache?".to_owned()].into()));
        assert_eq!(of("container", "remove"), Some(["container_id?".to_owned()].into()));
        assert_eq!(of("container", "stop"), Some(BTreeSet::new()));
        assert!(catalogue.contains_key(&("persistence".to_owned(), "group".to_owned())));
        assert!(store_actions().contains("upsert"));
    }

    #[test]
    fn args_keep_their_wire_shape() {
        let user = UserId::parse("alice").unwrap();
        let workspace = WorkspaceId::parse("w1").unwrap();
        let recover = WorkspaceRecover { user, workspace, host: "h1".to_owned(), prefix: "recovered/h1/s-1".to_owned() };
        let task = Task::of(Uuid::nil(), Some("s-1"), &recover);
        assert_eq!((task.agent, task.action.as_str(), task.session.as_deref()), (AgentKind::Workspace, "recover", Some("s-1")));
        assert_eq!(task.args, json!({"user": "alice", "workspace": "w1", "host": "h1", "prefix": "recovered/h1/s-1"}));
        assert_eq!(task.args_as::<WorkspaceRecover>(), Ok(recover));
        let orphan = Task::of(Uuid::nil(), Some("s-1"), &ContainerRemove { container_id: Some("abc".to_owned()) });
        assert_eq!(orphan.args, json!({"container_id": "abc"}));
        assert_eq!(Task::of(Uuid::nil(), Some("s-1"), &ContainerRemove { container_id: None }).args, json!({}));
    }

    fn task(agent: AgentKind, action: &str, args: Value) -> Task {
        Task { id: Uuid::nil(), agent, action: action.to_owned(), session: Some("s-1".to_owned()), thred: None, cause: None, args }
    }

    #[test]
    fn a_pattern_slot_of_empty_text_is_none_and_a_bad_one_is_refused_by_name() {
        let args = json!({"user": "alice", "workspace": "w", "slot": ""});
        let parsed = task(AgentKind::Workspace, "materialize", args.clone()).args_as::<WorkspaceMaterialize>().unwrap();
        assert_eq!((parsed.slot, parsed.fence), (None, false));
        let parsed = task(AgentKind::Container, "provision", json!({"user": "alice", "workspace": "w", "slot": "p1"}));
        assert_eq!(parsed.args_as::<ContainerProvision>().unwrap().slot.map(String::from).as_deref(), Some("p1"));
        let refused =
            task(AgentKind::Container, "provision", json!({"user": "a", "workspace": "w", "slot": "../x"})).args_as::<ContainerProvision>();
        assert!(
            matches!(&refused, Err(ArgsError::Invalid { reason, .. }) if reason.starts_with("slot: session id \"../x\"")),
            "{refused:?}"
        );
        let claim = task(AgentKind::Container, "claim", args).args_as::<ContainerClaim>().unwrap_err().to_string();
        assert!(claim.contains("a `slot` is needed"), "{claim}");
        let pool = task(AgentKind::Container, "pool_create", json!({})).args_as::<ContainerPoolCreate>().unwrap_err().to_string();
        assert!(pool.contains("missing field `slot`"), "{pool}");
    }

    #[test]
    fn unknown_args_are_refused_where_the_agent_always_refused_them() {
        let typo = task(AgentKind::Workspace, "sync", json!({"user": "alice", "workspace": "w", "finale": true}));
        let error = typo.args_as::<WorkspaceSync>().unwrap_err().to_string();
        assert!(error.starts_with("args of `sync`: unknown field `finale`"), "{error}");
        let pool = task(AgentKind::Container, "pool_remove", json!({"slot": "p1", "session": "s"}));
        assert!(pool.args_as::<ContainerPoolRemove>().is_err());
        let provision = task(AgentKind::Container, "provision", json!({"user": "alice", "workspace": "w", "later": 1}));
        assert!(provision.args_as::<ContainerProvision>().is_ok());
        assert_eq!(task(AgentKind::Container, "pause", Value::Null).args_as::<ContainerPause>(), Ok(ContainerPause {}));
        assert_eq!(task(AgentKind::Workspace, "remove", Value::Null).args_as::<WorkspaceRemove>(), Ok(WorkspaceRemove { cache: false }));
    }

    #[test]
    fn ids_are_checked_and_the_task_must_be_the_types() {
        let error = task(AgentKind::Workspace, "sync", json!({"user": "#", "workspace": "w"})).args_as::<WorkspaceSync>().unwrap_err();
        assert!(error.to_string().contains("user id \"#\""), "{error}");
        let wrong = task(AgentKind::Container, "remove", json!({})).args_as::<WorkspaceRemove>().unwrap_err();
        assert_eq!(wrong.to_string(), "expected a workspace `remove` task, got a container `remove` one");
        let wrong = task(AgentKind::Container, "pool_remove", json!({"slot": "p1"})).args_as::<ContainerPoolCreate>();
        assert!(matches!(wrong, Err(ArgsError::WrongTask { .. })));
    }
}
