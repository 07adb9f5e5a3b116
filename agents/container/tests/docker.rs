//! The container agent against the real Docker engine and the real broker.
//!
//! Every test works on its own network, its own workspace root and its own `berth.test=<uuid>`
//! label, and a guard removes everything carrying that label when the test ends, even on panic.

#![allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::container::{Config, CreateContainerOptions, ListContainersOptions, StartContainerOptions};
use bollard::Docker;
use container::{connect_docker, spec, Agent, AgentSettings, SessionIdentity};
use protocol::bus::{Durability, QueueSpec};
use protocol::event::DEFAULT_MAX_EVENT_BYTES;
use protocol::events::{
    ContainerClaimed, ContainerEntry, ContainerExited, ContainerFailed, ContainerInventory, ContainerPaused, ContainerProbed,
    ContainerReady, ContainerRemoved, ContainerResumed, ContainerStats, EventData,
};
use protocol::{topology, AgentKind, Bus, BusConfig, CloudEvent, ConsumeSpec, Outcome, Profile, Properties, Task};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

const TEST_LABEL: &str = "berth.test";

fn amqp_url() -> String {
    std::env::var("BERTH_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn dev_profile_text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../run-profiles/dev/profile.toml")).expect("dev profile")
}

/// Removes every container and network carrying the test's label, and its workspace root.
struct Cleanup {
    test_id: String,
    workspace_root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label={TEST_LABEL}={}", self.test_id);
        if let Ok(listed) = Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output() {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        // The agent labels its networks like its containers (one per deployment).
        if let Ok(listed) = Command::new("docker").args(["network", "ls", "-q", "--no-trunc", "--filter", &filter]).output() {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["network", "rm", id]).output();
                // The network's egress chains go with it.
                container::egress::remove_for_network_blocking(id);
            }
        }
        let _ = std::fs::remove_dir_all(&self.workspace_root);
    }
}

struct Fixture {
    test_id: String,
    profile: Profile,
    /// The test's own view of the broker (taps, task queues), as the admin.
    bus: Bus,
    /// What the agents under test connect with: the container identity, as in a deployment.
    agent_bus: Bus,
    docker: Docker,
    settings: AgentSettings,
    // Dropped last: removes what the test created.
    _cleanup: Cleanup,
}

impl Fixture {
    async fn new(edit: impl FnOnce(&mut Profile)) -> Fixture {
        let test_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let mut profile = Profile::parse(&dev_profile_text(), std::path::Path::new("dev/profile.toml")).expect("dev profile parses");
        profile.container.network = format!("berth-test-{test_id}");
        profile.services.workspace_root = std::env::temp_dir().join(format!("berth-container-test-{test_id}"));
        profile.services.amqp_url = amqp_url();
        edit(&mut profile);
        let cleanup = Cleanup { test_id: test_id.clone(), workspace_root: profile.services.workspace_root.clone() };
        let bus = Bus::connect(BusConfig::new(&amqp_url(), &format!("container-test-{test_id}"))).await.expect("broker");
        bus.declare_topology().await.expect("topology");
        let agent_bus = container_identity(&format!("container-test-agent-{test_id}")).await;
        let docker = connect_docker().await.expect("docker engine");
        let mut settings = AgentSettings::production();
        settings.extra_labels = BTreeMap::from([(TEST_LABEL.to_owned(), test_id.clone())]);
        settings.stop_timeout_secs = 1;
        Fixture { test_id, profile, bus, agent_bus, docker, settings, _cleanup: cleanup }
    }

    fn agent(&self) -> Agent {
        Agent::with_settings(self.profile.clone(), self.agent_bus.clone(), self.docker.clone(), self.settings.clone())
            .expect("safe profile")
    }

    fn session(&self, name: &str) -> String {
        format!("t{}-{name}", self.test_id)
    }

    /// Containers carrying this test's label, optionally for one session.
    async fn containers(&self, session: Option<&str>) -> Vec<bollard::models::ContainerSummary> {
        let mut labels = vec![format!("{TEST_LABEL}={}", self.test_id)];
        if let Some(session) = session {
            labels.push(format!("{}={session}", spec::SESSION_LABEL));
        }
        let options = ListContainersOptions { all: true, filters: HashMap::from([("label".to_owned(), labels)]), ..Default::default() };
        self.docker.list_containers(Some(options)).await.expect("list containers")
    }
}

fn task(session: &str, action: &str, args: Value) -> Task {
    Task {
        id: Uuid::now_v7(),
        agent: AgentKind::Container,
        action: action.to_owned(),
        session: Some(session.to_owned()),
        thred: Some(format!("thred-{session}")),
        cause: None,
        args,
    }
}

fn provision(session: &str) -> Task {
    task(session, "provision", json!({"user": "alice", "workspace": "w1"}))
}

/// Handles a task directly and returns its single answer.
async fn answer(agent: &Agent, task: &Task) -> CloudEvent {
    let mut events = agent.handle(task).await.expect("task handled");
    assert_eq!(events.len(), 1, "{events:?}");
    let event = events.remove(0);
    assert_eq!(event.subject.as_deref(), task.session.as_deref());
    assert_eq!(event.extension("taskid"), Some(task.id.to_string().as_str()));
    assert_eq!(event.extension("thredid"), task.thred.as_deref());
    event
}

/// A free warm-pool slot made by `agent` (its container running, claimed by nobody); returns the
/// `pool_create` task, for a test that delivers it again.
async fn make_pool_slot(agent: &Agent, slot: &str) -> Task {
    let mut create = task(slot, "pool_create", json!({"slot": slot}));
    create.session = None;
    let events = agent.handle(&create).await.expect("pool slot made");
    assert_eq!(events[0].event_type, "container.pool_slot_ready", "{:?}", events[0].data);
    create
}

#[track_caller]
fn expect_type(event: &CloudEvent, event_type: &str) {
    assert_eq!(event.event_type, event_type, "unexpected answer: {}", event.data);
}

fn port_of(event: &CloudEvent) -> u16 {
    data::<ContainerReady>(event).port
}

/// The event's data read as its catalogue type (the event must be of that type).
#[track_caller]
fn data<T: EventData>(event: &CloudEvent) -> T {
    event.data_as().unwrap_or_else(|error| panic!("{error}: {}", event.data))
}

/// An inventory entry's session, user and workspace as text (none when its label was empty).
fn ids(entry: &ContainerEntry) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        entry.session.as_ref().map(|id| id.as_str()),
        entry.user.as_ref().map(|id| id.as_str()),
        entry.workspace.as_ref().map(|id| id.as_str()),
    )
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_string(&mut body)).await.ok()?.ok()?;
    Some(body)
}

/// Events from the real broker, bound to the given routing keys.
struct EventTap {
    events: mpsc::UnboundedReceiver<CloudEvent>,
    _stop: oneshot::Sender<()>,
}

impl EventTap {
    async fn open(bus: &Bus, keys: &[&str]) -> EventTap {
        let keys: Vec<String> = keys.iter().map(|key| (*key).to_owned()).collect();
        let queue = bus.declare_private_queue(topology::EVENTS_EXCHANGE, &keys).await.expect("tap queue");
        let (sender, events) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let consumer_bus = bus.clone();
        tokio::spawn(async move {
            let handler = move |incoming: protocol::Incoming| {
                let sender = sender.clone();
                async move {
                    if let Ok(event) = CloudEvent::parse(&incoming.body, DEFAULT_MAX_EVENT_BYTES) {
                        let _ = sender.send(event);
                    }
                    Outcome::Ack
                }
            };
            let _ = consumer_bus
                .consume(ConsumeSpec::new(&queue, 64), handler, async {
                    stopped.await.ok();
                })
                .await;
        });
        EventTap { events, _stop: stop }
    }

    async fn next_matching(&mut self, what: &str, timeout: Duration, predicate: impl Fn(&CloudEvent) -> bool) -> CloudEvent {
        match self.try_next_matching(timeout, predicate).await {
            Some(event) => event,
            None => panic!("no {what} within {timeout:?}"),
        }
    }

    async fn try_next_matching(&mut self, timeout: Duration, predicate: impl Fn(&CloudEvent) -> bool) -> Option<CloudEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if predicate(&event) => return Some(event),
                Ok(Some(_other)) => {}
                Ok(None) => panic!("event tap closed"),
                Err(_) => return None,
            }
        }
    }
}

/// A unique, non-auto-deleting task queue: tasks reach it through the broker's default exchange,
/// so the test's agent never takes tasks meant for a real deployment, and the queue survives an
/// agent that dies with unacknowledged tasks.
/// A connection as the container identity (bootstrap's users and permissions ensured first).
async fn container_identity(name: &str) -> Bus {
    protocol::broker_admin::ensure_identities(&amqp_url()).await.expect("bus identities");
    let config = BusConfig::for_identity(&amqp_url(), protocol::Identity::Container, name).expect("the container identity's password");
    Bus::connect(config).await.expect("broker as the container identity")
}

/// The test's task queue: an isolated world's name for the container agent's queue, which the
/// container identity may consume (and park retries of).
async fn task_queue(bus: &Bus, test_id: &str) -> String {
    let queue = format!("berth-test.{test_id}.agent.container");
    bus.declare_queue(&QueueSpec::classic(&queue, Durability::Transient)).await.expect("declare task queue");
    queue
}

async fn send_task(bus: &Bus, queue: &str, task: &Task) {
    bus.publish("", queue, &task.to_bytes(), Properties::bare()).await.expect("task published");
}

/// A task dropped straight into the agent's queue through the default exchange by another
/// component's identity (here the workspace agent's) is dead-lettered with the reason, and nothing
/// is created; the engine's task still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_task_from_another_identity_is_dead_lettered_and_creates_nothing() {
    let fixture = Fixture::new(|_| {}).await;
    let queue = task_queue(&fixture.bus, &fixture.test_id).await;
    let dead = fixture.bus.declare_private_queue(topology::DEAD_EXCHANGE, &[String::new()]).await.expect("dead-letter tap");
    let (dead_sender, mut dead_letters) = mpsc::unbounded_channel::<protocol::Incoming>();
    let (stop_tap, tap_stopped) = oneshot::channel::<()>();
    let tap_bus = fixture.bus.clone();
    let tap_queue = dead.clone();
    tokio::spawn(async move {
        let handler = move |incoming: protocol::Incoming| {
            let dead_sender = dead_sender.clone();
            async move {
                let _ = dead_sender.send(incoming);
                Outcome::Ack
            }
        };
        let _ = tap_bus
            .consume(ConsumeSpec::new(&tap_queue, 16), handler, async {
                tap_stopped.await.ok();
            })
            .await;
    });
    let agent = fixture.agent();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving_queue = queue.clone();
    let server = tokio::spawn(async move {
        agent
            .serve(&serving_queue, async {
                stopped.await.ok();
            })
            .await
    });

    protocol::broker_admin::ensure_identities(&amqp_url()).await.expect("bus identities");
    let forger =
        Bus::connect(BusConfig::for_identity(&amqp_url(), protocol::Identity::Workspace, "container-test-forger").expect("password"))
            .await
            .expect("broker as the workspace identity");
    let session = fixture.session("forged");
    let forged = provision(&session);
    send_task(&forger, &queue, &forged).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let incoming = tokio::time::timeout(remaining, dead_letters.recv()).await.expect("the forged task dead-lettered").expect("tap");
        if Task::decode(&incoming.body).is_ok_and(|task| task.id == forged.id) {
            break incoming;
        }
    };
    assert_eq!(
        refused.headers[topology::REASON_HEADER],
        "a container task refused from the workspace identity (berth-workspace): only berth-engine sends tasks"
    );
    assert_eq!(refused.headers[topology::SENDER_HEADER], "berth-workspace");
    assert!(fixture.containers(Some(&session)).await.is_empty(), "the forged provision created a container");

    let _ = stop.send(());
    let _ = stop_tap.send(());
    server.await.unwrap().expect("serve ends cleanly");
    forger.close().await;
    fixture.bus.delete_queue(&queue).await.expect("delete task queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_sets_every_limit_and_hardening_option_and_is_idempotent() {
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let session = fixture.session("limits");
    let session_dir = fixture.profile.session_dir(&session);
    std::fs::create_dir_all(&session_dir).unwrap();
    std::fs::write(session_dir.join("hello.txt"), "hello from the workspace").unwrap();

    let ready = answer(&agent, &provision(&session)).await;
    expect_type(&ready, "container.ready");
    assert_eq!(data::<ContainerReady>(&ready).host, "127.0.0.1");
    let port = port_of(&ready);
    let body = http_get(port, "/hello.txt").await.expect("published port answers");
    assert!(body.contains("hello from the workspace"), "{body}");

    let container_id = data::<ContainerReady>(&ready).container_id;
    let inspected = fixture.docker.inspect_container(&container_id, None).await.unwrap();
    assert_eq!(inspected.name.as_deref(), Some(format!("/berth-{session}").as_str()));
    let host = inspected.host_config.clone().unwrap();
    assert_eq!(host.memory, Some(128 * 1024 * 1024));
    assert_eq!(host.memory_swap, Some(128 * 1024 * 1024), "swap disabled");
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.pids_limit, Some(64));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    assert!(host.cap_add.unwrap_or_default().is_empty());
    assert!(host.security_opt.unwrap_or_default().iter().any(|option| option.starts_with("no-new-privileges")));
    let tmp_options = host.tmpfs.unwrap_or_default().remove("/tmp").expect("tmpfs /tmp");
    for option in ["noexec", "nosuid", "size=16m"] {
        assert!(tmp_options.contains(option), "{tmp_options}");
    }
    assert_eq!(host.readonly_rootfs, Some(true));
    assert_eq!(host.privileged, Some(false));
    assert_eq!(host.network_mode.as_deref(), Some(spec::network_name(&fixture.profile).as_str()));
    let bindings = host.port_bindings.unwrap_or_default().remove("8080/tcp").flatten().expect("port binding");
    assert_eq!(bindings[0].host_ip.as_deref(), Some("127.0.0.1"));
    assert!(host.binds.unwrap_or_default().contains(&format!("{}:/workspace:rw", session_dir.display())));
    let config = inspected.config.clone().unwrap();
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    let labels = config.labels.unwrap_or_default();
    assert_eq!(labels.get("berth.managed").map(String::as_str), Some("true"));
    assert_eq!(labels.get("berth.session"), Some(&session));
    assert_eq!(labels.get("berth.user").map(String::as_str), Some("alice"));
    assert_eq!(labels.get("berth.profile").map(String::as_str), Some("dev"));
    let env = config.env.unwrap_or_default();
    assert!(env.contains(&format!("BERTH_SESSION={session}")), "{env:?}");
    assert!(env.contains(&"BERTH_USER=alice".to_owned()), "{env:?}");
    // The workspace directory is 0755, and the process inside really runs as uid 1000.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&session_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
    }
    let ids = docker_exec(&container_id, &["id", "-u"]).await;
    assert_eq!(ids.trim(), "1000");
    // The kernel agrees about the limits and the hardening.
    let status = docker_exec(&container_id, &["cat", "/proc/self/status"]).await;
    assert!(status.lines().any(|line| line.starts_with("NoNewPrivs:") && line.ends_with('1')), "{status}");
    assert!(status.lines().any(|line| line.starts_with("CapEff:") && line.ends_with("0000000000000000")), "{status}");
    let mounts = docker_exec(&container_id, &["cat", "/proc/mounts"]).await;
    let root = mounts.lines().find(|line| line.split_whitespace().nth(1) == Some("/")).expect("root mount");
    assert!(root.split_whitespace().nth(3).is_some_and(|options| options.split(',').any(|option| option == "ro")), "{root}");
    let tmp = mounts.lines().find(|line| line.split_whitespace().nth(1) == Some("/tmp")).expect("tmp mount");
    assert!(tmp.starts_with("tmpfs") && tmp.contains("noexec") && tmp.contains("nosuid"), "{tmp}");
    let network = fixture.docker.inspect_network::<String>(&spec::network_name(&fixture.profile), None).await.unwrap();
    assert_eq!(network.options.unwrap_or_default().get(spec::ICC_OPTION).map(String::as_str), Some("false"));
    let network_labels = network.labels.unwrap_or_default();
    assert_eq!(network_labels.get("berth.managed").map(String::as_str), Some("true"));
    assert_eq!(network_labels.get("berth.deployment"), Some(&fixture.profile.deployment()));
    assert_eq!(labels.get("berth.deployment"), Some(&fixture.profile.deployment()));

    // Provisioning again (a repeated or redelivered task) finds the same container and port.
    let again = answer(&agent, &provision(&session)).await;
    expect_type(&again, "container.ready");
    let (again, first) = (data::<ContainerReady>(&again), data::<ContainerReady>(&ready));
    assert_eq!(again.container_id, first.container_id);
    assert_eq!(again.port, port);
    assert!(again.adopted);
    assert_eq!(fixture.containers(Some(&session)).await.len(), 1);

    // Another user asking for the same session id gets nothing of it.
    let intruder = task(&session, "provision", json!({"user": "mallory", "workspace": "w1"}));
    let refused = agent.handle(&intruder).await.unwrap();
    expect_type(&refused[0], "container.failed");

    let stats = answer(&agent, &task(&session, "stats", json!({}))).await;
    expect_type(&stats, "container.stats");
    let stats = data::<ContainerStats>(&stats);
    assert_eq!(stats.memory_limit, 128 * 1024 * 1024);
    assert!(stats.memory_used > 0, "{stats:?}");
    assert!(stats.cpu_percent.is_finite(), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_tasks_are_idempotent_and_pause_resume_round_trips() {
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let session = fixture.session("life");
    let ready = answer(&agent, &provision(&session)).await;
    expect_type(&ready, "container.ready");
    let container_id = data::<ContainerReady>(&ready).container_id;
    let port = port_of(&ready);

    for _ in 0..2 {
        expect_type(&answer(&agent, &task(&session, "pause", json!({}))).await, "container.paused");
        let state = fixture.docker.inspect_container(&container_id, None).await.unwrap().state.unwrap();
        assert_eq!(state.paused, Some(true));
    }
    assert!(!container::probe::http_ready("127.0.0.1", port, "/").await, "a paused container must not answer");
    for _ in 0..2 {
        let resumed = answer(&agent, &task(&session, "resume", json!({}))).await;
        expect_type(&resumed, "container.resumed");
        assert_eq!(data::<ContainerResumed>(&resumed).container_id.as_ref(), Some(&container_id));
    }
    assert!(container::probe::http_ready("127.0.0.1", port, "/").await, "resumed container answers");

    for _ in 0..2 {
        expect_type(&answer(&agent, &task(&session, "stop", json!({}))).await, "container.stopped");
    }
    let state = fixture.docker.inspect_container(&container_id, None).await.unwrap().state.unwrap();
    assert_eq!(state.running, Some(false));
    // The engine pauses before every final sync: an exited container is answered, not refused.
    for _ in 0..2 {
        let paused_exited = answer(&agent, &task(&session, "pause", json!({}))).await;
        expect_type(&paused_exited, "container.paused");
        let paused: ContainerPaused = data(&paused_exited);
        assert_eq!((paused.state.as_str(), paused.container_id.as_ref()), ("exited", Some(&container_id)), "{paused:?}");
    }
    expect_type(&answer(&agent, &task(&session, "resume", json!({}))).await, "container.failed");

    // A removal naming this container under another session's name is refused.
    let confused = task(&fixture.session("someone-else"), "remove", json!({"container_id": container_id}));
    expect_type(&answer(&agent, &confused).await, "container.failed");
    assert_eq!(fixture.containers(Some(&session)).await.len(), 1);
    for _ in 0..2 {
        expect_type(&answer(&agent, &task(&session, "remove", json!({}))).await, "container.removed");
    }
    assert!(fixture.containers(Some(&session)).await.is_empty());
    // Pausing what is gone does not block the final sync that follows a pause.
    let paused_missing = answer(&agent, &task(&session, "pause", json!({}))).await;
    expect_type(&paused_missing, "container.paused");
    assert_eq!(data::<ContainerPaused>(&paused_missing), ContainerPaused { container_id: None, state: "missing".to_owned() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_answers_paused_with_the_state_whatever_the_container_is() {
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let session = fixture.session("freeze");
    let ready = answer(&agent, &provision(&session)).await;
    expect_type(&ready, "container.ready");
    let container_id = data::<ContainerReady>(&ready).container_id;

    let check_pause = |agent: Agent, expected_state: &'static str, expected_id: Option<String>| {
        let task = task(&session, "pause", json!({}));
        async move {
            let event = answer(&agent, &task).await;
            expect_type(&event, "container.paused");
            assert_eq!(data::<ContainerPaused>(&event), ContainerPaused { container_id: expected_id, state: expected_state.to_owned() });
        }
    };
    // Running, then already paused.
    check_pause(agent.clone(), "paused", Some(container_id.clone())).await;
    check_pause(agent.clone(), "paused", Some(container_id.clone())).await;
    // Exited behind the agent's back (a crash): a fresh agent, which knows nothing, answers too.
    let killed = Command::new("docker").args(["kill", &container_id]).output().unwrap();
    assert!(killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
    check_pause(agent.clone(), "exited", Some(container_id.clone())).await;
    check_pause(fixture.agent(), "exited", Some(container_id.clone())).await;
    // Gone.
    let removed = Command::new("docker").args(["rm", "-f", &container_id]).output().unwrap();
    assert!(removed.status.success());
    check_pause(agent.clone(), "missing", None).await;
    check_pause(fixture.agent(), "missing", None).await;
    // Stop and remove of a missing container succeed too.
    expect_type(&answer(&agent, &task(&session, "stop", json!({}))).await, "container.stopped");
    expect_type(&answer(&agent, &task(&session, "remove", json!({}))).await, "container.removed");
}

/// Two deployments of the same profile ("dev", one base network name, one test label) on one
/// Docker engine: only the deployment label tells their containers apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_sharing_a_profile_name_and_a_docker_engine_never_touch_each_other() {
    let mut fixture = Fixture::new(|_| {}).await;
    fixture.settings.orphan_grace = Duration::ZERO;
    fixture.settings.inventory_interval = Duration::from_secs(3600);
    let deployment = |suffix: &str| {
        let mut profile = fixture.profile.clone();
        profile.services.deployment = Some(format!("t{}-{suffix}", fixture.test_id));
        profile
    };
    let (profile_a, profile_b) = (deployment("a"), deployment("b"));
    assert_eq!(profile_a.name, profile_b.name);
    let agent_for = |profile: &Profile| {
        Agent::with_settings(profile.clone(), fixture.agent_bus.clone(), fixture.docker.clone(), fixture.settings.clone()).unwrap()
    };
    let (agent_a, agent_b) = (agent_for(&profile_a), agent_for(&profile_b));
    let (session_a, session_b) = (fixture.session("dep-a"), fixture.session("dep-b"));
    let ready_a = answer(&agent_a, &provision(&session_a)).await;
    let ready_b = answer(&agent_b, &provision(&session_b)).await;
    expect_type(&ready_a, "container.ready");
    expect_type(&ready_b, "container.ready");
    let id_a = data::<ContainerReady>(&ready_a).container_id;
    let id_b = data::<ContainerReady>(&ready_b).container_id;

    // Labels, networks and host directories are per deployment.
    let (network_a, network_b) = (spec::network_name(&profile_a), spec::network_name(&profile_b));
    assert_ne!(network_a, network_b);
    for (profile, id, network) in [(&profile_a, &id_a, &network_a), (&profile_b, &id_b, &network_b)] {
        let inspected = fixture.docker.inspect_container(id, None).await.unwrap();
        let labels = inspected.config.unwrap().labels.unwrap();
        assert_eq!(labels.get(spec::DEPLOYMENT_LABEL), Some(&profile.deployment()));
        assert_eq!(inspected.host_config.unwrap().network_mode.as_deref(), Some(network.as_str()));
        let network = fixture.docker.inspect_network::<String>(network, None).await.unwrap();
        assert_eq!(network.options.unwrap_or_default().get(spec::ICC_OPTION).map(String::as_str), Some("false"));
        assert_eq!(network.labels.unwrap_or_default().get(spec::DEPLOYMENT_LABEL), Some(&profile.deployment()));
    }
    assert_ne!(profile_a.session_dir(&session_a).parent(), profile_b.session_dir(&session_b).parent());

    // Each inventory lists only its own, with the user and workspace to recover it by.
    for (agent, own_session, own_id) in [(&agent_a, &session_a, &id_a), (&agent_b, &session_b, &id_b)] {
        let inventory = agent.inventory().await.unwrap();
        assert_eq!(inventory.len(), 1, "{inventory:?}");
        assert_eq!(ids(&inventory[0]), (Some(own_session.as_str()), Some("alice"), Some("w1")));
        assert_eq!(&inventory[0].container_id, own_id);
    }
    let published = agent_a.publish_inventory().await.unwrap();
    let published = data::<ContainerInventory>(&published);
    assert_eq!(published.deployment, profile_a.deployment());
    let entries = &published.containers;
    assert_eq!(entries.len(), 1);
    assert_eq!(ids(&entries[0]), (Some(session_a.as_str()), Some("alice"), Some("w1")));

    let still_running = |id: String| {
        let docker = fixture.docker.clone();
        async move { docker.inspect_container(&id, None).await.unwrap().state.unwrap().status }
    };
    // A's orphan removal naming B's container is refused and not executed (no grace period here).
    let refused = answer(&agent_a, &task(&session_b, "remove", json!({"container_id": id_b}))).await;
    expect_type(&refused, "container.failed");
    let reason = data::<ContainerFailed>(&refused).error;
    assert!(reason.contains(&profile_a.deployment()) && reason.contains(&profile_b.deployment()), "{reason}");
    // By the session's name, A finds no container of its own: removed, stopped, paused as missing.
    let by_name = answer(&agent_a, &task(&session_b, "remove", json!({}))).await;
    expect_type(&by_name, "container.removed");
    assert_eq!(data::<ContainerRemoved>(&by_name).container_id, None);
    expect_type(&answer(&agent_a, &task(&session_b, "stop", json!({}))).await, "container.stopped");
    let paused = answer(&agent_a, &task(&session_b, "pause", json!({}))).await;
    assert_eq!(data::<ContainerPaused>(&paused), ContainerPaused { container_id: None, state: "missing".into() });
    expect_type(&answer(&agent_a, &task(&session_b, "stats", json!({}))).await, "container.failed");
    // Provisioning B's session id in A cannot adopt or replace B's container.
    let hijack = answer(&agent_a, &provision(&session_b)).await;
    expect_type(&hijack, "container.failed");
    assert_eq!(still_running(id_b.clone()).await, Some(bollard::models::ContainerStateStatusEnum::RUNNING));
    assert!(http_get(port_of(&ready_b), "/").await.is_some(), "B's session still answers");

    // A's Docker-event watcher reports A's exits and never B's.
    let queue = task_queue(&fixture.bus, &fixture.test_id).await;
    let mut tap = EventTap::open(&fixture.bus, &["container.exited"]).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let serving_agent = agent_a.clone();
    let serving_queue = queue.clone();
    let server = tokio::spawn(async move {
        serving_agent
            .serve(&serving_queue, async {
                stopped.await.ok();
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(Command::new("docker").args(["kill", &id_b]).output().unwrap().status.success());
    let foreign = tap.try_next_matching(Duration::from_secs(3), |event| event.subject.as_deref() == Some(session_b.as_str())).await;
    assert!(foreign.is_none(), "agent A reported deployment B's exit: {foreign:?}");
    assert!(Command::new("docker").args(["kill", &id_a]).output().unwrap().status.success());
    tap.next_matching("A's own exit", Duration::from_secs(30), |event| event.subject.as_deref() == Some(session_a.as_str())).await;
    let _ = stop.send(());
    server.await.unwrap().expect("serve ends cleanly");
    fixture.bus.delete_queue(&queue).await.expect("delete task queue");

    // B removes its own as usual.
    let removed = answer(&agent_b, &task(&session_b, "remove", json!({"container_id": id_b}))).await;
    expect_type(&removed, "container.removed");
    assert!(fixture.docker.inspect_container(&id_b, None).await.is_err());
    assert_eq!(fixture.containers(None).await.len(), 1, "A's container is A's to remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_containers_cannot_reach_each_other_while_both_ports_answer() {
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let session_a = fixture.session("a");
    let session_b = fixture.session("b");
    for session in [&session_a, &session_b] {
        let session_dir = fixture.profile.session_dir(session);
        std::fs::create_dir_all(&session_dir).unwrap();
        std::fs::write(session_dir.join("index.html"), format!("this is {session}")).unwrap();
    }
    let ready_a = answer(&agent, &provision(&session_a)).await;
    let ready_b = answer(&agent, &provision(&session_b)).await;
    expect_type(&ready_a, "container.ready");
    expect_type(&ready_b, "container.ready");
    assert_ne!(port_of(&ready_a), port_of(&ready_b));
    let body_a = http_get(port_of(&ready_a), "/").await.unwrap_or_default();
    let body_b = http_get(port_of(&ready_b), "/").await.unwrap_or_default();
    assert!(body_a.contains(&format!("this is {session_a}")), "{body_a}");
    assert!(body_b.contains(&format!("this is {session_b}")), "{body_b}");

    let id_a = data::<ContainerReady>(&ready_a).container_id;
    let id_b = data::<ContainerReady>(&ready_b).container_id;
    let inspected_b = fixture.docker.inspect_container(&id_b, None).await.unwrap();
    let address_b = inspected_b.network_settings.unwrap().networks.unwrap()[&spec::network_name(&fixture.profile)]
        .ip_address
        .clone()
        .expect("b has an address");
    // busybox-static's wget crashes on this image, so a raw request goes through nc.
    let fetch = |address: &str| format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {address} 8080");
    // The control: the same request works inside a, against a itself.
    let own = docker_exec(&id_a, &["sh", "-c", &fetch("127.0.0.1")]).await;
    assert!(own.contains(&format!("this is {session_a}")), "{own}");
    let attempt = docker_exec_output(&id_a, &["sh", "-c", &fetch(&address_b)]).await;
    let answered = String::from_utf8_lossy(&attempt.stdout).into_owned();
    assert!(!attempt.status.success() && answered.is_empty(), "container a reached container b at {address_b}: {answered}");
    // And from the host, b still answers.
    assert!(http_get(port_of(&ready_b), "/").await.is_some_and(|body| body.contains(&format!("this is {session_b}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_timeout_fails_and_removes_the_container() {
    let fixture = Fixture::new(|profile| {
        profile.container.image = "berth-test/unhealthy:latest".to_owned();
        profile.container.ready_timeout_secs = 2;
    })
    .await;
    let agent = fixture.agent();
    let session = fixture.session("slow");
    let began = Instant::now();
    let failed = answer(&agent, &provision(&session)).await;
    expect_type(&failed, "container.failed");
    let failed = data::<ContainerFailed>(&failed);
    assert_eq!(failed.action, "provision");
    assert!(failed.error.contains("not ready within 2 s"), "{failed:?}");
    assert!(began.elapsed() >= Duration::from_secs(2));
    assert!(fixture.containers(Some(&session)).await.is_empty(), "the failed container was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_fast_and_clearly() {
    let fixture = Fixture::new(|profile| {
        profile.container.image = "berth-test/no-such-image:latest".to_owned();
        profile.container.ready_timeout_secs = 60;
    })
    .await;
    let agent = fixture.agent();
    let session = fixture.session("noimage");
    let began = Instant::now();
    let failed = answer(&agent, &provision(&session)).await;
    expect_type(&failed, "container.failed");
    let error = data::<ContainerFailed>(&failed).error;
    assert!(error.contains("berth-test/no-such-image:latest") && error.contains("not available"), "{error}");
    assert!(began.elapsed() < Duration::from_secs(30), "no hang on a missing image");
    assert!(fixture.containers(Some(&session)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_session_container_is_reported_through_the_broker() {
    let fixture = Fixture::new(|profile| profile.container.memory_mib = 16).await;
    let agent = fixture.agent();
    let queue = task_queue(&fixture.bus, &fixture.test_id).await;
    let mut tap = EventTap::open(&fixture.bus, &["container.exited"]).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let serving_agent = agent.clone();
    let serving_queue = queue.clone();
    let server = tokio::spawn(async move {
        serving_agent
            .serve(&serving_queue, async {
                stopped.await.ok();
            })
            .await
    });
    // Give the watcher a moment to subscribe to Docker's events.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A session container built by the crate's own spec, whose process eats memory until killed.
    let session = fixture.session("oom");
    let identity =
        SessionIdentity { session: session.clone(), user: "alice".into(), workspace: "w1".into(), thred: Some("thred-oom".into()) };
    // The network is the agent's; provisioning an ordinary session makes it exist.
    expect_type(&answer(&agent, &provision(&fixture.session("other"))).await, "container.ready");
    let mut config: Config<String> =
        spec::container_config(&fixture.profile, &identity, &fixture.profile.session_dir(&session), &fixture.settings.extra_labels);
    config.cmd = Some(vec!["sh".into(), "-c".into(), "x=a; while true; do x=$x$x; done".into()]);
    let created = fixture
        .docker
        .create_container(Some(CreateContainerOptions { name: spec::container_name(&session), platform: None }), config)
        .await
        .expect("create the memory eater");
    fixture.docker.start_container(&created.id, None::<StartContainerOptions<String>>).await.expect("start");

    let exited = tap
        .next_matching("container.exited for the memory eater", Duration::from_secs(60), |event| {
            event.subject.as_deref() == Some(session.as_str())
        })
        .await;
    assert_eq!(data::<ContainerExited>(&exited), ContainerExited { container_id: created.id.clone(), exit_code: 137, oom_killed: true });
    assert_eq!(exited.extension("thredid"), Some("thred-oom"));

    // A stop the agent was asked for is not reported as an unexpected exit.
    let other = fixture.session("other");
    expect_type(&answer(&agent, &task(&other, "stop", json!({}))).await, "container.stopped");
    let reported = tap.try_next_matching(Duration::from_secs(3), |event| event.subject.as_deref() == Some(other.as_str())).await;
    assert!(reported.is_none(), "a requested stop must not yield container.exited: {reported:?}");

    let _ = stop.send(());
    server.await.unwrap().expect("serve ends cleanly");
    fixture.bus.delete_queue(&queue).await.expect("delete task queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_provision_leaves_one_container_and_reconciliation_removes_orphans() {
    let mut fixture = Fixture::new(|_| {}).await;
    fixture.settings.inventory_interval = Duration::from_millis(500);
    fixture.settings.orphan_grace = Duration::ZERO;
    let queue = task_queue(&fixture.bus, &fixture.test_id).await;
    let mut tap = EventTap::open(&fixture.bus, &["container.ready", "container.removed", "container.inventory"]).await;
    let session = fixture.session("survivor");

    // First life: an agent on its own connection takes the task, and dies before answering.
    let first_bus = container_identity("container-test-first-life").await;
    let first_agent =
        Agent::with_settings(fixture.profile.clone(), first_bus.clone(), fixture.docker.clone(), fixture.settings.clone()).unwrap();
    let first_queue = queue.clone();
    let first_life = tokio::spawn(async move { first_agent.serve(&first_queue, std::future::pending::<()>()).await });
    send_task(&fixture.bus, &queue, &provision(&session)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fixture.containers(Some(&session)).await.is_empty() {
        assert!(Instant::now() < deadline, "the first agent never created the container");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first_life.abort();
    first_bus.close().await;
    let state_at_death = fixture.containers(Some(&session)).await[0].state.clone();
    eprintln!("the first agent died with the container {state_at_death:?}");

    // Second life: the unacknowledged task comes back and finds the container again.
    let second_bus = container_identity("container-test-second-life").await;
    let second_agent =
        Agent::with_settings(fixture.profile.clone(), second_bus.clone(), fixture.docker.clone(), fixture.settings.clone()).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let second_queue = queue.clone();
    let serving_agent = second_agent.clone();
    let second_life = tokio::spawn(async move {
        serving_agent
            .serve(&second_queue, async {
                stopped.await.ok();
            })
            .await
    });
    let ready = tap
        .next_matching("container.ready after the restart", Duration::from_secs(60), |event| {
            event.event_type == "container.ready" && event.subject.as_deref() == Some(session.as_str())
        })
        .await;
    let containers = fixture.containers(Some(&session)).await;
    assert_eq!(containers.len(), 1, "no duplicate container");
    assert_eq!(Some(data::<ContainerReady>(&ready).container_id), containers[0].id);
    assert!(http_get(port_of(&ready), "/").await.is_some(), "the adopted container answers on its port");

    // An orphan: a container whose session the engine no longer knows.
    let orphan = fixture.session("orphan");
    expect_type(&answer(&second_agent, &provision(&orphan)).await, "container.ready");

    // A careful agent keeps young containers even when told they are orphans.
    let mut careful_settings = fixture.settings.clone();
    careful_settings.orphan_grace = Duration::from_secs(3600);
    let careful =
        Agent::with_settings(fixture.profile.clone(), fixture.agent_bus.clone(), fixture.docker.clone(), careful_settings).unwrap();
    let orphan_id = fixture.containers(Some(&orphan)).await[0].id.clone().unwrap();
    let kept = answer(&careful, &task(&orphan, "remove", json!({"container_id": orphan_id}))).await;
    expect_type(&kept, "container.failed");
    let refusal = data::<ContainerFailed>(&kept);
    assert!(refusal.error.contains("grace"), "{refusal:?}");
    assert_eq!(fixture.containers(Some(&orphan)).await.len(), 1);

    // The test plays the engine: it reads an inventory listing both, and answers with removals
    // for every session that is not alive.
    let alive = [session.clone()];
    let inventory = tap
        .next_matching("an inventory listing both sessions", Duration::from_secs(30), |event| {
            let Ok(inventory) = event.data_as::<ContainerInventory>() else { return false };
            let listed = |wanted: &str| inventory.containers.iter().any(|entry| ids(entry).0 == Some(wanted));
            listed(&session) && listed(&orphan)
        })
        .await;
    let entries = data::<ContainerInventory>(&inventory).containers;
    assert_eq!(entries.len(), 2, "{entries:?}");
    let survivor_entry = entries.iter().find(|entry| ids(entry).0 == Some(session.as_str())).unwrap();
    assert_eq!(survivor_entry.host_port, Some(port_of(&ready)), "inventory carries the port read back from Docker");
    assert_eq!(survivor_entry.state, "running");
    for entry in entries.iter().filter(|entry| !alive.iter().any(|alive| ids(entry).0 == Some(alive.as_str()))) {
        let session = ids(entry).0.expect("every listed container names its session");
        send_task(&fixture.bus, &queue, &task(session, "remove", json!({"container_id": entry.container_id}))).await;
    }
    tap.next_matching("container.removed for the orphan", Duration::from_secs(30), |event| {
        event.event_type == "container.removed" && event.subject.as_deref() == Some(orphan.as_str())
    })
    .await;
    let left: Vec<String> =
        fixture.containers(None).await.into_iter().filter_map(|summary| summary.labels?.get("berth.session").cloned()).collect();
    assert_eq!(left, vec![session.clone()], "only the living session's container is left");

    let _ = stop.send(());
    second_life.await.unwrap().expect("serve ends cleanly");
    second_bus.close().await;
    fixture.bus.delete_queue(&queue).await.expect("delete task queue");
}

/// The error policy against a Docker engine that cannot be asked: no socket, a socket nobody
/// listens on, and one that accepts but never answers. Each is an outage (`RetryUnavailable`, which
/// never uses up the task's attempts), while a bad task is still dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_docker_engine_is_an_outage_and_bad_input_is_dead_lettered() {
    let fixture = Fixture::new(|_| {}).await;
    let root = fixture.profile.services.workspace_root.clone();
    std::fs::create_dir_all(&root).unwrap();
    // A socket that goes away after the client was made (Docker stopped, socket removed).
    let missing = root.join("gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
    let refusing = root.join("refusing.sock");
    drop(std::os::unix::net::UnixListener::bind(&refusing).unwrap());
    let hanging = root.join("hanging.sock");
    let hanging_listener = tokio::net::UnixListener::bind(&hanging).unwrap();
    let hold_open = tokio::spawn(async move {
        let mut accepted = Vec::new();
        while let Ok((stream, _)) = hanging_listener.accept().await {
            accepted.push(stream);
        }
    });
    let session = fixture.session("outage");
    let clients: Vec<(&PathBuf, Docker)> = [&missing, &refusing, &hanging]
        .into_iter()
        .map(|socket| (socket, Docker::connect_with_unix(&socket.display().to_string(), 1, bollard::API_DEFAULT_VERSION).unwrap()))
        .collect();
    std::fs::remove_file(&missing).unwrap();
    for (socket, docker) in clients {
        let agent = Agent::with_settings(fixture.profile.clone(), fixture.agent_bus.clone(), docker, fixture.settings.clone()).unwrap();
        for action in ["provision", "pause", "remove", "stop"] {
            let args = if action == "provision" { json!({"user": "alice", "workspace": "w1"}) } else { json!({}) };
            let outcome = agent.handle_delivery(&task(&session, action, args).to_bytes()).await;
            assert_eq!(outcome, Outcome::RetryUnavailable, "{action} through {}", socket.display());
        }
        let inventory = agent.inventory().await.unwrap_err();
        assert_eq!(inventory.outcome(), Outcome::RetryUnavailable, "{inventory}");
        let bad = agent.handle_delivery(&task(&session, "explode", json!({})).to_bytes()).await;
        assert!(matches!(bad, Outcome::DeadLetter(reason) if reason.contains("explode")));
    }
    hold_open.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_profiles_are_refused_before_any_container_exists() {
    let fixture = Fixture::new(|_| {}).await;
    let text = dev_profile_text();
    let path = std::path::Path::new("hostile/profile.toml");
    let privileged = Profile::parse(&text.replace("[container]", "[container]\nprivileged = true"), path).unwrap_err();
    assert!(privileged.to_string().contains("privileged"), "{privileged}");
    let socket =
        Profile::parse(&text.replace("[container]", "[container]\nmounts = [\"/var/run/docker.sock:/var/run/docker.sock\"]"), path)
            .unwrap_err();
    assert!(socket.to_string().contains("Docker socket"), "{socket}");

    // Profiles built in code skip loading; the agent checks again, and sees through symlinks.
    let mut hostile = fixture.profile.clone();
    hostile.container.privileged = true;
    let refused = Agent::new(hostile.clone(), fixture.bus.clone(), fixture.docker.clone()).err().expect("refused");
    assert!(refused.to_string().contains("privileged"), "{refused}");
    let run_refused = container::run(hostile, std::future::pending()).await.unwrap_err();
    assert!(run_refused.to_string().contains("privileged"), "{run_refused}");

    let disguise_dir = fixture.profile.services.workspace_root.join("disguise");
    std::fs::create_dir_all(&disguise_dir).unwrap();
    let disguised_socket = disguise_dir.join("innocent");
    std::os::unix::fs::symlink("/var/run/docker.sock", &disguised_socket).unwrap();
    let mut disguised = fixture.profile.clone();
    disguised.container.mounts = vec![format!("{}:/var/tools", disguised_socket.display())];
    let refused = Agent::new(disguised, fixture.bus.clone(), fixture.docker.clone()).err().expect("refused");
    assert!(refused.to_string().contains("container.mounts"), "{refused}");
    assert!(fixture.containers(None).await.is_empty());
}

async fn docker_exec_output(container_id: &str, command: &[&str]) -> std::process::Output {
    tokio::process::Command::new("docker").arg("exec").arg(container_id).args(command).output().await.expect("docker cli runs")
}

async fn docker_exec(container_id: &str, command: &[&str]) -> String {
    let output = docker_exec_output(container_id, command).await;
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_is_not_fooled_by_the_port_proxy() {
    // Docker's port proxy accepts on the host port even when nothing listens in the container.
    let silent = Fixture::new(|profile| {
        profile.container.image = "berth-test/unhealthy:latest".to_owned();
        profile.container.health = protocol::profile::HealthCheck::Tcp;
        profile.container.ready_timeout_secs = 2;
    })
    .await;
    let failed = answer(&silent.agent(), &provision(&silent.session("silent"))).await;
    expect_type(&failed, "container.failed");
    assert!(silent.containers(None).await.is_empty());

    let listening = Fixture::new(|profile| profile.container.health = protocol::profile::HealthCheck::Tcp).await;
    let ready = answer(&listening.agent(), &provision(&listening.session("listening"))).await;
    expect_type(&ready, "container.ready");
}

/// Starts `script` in the container in the background (`docker exec -d`, no terminal).
async fn docker_exec_detached(container_id: &str, script: &str) {
    let output = tokio::process::Command::new("docker")
        .args(["exec", "-d", container_id, "sh", "-c", script])
        .output()
        .await
        .expect("docker cli runs");
    assert!(output.status.success(), "{script}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Probes `session` and checks the answer is a `container.probed`.
async fn probe(agent: &Agent, session: &str) -> ContainerProbed {
    let probed = answer(agent, &task(session, "probe", json!({}))).await;
    expect_type(&probed, "container.probed");
    data(&probed)
}

/// The CPU share of one CPU, in percent, between two probes `elapsed` apart.
fn cpu_percent(before: &ContainerProbed, after: &ContainerProbed, elapsed: Duration) -> f64 {
    let used = after.cpu_ns.saturating_sub(before.cpu_ns);
    used as f64 / elapsed.as_nanos() as f64 * 100.0
}

/// The three signals of the idle rule, each against the real thing: a busy loop shows as CPU, a
/// background writer as a recent change in the workspace, a command under a terminal shell (a TTY
/// exec, as the session agent's terminal starts) as a terminal command; a quiet session as none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_probe_sees_a_busy_loop_a_background_writer_and_a_terminal_command() {
    use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
    use tokio::io::AsyncWriteExt;
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let session = fixture.session("work");
    let ready = answer(&agent, &provision(&session)).await;
    expect_type(&ready, "container.ready");
    let container_id = data::<ContainerReady>(&ready).container_id;
    let window = Duration::from_secs(3);

    // Quiet: a little CPU for the probe's own stats call at most, nothing written, no terminal.
    let before = probe(&agent, &session).await;
    let began = Instant::now();
    tokio::time::sleep(window).await;
    let quiet = probe(&agent, &session).await;
    let quiet_cpu = cpu_percent(&before, &quiet, began.elapsed());
    assert!(quiet_cpu < 5.0, "a quiet container used {quiet_cpu:.2} % of a CPU: {quiet:?}");
    assert!(quiet.write_age_ms >= window.as_millis() as u64, "{quiet:?}");
    assert_eq!((quiet.terminals, quiet.terminal_commands), (0, 0), "{quiet:?}");

    // A busy loop (not started from a terminal): CPU only.
    docker_exec_detached(&container_id, "while :; do :; done").await;
    let began = Instant::now();
    tokio::time::sleep(window).await;
    let busy = probe(&agent, &session).await;
    let busy_cpu = cpu_percent(&quiet, &busy, began.elapsed());
    // The profile caps the container at half a CPU; a busy loop takes most of it.
    assert!(busy_cpu > 20.0, "a busy loop used only {busy_cpu:.2} % of a CPU: {busy:?}");
    assert_eq!(busy.terminal_commands, 0, "{busy:?}");
    docker_exec(&container_id, &["sh", "-c", "kill $(pgrep -f 'while :') 2>/dev/null; true"]).await;

    // A background writer: a change in the workspace directory a moment ago.
    // The agent made the directory as this test's user; the container writes as uid 1000.
    std::os::unix::fs::chown(fixture.profile.session_dir(&session), Some(1000), Some(1000)).unwrap();
    docker_exec_detached(&container_id, "while :; do date > /workspace/log.txt; sleep 0.5; done").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writing = probe(&agent, &session).await;
    assert!(writing.write_age_ms < 2_000, "{writing:?}");
    assert!(writing.scanned >= 1, "{writing:?}");
    docker_exec(&container_id, &["sh", "-c", "kill $(pgrep -f 'date >') 2>/dev/null; true"]).await;

    // A terminal: an idle shell is no command; a command typed into it is.
    let options = CreateExecOptions::<String> {
        cmd: Some(vec!["/bin/sh".to_owned()]),
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(true),
        ..Default::default()
    };
    let exec = fixture.docker.create_exec(&container_id, options).await.unwrap();
    let started =
        fixture.docker.start_exec(&exec.id, Some(StartExecOptions { detach: false, tty: true, output_capacity: None })).await.unwrap();
    let StartExecResults::Attached { mut input, output: _output } = started else { panic!("an attached exec") };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_shell = probe(&agent, &session).await;
    assert_eq!((idle_shell.terminals, idle_shell.terminal_commands), (1, 0), "{idle_shell:?}");
    input.write_all(b"sleep 60\n").await.unwrap();
    input.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let commanded = loop {
        let probed = probe(&agent, &session).await;
        if probed.terminal_commands == 1 || Instant::now() > deadline {
            break probed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((commanded.terminals, commanded.terminal_commands), (1, 1), "{commanded:?}");

    // A probe of a session without a container is answered, not retried.
    let missing = answer(&agent, &task(&fixture.session("none"), "probe", json!({}))).await;
    expect_type(&missing, "container.failed");
    assert_eq!(data::<ContainerFailed>(&missing).action, "probe");
}

/// The dormant tier: a stopped container keeps its directory; a wake starts that same container
/// on it (no new container, the files intact) and reports the port it has now. A wake whose
/// container is gone creates one on the same directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dormant_container_wakes_on_its_directory_and_reports_its_port() {
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let session = fixture.session("dormant");
    let ready = answer(&agent, &provision(&session)).await;
    expect_type(&ready, "container.ready");
    let container_id = data::<ContainerReady>(&ready).container_id;
    std::fs::write(fixture.profile.session_dir(&session).join("notes.txt"), "kept\n").unwrap();

    // The ladder: paused, then stopped (a paused container is thawed so it can stop gracefully).
    expect_type(&answer(&agent, &task(&session, "pause", json!({}))).await, "container.paused");
    expect_type(&answer(&agent, &task(&session, "stop", json!({}))).await, "container.stopped");
    let state = fixture.docker.inspect_container(&container_id, None).await.unwrap().state.unwrap();
    assert_eq!((state.running, state.paused), (Some(false), Some(false)), "{state:?}");
    let on_disk = fixture.profile.session_dir(&session).join("notes.txt");
    assert_eq!(std::fs::read_to_string(&on_disk).unwrap(), "kept\n", "the directory outlives the stop");
    // A stopped session container is still in the inventory, for the engine to match with its thred.
    let inventory = agent.inventory().await.unwrap();
    assert!(inventory.iter().any(|entry| ids(entry).0 == Some(session.as_str())), "{inventory:?}");

    for _ in 0..2 {
        let woken = answer(&agent, &task(&session, "wake", json!({"user": "alice", "workspace": "w1"}))).await;
        expect_type(&woken, "container.ready");
        let woken_ready: ContainerReady = data(&woken);
        assert_eq!(woken_ready.container_id, container_id, "the same container, started again");
        assert!(woken_ready.adopted);
        let port = port_of(&woken);
        let served = http_get(port, "/notes.txt").await.unwrap_or_default();
        assert!(served.contains("kept"), "the woken container serves the kept file on port {port}: {served}");
    }

    // Gone while dormant: the wake builds a new container on the same directory.
    expect_type(&answer(&agent, &task(&session, "stop", json!({}))).await, "container.stopped");
    fixture.docker.remove_container(&container_id, None).await.unwrap();
    let rebuilt = answer(&agent, &task(&session, "wake", json!({"user": "alice", "workspace": "w1"}))).await;
    expect_type(&rebuilt, "container.ready");
    assert_ne!(data::<ContainerReady>(&rebuilt).container_id, container_id);
    let served = http_get(port_of(&rebuilt), "/notes.txt").await.unwrap_or_default();
    assert!(served.contains("kept"), "{served}");
    // A new start (provision) still replaces an exited container rather than reusing it.
    let rebuilt_id = data::<ContainerReady>(&rebuilt).container_id;
    expect_type(&answer(&agent, &task(&session, "stop", json!({}))).await, "container.stopped");
    let fresh = answer(&agent, &provision(&session)).await;
    expect_type(&fresh, "container.ready");
    assert_ne!(data::<ContainerReady>(&fresh).container_id, rebuilt_id);
}

/// A session that claimed a warm-pool container mounts the slot's directory, which the claim
/// renamed into the session's: a wake from the dormant tier must not start that container again
/// (Docker would mount the old, empty path) but put a new one on the session directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dormant_pool_claimed_session_wakes_on_its_own_directory() {
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let session = fixture.session("pooled");
    let slot = fixture.session("slot");
    make_pool_slot(&agent, &slot).await;
    // What the workspace agent does at a claim: the slot's directory becomes the session's.
    std::fs::create_dir_all(fixture.profile.session_dir(&session).parent().unwrap()).unwrap();
    std::fs::rename(fixture.profile.pool_slot_dir(&slot), fixture.profile.session_dir(&session)).unwrap();
    std::fs::write(fixture.profile.session_dir(&session).join("notes.txt"), "kept\n").unwrap();
    let claimed = answer(&agent, &task(&session, "provision", json!({"user": "alice", "workspace": "w1", "slot": slot}))).await;
    expect_type(&claimed, "container.ready");
    assert!(http_get(port_of(&claimed), "/notes.txt").await.unwrap_or_default().contains("kept"));

    expect_type(&answer(&agent, &task(&session, "stop", json!({}))).await, "container.stopped");
    let woken = answer(&agent, &task(&session, "wake", json!({"user": "alice", "workspace": "w1"}))).await;
    expect_type(&woken, "container.ready");
    assert_ne!(
        data::<ContainerReady>(&woken).container_id,
        data::<ContainerReady>(&claimed).container_id,
        "the pool container is replaced"
    );
    let served = http_get(port_of(&woken), "/notes.txt").await.unwrap_or_default();
    assert!(served.contains("kept"), "the woken session serves its own directory: {served}");
}

/// Docker's state of a container by name or id (`running`, `paused`, `exited`), if it exists.
fn docker_state(container: &str) -> Option<String> {
    let output = Command::new("docker").args(["inspect", "-f", "{{.State.Status}}", container]).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A claim whose slot container is not running (gone here) is still a claim, without the readiness
/// its answer would carry: the `provision` after the materialize opens cold on the session
/// directory, which the claim must not do before that directory is filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_a_slot_whose_container_is_gone_leaves_the_readiness_to_provision() {
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let session = fixture.session("late-claimer");
    let slot = fixture.session("gone-slot");
    make_pool_slot(&agent, &slot).await;
    let pool_name = spec::pool_container_name(&slot);
    let removed = Command::new("docker").args(["rm", "-f", &pool_name]).output().expect("docker rm");
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));

    let claimed = answer(&agent, &task(&session, "claim", json!({"user": "alice", "workspace": "w1", "slot": slot}))).await;
    expect_type(&claimed, "container.claimed");
    assert_eq!(data::<ContainerClaimed>(&claimed).ready, None, "{}", claimed.data);
    assert_eq!(docker_state(&spec::container_name(&session)), None, "the claim made no container");

    std::fs::rename(fixture.profile.pool_slot_dir(&slot), fixture.profile.session_dir(&session)).unwrap();
    std::fs::write(fixture.profile.session_dir(&session).join("notes.txt"), "materialized\n").unwrap();
    let ready = answer(&agent, &task(&session, "provision", json!({"user": "alice", "workspace": "w1"}))).await;
    expect_type(&ready, "container.ready");
    assert!(http_get(port_of(&ready), "/notes.txt").await.unwrap_or_default().contains("materialized"), "cold on the session directory");
    expect_type(&answer(&agent, &task(&session, "remove", json!({}))).await, "container.removed");
}

/// A claim renames and unpauses nothing: the slot's container keeps running under its pool name,
/// and every later task of the session finds it through the claim recorded on the host, also from
/// an agent started again (it has only the host's files); another session can't claim it, the
/// inventory names its session, and its removal takes the slot's folders and index entry along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_pool_container_is_found_by_every_task_of_its_session() {
    let fixture = Fixture::new(|_| {}).await;
    let agent = fixture.agent();
    let (session, other) = (fixture.session("claimer"), fixture.session("other"));
    let slot = fixture.session("slot");
    let create = make_pool_slot(&agent, &slot).await;
    let pool_name = spec::pool_container_name(&slot);
    assert_eq!(docker_state(&pool_name).as_deref(), Some("running"), "a free slot is left running");

    let claimed = answer(&agent, &task(&session, "claim", json!({"user": "alice", "workspace": "w1", "slot": slot}))).await;
    expect_type(&claimed, "container.claimed");
    // The claim checked the running container: its answer is what a provision would say.
    let checked = data::<ContainerClaimed>(&claimed).ready.expect("the claim found the slot's container answering");
    let refused = answer(&agent, &task(&other, "claim", json!({"user": "bob", "workspace": "w2", "slot": slot}))).await;
    expect_type(&refused, "container.failed");
    assert!(data::<ContainerFailed>(&refused).error.contains("claimed by session"), "{}", refused.data);
    assert_eq!(docker_state(&pool_name).as_deref(), Some("running"), "the claim renamed and paused nothing");
    // A redelivered pool_create of the claimed slot makes and removes nothing: it is the session's.
    let again = agent.handle(&create).await.expect("handled");
    assert_eq!(again[0].event_type, "container.pool_slot_failed", "{:?}", again[0].data);
    assert_eq!(docker_state(&pool_name).as_deref(), Some("running"));
    assert!(fixture.profile.pool_identity_dir(&slot).join("session.json").exists(), "the claim stays");
    assert_eq!(docker_state(&spec::container_name(&session)), None);
    let index = fixture.profile.deployment_root().join(".berth-pool").join(".sessions").join(&session);
    assert_eq!(std::fs::read_to_string(&index).expect("the claim's index entry"), slot);

    // What the workspace agent does beside the claim: the slot's directory becomes the session's.
    std::fs::rename(fixture.profile.pool_slot_dir(&slot), fixture.profile.session_dir(&session)).unwrap();
    std::fs::write(fixture.profile.session_dir(&session).join("notes.txt"), "materialized\n").unwrap();
    // From here on, an agent started again: nothing in memory, only the host's files.
    let agent = fixture.agent();
    let ready = answer(&agent, &task(&session, "provision", json!({"user": "alice", "workspace": "w1"}))).await;
    expect_type(&ready, "container.ready");
    let container_id = data::<ContainerReady>(&ready).container_id;
    let pool_id = Command::new("docker").args(["inspect", "-f", "{{.Id}}", &pool_name]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&pool_id.stdout).trim(), container_id, "ready on the slot's own container");
    assert_eq!(
        (&checked.container_id, checked.port, checked.adopted),
        (&container_id, port_of(&ready), true),
        "the claim's check saw the same"
    );
    assert!(http_get(port_of(&ready), "/notes.txt").await.unwrap_or_default().contains("materialized"));
    // The other session's provision never adopts it: it gets a container of its own.
    let others = answer(&agent, &task(&other, "provision", json!({"user": "bob", "workspace": "w2"}))).await;
    expect_type(&others, "container.ready");
    assert_ne!(data::<ContainerReady>(&others).container_id, container_id);

    let agent = fixture.agent();
    let paused = answer(&agent, &task(&session, "pause", json!({}))).await;
    assert_eq!(data::<ContainerPaused>(&paused), ContainerPaused { container_id: Some(container_id.clone()), state: "paused".to_owned() });
    assert_eq!(docker_state(&pool_name).as_deref(), Some("paused"));
    let agent = fixture.agent();
    let resumed = answer(&agent, &task(&session, "resume", json!({}))).await;
    assert_eq!(data::<protocol::events::ContainerResumed>(&resumed).container_id.as_deref(), Some(container_id.as_str()));
    assert_eq!(docker_state(&pool_name).as_deref(), Some("running"));
    expect_type(&answer(&agent, &task(&session, "stats", json!({}))).await, "container.stats");
    expect_type(&answer(&agent, &task(&session, "probe", json!({}))).await, "container.probed");
    let entry = agent.inventory().await.expect("inventory").into_iter().find(|entry| entry.container_id == container_id).expect("listed");
    assert_eq!((ids(&entry), entry.pool_slot.as_deref()), ((Some(session.as_str()), Some("alice"), Some("w1")), Some(slot.as_str())));

    let agent = fixture.agent();
    let removed = answer(&agent, &task(&session, "remove", json!({}))).await;
    assert_eq!(data::<ContainerRemoved>(&removed).container_id.as_deref(), Some(container_id.as_str()));
    assert_eq!(docker_state(&pool_name), None);
    assert!(!index.exists(), "the index entry went with the container");
    assert!(!fixture.profile.pool_identity_dir(&slot).exists(), "the slot's identity folder went too");
    assert!(fixture.profile.session_dir(&session).join("notes.txt").exists(), "the session directory is the workspace agent's to remove");
}
