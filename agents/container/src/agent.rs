//! The container agent's handler: one task in, Docker work done, answer events out.
//!
//! Every action is idempotent: the container of a session is found by its name `berth-<session>`,
//! so a redelivered or repeated task finds the work already done and answers the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::container::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, StartContainerOptions, StatsOptions, StopContainerOptions,
    TopOptions,
};
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};
use bollard::network::{CreateNetworkOptions, InspectNetworkOptions};
use bollard::Docker;
use futures::StreamExt;
use protocol::events::{
    ContainerFailed, ContainerInventory, ContainerPaused, ContainerProbed, ContainerReady, ContainerRemoved, ContainerResumed,
    ContainerStopped, EventData, ReadyTimings,
};
use protocol::profile::HealthCheck;
use protocol::{Bus, CloudEvent, Outcome, Profile, Task};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::error::{docker_status, is_docker_answer, Error, Result};
use crate::spec::{self, SessionIdentity};
use crate::{egress, probe, stats, work};

mod pool;

/// The CloudEvents `source` of everything this agent publishes.
pub const EVENT_SOURCE: &str = "/berth/agent/container";
/// How often readiness is probed while a container starts.
const READINESS_POLL: Duration = Duration::from_millis(20);
/// How often the container's state is checked while its health check does not answer yet.
const STATE_CHECK_INTERVAL: Duration = Duration::from_millis(250);
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
            // Fifty warm claims at once are a hundred short tasks (claim, then unpause): with 16
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
    /// A warm claim's hand-off on its own (identity file, rename), the container left paused.
    Claim {
        user: String,
        workspace: String,
        slot: String,
    },
    /// A warm-pool slot: its directory and a container made ready, then paused.
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

/// What provisioning does with a container that exists but has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitedContainer {
    /// A new session start replaces it: a dead container is no use to it.
    Replace,
    /// A wake from the dormant tier starts it again: it was stopped on purpose, with its directory.
    Restart,
}

#[derive(Debug, Deserialize)]
struct ProvisionArgs {
    user: String,
    workspace: String,
    #[serde(default)]
    slot: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolArgs {
    slot: String,
}

#[derive(Debug, Deserialize, Default)]
struct RemoveArgs {
    #[serde(default)]
    container_id: Option<String>,
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

    // ---------------------------------------------------------------- provision

    async fn provision_answer(&self, task: &Task, identity: &SessionIdentity, exited: ExitedContainer) -> Result<CloudEvent> {
        let name = spec::container_name(&identity.session);
        let action = task.action.as_str();
        match self.provision(identity, exited).await {
            Ok(ready) => {
                self.remember_container(&identity.session, &ready.container_id);
                tracing::info!(session_id = %identity.session, container_id = %ready.container_id, port = ready.port,
                    adopted = ready.adopted, start_ms = ready.start_ms, ready_ms = ready.ready_ms, "container ready");
                Ok(answer(
                    task,
                    &ContainerReady {
                        container_id: ready.container_id,
                        host: ready.host,
                        port: ready.port,
                        network: ready.network,
                        adopted: ready.adopted,
                        timings_ms: ReadyTimings { create: ready.create_ms, start: ready.start_ms, ready: ready.ready_ms },
                    },
                ))
            }
            Err(Failure::Unanswered(error)) => Err(Error::from_docker(error)),
            Err(Failure::NotOurs(Refusal(reason))) => Ok(answer(task, &ContainerFailed { action: action.to_owned(), error: reason })),
            Err(Failure::Refused(Refusal(reason))) => {
                self.forget_container(&identity.session);
                tracing::warn!(session_id = %identity.session, %reason, "provision failed, removing the container");
                if let Err(error) = self.remove_by_name(&name).await {
                    tracing::warn!(session_id = %identity.session, %error, "could not remove the failed container");
                }
                Ok(answer(task, &ContainerFailed { action: action.to_owned(), error: reason }))
            }
        }
    }

    /// Creates (or finds again) the session's container, starts it and waits until it is ready.
    pub async fn provision_container(&self, identity: &SessionIdentity) -> Result<ReadyContainer, String> {
        self.provision(identity, ExitedContainer::Replace).await.map_err(|failure| match failure {
            Failure::Refused(Refusal(reason)) | Failure::NotOurs(Refusal(reason)) => reason,
            Failure::Unanswered(error) => error.to_string(),
        })
    }

    async fn provision(&self, identity: &SessionIdentity, exited: ExitedContainer) -> Result<ReadyContainer, Failure> {
        let began = Instant::now();
        let deadline = began + Duration::from_secs(self.inner.profile.container.ready_timeout_secs);
        self.ensure_network().await?;
        let session_dir = self.inner.profile.session_dir(&identity.session);
        ensure_session_dir(&session_dir).await?;
        let name = spec::container_name(&identity.session);
        let mut create_ms = 0;
        let mut adopted = true;
        // A few rounds at most: another replica may create or remove the container between our calls.
        for _round in 0..4 {
            let existing = match self.inner.docker.inspect_container(&name, None).await {
                Ok(existing) => Some(existing),
                Err(error) if docker_status(&error) == Some(404) => None,
                Err(error) => return Err(error.into()),
            };
            // A claimed warm-pool container mounts its slot's directory, which the claim renamed
            // into the session's: started again, Docker would mount the old, empty path. A wake
            // replaces it with a container on the session directory instead.
            let mut mounts_session_dir = true;
            // A paused container (a warm claim's) runs already with its port published: this
            // inspection is what readiness needs, so nothing but the unpause goes to Docker
            // before the health check.
            let mut paused_inspection = None;
            let status = match existing {
                Some(existing) => {
                    check_ownership(&existing, identity, &self.inner.profile).map_err(Failure::NotOurs)?;
                    mounts_session_dir = !container_labels(&existing).contains_key(spec::POOL_SLOT_LABEL);
                    let status = existing.state.as_ref().and_then(|state| state.status).unwrap_or(ContainerStateStatusEnum::EMPTY);
                    if status == ContainerStateStatusEnum::PAUSED {
                        paused_inspection = Some(existing);
                    }
                    status
                }
                None => {
                    let created_at = Instant::now();
                    let config = spec::container_config(&self.inner.profile, identity, &session_dir, &self.inner.settings.extra_labels);
                    let options = CreateContainerOptions { name: name.clone(), platform: None };
                    match self.inner.docker.create_container(Some(options), config).await {
                        // Ours and fresh: start it without asking Docker again.
                        Ok(_) => {
                            create_ms = elapsed_ms(created_at);
                            adopted = false;
                            ContainerStateStatusEnum::CREATED
                        }
                        // Someone else created it first: find it again on the next round.
                        Err(error) if docker_status(&error) == Some(409) => continue,
                        Err(error) if docker_status(&error) == Some(404) => {
                            return Err(Refusal(format!(
                                "image {} is not available on this Docker engine ({})",
                                self.inner.profile.container.image,
                                docker_message(&error)
                            ))
                            .into())
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
            };
            let started_at = Instant::now();
            // A dormant session's container was stopped on purpose, with its directory: a wake
            // starts that same container again, so only its memory was given up.
            let startable = status == ContainerStateStatusEnum::CREATED
                || (status == ContainerStateStatusEnum::EXITED && exited == ExitedContainer::Restart && mounts_session_dir);
            match status {
                ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING => {}
                ContainerStateStatusEnum::PAUSED => self.inner.docker.unpause_container(&name).await?,
                ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::EXITED if startable => {
                    match self.inner.docker.start_container(&name, None::<StartContainerOptions<String>>).await {
                        Ok(()) => {}
                        // 304: already started by a concurrent task.
                        Err(error) if docker_status(&error) == Some(304) => {}
                        Err(error) => return Err(Refusal(format!("start failed: {}", docker_message(&error))).into()),
                    }
                }
                ContainerStateStatusEnum::CREATED
                | ContainerStateStatusEnum::EXITED
                | ContainerStateStatusEnum::DEAD
                | ContainerStateStatusEnum::REMOVING
                | ContainerStateStatusEnum::EMPTY => {
                    // A dead container is no use to a new session start: replace it.
                    self.remove_by_name(&name).await?;
                    continue;
                }
            }
            let start_ms = elapsed_ms(started_at);
            let ready_began = Instant::now();
            let ready = self.wait_until_answering(&name, paused_inspection, deadline).await?;
            return Ok(ReadyContainer {
                container_id: ready.container_id,
                host: spec::publish_host().to_owned(),
                port: ready.port,
                network: ready.network,
                create_ms,
                start_ms,
                ready_ms: elapsed_ms(ready_began),
                adopted,
            });
        }
        Err(Refusal(format!("container {name} kept changing under us; giving up")).into())
    }

    /// Makes sure the session network exists with inter-container traffic disabled. Checked once
    /// per process, and by one task at a time: Docker's duplicate check is racy, and two networks
    /// with one name would make the name ambiguous.
    async fn ensure_network(&self) -> Result<(), Failure> {
        self.inner.network_checked.get_or_try_init(|| self.check_or_create_network()).await?;
        Ok(())
    }

    /// Re-applies the session network's egress rules when something removed them (a flushed
    /// firewall, a rebooted host with the network still there). Nothing to do before the first
    /// provision made the network.
    pub async fn reensure_egress(&self) -> Result<(), String> {
        let Some(plan) = self.inner.network_checked.get().cloned() else { return Ok(()) };
        let changed = tokio::task::spawn_blocking(move || egress::apply_blocking(&plan)).await.map_err(|error| error.to_string())??;
        if changed {
            tracing::warn!(network = %spec::network_name(&self.inner.profile), "egress rules were missing or changed, restored them");
        }
        Ok(())
    }

    /// Removes the egress chains of networks that no longer exist (a network removed by hand, by
    /// a test, or by an agent that died first), whichever deployment made them: a chain without
    /// its network protects nothing. The chains are listed before the networks, so a network
    /// created meanwhile is always seen and its fresh chains are kept.
    pub async fn remove_stale_egress_rules(&self) -> Result<usize> {
        let chain_ids = tokio::task::spawn_blocking(egress::chain_network_ids_blocking).await.unwrap_or_default();
        if chain_ids.is_empty() {
            return Ok(0);
        }
        let networks = self.inner.docker.list_networks::<String>(None).await.map_err(Error::from_docker)?;
        let network_ids: Vec<String> = networks.into_iter().filter_map(|network| network.id).collect();
        let unknown: Vec<String> =
            chain_ids.into_iter().filter(|id| !network_ids.iter().any(|network| network.starts_with(id.as_str()))).collect();
        // Another Docker engine on this machine (another host id) may own the network.
        let stale = tokio::task::spawn_blocking(move || {
            unknown.into_iter().filter(|id| !egress::chain_bridge_exists_blocking(id)).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let removed = stale.len();
        for id in stale {
            tokio::task::spawn_blocking(move || egress::remove_for_network_blocking(&id)).await.ok();
        }
        if removed > 0 {
            tracing::info!(removed, "removed the egress rules of networks that are gone");
        }
        Ok(removed)
    }

    /// The egress rules of the session network, once it has been checked (tests read counters).
    pub fn egress_plan(&self) -> Option<egress::EgressPlan> {
        self.inner.network_checked.get().cloned()
    }

    /// Removes the session network and its egress rules (the rules first go with the network:
    /// nothing else of Berth's stays behind in the firewall). Containers still on it make Docker refuse.
    pub async fn remove_network(&self) -> Result<()> {
        let name = spec::network_name(&self.inner.profile);
        let network = match self.inner.docker.inspect_network(&name, None::<InspectNetworkOptions<String>>).await {
            Ok(network) => network,
            Err(error) if docker_status(&error) == Some(404) => return Ok(()),
            Err(error) => return Err(Error::from_docker(error)),
        };
        self.inner.docker.remove_network(&name).await.map_err(Error::from_docker)?;
        if let Some(id) = network.id {
            tokio::task::spawn_blocking(move || egress::remove_for_network_blocking(&id)).await.ok();
        }
        Ok(())
    }

    async fn check_or_create_network(&self) -> Result<egress::EgressPlan, Failure> {
        self.check_runtime().await?;
        self.create_or_check_network().await?;
        let network_name = spec::network_name(&self.inner.profile);
        let network = self.inner.docker.inspect_network(&network_name, None::<InspectNetworkOptions<String>>).await?;
        if network.enable_ipv6 == Some(true) {
            return Err(Refusal(format!("network {network_name} has IPv6 enabled: session egress rules are IPv4 only")).into());
        }
        let network_id = network.id.clone().unwrap_or_default();
        let bridge = network
            .options
            .as_ref()
            .and_then(|options| options.get("com.docker.network.bridge.name").cloned())
            .unwrap_or_else(|| format!("br-{}", network_id.chars().take(12).collect::<String>()));
        let plan = egress::EgressPlan::new(&network_name, &network_id, &bridge, &self.inner.profile.container.egress_allow);
        let applied = plan.clone();
        let changed = tokio::task::spawn_blocking(move || egress::apply_blocking(&applied))
            .await
            .map_err(|error| Refusal(format!("egress rules: {error}")))?
            .map_err(|error| {
                Refusal(format!("egress rules for network {network_name} could not be installed, no session starts without them: {error}"))
            })?;
        tracing::info!(network = %network_name, bridge = %bridge, changed, "egress rules in place");
        if let Err(error) = self.remove_stale_egress_rules().await {
            tracing::warn!(%error, "could not look for stale egress rules");
        }
        Ok(plan)
    }

    /// The profile's OCI runtime must be registered with dockerd (`runsc` is not by default).
    async fn check_runtime(&self) -> Result<(), Failure> {
        let runtime = self.inner.profile.container.runtime.docker_name();
        let info = self.inner.docker.info().await?;
        let known = info.runtimes.as_ref().is_some_and(|runtimes| runtimes.contains_key(runtime));
        if !known {
            let names: Vec<String> = info.runtimes.unwrap_or_default().into_keys().collect();
            return Err(Refusal(format!(
                "container.runtime {runtime:?} is not registered with the Docker engine (it knows {names:?}; scripts/services.sh registers runsc)"
            ))
            .into());
        }
        Ok(())
    }

    async fn create_or_check_network(&self) -> Result<(), Failure> {
        let network_name = spec::network_name(&self.inner.profile);
        let deployment = self.inner.profile.deployment();
        let docker = &self.inner.docker;
        let network = match docker.inspect_network(&network_name, None::<InspectNetworkOptions<String>>).await {
            Ok(network) => Some(network),
            Err(error) if docker_status(&error) == Some(404) => None,
            Err(error) => return Err(error.into()),
        };
        match network {
            Some(network) => {
                let icc = network.options.as_ref().and_then(|options| options.get(spec::ICC_OPTION)).map(String::as_str);
                if icc != Some("false") {
                    return Err(Refusal(format!(
                        "network {network_name} exists without {}=false: session containers could reach each other",
                        spec::ICC_OPTION
                    ))
                    .into());
                }
                let owner = network.labels.as_ref().and_then(|labels| labels.get(spec::DEPLOYMENT_LABEL));
                if owner.is_some_and(|owner| *owner != deployment) {
                    return Err(Refusal(format!(
                        "network {network_name} belongs to deployment {}, not {deployment}",
                        owner.map(String::as_str).unwrap_or_default()
                    ))
                    .into());
                }
            }
            None => {
                let mut labels: HashMap<String, String> =
                    self.inner.settings.extra_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                labels.insert(spec::MANAGED_LABEL.to_owned(), "true".to_owned());
                labels.insert(spec::PROFILE_LABEL.to_owned(), self.inner.profile.name.clone());
                labels.insert(spec::DEPLOYMENT_LABEL.to_owned(), deployment.clone());
                let options = CreateNetworkOptions {
                    name: network_name.clone(),
                    check_duplicate: true,
                    driver: "bridge".to_owned(),
                    options: HashMap::from([(spec::ICC_OPTION.to_owned(), "false".to_owned())]),
                    labels,
                    ..Default::default()
                };
                match docker.create_network(options).await {
                    Ok(_) => tracing::info!(network = %network_name, "created the session network"),
                    Err(error) if docker_status(&error) == Some(409) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(())
    }

    /// Polls until the container answers its health check; returns its id and host port.
    async fn wait_until_ready(&self, name: &str, deadline: Instant) -> Result<(String, u16), Failure> {
        let ready = self.wait_until_answering(name, None, deadline).await?;
        Ok((ready.container_id, ready.port))
    }

    /// [`Agent::wait_until_ready`], with the container's address on the session network.
    /// `known`: an inspection taken just before (of a container that was paused, so its port and
    /// address stand), used instead of asking Docker again; not for Docker's own health check,
    /// whose status it would show from before the pause.
    async fn wait_until_answering(
        &self,
        name: &str,
        known: Option<ContainerInspectResponse>,
        deadline: Instant,
    ) -> Result<Answering, Failure> {
        let settings = &self.inner.profile.container;
        let port_key = spec::service_port_key(settings);
        let mut inspected = match known.filter(|_| settings.health != HealthCheck::Docker) {
            Some(inspected) => inspected,
            None => self.inner.docker.inspect_container(name, None).await?,
        };
        let container_id = inspected.id.clone().unwrap_or_default();
        let port = loop {
            if let Some(port) = published_port(&inspected, &port_key) {
                break port;
            }
            check_still_running(&inspected)?;
            if Instant::now() >= deadline {
                return Err(Refusal(format!("port {port_key} was never published")).into());
            }
            tokio::time::sleep(READINESS_POLL).await;
            inspected = self.inner.docker.inspect_container(name, None).await?;
        };
        let mut last_inspection = Instant::now();
        loop {
            let answered = match &settings.health {
                HealthCheck::Http(path) => probe::http_ready(spec::publish_host(), port, path).await,
                HealthCheck::Tcp => probe::tcp_ready(spec::publish_host(), port).await,
                HealthCheck::Docker => docker_health(&inspected)?,
            };
            if answered {
                let network =
                    network_address(&inspected, &spec::network_name(&self.inner.profile), settings.service_port, &self.inner.profile);
                return Ok(Answering { container_id, port, network });
            }
            // Asking Docker every round would load it while many sessions start at once; a dead
            // container is noticed within the interval anyway.
            if last_inspection.elapsed() >= STATE_CHECK_INTERVAL || settings.health == HealthCheck::Docker {
                inspected = self.inner.docker.inspect_container(name, None).await?;
                last_inspection = Instant::now();
                check_still_running(&inspected)?;
            }
            if Instant::now() >= deadline {
                return Err(Refusal(format!(
                    "not ready within {} s (health check {:?} never answered)",
                    settings.ready_timeout_secs, settings.health
                ))
                .into());
            }
            tokio::time::sleep(READINESS_POLL).await;
        }
    }

    // ---------------------------------------------------------------- lifecycle

    /// Freezes the session's container. The engine pauses before every final sync, so this never
    /// fails for a container that has nothing left to freeze: already paused, exited (or never
    /// started), or gone are all answered `container.paused` with that `state`.
    async fn pause_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        if let Some(id) = self.known_container(session) {
            if self.inner.docker.pause_container(&id).await.is_ok() {
                return Ok(paused(task, Some(&id), FrozenState::Paused));
            }
        }
        let name = spec::container_name(session);
        let Some(inspected) = self.inspect_owned(&name).await? else {
            return Ok(paused(task, None, FrozenState::Missing));
        };
        let id = inspected.id.clone().unwrap_or_default();
        let pause_error = match frozen_state(container_status(&inspected)) {
            Some(state) => return Ok(paused(task, Some(&id), state)),
            None => match self.inner.docker.pause_container(&id).await {
                Ok(()) => return Ok(paused(task, Some(&id), FrozenState::Paused)),
                Err(error) => error,
            },
        };
        if !is_docker_answer(&pause_error) {
            return Err(Error::from_docker(pause_error));
        }
        // Docker refused: the container may have exited or gone in between. Look once more.
        let Some(inspected) = self.inspect_owned(&name).await? else {
            return Ok(paused(task, None, FrozenState::Missing));
        };
        match frozen_state(container_status(&inspected)) {
            Some(state) => Ok(paused(task, Some(&id), state)),
            None => self.docker_failure(task, "pause", pause_error),
        }
    }

    async fn resume_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        // Waking is on the user's critical path: skip the inspect when the container is known.
        if let Some(id) = self.known_container(session) {
            if self.inner.docker.unpause_container(&id).await.is_ok() {
                return Ok(answer(task, &ContainerResumed { container_id: Some(id) }));
            }
        }
        let name = spec::container_name(session);
        let Some(inspected) = self.inspect_owned(&name).await? else {
            return Ok(failed(task, "resume", format!("no container for session {session}")));
        };
        let id = inspected.id.clone().unwrap_or_default();
        match container_status(&inspected) {
            ContainerStateStatusEnum::RUNNING => {}
            ContainerStateStatusEnum::PAUSED => {
                if let Err(error) = self.inner.docker.unpause_container(&name).await {
                    return self.docker_failure(task, "resume", error);
                }
            }
            other => return Ok(failed(task, "resume", format!("container is {other}, only a paused container can be resumed"))),
        }
        Ok(answer(task, &ContainerResumed { container_id: Some(id) }))
    }

    async fn stop_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        let name = spec::container_name(session);
        let Some(inspected) = self.inspect_owned(&name).await? else {
            // Nothing left to stop is what `stop` wants.
            return Ok(answer(task, &ContainerStopped { container_id: None }));
        };
        let id = inspected.id.clone().unwrap_or_default();
        self.expect_exit(&id);
        // A frozen process cannot act on SIGTERM: thaw a paused (idle) container first so its
        // programs stop gracefully, flushing what they hold into the workspace, instead of being
        // killed when the timeout runs out.
        if container_status(&inspected) == ContainerStateStatusEnum::PAUSED {
            if let Err(error) = self.inner.docker.unpause_container(&name).await {
                tracing::debug!(session_id = %session, %error, "could not unpause before stopping; stopping anyway");
            }
        }
        let options = StopContainerOptions { t: self.inner.settings.stop_timeout_secs };
        match self.inner.docker.stop_container(&name, Some(options)).await {
            Ok(()) => {}
            Err(error) if matches!(docker_status(&error), Some(304) | Some(404)) => {}
            Err(error) => return self.docker_failure(task, "stop", error),
        }
        Ok(answer(task, &ContainerStopped { container_id: Some(id) }))
    }

    async fn remove_answer(&self, task: &Task, session: &str, container_id: Option<&str>) -> Result<CloudEvent> {
        let target = container_id.map_or_else(|| spec::container_name(session), str::to_owned);
        let inspected = match self.inner.docker.inspect_container(&target, None).await {
            Ok(inspected) => inspected,
            Err(error) if docker_status(&error) == Some(404) => {
                self.forget_container(session);
                return Ok(answer(task, &ContainerRemoved { container_id: container_id.map(str::to_owned) }));
            }
            Err(error) if is_docker_answer(&error) => return self.docker_failure(task, "remove", error),
            Err(error) => return Err(Error::from_docker(error)),
        };
        let labels = container_labels(&inspected);
        let id = inspected.id.clone().unwrap_or_default();
        if !spec::is_deployment_container(&labels, &self.inner.profile) {
            let profile = &self.inner.profile;
            let refusal = format!(
                "container {target} is not a session container of profile {} in deployment {} (it is labelled deployment {:?}); left alone",
                profile.name,
                profile.deployment(),
                labels.get(spec::DEPLOYMENT_LABEL).map(String::as_str).unwrap_or("none")
            );
            if container_id.is_some() {
                return Ok(failed(task, "remove", refusal));
            }
            // Docker names are unique: another deployment's container under this name means this
            // deployment's does not exist, and that is what `remove` wants.
            tracing::warn!(session_id = %session, %refusal, "remove by name found a foreign container");
            self.forget_container(session);
            return Ok(answer(task, &ContainerRemoved { container_id: None }));
        }
        if labels.get(spec::SESSION_LABEL).is_some_and(|owner| owner != session) {
            return Ok(failed(task, "remove", format!("container {target} belongs to another session, not {session}")));
        }
        if container_id.is_some() {
            let age = container_age(&inspected);
            if age.is_some_and(|age| age < self.inner.settings.orphan_grace) {
                return Ok(failed(
                    task,
                    "remove",
                    format!("kept container {id}: created {:?} ago, within the orphan grace period", age.unwrap_or_default()),
                ));
            }
        }
        self.expect_exit(&id);
        self.forget_container(session);
        match self.inner.docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await {
            Ok(()) => {}
            Err(error) if docker_status(&error) == Some(404) => {}
            Err(error) => return self.docker_failure(task, "remove", error),
        }
        tracing::info!(container_id = %id, session_id = %session, "container removed");
        if let Some(slot) = labels.get(spec::POOL_SLOT_LABEL) {
            pool::remove_slot_folders(&self.inner.profile, slot);
        }
        Ok(answer(task, &ContainerRemoved { container_id: Some(id) }))
    }

    async fn stats_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        let name = spec::container_name(session);
        if self.inspect_owned(&name).await?.is_none() {
            return Ok(failed(task, "stats", format!("no container for session {session}")));
        }
        let options = StatsOptions { stream: false, one_shot: false };
        let sample = self.inner.docker.stats(&name, Some(options)).next().await;
        match sample {
            Some(Ok(sample)) => Ok(answer(task, &stats::compute(&sample))),
            Some(Err(error)) if is_docker_answer(&error) => self.docker_failure(task, "stats", error),
            Some(Err(error)) => Err(Error::from_docker(error)),
            None => Ok(failed(task, "stats", "docker returned no statistics".to_owned())),
        }
    }

    /// The idle rule's work probe (see [`work`]): cumulative CPU, the age of the newest change in
    /// the workspace directory, and the commands running under terminal shells.
    async fn probe_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        let name = spec::container_name(session);
        let Some(inspected) = self.inspect_owned(&name).await? else {
            return Ok(failed(task, "probe", format!("no container for session {session}")));
        };
        let options = StatsOptions { stream: false, one_shot: true };
        let cpu_ns = match self.inner.docker.stats(&name, Some(options)).next().await {
            Some(Ok(sample)) => sample.cpu_stats.cpu_usage.total_usage,
            Some(Err(error)) if is_docker_answer(&error) => return self.docker_failure(task, "probe", error),
            Some(Err(error)) => return Err(Error::from_docker(error)),
            None => return Ok(failed(task, "probe", "docker returned no statistics".to_owned())),
        };
        let mut shell_pids = Vec::new();
        for exec_id in inspected.exec_ids.clone().unwrap_or_default() {
            // An exec may end between the container's inspection and its own: it is no terminal.
            let Ok(exec) = self.inner.docker.inspect_exec(&exec_id).await else { continue };
            let tty = exec.process_config.as_ref().and_then(|config| config.tty).unwrap_or(false);
            if exec.running == Some(true) && tty {
                shell_pids.extend(exec.pid);
            }
        }
        let terminal_commands = if shell_pids.is_empty() {
            0
        } else {
            let options = TopOptions { ps_args: "-eo pid,ppid" };
            match self.inner.docker.top_processes(&name, Some(options)).await {
                Ok(top) => work::terminal_commands(&shell_pids, &top.processes.unwrap_or_default()),
                Err(error) => return self.docker_failure(task, "probe", error),
            }
        };
        let directory = self.inner.profile.session_dir(session);
        // Stat-ing every entry is blocking work; a panic in it is answered, not retried.
        let scan = match tokio::task::spawn_blocking(move || work::scan_writes(&directory, work::SCAN_LIMIT)).await {
            Ok(scan) => scan,
            Err(error) => return Ok(failed(task, "probe", format!("workspace scan failed: {error}"))),
        };
        let probe = ContainerProbed {
            cpu_ns,
            write_age_ms: u64::try_from(scan.newest_change_age.as_millis()).unwrap_or(u64::MAX),
            terminal_commands,
            terminals: shell_pids.len() as u64,
            scanned: scan.scanned,
            truncated: scan.truncated,
        };
        tracing::debug!(session_id = %session, ?probe, "work probe");
        Ok(answer(task, &probe))
    }

    /// Inspects a session container; `None` when it does not exist. A container that carries the
    /// name but not this deployment's labels counts as missing, and is never acted on.
    async fn inspect_owned(&self, name: &str) -> Result<Option<ContainerInspectResponse>> {
        match self.inner.docker.inspect_container(name, None).await {
            Ok(inspected) => {
                let labels = container_labels(&inspected);
                if !spec::is_deployment_container(&labels, &self.inner.profile) {
                    // Someone else's container under the session's name: ours does not exist.
                    return Ok(None);
                }
                if let (Some(session), Some(id)) = (labels.get(spec::SESSION_LABEL), inspected.id.as_ref()) {
                    self.remember_container(session, id);
                }
                Ok(Some(inspected))
            }
            Err(error) if docker_status(&error) == Some(404) => {
                if let Some(session) = name.strip_prefix("berth-") {
                    self.forget_container(session);
                }
                Ok(None)
            }
            Err(error) if is_docker_answer(&error) => Ok(None),
            Err(error) => Err(Error::from_docker(error)),
        }
    }

    fn docker_failure(&self, task: &Task, action: &str, error: bollard::errors::Error) -> Result<CloudEvent> {
        if is_docker_answer(&error) {
            Ok(failed(task, action, docker_message(&error)))
        } else {
            Err(Error::from_docker(error))
        }
    }

    /// Force-removes this deployment's container of that name; gone already is fine, and a
    /// container that is not this deployment's is left alone.
    /// Removes the container `id` (its exit expected, so no `container.exited` is reported); gone
    /// already is done.
    pub(super) async fn force_remove(&self, id: &str) -> Result<(), bollard::errors::Error> {
        self.expect_exit(id);
        match self.inner.docker.remove_container(id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await {
            Ok(()) => Ok(()),
            Err(error) if docker_status(&error) == Some(404) => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn remove_by_name(&self, name: &str) -> Result<(), bollard::errors::Error> {
        let inspected = match self.inner.docker.inspect_container(name, None).await {
            Ok(inspected) => inspected,
            Err(error) if docker_status(&error) == Some(404) => return Ok(()),
            Err(error) => return Err(error),
        };
        if !spec::is_deployment_container(&container_labels(&inspected), &self.inner.profile) {
            tracing::warn!(container = name, "not removing a container that is not this deployment's");
            return Ok(());
        }
        self.force_remove(&inspected.id.unwrap_or_default()).await
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

    // ---------------------------------------------------------------- inventory

    /// Docker label filters selecting this agent's containers (profile and deployment, plus the
    /// extra labels). Docker ANDs them.
    pub(crate) fn label_filters(&self) -> Vec<String> {
        let mut filters = vec![
            format!("{}=true", spec::MANAGED_LABEL),
            format!("{}={}", spec::PROFILE_LABEL, self.inner.profile.name),
            format!("{}={}", spec::DEPLOYMENT_LABEL, self.inner.profile.deployment()),
        ];
        filters.extend(self.inner.settings.extra_labels.iter().map(|(name, value)| format!("{name}={value}")));
        filters
    }

    /// Every labelled session container of this profile and deployment, whatever its state.
    pub async fn inventory(&self) -> Result<Vec<InventoryEntry>> {
        let options =
            ListContainersOptions { all: true, filters: HashMap::from([("label".to_owned(), self.label_filters())]), ..Default::default() };
        let containers = self.inner.docker.list_containers(Some(options)).await.map_err(Error::from_docker)?;
        let service_port = self.inner.profile.container.service_port;
        let mut entries: Vec<InventoryEntry> = containers
            .into_iter()
            // Docker filtered by label already; checking again costs nothing and keeps another
            // deployment's containers out even if a filter were ever dropped.
            .filter(|summary| summary.labels.as_ref().is_some_and(|labels| spec::is_deployment_container(labels, &self.inner.profile)))
            .map(|summary| {
                let labels = summary.labels.unwrap_or_default();
                let host_port = summary
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .find(|port| port.private_port == service_port && port.public_port.is_some())
                    .and_then(|port| port.public_port);
                let pool_slot = labels.get(spec::POOL_SLOT_LABEL).cloned();
                // A claimed pool container carries no session label: its name is the session's.
                let claimed = pool_slot
                    .as_ref()
                    .and_then(|_| summary.names.as_deref().unwrap_or_default().iter().find_map(|name| spec::claimed_pool_session(name)));
                InventoryEntry {
                    session: labels.get(spec::SESSION_LABEL).cloned().or(claimed).unwrap_or_default(),
                    user: labels.get(spec::USER_LABEL).cloned().unwrap_or_default(),
                    workspace: labels.get(spec::WORKSPACE_LABEL).cloned().unwrap_or_default(),
                    container_id: summary.id.unwrap_or_default(),
                    state: summary.state.unwrap_or_default(),
                    host_port,
                    created: summary
                        .created
                        .and_then(|seconds| chrono::DateTime::from_timestamp(seconds, 0))
                        .map(|time| time.to_rfc3339())
                        .unwrap_or_default(),
                    pool_slot,
                }
            })
            .collect();
        entries.sort_by(|left, right| left.session.cmp(&right.session));
        Ok(entries)
    }

    /// Publishes `container.inventory` (no subject: it is about every session), naming the
    /// deployment so an engine of another deployment on the same broker ignores it.
    pub async fn publish_inventory(&self) -> Result<CloudEvent> {
        let entries = self.inventory().await?;
        let containers = entries.len();
        let data = ContainerInventory { deployment: self.inner.profile.deployment(), host: self.inner.profile.host(), containers: entries };
        let event = CloudEvent::of(EVENT_SOURCE, None, &data);
        self.inner.bus.publish_event(&event).await?;
        tracing::debug!(containers, "inventory published");
        Ok(event)
    }

    /// Publishes this host's `host.report`: its budget, and what its session containers (every
    /// container of the deployment that is not exited) hold by the profile's per-session limits.
    pub async fn publish_host_report(&self, interval: Duration) -> Result<CloudEvent> {
        let profile = &self.inner.profile;
        let entries = self.inventory().await?;
        let sessions = entries.iter().filter(|entry| !matches!(entry.state.as_str(), "exited" | "dead")).count() as u64;
        let report = protocol::host::HostReport {
            host: profile.host(),
            deployment: profile.deployment(),
            agent: protocol::AgentKind::Container,
            interval_secs: interval.as_secs().max(1),
            capacity: Some(protocol::host::HostCapacity::of(profile, sessions)),
            workspaces: None,
        };
        let event = report.to_event(EVENT_SOURCE);
        self.inner.bus.publish_event(&event).await?;
        tracing::debug!(host = %report.host, sessions, "host report published");
        Ok(event)
    }
}

fn parse_task(task: &Task) -> Result<(String, Action)> {
    let bad = |reason: String| Error::BadTask { task_id: task.id.to_string(), reason };
    if task.agent != protocol::AgentKind::Container {
        return Err(bad(format!("task for the {} agent reached the container agent", task.agent)));
    }
    let args = if task.args.is_null() { json!({}) } else { task.args.clone() };
    // A pool task is about a slot, not a session: its work is serialised on the slot's container
    // name instead (`pool-<slot>`).
    let pool_slot = matches!(task.action.as_str(), "pool_create" | "pool_remove")
        .then(|| args.get("slot").and_then(Value::as_str).unwrap_or_default().to_owned());
    let session = match (task.session.clone(), pool_slot) {
        (_, Some(slot)) => {
            if !slot.is_empty() {
                spec::validate_session_id(&slot).map_err(|reason| bad(format!("slot: {reason}")))?;
            }
            format!("pool-{slot}")
        }
        (Some(session), None) => session,
        (None, None) => return Err(bad("container tasks need a `session`".to_owned())),
    };
    spec::validate_session_id(&session).map_err(bad)?;
    let action = match task.action.as_str() {
        "provision" => {
            let parsed: ProvisionArgs = serde_json::from_value(args).map_err(|error| bad(format!("provision args: {error}")))?;
            spec::validate_label_value("user", &parsed.user).map_err(bad)?;
            spec::validate_label_value("workspace", &parsed.workspace).map_err(bad)?;
            let slot = parsed.slot.filter(|slot| !slot.is_empty());
            if let Some(slot) = &slot {
                spec::validate_session_id(slot).map_err(|reason| bad(format!("slot: {reason}")))?;
            }
            Action::Provision { user: parsed.user, workspace: parsed.workspace, slot }
        }
        "claim" => {
            let parsed: ProvisionArgs = serde_json::from_value(args).map_err(|error| bad(format!("claim args: {error}")))?;
            spec::validate_label_value("user", &parsed.user).map_err(bad)?;
            spec::validate_label_value("workspace", &parsed.workspace).map_err(bad)?;
            let slot = parsed.slot.filter(|slot| !slot.is_empty()).ok_or_else(|| bad("claim args: a `slot` is needed".to_owned()))?;
            spec::validate_session_id(&slot).map_err(|reason| bad(format!("slot: {reason}")))?;
            Action::Claim { user: parsed.user, workspace: parsed.workspace, slot }
        }
        "pool_create" | "pool_remove" => {
            let parsed: PoolArgs = serde_json::from_value(args).map_err(|error| bad(format!("{} args: {error}", task.action)))?;
            spec::validate_session_id(&parsed.slot).map_err(|reason| bad(format!("slot: {reason}")))?;
            if task.action == "pool_create" {
                Action::PoolCreate { slot: parsed.slot }
            } else {
                Action::PoolRemove { slot: parsed.slot }
            }
        }
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "stop" => Action::Stop,
        "remove" => {
            let parsed: RemoveArgs = serde_json::from_value(args).map_err(|error| bad(format!("remove args: {error}")))?;
            if let Some(id) = &parsed.container_id {
                if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad(format!("remove args: container_id {id:?} is not a container id")));
                }
            }
            Action::Remove { container_id: parsed.container_id }
        }
        "stats" => Action::Stats,
        "probe" => Action::Probe,
        "wake" => {
            let parsed: ProvisionArgs = serde_json::from_value(args).map_err(|error| bad(format!("wake args: {error}")))?;
            spec::validate_label_value("user", &parsed.user).map_err(bad)?;
            spec::validate_label_value("workspace", &parsed.workspace).map_err(bad)?;
            Action::Wake { user: parsed.user, workspace: parsed.workspace }
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

/// What `pause` found: frozen now, or nothing left running to freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrozenState {
    Paused,
    Exited,
    Missing,
}

impl FrozenState {
    fn as_str(self) -> &'static str {
        match self {
            FrozenState::Paused => "paused",
            FrozenState::Exited => "exited",
            FrozenState::Missing => "missing",
        }
    }
}

/// `None` while the container runs (it has to be paused); otherwise what it already is.
fn frozen_state(status: ContainerStateStatusEnum) -> Option<FrozenState> {
    match status {
        ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING => None,
        ContainerStateStatusEnum::PAUSED => Some(FrozenState::Paused),
        // Never started, stopped, dead or being removed: no process can change the workspace.
        ContainerStateStatusEnum::CREATED
        | ContainerStateStatusEnum::EXITED
        | ContainerStateStatusEnum::DEAD
        | ContainerStateStatusEnum::REMOVING
        | ContainerStateStatusEnum::EMPTY => Some(FrozenState::Exited),
    }
}

fn paused(task: &Task, container_id: Option<&str>, state: FrozenState) -> CloudEvent {
    answer(task, &ContainerPaused { container_id: container_id.map(str::to_owned), state: state.as_str().to_owned() })
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn ensure_session_dir(session_dir: &Path) -> Result<(), Refusal> {
    if tokio::fs::metadata(session_dir).await.is_ok_and(|metadata| metadata.is_dir()) {
        return Ok(());
    }
    tokio::fs::create_dir_all(session_dir)
        .await
        .map_err(|error| Refusal(format!("cannot create workspace directory {}: {error}", session_dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(session_dir, std::fs::Permissions::from_mode(0o755))
            .await
            .map_err(|error| Refusal(format!("cannot set permissions on {}: {error}", session_dir.display())))?;
    }
    Ok(())
}

fn container_labels(inspected: &ContainerInspectResponse) -> HashMap<String, String> {
    inspected.config.as_ref().and_then(|config| config.labels.clone()).unwrap_or_default()
}

fn container_status(inspected: &ContainerInspectResponse) -> ContainerStateStatusEnum {
    inspected.state.as_ref().and_then(|state| state.status).unwrap_or(ContainerStateStatusEnum::EMPTY)
}

/// A container named like ours must also be labelled as ours, for this very session; a claimed
/// warm-pool container (no session label) must have been claimed for this session and user.
fn check_ownership(inspected: &ContainerInspectResponse, identity: &SessionIdentity, profile: &Profile) -> Result<(), Refusal> {
    let labels = container_labels(inspected);
    if let Some(slot) = labels.get(spec::POOL_SLOT_LABEL).filter(|_| spec::is_deployment_container(&labels, profile)) {
        return pool::check_claim(profile, slot, identity).map_err(Refusal);
    }
    let ours = spec::is_deployment_container(&labels, profile) && labels.get(spec::SESSION_LABEL) == Some(&identity.session);
    if !ours {
        return Err(Refusal(format!(
            "a container named {} exists but is not this session's Berth container in deployment {}",
            spec::container_name(&identity.session),
            profile.deployment()
        )));
    }
    if labels.get(spec::USER_LABEL) != Some(&identity.user) {
        return Err(Refusal(format!("the container of session {} belongs to another user", identity.session)));
    }
    Ok(())
}

/// A container that answers its health check.
struct Answering {
    container_id: String,
    port: u16,
    network: Option<protocol::host::NetworkAddress>,
}

/// The container's address on `network` (its IP there and the service port), on this machine.
fn network_address(
    inspected: &ContainerInspectResponse,
    network: &str,
    service_port: u16,
    profile: &Profile,
) -> Option<protocol::host::NetworkAddress> {
    let endpoint = inspected.network_settings.as_ref()?.networks.as_ref()?.get(network)?;
    let ip = endpoint.ip_address.as_deref()?.parse().ok()?;
    Some(protocol::host::NetworkAddress {
        ip,
        port: service_port,
        host: profile.host(),
        boot_id: protocol::host::boot_id().unwrap_or_default().to_owned(),
    })
}

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

fn check_still_running(inspected: &ContainerInspectResponse) -> Result<(), Refusal> {
    let Some(state) = &inspected.state else { return Ok(()) };
    match state.status {
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => Err(Refusal(format!(
            "container exited before it was ready (exit code {}, oom_killed {}{})",
            state.exit_code.unwrap_or(-1),
            state.oom_killed.unwrap_or(false),
            state.error.as_deref().filter(|text| !text.is_empty()).map(|text| format!(", {text}")).unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

fn docker_health(inspected: &ContainerInspectResponse) -> Result<bool, Refusal> {
    let health = inspected.state.as_ref().and_then(|state| state.health.as_ref()).and_then(|health| health.status);
    match health {
        Some(HealthStatusEnum::HEALTHY) => Ok(true),
        Some(HealthStatusEnum::UNHEALTHY) => Err(Refusal("docker reports the container unhealthy".to_owned())),
        Some(HealthStatusEnum::STARTING) => Ok(false),
        Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) | None => {
            Err(Refusal("the profile asks for Docker's health check but the image has no HEALTHCHECK".to_owned()))
        }
    }
}

fn container_age(inspected: &ContainerInspectResponse) -> Option<Duration> {
    let created = chrono::DateTime::parse_from_rfc3339(inspected.created.as_deref()?).ok()?;
    (chrono::Utc::now() - created.with_timezone(&chrono::Utc)).to_std().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure
mod tests {
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
        check(task("provision", Some("s"), json!({"user": "a\n", "workspace": "w"})), Err("`user`"));
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

    #[test]
    fn pause_never_fails_for_a_container_with_nothing_to_freeze() {
        assert_eq!(frozen_state(ContainerStateStatusEnum::RUNNING), None);
        assert_eq!(frozen_state(ContainerStateStatusEnum::PAUSED), Some(FrozenState::Paused));
        for status in [ContainerStateStatusEnum::EXITED, ContainerStateStatusEnum::CREATED, ContainerStateStatusEnum::DEAD] {
            assert_eq!(frozen_state(status), Some(FrozenState::Exited), "{status}");
        }
    }
}
