//! The engine against the real RabbitMQ and Redis: every test runs on its own exchanges, queue and
//! Redis key prefix (`EngineConfig::isolated`) and removes them at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use engine::pattern::{load_pattern_file, parse_pattern};
use engine::service::{self, Engine, Serving};
use engine::{EngineConfig, Pattern};
use protocol::bus::{Acks, AutoDelete, Durability, ExchangeKind};
use protocol::events::{
    ContainerPaused, ContainerProbed, ContainerReady, ContainerRemoved, ContainerResumed, ContainerStopped, EventData, InputSource,
    ReadyTimings, SessionActivity, SessionClose, SessionOpen, TimerFired, WorkspaceMaterialized, WorkspaceProgress, WorkspaceRemoved,
    WorkspaceSyncFailed, WorkspaceSynced,
};
use protocol::{Bus, BusConfig, CloudEvent, Identity, Notification, Profile, Properties, Task};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dev_profile() -> Profile {
    Profile::load(&repository().join("run-profiles/dev/profile.toml")).expect("dev profile")
}

fn session_pattern() -> Pattern {
    load_pattern_file(&repository().join("patterns/workspace-session.json")).expect("workspace-session pattern")
}

/// A message seen on one of the test's private queues.
#[derive(Debug, Clone)]
struct Seen {
    routing_key: String,
    body: Vec<u8>,
    headers: BTreeMap<String, String>,
}

/// Reads a private queue bound to `exchange` into a channel.
async fn collect(bus: &Bus, exchange: &str, keys: &[&str]) -> mpsc::UnboundedReceiver<Seen> {
    let keys: Vec<String> = keys.iter().map(|key| (*key).to_owned()).collect();
    let queue = bus.declare_private_queue(exchange, &keys).await.expect("private queue");
    let mut subscription = bus.subscribe(&queue, Acks::Automatic).await.expect("subscribe");
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(incoming)) = subscription.next().await {
            let seen = Seen { routing_key: incoming.routing_key, body: incoming.body, headers: incoming.headers.into_iter().collect() };
            if sender.send(seen).is_err() {
                return;
            }
        }
    });
    receiver
}

/// One test's world: isolated names, collectors on tasks, notifications and dead letters.
struct Harness {
    profile: Profile,
    config: EngineConfig,
    bus: Bus,
    /// One bus per identity that sends events: each event is published as the identity allowed
    /// to send it (`protocol::identity::allowed_senders`), as the real component would.
    senders: HashMap<Identity, Bus>,
    tasks: mpsc::UnboundedReceiver<Seen>,
    notifications: mpsc::UnboundedReceiver<Seen>,
    dead: mpsc::UnboundedReceiver<Seen>,
    /// Tasks read while waiting for another one.
    task_backlog: Vec<Task>,
    notification_backlog: Vec<Notification>,
    /// Work probes nobody waits for are answered "quiet" (no CPU, no writes, no terminal
    /// command), so a session idles on input alone; a test of the idle rule answers them itself.
    probes: Probes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probes {
    AnsweredQuiet,
    LeftToTheTest,
}

struct Running {
    engine: Engine,
    serving: Serving,
}

impl Running {
    async fn stop(self) {
        self.serving.stop().await.expect("engine ran");
    }
}

impl Harness {
    async fn new(profile: Profile) -> Harness {
        protocol::telemetry::init(protocol::telemetry::LogFormat::Pretty);
        let tag = Uuid::now_v7().simple().to_string();
        let config = EngineConfig::isolated(&tag);
        let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "engine-test")).await.expect("broker");
        service::declare(&bus, &config).await.expect("declare");
        // The engine under test connects as its own identity: the users must exist in this vhost.
        protocol::broker_admin::ensure_identities(&profile.services.amqp_url).await.expect("bus identities");
        let mut senders = HashMap::new();
        for identity in [Identity::Engine, Identity::Container, Identity::Workspace, Identity::Client] {
            let config = BusConfig::for_identity(&profile.services.amqp_url, identity, "engine-test-sender").expect("identity");
            senders.insert(identity, Bus::connect(config).await.expect("broker"));
        }
        let tasks = collect(&bus, &config.tasks_exchange, &["container", "workspace", "persistence", "session"]).await;
        let notifications = collect(&bus, &config.notify_exchange, &["#"]).await;
        let dead = collect(&bus, &config.dead_exchange, &[""]).await;
        Harness {
            profile,
            config,
            bus,
            senders,
            tasks,
            notifications,
            dead,
            task_backlog: Vec::new(),
            notification_backlog: Vec::new(),
            probes: Probes::AnsweredQuiet,
        }
    }

    async fn start(&self, patterns: Vec<Pattern>) -> Running {
        self.start_with(patterns, self.config.clone()).await
    }

    async fn start_with(&self, patterns: Vec<Pattern>, config: EngineConfig) -> Running {
        let engine = Engine::connect(self.profile.clone(), patterns, config).await.expect("engine connects");
        let serving = Serving::start(&engine);
        Running { engine, serving }
    }

    async fn publish(&self, event: &CloudEvent) {
        let sender = protocol::identity::allowed_senders(&event.event_type)[0];
        self.publish_as(sender, event).await;
    }

    async fn publish_as(&self, sender: Identity, event: &CloudEvent) {
        let properties = Properties::cloud_event();
        let bus = self.senders.get(&sender).unwrap_or(&self.bus);
        bus.publish(&self.config.events_exchange, &event.event_type, &event.to_bytes(), properties).await.expect("publish");
    }

    async fn publish_raw(&self, routing_key: &str, body: &[u8]) {
        self.bus.publish(&self.config.events_exchange, routing_key, body, Properties::bare()).await.expect("publish");
    }

    /// Waits for the next task of `session` for `agent`.`action`, keeping others for later.
    async fn task(&mut self, session: &str, agent: &str, action: &str) -> Task {
        let matches = |task: &Task| task.session.as_deref() == Some(session) && task.agent.as_str() == agent && task.action == action;
        if let Some(index) = self.task_backlog.iter().position(matches) {
            return self.task_backlog.remove(index);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.tasks.recv())
                .await
                .unwrap_or_else(|_| panic!("no {agent}.{action} task for {session} within {WAIT:?}; backlog {:?}", self.task_summaries()))
                .expect("task stream");
            let task = Task::decode(&seen.body).expect("a task");
            if matches(&task) {
                return task;
            }
            if self.answered_quietly(&task).await {
                continue;
            }
            self.task_backlog.push(task);
        }
    }

    /// Answers a work probe "quiet" unless the test answers probes itself.
    async fn answered_quietly(&self, task: &Task) -> bool {
        if self.probes != Probes::AnsweredQuiet || task.agent.as_str() != "container" || task.action != "probe" {
            return false;
        }
        self.publish(&answer(task, &quiet_probe(0))).await;
        true
    }

    fn task_summaries(&self) -> Vec<String> {
        self.task_backlog.iter().map(|task| format!("{}.{}({:?})", task.agent, task.action, task.session)).collect()
    }

    /// Every task that arrives within `window`, added to the backlog and returned.
    async fn drain_tasks(&mut self, window: Duration) -> Vec<Task> {
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, self.tasks.recv()).await {
            let task = Task::decode(&seen.body).expect("a task");
            if !self.answered_quietly(&task).await {
                self.task_backlog.push(task);
            }
        }
        self.task_backlog.clone()
    }

    async fn notification(&mut self, session: &str, state: &str) -> Notification {
        let matches = |n: &Notification| n.session.as_deref() == Some(session) && n.state == state;
        self.notification_where(matches, &format!("`{state}` notification for {session}")).await
    }

    /// The first notification caused by the event `event_id`.
    async fn notification_caused_by(&mut self, event_id: &str) -> Notification {
        let matches = |n: &Notification| n.cause.as_deref() == Some(event_id);
        self.notification_where(matches, &format!("notification caused by {event_id}")).await
    }

    /// The first notification (from the backlog, else arriving within [`WAIT`]) that `matches`.
    async fn notification_where(&mut self, matches: impl Fn(&Notification) -> bool, what: &str) -> Notification {
        if let Some(index) = self.notification_backlog.iter().position(&matches) {
            return self.notification_backlog.remove(index);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.notifications.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what}"))
                .expect("notification stream");
            let notification = Notification::decode(&seen.body).expect("a notification");
            assert_eq!(seen.routing_key, format!("user.{}", notification.user));
            if matches(&notification) {
                return notification;
            }
            self.notification_backlog.push(notification);
        }
    }

    async fn dead_letter(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.dead.recv()).await.expect("a dead letter in time").expect("dead-letter stream")
    }

    async fn cleanup(self) {
        service::teardown(&self.bus, &self.profile.services.redis_url, &self.config).await.expect("teardown");
        for sender in self.senders.values() {
            sender.close().await;
        }
        self.bus.close().await;
    }
}

/// `GET path` over a plain TCP connection, the whole response as text.
async fn http_get(address: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let authorization = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.expect("a response in time").expect("response");
    response
}

fn open_event(session: &str, user: &str) -> CloudEvent {
    open_workspace_event(session, user, "w1")
}

fn open_workspace_event(session: &str, user: &str, workspace: &str) -> CloudEvent {
    let open = SessionOpen { user: user.parse().expect("a user id"), workspace: workspace.parse().expect("a workspace id"), profile: None };
    CloudEvent::of("/test", Some(session), &open)
}

/// A work probe's answer for a container that used `cpu_ns` in all and did nothing else.
fn quiet_probe(cpu_ns: u64) -> ContainerProbed {
    ContainerProbed { cpu_ns, write_age_ms: 1_000_000_000, terminal_commands: 0, terminals: 0, scanned: 3, truncated: false }
}

/// `workspace.materialized` of `files` files and `bytes` bytes, none of them large.
fn materialized(files: u64, bytes: u64) -> WorkspaceMaterialized {
    WorkspaceMaterialized { files, bytes, pending_large_files: 0, pending_large_bytes: 0 }
}

/// `container.ready` on the published port `port` of 127.0.0.1, without a network address.
fn ready(container_id: &str, port: u16) -> ContainerReady {
    ContainerReady {
        container_id: container_id.to_owned(),
        host: "127.0.0.1".to_owned(),
        port,
        network: None,
        adopted: false,
        timings_ms: ReadyTimings { create: 0, start: 0, ready: 0 },
    }
}

fn paused(container_id: Option<&str>, state: &str) -> ContainerPaused {
    ContainerPaused { container_id: container_id.map(str::to_owned), state: state.to_owned() }
}

/// A confirmed final sync that had nothing to do.
fn synced_final() -> WorkspaceSynced {
    WorkspaceSynced {
        final_sync: true,
        uploaded: 0,
        deleted: 0,
        unchanged: 0,
        bytes_uploaded: 0,
        skipped: Vec::new(),
        conflicts: 0,
        missing: false,
        skipped_total: None,
    }
}

fn workspace_removed() -> WorkspaceRemoved {
    WorkspaceRemoved { preserved: Vec::new(), preserved_total: None }
}

/// An agent's answer to `task`, bound the way agents bind it.
fn answer<T: EventData>(task: &Task, data: &T) -> CloudEvent {
    CloudEvent::answering(task, "/test/agent", data)
}

/// An answer with any data, as a forger would send it.
fn raw_answer(task: &Task, event_type: &str, data: Value) -> CloudEvent {
    CloudEvent::new(event_type, "/test/agent", task.session.as_deref(), data)
        .with_extension("thredid", task.thred.clone().unwrap_or_default())
        .with_extension("taskid", task.id.to_string())
}

async fn live_thred(engine: &Engine, session: &str) -> Option<engine::Thred> {
    engine.live_threds(session).await.expect("redis").into_iter().next()
}

async fn wait_for_state(engine: &Engine, thred_id: &str, state: &str) -> engine::Thred {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let thred = engine.thred(thred_id).await.expect("redis").expect("thred exists");
        if thred.state == state {
            return thred;
        }
        assert!(tokio::time::Instant::now() < deadline, "thred stuck in {} (waiting for {state})", thred.state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The persistence operations in `tasks`, groups unfolded, in order: (action, args).
fn persistence_operations(tasks: &[Task]) -> Vec<(String, Value)> {
    let mut operations = Vec::new();
    for task in tasks.iter().filter(|task| task.agent == protocol::AgentKind::Persistence) {
        if task.action == "group" {
            for operation in task.args["operations"].as_array().cloned().unwrap_or_default() {
                operations.push((operation["action"].as_str().unwrap_or_default().to_owned(), operation["args"].clone()));
            }
        } else {
            operations.push((task.action.clone(), task.args.clone()));
        }
    }
    operations
}

/// Drives a new session up to `running`; returns the provision task (it carries the thred id).
async fn open_until_running(harness: &mut Harness, session: &str) -> Task {
    // A workspace of its own: a second open of one workspace would join the first session.
    harness.publish(&open_workspace_event(session, "alice", &format!("w-{session}"))).await;
    let materialize = harness.task(session, "workspace", "materialize").await;
    harness.publish(&answer(&materialize, &materialized(1, 3))).await;
    let provision = harness.task(session, "container", "provision").await;
    harness.publish(&answer(&provision, &ready("c-1", 40000))).await;
    harness.notification(session, "running").await;
    provision
}

/// Invariant 8: a `container.ready` from anyone but the container agent (here the workspace
/// agent's identity, on an exchange without topic permissions, and the admin) is dead-lettered
/// with the reason and changes nothing; the genuine one still starts the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_agent_events_are_dead_lettered_with_the_reason_and_the_session_is_untouched() {
    let mut harness = Harness::new(dev_profile()).await;
    let running = harness.start(vec![session_pattern()]).await;
    let session = format!("s-{}", Uuid::now_v7());
    harness.publish(&open_workspace_event(&session, "alice", &format!("w-{session}"))).await;
    let materialize = harness.task(&session, "workspace", "materialize").await;
    // The container agent may not answer for the workspace agent either.
    let forged_materialized = answer(&materialize, &materialized(1, 3));
    harness.publish_as(Identity::Container, &forged_materialized).await;
    let refused = harness.dead_letter().await;
    assert_eq!(
        refused.headers["x-berth-reason"],
        "`workspace.materialized` refused from the container identity (berth-container): only berth-workspace may send it"
    );
    assert_eq!(refused.headers["x-berth-sender"], "berth-container");
    harness.publish(&answer(&materialize, &materialized(1, 3))).await;
    let provision = harness.task(&session, "container", "provision").await;

    let forged = json!({"container_id": "c-evil", "host": "203.0.113.9", "port": 6666, "timings_ms": {}});
    harness.publish_as(Identity::Workspace, &raw_answer(&provision, "container.ready", forged.clone())).await;
    let from_workspace = harness.dead_letter().await;
    assert_eq!(
        from_workspace.headers["x-berth-reason"],
        "`container.ready` refused from the workspace identity (berth-workspace): only berth-container may send it"
    );
    harness.publish_as(Identity::Admin, &raw_answer(&provision, "container.ready", forged)).await;
    let from_admin = harness.dead_letter().await;
    assert!(from_admin.headers["x-berth-reason"].contains("(not a Berth identity)"), "{from_admin:?}");
    let timer = CloudEvent::of("/test", Some(&session), &TimerFired { timer: "ready".to_owned(), generation: 1, deadline_ms: 0 });
    harness.publish_as(Identity::Client, &timer).await;
    let forged_timer = harness.dead_letter().await;
    assert!(forged_timer.headers["x-berth-reason"].starts_with("`timer.fired` refused from the client identity"), "{forged_timer:?}");

    // Nothing moved: still provisioning, no notification went out for the forgeries.
    let thred = running.engine.thred(provision.thred.as_deref().expect("thred id")).await.expect("redis").expect("the thred");
    assert_eq!(thred.state, "provisioning");
    harness.publish(&answer(&provision, &ready("c-1", 40000))).await;
    let started = harness.notification(&session, "running").await;
    assert_eq!((started.detail["host"].clone(), started.detail["port"].clone()), (json!("127.0.0.1"), json!(40000)));
    assert_eq!(running.engine.metrics().snapshot().dead_lettered, 4);
    running.stop().await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_session_lifecycle_driven_by_events() {
    let mut harness = Harness::new(dev_profile()).await;
    let running = harness.start(vec![session_pattern()]).await;
    let session = format!("s-{}", Uuid::now_v7());

    harness.publish(&open_event(&session, "alice")).await;
    let materialize = harness.task(&session, "workspace", "materialize").await;
    // `slot` is the warm-pool slot the engine claimed; `""`: none (this profile has no pool).
    // `fence`: only a session reopened elsewhere after a failover fences its workspace.
    assert_eq!(materialize.args, json!({"user": "alice", "workspace": "w1", "slot": "", "fence": false}));
    let thred_id = materialize.thred.clone().expect("task names its thred");
    assert_eq!(harness.notification(&session, "materializing").await.user, "alice");

    harness.publish(&answer(&materialize, &WorkspaceProgress { files_done: 1, files_total: 2, bytes_done: 0, bytes_total: 0 })).await;
    harness.publish(&answer(&materialize, &materialized(2, 10))).await;
    let provision = harness.task(&session, "container", "provision").await;
    assert_eq!(provision.args, json!({"user": "alice", "workspace": "w1", "slot": ""}));
    assert_eq!(provision.thred.as_deref(), Some(thred_id.as_str()));

    harness.publish(&answer(&provision, &ready("c-42", 41234))).await;
    let running_notification = harness.notification(&session, "running").await;
    assert_eq!(running_notification.detail["port"], json!(41234));
    harness.publish(&CloudEvent::of("/test", Some(&session), &SessionActivity { source: InputSource::Websocket })).await;

    harness.publish(&CloudEvent::of("/test", Some(&session), &SessionClose { reason: Some("done".to_owned()) })).await;
    // Frozen first, so the final sync copies a snapshot.
    let freeze = harness.task(&session, "container", "pause").await;
    harness.notification(&session, "stopping").await;
    harness.publish(&answer(&freeze, &paused(Some("c-42"), "paused"))).await;
    let sync = harness.task(&session, "workspace", "sync").await;
    assert_eq!(sync.args["final"], json!(true));
    harness.notification(&session, "saving").await;
    harness.publish(&answer(&sync, &WorkspaceSynced { uploaded: 1, unchanged: 1, bytes_uploaded: 3, ..synced_final() })).await;
    let remove_container = harness.task(&session, "container", "remove").await;
    harness.publish(&answer(&remove_container, &ContainerRemoved { container_id: Some("c-42".into()) })).await;
    let remove_workspace = harness.task(&session, "workspace", "remove").await;
    harness.publish(&answer(&remove_workspace, &workspace_removed())).await;
    harness.notification(&session, "closed").await;

    let thred = wait_for_state(&running.engine, &thred_id, "closed").await;
    assert!(thred.ended && thred.timers.is_empty());
    assert_eq!(thred.context["activity_count"], json!(1));
    assert!(live_thred(&running.engine, &session).await.is_none(), "an ended thred is no longer live");

    // The sessions record followed every state, and the audit trail has every transition.
    let tasks = harness.drain_tasks(Duration::from_millis(500)).await;
    let operations = persistence_operations(&tasks);
    let states: Vec<&str> = operations
        .iter()
        .filter(|(action, args)| action == "upsert" && args["collection"] == "sessions")
        .map(|(_, args)| args["doc"]["state"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        states,
        ["materializing", "provisioning", "running", "stopping", "saving", "removing_container", "removing_workspace", "closed"]
    );
    let audit: Vec<(String, String)> = operations
        .iter()
        .filter(|(action, args)| action == "put" && args["collection"] == "events")
        .map(|(_, args)| {
            (args["doc"]["from"].as_str().unwrap_or_default().to_owned(), args["doc"]["to"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    let audit_ids: std::collections::HashSet<&Value> =
        operations.iter().filter(|(action, _)| action == "put").map(|(_, args)| &args["id"]).collect();
    assert_eq!(audit_ids.len(), audit.len(), "every audit record has its own stable id");
    assert_eq!(audit.first(), Some(&("open".to_owned(), "materializing".to_owned())));
    assert_eq!(audit.last(), Some(&("removing_workspace".to_owned(), "closed".to_owned())));
    let (_, record) = operations.iter().rev().find(|(action, _)| action == "upsert").expect("a record");
    assert_eq!(record["id"], json!(session));
    assert_eq!(record["doc"]["container_id"], json!("c-42"));

    // A late answer to an ended thred changes nothing and is not an orphan.
    harness.publish(&answer(&remove_workspace, &workspace_removed())).await;
    let snapshot_before = running.engine.metrics().snapshot();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let snapshot = running.engine.metrics().snapshot();
    assert!(snapshot.rejected >= 1 && snapshot.orphans == snapshot_before.orphans, "{snapshot:?}");

    running.stop().await;
    // Every published outbox was deleted by the time the engine stopped.
    let client = redis::Client::open(harness.profile.services.redis_url.as_str()).expect("redis url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("redis");
    let left: usize =
        redis::cmd("SCARD").arg(format!("{}:outboxes", harness.config.redis_prefix)).query_async(&mut connection).await.expect("scard");
    assert_eq!(left, 0, "outboxes left after a clean stop");
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_stop_timers_fire_through_keyspace_notifications() {
    let mut profile = dev_profile();
    profile.timers.idle_after_secs = 1;
    profile.timers.stop_after_idle_secs = 1;
    profile.timers.autosave_secs = 0;
    let mut harness = Harness::new(profile).await;
    // No sweep after start-up: only the expiry notifications can fire these timers.
    let mut config = harness.config.clone();
    config.sweep_interval_ms = 0;
    let running = harness.start_with(vec![session_pattern()], config).await;
    let session = format!("s-{}", Uuid::now_v7());

    open_until_running(&mut harness, &session).await;
    let pause = harness.task(&session, "container", "pause").await;
    harness.notification(&session, "idle").await;
    harness.publish(&answer(&pause, &paused(Some("c-1"), "paused"))).await;
    // The stop timer: freeze again (already paused: answered at once), then the final sync.
    let freeze = harness.task(&session, "container", "pause").await;
    let stopping = harness.notification(&session, "stopping").await;
    assert_eq!(stopping.detail["reason"], json!("idle"));
    harness.publish(&answer(&freeze, &paused(Some("c-1"), "paused"))).await;
    let sync = harness.task(&session, "workspace", "sync").await;
    assert_eq!(sync.args["final"], json!(true));
    // The counter moves just after the timer.fired event is out, so it may trail the transition.
    let deadline = tokio::time::Instant::now() + WAIT;
    while running.engine.metrics().snapshot().timers_fired_by_notification < 2 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", running.engine.metrics().snapshot());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(running.engine.metrics().snapshot().timers_fired_by_sweep, 0);

    // Activity while idle wakes the session, and the cancelled stop timer never fires.
    let other = format!("s-{}", Uuid::now_v7());
    open_until_running(&mut harness, &other).await;
    harness.task(&other, "container", "pause").await;
    harness.publish(&CloudEvent::of("/test", Some(&other), &SessionActivity { source: InputSource::Terminal })).await;
    harness.task(&other, "container", "resume").await;
    // Keep it busy for longer than idle + stop: it must never stop.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        harness.publish(&CloudEvent::of("/test", Some(&other), &SessionActivity { source: InputSource::Api })).await;
    }
    let tasks = harness.drain_tasks(Duration::from_millis(300)).await;
    assert!(
        !tasks.iter().any(|task| task.session.as_deref() == Some(other.as_str()) && task.action == "sync"),
        "an active session was stopped"
    );
    let thred = live_thred(&running.engine, &other).await.expect("live");
    assert_eq!(thred.state, "running");

    running.stop().await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_due_while_the_engine_is_down_fires_after_restart() {
    let mut profile = dev_profile();
    profile.timers.idle_after_secs = 2;
    profile.timers.autosave_secs = 0;
    let mut harness = Harness::new(profile).await;
    let first = harness.start(vec![session_pattern()]).await;
    let session = format!("s-{}", Uuid::now_v7());
    open_until_running(&mut harness, &session).await;
    let thred = live_thred(&first.engine, &session).await.expect("live thred");
    first.stop().await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let meanwhile = harness.drain_tasks(Duration::from_millis(100)).await;
    assert!(!meanwhile.iter().any(|task| task.action == "pause"), "nothing runs while the engine is down");

    let second = harness.start(vec![session_pattern()]).await;
    let pause = harness.task(&session, "container", "pause").await;
    assert_eq!(pause.thred.as_deref(), Some(thred.id.as_str()));
    wait_for_state(&second.engine, &thred.id, "idle").await;
    assert!(second.engine.metrics().snapshot().timers_fired_by_sweep >= 1, "the start-up sweep fired it");
    // Fired once: no second pause.
    let later = harness.drain_tasks(Duration::from_millis(1500)).await;
    assert_eq!(later.iter().filter(|task| task.action == "pause").count(), 0, "{later:?}");
    second.stop().await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_commit_and_publish_loses_and_duplicates_nothing() {
    let mut harness = Harness::new(dev_profile()).await;
    let session = format!("s-{}", Uuid::now_v7());
    let worker = find_example("engine_worker");
    let mut crashing_config = harness.config.clone();
    crashing_config.halt_after_commit = true;
    let mut child = tokio::process::Command::new(&worker)
        .env("BERTH_ENGINE_CONFIG", serde_json::to_string(&crashing_config).expect("config json"))
        .env("BERTH_ENGINE_PROFILE", repository().join("run-profiles/dev/profile.toml"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", worker.display()));
    let open = open_event(&session, "alice");
    harness.publish(&open).await;
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let halted = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("halted-after-commit") {
                return line;
            }
        }
        String::new()
    })
    .await
    .expect("the worker committed");
    assert_eq!(halted, format!("halted-after-commit {}", open.id));
    child.kill().await.expect("SIGKILL");
    let _ = child.wait().await;

    // Committed but never published.
    assert!(harness.drain_tasks(Duration::from_millis(500)).await.is_empty(), "nothing was published before the kill");

    // A fresh engine publishes the outbox at start-up; the redelivered event is a duplicate.
    let running = harness.start(vec![session_pattern()]).await;
    let materialize = harness.task(&session, "workspace", "materialize").await;
    assert_eq!(materialize.cause.as_deref(), Some(open.id.as_str()));
    assert!((0..8).any(|index| materialize.id == Task::stable_id(&open.id, index)), "the task id is derived from its event");
    let tasks = harness.drain_tasks(Duration::from_secs(2)).await;
    let mut by_id: HashMap<Uuid, Vec<&Task>> = HashMap::new();
    for task in &tasks {
        by_id.entry(task.id).or_default().push(task);
    }
    by_id.entry(materialize.id).or_default().push(&materialize);
    for (id, copies) in &by_id {
        assert!(copies.windows(2).all(|pair| pair[0] == pair[1]), "task {id} differs between copies");
    }
    let kinds: Vec<String> = tasks.iter().map(|task| format!("{}.{}", task.agent, task.action)).collect();
    assert_eq!(kinds.iter().filter(|kind| *kind == "workspace.materialize").count(), 0, "materialize published twice: {kinds:?}");
    assert_eq!(kinds.iter().filter(|kind| *kind == "persistence.group").count(), 1, "{kinds:?}");
    let operations = persistence_operations(&tasks);
    assert_eq!(operations.iter().map(|(action, _)| action.as_str()).collect::<Vec<_>>(), ["upsert", "put"]);
    let snapshot = running.engine.metrics().snapshot();
    assert_eq!(snapshot.outboxes_replayed, 1, "{snapshot:?}");
    let thred = live_thred(&running.engine, &session).await.expect("one live thred");
    assert_eq!((thred.state.as_str(), thred.version), ("materializing", 1));
    running.stop().await;
    harness.cleanup().await;
}

/// `cargo test` builds the examples next to the test binary's directory.
fn find_example(name: &str) -> PathBuf {
    let test_binary = std::env::current_exe().expect("current exe");
    let profile_dir = test_binary.parent().and_then(Path::parent).expect("target profile dir");
    let example = profile_dir.join("examples").join(name);
    assert!(
        example.exists(),
        "{} is missing: build it first with `cargo build -p engine --examples` (scripts/test.sh does)",
        example.display()
    );
    example
}

const COUNTER_PATTERN: &str = r#"{
  "version": 1,
  "name": "counter",
  "start": {"events": ["count.inc"], "key": "event.subject", "context": {"n": "0"}},
  "initial": "even",
  "states": {
    "even": {"on": [{"event": "count.inc", "target": "odd", "effects": [{"set": {"n": "ctx.n + 1"}}]}]},
    "odd": {"on": [{"event": "count.inc", "target": "even", "effects": [{"set": {"n": "ctx.n + 1"}}]}]}
  }
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_leave_every_thred_as_one_engine_would() {
    const THREDS: usize = 50;
    const EVENTS_PER_THRED: usize = 20;
    let harness = Harness::new(dev_profile()).await;
    let counter = || parse_pattern(COUNTER_PATTERN, Path::new("counter.json")).expect("counter pattern");
    let first = harness.start(vec![counter()]).await;
    let second = harness.start(vec![counter()]).await;
    let keys: Vec<String> = (0..THREDS).map(|index| format!("k-{index}-{}", Uuid::now_v7())).collect();
    let events: Vec<CloudEvent> =
        (0..EVENTS_PER_THRED).flat_map(|_| keys.iter().map(|key| CloudEvent::new("count.inc", "/test", Some(key), json!({})))).collect();
    let harness = Arc::new(harness);
    let mut publishers = Vec::new();
    for chunk in events.chunks(100) {
        let chunk = chunk.to_vec();
        let harness = harness.clone();
        publishers.push(tokio::spawn(async move {
            for event in chunk {
                harness.publish(&event).await;
            }
        }));
    }
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    for key in &keys {
        loop {
            let threds = first.engine.live_threds(key).await.expect("redis");
            let done = threds.first().is_some_and(|thred| thred.context["n"] == json!(EVENTS_PER_THRED));
            if done {
                assert_eq!(threds.len(), 1, "one thred per key, even when both replicas saw the first event");
                let thred = &threds[0];
                assert_eq!(thred.state, ["even", "odd"][EVENTS_PER_THRED % 2]);
                assert_eq!(thred.version, EVENTS_PER_THRED as u64, "one commit per event");
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "thred {key} stuck at {:?}", threds.first().map(|t| &t.context["n"]));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (one, two) = (first.engine.metrics().snapshot(), second.engine.metrics().snapshot());
    assert_eq!(one.transitions + two.transitions, (THREDS * EVENTS_PER_THRED) as u64, "{one:?} {two:?}");
    assert!(one.events_handled > 0 && two.events_handled > 0, "both replicas took part: {one:?} {two:?}");
    first.stop().await;
    second.stop().await;
    match Arc::try_unwrap(harness) {
        Ok(harness) => harness.cleanup().await,
        Err(_) => panic!("harness still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_dead_lettered_while_others_flow() {
    let mut harness = Harness::new(dev_profile()).await;
    let running = harness.start(vec![session_pattern()]).await;
    let session = format!("s-{}", Uuid::now_v7());

    harness.publish_raw("session.open", b"{not json").await;
    let reason = harness.dead_letter().await;
    assert!(reason.headers["x-berth-reason"].starts_with("invalid event: event is not valid JSON"), "{reason:?}");

    harness.publish(&CloudEvent::new("shipment.sent", "/test", Some(&session), json!({}))).await;
    let unknown = harness.dead_letter().await;
    assert_eq!(unknown.headers["x-berth-reason"], "unknown event type `shipment.sent`: no pattern handles it");
    assert_eq!(unknown.routing_key, "shipment.sent");

    let no_workspace = CloudEvent::new("session.open", "/test", Some(&session), json!({"user": "alice"}));
    harness.publish(&no_workspace).await;
    let invalid = harness.dead_letter().await;
    assert!(invalid.headers["x-berth-reason"].contains("refuses the starting event"), "{invalid:?}");

    // A user id that would be a routing-key wildcard, a session id that would be a path.
    let wildcard_user = CloudEvent::new("session.open", "/test", Some(&session), json!({"user": "#", "workspace": "w1"}));
    harness.publish(&wildcard_user).await;
    let refused = harness.dead_letter().await;
    assert_eq!(refused.headers["x-berth-reason"], format!("invalid event: user id \"#\": {}", protocol::ids::UserId::RULE));
    harness.publish(&open_event("../etc", "alice")).await;
    let refused = harness.dead_letter().await;
    assert!(refused.headers["x-berth-reason"].starts_with("invalid event: session id \"../etc\""), "{refused:?}");

    harness.publish(&open_event(&session, "alice")).await;
    harness.task(&session, "workspace", "materialize").await;

    // An answer for a session nobody runs is an orphan: counted, acked, not dead-lettered.
    let stray = CloudEvent::new("container.ready", "/test", Some("s-nobody"), json!({"container_id": "x"}));
    harness.publish(&stray).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while running.engine.metrics().snapshot().orphans == 0 {
        assert!(tokio::time::Instant::now() < deadline, "orphan not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snapshot = running.engine.metrics().snapshot();
    assert_eq!(snapshot.dead_lettered, 5, "{snapshot:?}");
    assert!(harness.dead.try_recv().is_err(), "the orphan was not dead-lettered");
    running.stop().await;
    harness.cleanup().await;
}

fn recovery_pattern() -> Pattern {
    load_pattern_file(&repository().join("patterns/workspace-recovery.json")).expect("workspace-recovery pattern")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventories_recover_what_no_live_session_owns() {
    let mut harness = Harness::new(dev_profile()).await;
    let running = harness.start(vec![session_pattern(), recovery_pattern()]).await;
    let live_session = format!("s-{}", Uuid::now_v7());
    harness.publish(&open_event(&live_session, "alice")).await;
    harness.task(&live_session, "workspace", "materialize").await;

    let old = (chrono::Utc::now() - chrono::Duration::minutes(10)).to_rfc3339();
    let young = chrono::Utc::now().to_rfc3339();
    let (orphan, newborn, stranded, anonymous) = (
        format!("s-{}", Uuid::now_v7()),
        format!("s-{}", Uuid::now_v7()),
        format!("s-{}", Uuid::now_v7()),
        format!("s-{}", Uuid::now_v7()),
    );
    let inventory = CloudEvent::new(
        "container.inventory",
        "/test/container",
        None,
        json!({"containers": [
            {"session": live_session, "container_id": "c-live", "state": "running", "host_port": 1, "created": old, "user": "alice", "workspace": "w1"},
            {"session": orphan, "container_id": "c0ffee", "state": "running", "host_port": 2, "created": old, "user": "bob", "workspace": "thesis"},
            {"session": newborn, "container_id": "c-new", "state": "running", "host_port": 3, "created": young, "user": "bob", "workspace": "w9"},
            {"session": anonymous, "container_id": "c-anon", "state": "exited", "host_port": 0, "created": old},
        ]}),
    );
    harness.publish(&inventory).await;
    // The orphan is recovered like any session's exit: freeze, confirmed final sync, remove.
    let freeze = harness.task(&orphan, "container", "pause").await;
    let recovering = harness.notification(&orphan, "stopping").await;
    assert_eq!((recovering.user.as_str(), &recovering.detail["reason"]), ("bob", &json!("orphan container")));
    harness.publish(&answer(&freeze, &paused(Some("c0ffee"), "paused"))).await;
    let sync = harness.task(&orphan, "workspace", "sync").await;
    assert_eq!(sync.args, json!({"user": "bob", "workspace": "thesis", "final": true}));
    // Nothing is removed while the final sync fails.
    harness.publish(&answer(&sync, &WorkspaceSyncFailed { final_sync: true, error: "store down".into(), action: None })).await;
    let retried = harness.task(&orphan, "workspace", "sync").await;
    assert_ne!(retried.id, sync.id);
    let early = harness.drain_tasks(Duration::from_millis(300)).await;
    assert!(!early.iter().any(|task| task.session.as_deref() == Some(orphan.as_str()) && task.action == "remove"), "{early:?}");
    harness.publish(&answer(&retried, &synced_final())).await;
    let remove_container = harness.task(&orphan, "container", "remove").await;
    harness.publish(&answer(&remove_container, &ContainerRemoved { container_id: None })).await;
    let remove_workspace = harness.task(&orphan, "workspace", "remove").await;
    harness.publish(&answer(&remove_workspace, &workspace_removed())).await;
    assert_eq!(harness.notification(&orphan, "recovered").await.detail["recovered"], json!(true));
    // A container that does not say whose it is still goes; its directory is left to the
    // workspace inventory.
    let removal = harness.task(&anonymous, "container", "remove").await;
    assert_eq!(removal.args, json!({"container_id": "c-anon"}));

    // A stranded host directory is recovered too; a young one, a live one and another
    // deployment's are left alone.
    let directories = CloudEvent::new(
        "workspace.inventory",
        "/test/workspace",
        None,
        json!({"directories": [
            {"session": stranded, "user": "carol", "workspace": "notes", "profile": "dev", "modified": old, "confirmed": false},
            {"session": live_session, "user": "alice", "workspace": "w1", "profile": "dev", "modified": old, "confirmed": false},
            {"session": newborn, "user": "bob", "workspace": "w9", "profile": "dev", "modified": young, "confirmed": false},
        ]}),
    );
    harness.publish(&directories).await;
    let foreign = CloudEvent::new(
        "workspace.inventory",
        "/test/workspace",
        None,
        json!({"deployment": "someone-else", "directories": [
            {"session": format!("s-{}", Uuid::now_v7()), "user": "dave", "workspace": "x", "profile": "dev", "modified": old, "confirmed": false},
        ]}),
    );
    harness.publish(&foreign).await;
    let freeze = harness.task(&stranded, "container", "pause").await;
    harness.publish(&answer(&freeze, &paused(None, "missing"))).await;
    let sync = harness.task(&stranded, "workspace", "sync").await;
    assert_eq!(sync.args, json!({"user": "carol", "workspace": "notes", "final": true}));

    let rest = harness.drain_tasks(Duration::from_millis(700)).await;
    let touched: std::collections::HashSet<&str> =
        rest.iter().filter(|task| task.agent != protocol::AgentKind::Persistence).filter_map(|task| task.session.as_deref()).collect();
    for untouched in [&live_session, &newborn] {
        assert!(
            !rest.iter().any(|task| task.session.as_deref() == Some(untouched.as_str())
                && task.agent != protocol::AgentKind::Persistence
                && task.action != "materialize"),
            "{untouched} must be left alone: {touched:?}"
        );
    }
    assert_eq!(running.engine.metrics().snapshot().recoveries, 2, "{:?}", running.engine.metrics().snapshot());
    running.stop().await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_workspace_twice_joins_its_live_session() {
    let mut harness = Harness::new(dev_profile()).await;
    // Two replicas: exclusivity lives in Redis, not in one engine's memory.
    let first_replica = harness.start(vec![session_pattern()]).await;
    let second_replica = harness.start(vec![session_pattern()]).await;
    let (tab_one, tab_two) = (format!("s-{}", Uuid::now_v7()), format!("s-{}", Uuid::now_v7()));
    let open_one = open_workspace_event(&tab_one, "alice", "thesis");
    let open_two = open_workspace_event(&tab_two, "alice", "thesis");
    let (one, two) = tokio::join!(harness.publish(&open_one), harness.publish(&open_two));
    let ((), ()) = (one, two);
    let told_one = harness.notification_caused_by(&open_one.id).await;
    let told_two = harness.notification_caused_by(&open_two.id).await;
    let owner = told_one.session.clone().expect("a session");
    assert_eq!(told_two.session.as_deref(), Some(owner.as_str()), "both openers are told the same session");
    let joined: Vec<bool> = [&told_one, &told_two].iter().map(|told| told.detail["joined"] == json!(true)).collect();
    assert_eq!(joined.iter().filter(|joined| **joined).count(), 1, "exactly one joined: {told_one:?} {told_two:?}");
    // One session, one materialize.
    harness.task(&owner, "workspace", "materialize").await;
    let tasks = harness.drain_tasks(Duration::from_millis(700)).await;
    let materializes = tasks.iter().filter(|task| task.action == "materialize").count();
    assert_eq!(materializes, 0, "a second materialize: {tasks:?}");
    // Another workspace of the same user, and the same workspace of another user, start their own.
    let other_workspace = format!("s-{}", Uuid::now_v7());
    harness.publish(&open_workspace_event(&other_workspace, "alice", "essay")).await;
    harness.task(&other_workspace, "workspace", "materialize").await;
    let other_user = format!("s-{}", Uuid::now_v7());
    harness.publish(&open_workspace_event(&other_user, "bob", "thesis")).await;
    harness.task(&other_user, "workspace", "materialize").await;

    // Once the owner has ended, the workspace can be opened again.
    harness.publish(&CloudEvent::of("/test", Some(&owner), &SessionClose { reason: None })).await;
    let freeze = harness.task(&owner, "container", "pause").await;
    harness.publish(&answer(&freeze, &paused(None, "missing"))).await;
    let sync = harness.task(&owner, "workspace", "sync").await;
    harness.publish(&answer(&sync, &synced_final())).await;
    let remove_container = harness.task(&owner, "container", "remove").await;
    harness.publish(&answer(&remove_container, &ContainerRemoved { container_id: None })).await;
    let remove_workspace = harness.task(&owner, "workspace", "remove").await;
    harness.publish(&answer(&remove_workspace, &workspace_removed())).await;
    harness.notification(&owner, "closed").await;
    let reopen = format!("s-{}", Uuid::now_v7());
    let reopen_event = open_workspace_event(&reopen, "alice", "thesis");
    harness.publish(&reopen_event).await;
    let told = harness.notification_caused_by(&reopen_event.id).await;
    assert_eq!((told.session.as_deref(), told.state.as_str()), (Some(reopen.as_str()), "materializing"));
    harness.task(&reopen, "workspace", "materialize").await;
    assert!(first_replica.engine.metrics().snapshot().joins + second_replica.engine.metrics().snapshot().joins >= 1);
    first_replica.stop().await;
    second_replica.stop().await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_timer_event_is_fired_again_and_leaves_the_index_once_committed() {
    let mut profile = dev_profile();
    profile.timers.idle_after_secs = 1;
    profile.timers.autosave_secs = 0;
    let mut harness = Harness::new(profile).await;
    let mut config = harness.config.clone();
    config.refire_after_ms = 500;
    let running = harness.start_with(vec![session_pattern()], config.clone()).await;
    let session = format!("s-{}", Uuid::now_v7());
    open_until_running(&mut harness, &session).await;
    // Stop the engine before the idle timer is due, then fire it into the void: the event is lost.
    running.stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let client = redis::Client::open(harness.profile.services.redis_url.as_str()).expect("redis url");
    let redis = client.get_connection_manager().await.expect("redis");
    let void = format!("{}.void", config.events_exchange);
    harness.bus.declare_exchange(&void, ExchangeKind::Fanout, Durability::Transient, AutoDelete::Never).await.expect("void exchange");
    let keys = engine::service::Keys::new(&config.redis_prefix);
    let lossy = engine::timers::TimerService::new(
        client.clone(),
        redis.clone(),
        harness.bus.clone(),
        keys.clone(),
        void.clone(),
        Arc::new(engine::metrics::Metrics::default()),
        Arc::new(tokio::sync::Notify::new()),
    )
    .refiring_after(Duration::from_millis(500));
    assert_eq!(lossy.sweep().await.expect("sweep"), 1, "the idle timer was due");
    let mut connection = redis.clone();
    let indexed: Vec<(String, f64)> =
        redis::cmd("ZRANGE").arg(keys.deadlines()).arg(0).arg(-1).arg("WITHSCORES").query_async(&mut connection).await.expect("zrange");
    let idle: Vec<&(String, f64)> = indexed.iter().filter(|(member, _)| member.contains("|idle|")).collect();
    assert_eq!(idle.len(), 1, "a published but uncommitted timer stays indexed: {indexed:?}");
    assert!(idle[0].1 as i64 > chrono::Utc::now().timestamp_millis(), "and is due again later");
    harness.bus.delete_exchange(&void).await.expect("delete void");

    // The engine comes back: the sweep fires it again, the session idles, the entry is gone.
    let running = harness.start_with(vec![session_pattern()], config).await;
    harness.task(&session, "container", "pause").await;
    harness.notification(&session, "idle").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let indexed: Vec<String> =
            redis::cmd("ZRANGE").arg(keys.deadlines()).arg(0).arg(-1).query_async(&mut connection).await.expect("zrange");
        if !indexed.iter().any(|member| member.contains("|idle|")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the committed timer is still indexed: {indexed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop().await;
    harness.cleanup().await;
}

#[test]
fn patterns_check_cli_reports_bad_files() {
    let directory = std::env::temp_dir().join(format!("berth-patterns-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let bad = directory.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"version": 1, "name": "bad", "start": {"events": ["a.b"], "key": "event.subject"}, "initial": "x", "states": {}}"#,
    )
    .expect("write");
    let good = repository().join("patterns/workspace-session.json");
    let schema = repository().join("patterns/pattern.schema.json");
    assert_eq!(format!("{:?}", engine::check_files_cli(&[good.clone(), schema])), format!("{:?}", std::process::ExitCode::SUCCESS));
    assert_eq!(format!("{:?}", engine::check_files_cli(&[good, bad])), format!("{:?}", std::process::ExitCode::FAILURE));
    std::fs::remove_dir_all(&directory).expect("cleanup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_queue_and_admit_first_come_first_served() {
    let mut profile = dev_profile();
    profile.limits.max_sessions_per_user = 2;
    profile.limits.max_opens_per_user_per_minute = 4;
    // Room for exactly two sessions of the dev image.
    profile.limits.host_memory_mib = 2 * profile.container.memory_mib;
    profile.limits.host_cpus = 64.0;
    profile.limits.queue_timeout_secs = 4;
    let mut harness = Harness::new(profile).await;
    let running = harness.start(vec![session_pattern()]).await;
    let session = |_: &str| format!("s-{}", Uuid::now_v7());

    // Alice takes the whole host; her third open is refused by name, at once.
    let (alice_one, alice_two, alice_three) = (session("a1"), session("a2"), session("a3"));
    harness.publish(&open_workspace_event(&alice_one, "alice", "one")).await;
    harness.task(&alice_one, "workspace", "materialize").await;
    harness.publish(&open_workspace_event(&alice_two, "alice", "two")).await;
    harness.task(&alice_two, "workspace", "materialize").await;
    let refused_open = open_workspace_event(&alice_three, "alice", "three");
    harness.publish(&refused_open).await;
    let refused = harness.notification_caused_by(&refused_open.id).await;
    assert_eq!(refused.state, "closed");
    assert_eq!((&refused.detail["code"], &refused.detail["limit"]), (&json!("limit_exceeded"), &json!("sessions_per_user")), "{refused:?}");

    // Bob and carol wait, in the order they came.
    let (bob, carol) = (session("b"), session("c"));
    let bob_open = open_workspace_event(&bob, "bob", "thesis");
    harness.publish(&bob_open).await;
    let bob_queued = harness.notification_caused_by(&bob_open.id).await;
    assert_eq!((bob_queued.state.as_str(), &bob_queued.detail["position"]), ("queued", &json!(1)), "{bob_queued:?}");
    let carol_open = open_workspace_event(&carol, "carol", "notes");
    harness.publish(&carol_open).await;
    let carol_queued = harness.notification_caused_by(&carol_open.id).await;
    assert_eq!((carol_queued.state.as_str(), &carol_queued.detail["position"]), ("queued", &json!(2)), "{carol_queued:?}");
    let early = harness.drain_tasks(Duration::from_millis(500)).await;
    assert!(
        !early.iter().any(|task| task.action == "materialize"
            && task.session.as_deref() != Some(&alice_one)
            && task.session.as_deref() != Some(&alice_two)),
        "nobody jumps the queue: {early:?}"
    );

    // Alice closes one: bob (first in line) starts, carol moves up to 1.
    harness.publish(&CloudEvent::of("/test", Some(&alice_one), &SessionClose { reason: None })).await;
    let freeze = harness.task(&alice_one, "container", "pause").await;
    harness.publish(&answer(&freeze, &paused(None, "missing"))).await;
    let sync = harness.task(&alice_one, "workspace", "sync").await;
    harness.publish(&answer(&sync, &synced_final())).await;
    let remove_container = harness.task(&alice_one, "container", "remove").await;
    harness.publish(&answer(&remove_container, &ContainerRemoved { container_id: None })).await;
    // Capacity is held until the session has ended: bob still waits while alice's directory goes.
    let remove_workspace = harness.task(&alice_one, "workspace", "remove").await;
    let still_waiting = harness.drain_tasks(Duration::from_millis(300)).await;
    assert!(!still_waiting.iter().any(|task| task.session.as_deref() == Some(bob.as_str()) && task.action == "materialize"));
    let freed = std::time::Instant::now();
    harness.publish(&answer(&remove_workspace, &workspace_removed())).await;
    harness.task(&bob, "workspace", "materialize").await;
    // The figure the closing note reports: capacity freed → the first queued session starts.
    eprintln!("queue admission: capacity freed → next session's materialize task in {:.1} ms", freed.elapsed().as_secs_f64() * 1000.0);
    let carol_moved = harness
        .notification_where(
            |n| n.session.as_deref() == Some(carol.as_str()) && n.state == "queued" && n.detail["position"] == json!(1),
            "carol at position 1",
        )
        .await;
    assert_eq!(carol_moved.user, "carol");

    // The host is full again; carol's wait runs out and she is told why.
    let timed_out = harness.notification(&carol, "closed").await;
    assert_eq!(timed_out.detail["code"], json!("queue_timeout"), "{timed_out:?}");

    // Dave opens too often: five new sessions in a minute, one over that limit, each once the
    // last was answered. (Published at once, the engine steps them concurrently: every read may
    // see fewer than four opens, and the extra ones are then refused for his live sessions
    // instead; no limit is passed either way.) Never more than two of his sessions wait.
    let mut answers = Vec::new();
    for index in 0..5 {
        let open = open_workspace_event(&session("d"), "dave", &format!("w{index}"));
        harness.publish(&open).await;
        answers.push(harness.notification_caused_by(&open.id).await);
    }
    let refused_by =
        |limit: &str| answers.iter().filter(|n| n.detail["code"] == json!("limit_exceeded") && n.detail["limit"] == json!(limit)).count();
    assert!(refused_by("opens_per_minute") >= 1, "one open past four a minute is refused by that limit: {answers:?}");
    assert!(answers.iter().filter(|n| n.state == "queued").count() <= 2, "at most two of dave's sessions live: {answers:?}");
    assert_eq!(
        answers.iter().filter(|n| n.state == "queued").count() + refused_by("opens_per_minute") + refused_by("sessions_per_user"),
        5,
        "every open is queued or refused by name: {answers:?}"
    );

    running.stop().await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_metered_and_a_spent_budget_warns_stops_and_refuses() {
    let mut profile = dev_profile();
    // One unit of money per second running: the daily budget of 3 lasts three seconds.
    profile.limits.price_per_running_hour = 3600.0;
    profile.limits.daily_budget = 3.0;
    profile.limits.monthly_budget = 0.0;
    let mut harness = Harness::new(profile).await;
    let mut config = harness.config.clone();
    config.meter_interval_ms = 300;
    let running = harness.start_with(vec![session_pattern()], config).await;
    let spender = format!("spender-{}", Uuid::now_v7().simple());
    let session = format!("s-{}", Uuid::now_v7());
    harness.publish(&open_workspace_event(&session, &spender, "thesis")).await;
    let materialize = harness.task(&session, "workspace", "materialize").await;
    harness.publish(&answer(&materialize, &materialized(0, 0))).await;
    let provision = harness.task(&session, "container", "provision").await;
    harness.publish(&answer(&provision, &ready("c-1", 40000))).await;

    // Warned once past four fifths, then stopped through the ordinary exit: frozen, saved, removed.
    let warning = harness
        .notification_where(|n| n.session.as_deref() == Some(session.as_str()) && !n.detail["budget_warning"].is_null(), "a budget warning")
        .await;
    assert_eq!(warning.detail["budget_warning"]["budget"], json!("daily_budget"), "{warning:?}");
    let freeze = harness.task(&session, "container", "pause").await;
    let stopping = harness.notification(&session, "stopping").await;
    assert_eq!(stopping.detail["reason"], json!("budget"), "{stopping:?}");
    harness.publish(&answer(&freeze, &paused(None, "paused"))).await;
    let sync = harness.task(&session, "workspace", "sync").await;
    assert_eq!(sync.args["final"], json!(true), "the work is saved before the budget stop removes anything");
    harness.publish(&answer(&sync, &synced_final())).await;
    let remove_container = harness.task(&session, "container", "remove").await;
    harness.publish(&answer(&remove_container, &ContainerRemoved { container_id: None })).await;
    let remove_workspace = harness.task(&session, "workspace", "remove").await;
    harness.publish(&answer(&remove_workspace, &workspace_removed())).await;
    assert_eq!(harness.notification(&session, "stopped").await.detail["reason"], json!("budget"));

    // The usage went to the store, and the next open is refused, naming the budget.
    let tasks = harness.drain_tasks(Duration::from_millis(300)).await;
    let usage: Vec<&Task> = tasks
        .iter()
        .filter(|task| {
            task.action == "upsert"
                && task.args["collection"] == json!("usage")
                && task.args["id"].as_str().is_some_and(|id| id.starts_with(&spender))
        })
        .collect();
    let last = usage.last().expect("usage recorded in the store");
    assert!(last.args["doc"]["cost"].as_f64().unwrap_or_default() >= 3.0, "{last:?}");
    assert!(last.args["doc"]["running_secs"].as_f64().unwrap_or_default() >= 3.0, "{last:?}");
    // The engine's /metrics shows the user's usage of the day and the month, behind its token.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop_exporter, exporter_stopped) = oneshot::channel::<()>();
    let (serving, redis_url) = (running.engine.clone(), harness.profile.services.redis_url.clone());
    let exporter = tokio::spawn(async move {
        engine::exporter::serve(&serving, &redis_url, listener, Some("scrape-token".into()), async move {
            let _ = exporter_stopped.await;
        })
        .await
    });
    let refused_scrape = http_get(address, "/metrics", None).await;
    assert!(refused_scrape.starts_with("HTTP/1.1 401"), "{refused_scrape}");
    let scrape = http_get(address, "/metrics", Some("scrape-token")).await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("berth_engine_events_handled_total"), "{scrape}");
    assert!(scrape.contains("berth_engine_consumer_bus_handled_total{queue="), "the engine's bus counters: {scrape}");
    for period in ["day", "month"] {
        let line = scrape
            .lines()
            .find(|line| line.starts_with(&format!("berth_engine_usage_cost{{user=\"{spender}\",period=\"{period}\"}}")))
            .unwrap_or_else(|| panic!("no {period} cost of {spender} in {scrape}"));
        let cost: f64 = line.rsplit(' ').next().and_then(|value| value.parse().ok()).expect("a number");
        assert!(cost >= 3.0, "{line}");
    }
    drop(stop_exporter);
    exporter.await.expect("exporter task").expect("exporter served");

    let again = open_workspace_event(&format!("s-{}", Uuid::now_v7()), &spender, "essay");
    harness.publish(&again).await;
    let refused = harness.notification_caused_by(&again.id).await;
    assert_eq!((refused.state.as_str(), &refused.detail["limit"]), ("closed", &json!("daily_budget")), "{refused:?}");
    running.stop().await;
    harness.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_user_wins_and_a_foreign_profile_is_refused() {
    let mut harness = Harness::new(dev_profile()).await;
    let running = harness.start(vec![session_pattern()]).await;

    let session = format!("s-{}", Uuid::now_v7());
    let open = open_event(&session, "mallory").with_extension("userid", "bob");
    harness.publish(&open).await;
    let materialize = harness.task(&session, "workspace", "materialize").await;
    assert_eq!(materialize.args["user"], json!("bob"));
    assert_eq!(harness.notification(&session, "materializing").await.user, "bob");

    let foreign = format!("s-{}", Uuid::now_v7());
    harness
        .publish(&CloudEvent::of(
            "/test",
            Some(&foreign),
            &SessionOpen {
                user: "alice".parse().expect("a user id"),
                workspace: "w1".parse().expect("a workspace id"),
                profile: Some("prod".to_owned()),
            },
        ))
        .await;
    let closed = harness.notification(&foreign, "closed").await;
    assert_eq!(closed.detail["error"], json!("profile prod is not this deployment (dev)"));
    assert!(live_thred(&running.engine, &foreign).await.is_none());
    running.stop().await;
    harness.cleanup().await;
}

/// A short ladder: pause after 2 s without input or work (warned 1 s before), stop the container
/// 3 s after pausing, close 6 s after pausing.
fn ladder_profile() -> Profile {
    let mut profile = dev_profile();
    profile.timers.idle_after_secs = 2;
    profile.timers.idle_warning_secs = 1;
    profile.timers.dormant_after_idle_secs = 3;
    profile.timers.stop_after_idle_secs = 6;
    profile.timers.autosave_secs = 0;
    profile.validate().expect("a valid ladder");
    profile
}

/// The idle rule and the ladder through the real engine, Redis timers and the broker: a busy loop,
/// a background writer and a terminal command each keep the session running (the deadline
/// re-arms, the user is told why); a quiet session is warned, paused, stopped with its directory
/// kept, woken from each tier (the dormant one on a new port), and finally closed through the
/// freeze and the final sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_keeps_a_session_running_and_a_quiet_one_climbs_the_ladder_and_wakes_from_each_tier() {
    let mut harness = Harness::new(ladder_profile()).await;
    harness.probes = Probes::LeftToTheTest;
    let running = harness.start(vec![session_pattern()]).await;
    let session = format!("s-{}", Uuid::now_v7());
    open_until_running(&mut harness, &session).await;
    let baseline = harness.task(&session, "container", "probe").await;
    harness.publish(&answer(&baseline, &quiet_probe(0))).await;

    // The warning before the pause comes first (idle_after − idle_warning = 1 s).
    let warning = harness
        .notification_where(|n| n.session.as_deref() == Some(session.as_str()) && n.detail["warning"] == "pause", "pause warning")
        .await;
    assert_eq!(warning.detail["in_secs"], json!(1));
    // Three kinds of work, one per deadline: each keeps the session running.
    // Two CPU-seconds in a two-second interval: a busy loop on one core.
    let cpu_ns = 2_000_000_000u64;
    let works = [
        ("a busy loop", quiet_probe(cpu_ns)),
        ("a background writer", ContainerProbed { write_age_ms: 300, ..quiet_probe(cpu_ns) }),
        ("a terminal command", ContainerProbed { terminal_commands: 1, terminals: 1, ..quiet_probe(cpu_ns) }),
    ];
    for (what, data) in works {
        let probe = harness.task(&session, "container", "probe").await;
        harness.publish(&answer(&probe, &data)).await;
        let kept =
            harness.notification_where(|n| n.session.as_deref() == Some(session.as_str()) && n.detail.get("working").is_some(), what).await;
        assert_eq!(kept.state, "running", "{what}");
        let thred = live_thred(&running.engine, &session).await.expect("live");
        assert_eq!(thred.state, "running", "{what} must not be paused");
    }
    let early = harness.drain_tasks(Duration::from_millis(100)).await;
    assert!(
        !early.iter().any(|task| task.session.as_deref() == Some(session.as_str()) && task.action == "pause"),
        "a working session was paused: {early:?}"
    );

    // Quiet now: paused, and the user sees the tier.
    let probe = harness.task(&session, "container", "probe").await;
    harness.publish(&answer(&probe, &quiet_probe(cpu_ns))).await;
    let pause = harness.task(&session, "container", "pause").await;
    let idle = harness.notification(&session, "idle").await;
    assert_eq!(
        (idle.detail["tier"].as_str(), idle.detail["next"].as_str(), idle.detail["next_in_secs"].as_u64()),
        (Some("paused"), Some("dormant"), Some(3))
    );
    harness.publish(&answer(&pause, &paused(Some("c-1"), "paused"))).await;

    // Wake from the paused tier: resume, no new container.
    harness.publish(&CloudEvent::of("/test", Some(&session), &SessionActivity { source: InputSource::Terminal })).await;
    let resume = harness.task(&session, "container", "resume").await;
    harness.publish(&answer(&resume, &ContainerResumed { container_id: Some("c-1".into()) })).await;
    harness.notification(&session, "running").await;
    let baseline = harness.task(&session, "container", "probe").await;
    harness.publish(&answer(&baseline, &quiet_probe(cpu_ns))).await;
    let probe = harness.task(&session, "container", "probe").await;
    harness.publish(&answer(&probe, &quiet_probe(cpu_ns))).await;
    let pause = harness.task(&session, "container", "pause").await;
    let idle = harness.notification(&session, "idle").await;
    assert!(idle.detail["wake_estimate_ms"].as_u64().is_some(), "the measured resume is the estimate: {}", idle.detail);
    harness.publish(&answer(&pause, &paused(Some("c-1"), "paused"))).await;

    // The warning before the stop, then the dormant tier: the container stops, the directory stays.
    let warning = harness
        .notification_where(|n| n.session.as_deref() == Some(session.as_str()) && n.detail["warning"] == "dormant", "dormant warning")
        .await;
    assert_eq!(warning.state, "idle");
    let stop = harness.task(&session, "container", "stop").await;
    let dormant = harness.notification(&session, "dormant").await;
    assert_eq!(dormant.detail["tier"], json!("dormant"));
    harness.publish(&answer(&stop, &ContainerStopped { container_id: Some("c-1".into()) })).await;
    let tasks = harness.drain_tasks(Duration::from_millis(300)).await;
    assert!(
        !tasks
            .iter()
            .any(|task| task.session.as_deref() == Some(session.as_str())
                && ["sync", "remove", "materialize"].contains(&task.action.as_str())),
        "the dormant tier keeps the directory: {tasks:?}"
    );

    // Wake from the dormant tier: the same container starts again (no materialize), on a new port.
    harness.publish(&CloudEvent::of("/test", Some(&session), &SessionActivity { source: InputSource::Api })).await;
    let wake = harness.task(&session, "container", "wake").await;
    assert_eq!(wake.args, json!({"user": "alice", "workspace": format!("w-{session}")}));
    harness.notification(&session, "waking").await;
    harness
        .publish(&answer(&wake, &ContainerReady { timings_ms: ReadyTimings { create: 0, start: 120, ready: 80 }, ..ready("c-1", 40002) }))
        .await;
    // The new port is reported: the proxy and the console follow the running notification.
    harness
        .notification_where(
            |n| n.session.as_deref() == Some(session.as_str()) && n.state == "running" && n.detail["port"] == json!(40002),
            "running on the new port",
        )
        .await;
    let tasks = harness.drain_tasks(Duration::from_millis(100)).await;
    assert!(!tasks.iter().any(|task| task.session.as_deref() == Some(session.as_str()) && task.action == "materialize"), "{tasks:?}");

    // Quiet for the whole ladder: paused, dormant, then closed with the final sync first.
    for _ in 0..2 {
        let probe = harness.task(&session, "container", "probe").await;
        harness.publish(&answer(&probe, &quiet_probe(0))).await;
    }
    let pause = harness.task(&session, "container", "pause").await;
    harness.publish(&answer(&pause, &paused(Some("c-1"), "paused"))).await;
    let stop = harness.task(&session, "container", "stop").await;
    harness.publish(&answer(&stop, &ContainerStopped { container_id: Some("c-1".into()) })).await;
    let close_warning = harness
        .notification_where(|n| n.session.as_deref() == Some(session.as_str()) && n.detail["warning"] == "close", "close warning")
        .await;
    assert_eq!(close_warning.state, "dormant");
    let freeze = harness.task(&session, "container", "pause").await;
    let stopping = harness.notification(&session, "stopping").await;
    assert_eq!(stopping.detail["reason"], json!("idle"));
    harness.publish(&answer(&freeze, &paused(Some("c-1"), "exited"))).await;
    let sync = harness.task(&session, "workspace", "sync").await;
    assert_eq!(sync.args["final"], json!(true));
    harness.publish(&answer(&sync, &synced_final())).await;
    let remove = harness.task(&session, "container", "remove").await;
    harness.publish(&answer(&remove, &ContainerRemoved { container_id: Some("c-1".into()) })).await;
    let remove_workspace = harness.task(&session, "workspace", "remove").await;
    harness.publish(&answer(&remove_workspace, &workspace_removed())).await;
    harness.notification(&session, "stopped").await;

    running.stop().await;
    harness.cleanup().await;
}
