//! The container agent's handler: one task in, Docker work done, answer events out.
//!
//! Every action is idempotent: the container of a session is found by its name `berth-<session>`
//! (or, for a session that claimed a warm-pool slot, by the slot's `berth-pool-<slot>` through the
//! claim recorded on the host: [`Agent::session_container_name`]), so a redelivered or repeated
//! task finds the work already done and answers the same way.
//!
//! This file holds the agent itself (settings, per-session serialisation, what it remembers), the
//! task's decoding at the edge ([`parse_task`]) and its dispatch, the failure types every action
//! answers with, and the helpers its submodules share. The work is in those: [`provisioning`]
//! (a container created or found again, started and made ready), [`lifecycle`] (pause, resume,
//! stop, remove, stats and the work probe on an existing container), [`inventory`] (what the
//! Docker engine holds, as `container.inventory` and `container.host_report`) and [`pool`] (warm
//! slots and their claim).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::Docker;
use protocol::events::{ContainerFailed, EventData};
use protocol::tasks::{
    ArgsError, ContainerClaim, ContainerPause, ContainerPoolCreate, ContainerPoolRemove, ContainerProbe, ContainerProvision,
    ContainerRemove, ContainerResume, ContainerStats, ContainerStop, ContainerWake,
};
use protocol::{Bus, CloudEvent, Outcome, Profile, Task};
use tokio::sync::Mutex;

use crate::egress;
use crate::error::{is_docker_answer, Error, Result};
use crate::spec::{self, SessionIdentity};

mod inventory;
mod lifecycle;
mod pool;
mod provisioning;

use provisioning::ExitedContainer;

/// The CloudEvents `source` of everything this agent publishes.
pub const EVENT_SOURCE: &str = "/berth/agent/container";
/// How long an exit the agent caused itself is remembered, so the event watcher does not report it.
const EXPECTED_EXIT_MEMORY: Duration = Duration::from_secs(300);

/// Tunables of one agent instance (no `Default`: callers say what they want).
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Labels added to everything this agent creates. When not empty, the event watcher and the
    /// inventory only look at containers that carry them too (tests and benchmarks use this to
    /// stay apart from each other and from a real deployment on the same Docker engine).
    pub extra_labels: BTreeMap<String, String>,
    /// How often `container.inventory` is published while serving.
    pub inventory_interval: Duration,
    /// A `remove` naming a container id (an orphan) leaves containers younger than this alone, so
    /// a container being provisioned right now is never taken for an orphan.
    pub orphan_grace: Duration,
    /// Seconds Docker waits after SIGTERM before it kills, on `stop`.
    pub stop_timeout_secs: i64,
    /// Tasks handled at the same time.
    pub concurrency: u16,
}

impl AgentSettings {
    /// The settings of `berth agent container`.
    pub fn production() -> AgentSettings {
        AgentSettings {
            extra_labels: BTreeMap::new(),
            inventory_interval: Duration::from_secs(60),
            orphan_grace: Duration::from_secs(60),
            stop_timeout_secs: 5,
            // Fifty warm claims at once are a hundred short tasks (claim, then readiness): with 16
            // at a time they waited in waves behind each other (`berth bench open`).
            concurrency: 64,
        }
    }
}

/// Connects to the local Docker engine (`DOCKER_HOST` or the default socket) at the highest API
/// version both sides speak.
pub async fn connect_docker() -> Result<Docker> {
    let docker = Docker::connect_with_local_defaults().map_err(Error::from_docker)?;
    docker.negotiate_version().await.map_err(Error::from_docker)
}

/// What a task asks for, decoded and validated at the edge.
#[derive(Debug, Clone, PartialEq)]
enum Action {
    /// `slot`: the warm-pool slot the engine bound to the session, if it claimed one.
    Provision {
        user: String,
        workspace: String,
        slot: Option<String>,
    },
    /// A warm claim's hand-off on its own (identity file and claim index; no Docker call).
    Claim {
        user: String,
        workspace: String,
        slot: String,
    },
    /// A warm-pool slot: its directory and a container made ready, left running.
    PoolCreate {
        slot: String,
    },
    /// An unclaimed slot's container and directories go (never a claimed one: it may hold work).
    PoolRemove {
        slot: String,
    },
    Pause,
    Resume,
    Stop,
    Remove {
        container_id: Option<String>,
    },
    Stats,
    /// The idle rule's work probe (`container.probed`).
    Probe,
    /// Starts a dormant (stopped) session container again on its directory.
    Wake {
        user: String,
        workspace: String,
    },
}

/// A failure of the container work itself: answered with `container.failed`, not retried.
#[derive(Debug)]
struct Refusal(String);

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal(reason)
    }
}

/// Either Docker said no (answered with an event) or it could not be asked (retried).
enum Failure {
    Refused(Refusal),
    /// A container with the session's name belongs to someone else: refuse, and leave it alone.
    NotOurs(Refusal),
    Unanswered(bollard::errors::Error),
}

impl From<bollard::errors::Error> for Failure {
    fn from(error: bollard::errors::Error) -> Failure {
        if is_docker_answer(&error) {
            Failure::Refused(Refusal(docker_message(&error)))
        } else {
            Failure::Unanswered(error)
        }
    }
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Failure {
        Failure::Refused(refusal)
    }
}

fn docker_message(error: &bollard::errors::Error) -> String {
    match error {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            format!("docker answered {status_code}: {message}")
        }
        other => other.to_string(),
    }
}

/// A container that answers its health check.
#[derive(Debug, Clone)]
pub struct ReadyContainer {
    pub container_id: String,
    pub host: String,
    pub port: u16,
    /// The container's own address on the session network, when Docker gave it one: what the
    /// session proxy on this machine uses instead of the published port (no Docker port proxy
    /// in between).
    pub network: Option<protocol::host::NetworkAddress>,
    pub create_ms: u64,
    pub start_ms: u64,
    pub ready_ms: u64,
    /// The container existed already (a repeated task, or one found again after a restart).
    pub adopted: bool,
}

/// One labelled container, as `container.inventory` reports it.
pub type InventoryEntry = protocol::events::ContainerEntry;

/// The container agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    profile: Profile,
    bus: Bus,
    docker: Docker,
    settings: AgentSettings,
    /// Serialises the tasks of one session inside this process.
    session_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The session network's egress rules, installed once per process (and re-checked with every
    /// inventory): no container starts before they are in place.
    network_checked: tokio::sync::OnceCell<egress::EgressPlan>,
    /// Containers this agent is stopping or removing on purpose, by id.
    expected_exits: std::sync::Mutex<HashMap<String, Instant>>,
    /// Session → id of the container last seen to be that session's. Only a shortcut for pause and
    /// resume (a container id is never reused, so a stale entry just fails over to the careful
    /// path); a restart loses nothing by forgetting it.
    known_containers: std::sync::Mutex<HashMap<String, String>>,
}

impl Agent {
    /// An agent with production settings. Refuses an unsafe profile.
    pub fn new(profile: Profile, bus: Bus, docker: Docker) -> Result<Agent> {
        Agent::with_settings(profile, bus, docker, AgentSettings::production())
    }

    /// An agent with explicit settings. Refuses an unsafe profile.
    pub fn with_settings(profile: Profile, bus: Bus, docker: Docker, settings: AgentSettings) -> Result<Agent> {
        spec::check_container_hardening(&profile)?;
        Ok(Agent {
            inner: Arc::new(Inner {
                profile,
                bus,
                docker,
                settings,
                session_locks: Mutex::new(HashMap::new()),
                network_checked: tokio::sync::OnceCell::new(),
                expected_exits: std::sync::Mutex::new(HashMap::new()),
                known_containers: std::sync::Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn profile(&self) -> &Profile {
        &self.inner.profile
    }

    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    pub fn docker(&self) -> &Docker {
        &self.inner.docker
    }

    pub fn settings(&self) -> &AgentSettings {
        &self.inner.settings
    }

    /// Decodes one delivery and handles it; the answer for the consumer.
    pub async fn handle_delivery(&self, body: &[u8]) -> Outcome {
        let task = match Task::decode(body) {
            Ok(task) => task,
            Err(error) => return Outcome::DeadLetter(format!("not a task: {error}")),
        };
        match self.handle(&task).await {
            Ok(_) => Outcome::Ack,
            Err(error) => {
                tracing::warn!(task_id = %task.id, action = %task.action, %error, "task failed");
                error.outcome()
            }
        }
    }

    /// Does what `task` asks and publishes the answer events, which it also returns.
    pub async fn handle(&self, task: &Task) -> Result<Vec<CloudEvent>> {
        let (session, action) = parse_task(task)?;
        let began = Instant::now();
        // A work probe only reads (stats, execs, the directory) and a stats call can take a
        // while: it must never hold up a resume or a stop of the same session behind it.
        let answered = if matches!(action, Action::Probe) {
            self.perform(task, &session, action).await
        } else {
            let lock = self.session_lock(&session).await;
            let guard = lock.lock().await;
            tracing::debug!(task_id = %task.id, session_id = %session, action = %task.action, "handling task");
            let answered = self.perform(task, &session, action).await;
            drop(guard);
            self.release_session_lock(&session, lock).await;
            answered
        };
        // Every answer names this host, so the engine drops one from a host its session has left.
        let host = self.inner.profile.host();
        let events: Vec<CloudEvent> = answered?.into_iter().map(|event| event.with_extension("host", host.clone())).collect();
        let worked_ms = elapsed_ms(began);
        for event in &events {
            self.inner.bus.publish_event(event).await?;
        }
        tracing::info!(task_id = %task.id, session_id = %session, action = %task.action,
            answer = %events.iter().map(|event| event.event_type.as_str()).collect::<Vec<_>>().join(","),
            worked_ms, published_ms = elapsed_ms(began) - worked_ms, "task answered");
        Ok(events)
    }

    async fn perform(&self, task: &Task, session: &str, action: Action) -> Result<Vec<CloudEvent>> {
        let event = match action {
            Action::Provision { user, workspace, slot } => {
                let identity = SessionIdentity { session: session.to_owned(), user, workspace, thred: task.thred.clone() };
                if let Some(slot) = slot {
                    if let Some(refused) = self.claim_pool_container(task, &identity, &slot).await? {
                        return Ok(vec![refused]);
                    }
                }
                self.provision_answer(task, &identity, ExitedContainer::Replace).await?
            }
            Action::Claim { user, workspace, slot } => {
                let identity = SessionIdentity { session: session.to_owned(), user, workspace, thred: task.thred.clone() };
                self.claim_answer(task, &identity, &slot).await?
            }
            Action::Wake { user, workspace } => {
                let identity = SessionIdentity { session: session.to_owned(), user, workspace, thred: task.thred.clone() };
                self.provision_answer(task, &identity, ExitedContainer::Restart).await?
            }
            Action::Probe => self.probe_answer(task, session).await?,
            Action::Pause => self.pause_answer(task, session).await?,
            Action::Resume => self.resume_answer(task, session).await?,
            Action::Stop => self.stop_answer(task, session).await?,
            Action::Remove { container_id } => self.remove_answer(task, session, container_id.as_deref()).await?,
            Action::Stats => self.stats_answer(task, session).await?,
            Action::PoolCreate { slot } => self.pool_create_answer(task, &slot).await?,
            Action::PoolRemove { slot } => self.pool_remove_answer(task, &slot).await?,
        };
        Ok(vec![event])
    }

    async fn session_lock(&self, session: &str) -> Arc<Mutex<()>> {
        self.inner.session_locks.lock().await.entry(session.to_owned()).or_default().clone()
    }

    async fn release_session_lock(&self, session: &str, lock: Arc<Mutex<()>>) {
        let mut locks = self.inner.session_locks.lock().await;
        drop(lock);
        // Only the map holds it now: nobody waits, so the entry can go.
        if locks.get(session).is_some_and(|held| Arc::strong_count(held) == 1) {
            locks.remove(session);
        }
    }

    fn known_container(&self, session: &str) -> Option<String> {
        self.inner.known_containers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(session).cloned()
    }

    fn remember_container(&self, session: &str, container_id: &str) {
        let mut known = self.inner.known_containers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        known.insert(session.to_owned(), container_id.to_owned());
    }

    fn forget_container(&self, session: &str) {
        self.inner.known_containers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(session);
    }

    fn expect_exit(&self, container_id: &str) {
        if container_id.is_empty() {
            return;
        }
        let mut expected = self.inner.expected_exits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        expected.retain(|_, since| since.elapsed() < EXPECTED_EXIT_MEMORY);
        expected.insert(container_id.to_owned(), Instant::now());
    }

    /// Was this exit caused by the agent itself (stop, remove, failed provision)?
    pub(crate) fn take_expected_exit(&self, container_id: &str) -> bool {
        let mut expected = self.inner.expected_exits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        expected.remove(container_id).is_some()
    }
}

/// A pool task is about a slot, not a session: the slot and the action, `None` for other tasks.
fn pool_task(task: &Task) -> std::result::Result<Option<(String, Action)>, ArgsError> {
    Ok(match task.action.as_str() {
        "pool_create" => {
            let slot = String::from(task.args_as::<ContainerPoolCreate>()?.slot);
            Some((slot.clone(), Action::PoolCreate { slot }))
        }
        "pool_remove" => {
            let slot = String::from(task.args_as::<ContainerPoolRemove>()?.slot);
            Some((slot.clone(), Action::PoolRemove { slot }))
        }
        _ => None,
    })
}

/// The task's session (or `pool-<slot>`) and action, its args read through `protocol::tasks`.
fn parse_task(task: &Task) -> Result<(String, Action)> {
    let bad = |reason: String| Error::BadTask { task_id: task.id.to_string(), reason };
    let args = |error: ArgsError| bad(error.to_string());
    if task.agent != protocol::AgentKind::Container {
        return Err(bad(format!("task for the {} agent reached the container agent", task.agent)));
    }
    // A pool task's work is serialised on the slot's container name instead (`pool-<slot>`).
    if let Some((slot, action)) = pool_task(task).map_err(args)? {
        let session = format!("pool-{slot}");
        spec::validate_session_id(&session).map_err(bad)?;
        return Ok((session, action));
    }
    let session = task.session.clone().ok_or_else(|| bad("container tasks need a `session`".to_owned()))?;
    spec::validate_session_id(&session).map_err(bad)?;
    let action = match task.action.as_str() {
        "provision" => {
            let parsed: ContainerProvision = task.args_as().map_err(args)?;
            Action::Provision { user: parsed.user.into(), workspace: parsed.workspace.into(), slot: parsed.slot.map(String::from) }
        }
        "claim" => {
            let parsed: ContainerClaim = task.args_as().map_err(args)?;
            Action::Claim { user: parsed.user.into(), workspace: parsed.workspace.into(), slot: parsed.slot.into() }
        }
        "pause" => task.args_as::<ContainerPause>().map(|_| Action::Pause).map_err(args)?,
        "resume" => task.args_as::<ContainerResume>().map(|_| Action::Resume).map_err(args)?,
        "stop" => task.args_as::<ContainerStop>().map(|_| Action::Stop).map_err(args)?,
        "remove" => {
            let parsed: ContainerRemove = task.args_as().map_err(args)?;
            if let Some(id) = &parsed.container_id {
                if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad(format!("remove args: container_id {id:?} is not a container id")));
                }
            }
            Action::Remove { container_id: parsed.container_id }
        }
        "stats" => task.args_as::<ContainerStats>().map(|_| Action::Stats).map_err(args)?,
        "probe" => task.args_as::<ContainerProbe>().map(|_| Action::Probe).map_err(args)?,
        "wake" => {
            let parsed: ContainerWake = task.args_as().map_err(args)?;
            Action::Wake { user: parsed.user.into(), workspace: parsed.workspace.into() }
        }
        other => {
            return Err(bad(format!(
                "unknown action {other:?} (expected provision, claim, wake, pause, resume, stop, remove, stats, probe, pool_create or pool_remove)"
            )))
        }
    };
    Ok((session, action))
}

/// An answer event bound to the task's session, thred and id; `data`'s type names the event.
fn answer<T: EventData>(task: &Task, data: &T) -> CloudEvent {
    CloudEvent::answering(task, EVENT_SOURCE, data)
}

fn failed(task: &Task, action: &str, error: String) -> CloudEvent {
    tracing::warn!(task_id = %task.id, action, %error, "container action failed");
    answer(task, &ContainerFailed { action: action.to_owned(), error })
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn container_labels(inspected: &ContainerInspectResponse) -> HashMap<String, String> {
    inspected.config.as_ref().and_then(|config| config.labels.clone()).unwrap_or_default()
}

fn container_status(inspected: &ContainerInspectResponse) -> ContainerStateStatusEnum {
    inspected.state.as_ref().and_then(|state| state.status).unwrap_or(ContainerStateStatusEnum::EMPTY)
}

/// The host port Docker published for `port_key` on the publish address, once it has one (readiness
/// waits for it, and a warm claim reads it).
fn published_port(inspected: &ContainerInspectResponse, port_key: &str) -> Option<u16> {
    inspected
        .network_settings
        .as_ref()?
        .ports
        .as_ref()?
        .get(port_key)?
        .as_ref()?
        .iter()
        .filter(|binding| binding.host_ip.as_deref().is_none_or(|ip| ip == spec::publish_host()))
        .find_map(|binding| binding.host_port.as_deref()?.parse().ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn task(action: &str, session: Option<&str>, args: Value) -> Task {
        Task {
            id: uuid::Uuid::now_v7(),
            agent: protocol::AgentKind::Container,
            action: action.to_owned(),
            session: session.map(str::to_owned),
            thred: None,
            cause: None,
            args,
        }
    }

    #[track_caller]
    fn check(task: Task, expected: Result<Action, &str>) {
        match (parse_task(&task), expected) {
            (Ok((_, action)), Ok(expected)) => assert_eq!(action, expected),
            (Err(error), Err(fragment)) => assert!(error.to_string().contains(fragment), "{error} lacks {fragment:?}"),
            (actual, expected) => panic!("got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn tasks_are_validated_at_the_edge() {
        check(
            task("provision", Some("s-1"), json!({"user": "alice", "workspace": "w"})),
            Ok(Action::Provision { user: "alice".into(), workspace: "w".into(), slot: None }),
        );
        check(
            task("provision", Some("s-1"), json!({"user": "alice", "workspace": "w", "slot": "p1"})),
            Ok(Action::Provision { user: "alice".into(), workspace: "w".into(), slot: Some("p1".into()) }),
        );
        check(
            task("provision", Some("s-1"), json!({"user": "alice", "workspace": "w", "slot": ""})),
            Ok(Action::Provision { user: "alice".into(), workspace: "w".into(), slot: None }),
        );
        check(task("provision", Some("s-1"), json!({"user": "a", "workspace": "w", "slot": "../x"})), Err("slot"));
        check(
            task("claim", Some("s-1"), json!({"user": "alice", "workspace": "w", "slot": "p1"})),
            Ok(Action::Claim { user: "alice".into(), workspace: "w".into(), slot: "p1".into() }),
        );
        check(task("claim", Some("s-1"), json!({"user": "alice", "workspace": "w", "slot": ""})), Err("a `slot` is needed"));
        check(task("claim", Some("s-1"), json!({"user": "alice", "workspace": "w", "slot": "../x"})), Err("slot"));
        check(task("pool_create", None, json!({"slot": "p1"})), Ok(Action::PoolCreate { slot: "p1".into() }));
        check(task("pool_remove", None, json!({"slot": "p1"})), Ok(Action::PoolRemove { slot: "p1".into() }));
        check(task("pool_create", None, json!({"slot": "../p"})), Err("slot"));
        check(task("pool_create", None, json!({})), Err("missing field `slot`"));
        check(task("provision", Some("s-1"), json!({"user": "alice"})), Err("missing field `workspace`"));
        check(task("provision", None, json!({"user": "a", "workspace": "w"})), Err("need a `session`"));
        check(task("provision", Some("../x"), json!({"user": "a", "workspace": "w"})), Err("session id"));
        check(task("provision", Some("s"), json!({"user": "a\n", "workspace": "w"})), Err("user id"));
        check(task("wake", Some("s"), json!({"user": "a", "workspace": "../w"})), Err("workspace id"));
        check(task("pool_remove", None, json!({"slot": "p1", "session": "s"})), Err("unknown field `session`"));
        check(task("pause", Some("s"), Value::Null), Ok(Action::Pause));
        check(task("remove", Some("s"), json!({})), Ok(Action::Remove { container_id: None }));
        check(task("remove", Some("s"), json!({"container_id": "abc123"})), Ok(Action::Remove { container_id: Some("abc123".into()) }));
        check(task("remove", Some("s"), json!({"container_id": "../x"})), Err("not a container id"));
        check(task("explode", Some("s"), json!({})), Err("unknown action \"explode\""));
        let mut wrong_agent = task("pause", Some("s"), json!({}));
        wrong_agent.agent = protocol::AgentKind::Workspace;
        check(wrong_agent, Err("workspace agent"));
    }

    #[test]
    fn bad_tasks_are_dead_lettered_and_outages_retried() {
        let bad = parse_task(&task("explode", Some("s"), json!({}))).unwrap_err();
        assert!(matches!(bad.outcome(), Outcome::DeadLetter(reason) if reason.contains("explode")));
        let outage = Error::from_docker(bollard::errors::Error::RequestTimeoutError);
        assert_eq!(outage.outcome(), Outcome::RetryUnavailable);
        let no_socket = Error::from_docker(bollard::errors::Error::SocketNotFoundError("/var/run/docker.sock".into()));
        assert_eq!(no_socket.outcome(), Outcome::RetryUnavailable);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Error::from_docker(refused.into()).outcome(), Outcome::RetryUnavailable);
        let garbled = Error::from_docker(bollard::errors::Error::DockerStreamError { error: "broken stream".into() });
        assert_eq!(garbled.outcome(), Outcome::Retry);
    }
}
