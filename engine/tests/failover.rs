//! Failover's records against the real RabbitMQ and Redis, on an injected clock: a host that goes
//! and never returns is not remembered forever. The engine runs on its own exchanges, queue and
//! Redis key prefix (`EngineConfig::isolated`) and removes them at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use engine::pattern::load_pattern_file;
use engine::service::{self, Engine, ManualClock, Serving};
use engine::EngineConfig;
use protocol::bus::Acks;
use protocol::host::{HostCapacity, HostReport};
use protocol::profile::HostsSettings;
use protocol::{AgentKind, Bus, BusConfig, CloudEvent, Identity, Profile, Properties, Task};
use redis::AsyncCommands;
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);
const FAILOVER_AFTER: Duration = Duration::from_secs(60);
const FORGET_AFTER: Duration = Duration::from_secs(2 * 24 * 3600);

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `dev` with `[hosts]`: fail over after a minute, forget after two days (of the injected clock).
fn profile() -> Profile {
    let mut profile = Profile::load(&repository().join("run-profiles/dev/profile.toml")).expect("dev profile");
    profile.hosts = Some(HostsSettings { failover_after: "1m".to_owned(), forget_after: Some("2d".to_owned()) });
    profile.validate().expect("a valid profile");
    assert_eq!((profile.failover_after(), profile.forget_after()), (FAILOVER_AFTER, FORGET_AFTER));
    profile
}

/// One test's isolated engine names, the operator's bus, a bus for each identity the events come
/// from, and a host id of its own.
struct World {
    profile: Profile,
    tag: String,
    config: EngineConfig,
    bus: Bus,
    container: Bus,
    workspace: Bus,
    client: Bus,
    host: String,
}

impl World {
    async fn new() -> World {
        protocol::telemetry::init(protocol::telemetry::LogFormat::Pretty);
        let profile = profile();
        let tag = Uuid::now_v7().simple().to_string();
        let config = EngineConfig::isolated(&tag);
        let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "failover-test")).await.expect("broker");
        service::declare(&bus, &config).await.expect("declare");
        protocol::broker_admin::ensure_identities(&profile.services.amqp_url).await.expect("bus identities");
        let url = profile.services.amqp_url.clone();
        let sender = |identity| {
            let url = url.clone();
            async move {
                Bus::connect(BusConfig::for_identity(&url, identity, "failover-test-sender").expect("identity")).await.expect("broker")
            }
        };
        let (container, workspace, client) =
            (sender(Identity::Container).await, sender(Identity::Workspace).await, sender(Identity::Client).await);
        let host = format!("h-{}", &tag[tag.len() - 8..]);
        World { profile, tag, config, bus, container, workspace, client, host }
    }
}

/// `host`'s container agent's report, every `interval_secs`, with the profile's capacity.
fn container_report(profile: &Profile, host: &str, interval_secs: u64) -> HostReport {
    HostReport {
        host: host.to_owned(),
        deployment: profile.deployment(),
        agent: AgentKind::Container,
        interval_secs,
        capacity: Some(HostCapacity::of(profile, 0)),
        workspaces: None,
    }
}

/// Publishes `event` on the engine's events exchange as `sender`'s identity.
async fn publish_event(sender: Bus, exchange: String, event: CloudEvent) {
    sender.publish(&exchange, &event.event_type, &event.to_bytes(), Properties::cloud_event()).await.expect("publish")
}

/// The workspace and container tasks the engine sends, on the shared queues and on `host`'s, with
/// their routing keys (`workspace.<host>` for a session placed on `host`).
async fn collect_tasks(bus: &Bus, exchange: &str, host: &str) -> mpsc::UnboundedReceiver<(String, Task)> {
    let keys = ["workspace".to_owned(), "container".to_owned(), format!("workspace.{host}"), format!("container.{host}")];
    collect_tasks_on(bus, exchange, &keys).await
}

/// The tasks the engine sends with these routing keys.
async fn collect_tasks_on(bus: &Bus, exchange: &str, keys: &[String]) -> mpsc::UnboundedReceiver<(String, Task)> {
    let queue = bus.declare_private_queue(exchange, keys).await.expect("private queue");
    let mut subscription = bus.subscribe(&queue, Acks::Automatic).await.expect("subscribe");
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(incoming)) = subscription.next().await {
            let task = Task::decode(&incoming.body).expect("a task");
            if sender.send((incoming.routing_key, task)).is_err() {
                return;
            }
        }
    });
    receiver
}

/// The next `action` task of `session`, with its routing key.
async fn next_task(tasks: &mut mpsc::UnboundedReceiver<(String, Task)>, session: &str, action: &str) -> (String, Task) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (key, task) = tokio::time::timeout_at(deadline, tasks.recv())
            .await
            .unwrap_or_else(|_| panic!("no {action} task for {session} within {WAIT:?}"))
            .expect("task stream");
        if task.session.as_deref() == Some(session) && task.action == action {
            return (key, task);
        }
    }
}

/// Polls `check` every 100 ms until it holds, for at most [`WAIT`].
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A host whose sessions all failed over and that never returns: once none of its sessions is on
/// it, it is no longer watched (`gone`); its record of the moved sessions (`failed-over:<host>`,
/// indexed in `failed-over`) outlives that, for its return, until `hosts.forget_after` after its
/// last failover, and not a round longer. Before these bounds both stayed forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_never_returns_is_forgotten_after_forget_after() {
    let World { profile, tag, config, bus, container, workspace, client, host } = World::new().await;
    let publish = |sender: &Bus, event: CloudEvent| publish_event(sender.clone(), config.events_exchange.clone(), event);
    let mut tasks = collect_tasks(&bus, &config.tasks_exchange, &host).await;

    let clock = Arc::new(ManualClock::at(chrono::Utc::now()));
    let pattern = load_pattern_file(&repository().join("patterns/workspace-session.json")).expect("workspace-session pattern");
    let engine = Engine::connect_with_clock(profile.clone(), vec![pattern], config.clone(), clock.clone()).await.expect("engine connects");
    let serving = Serving::start(&engine);

    // One host reports once (its report lives three 1 s intervals), and a session is placed on it.
    let report = container_report(&profile, &host, 1);
    publish(&container, report.to_event("/test/container")).await;
    // Not placeable while only its container agent reports: its workspace agent may not have
    // declared the host's queue yet, where the broker would drop the materialize. Such an open
    // waits in the queue (not sent unplaced to the shared queues, where a drained host's agents
    // could take it) until the host is placeable.
    let redis_client = redis::Client::open(profile.services.redis_url.as_str()).expect("redis url");
    let redis = redis_client.get_multiplexed_async_connection().await.expect("redis");
    let container_report_key = format!("{}:host:{host}:container", config.redis_prefix);
    eventually("the host's container report is recorded", || {
        let mut redis = redis.clone();
        let key = container_report_key.clone();
        async move { redis.exists::<_, bool>(&key).await.expect("redis") }
    })
    .await;
    let early = format!("s-early-{tag}");
    publish(
        &client,
        CloudEvent::new("session.open", "/test", Some(&early), json!({"user": "alice", "workspace": format!("w-early-{tag}")})),
    )
    .await;
    let queue_key = format!("{}:queue:workspace-session", config.redis_prefix);
    eventually("the early open waits in the queue", || {
        let mut redis = redis.clone();
        let queue_key = queue_key.clone();
        async move { redis.zcard::<_, u64>(&queue_key).await.expect("redis") == 1 }
    })
    .await;
    // Placeable once its workspace agent reports too (its host queue exists then): the waiting
    // open goes there.
    let workspace_report = HostReport { agent: AgentKind::Workspace, capacity: None, workspaces: Some(Vec::new()), ..report.clone() };
    publish(&workspace, workspace_report.to_event("/test/workspace")).await;
    // Its container report again, so the host stays live (three 1 s intervals) until the admitter,
    // which looks every second, has let the waiting open go.
    publish(&container, report.to_event("/test/container")).await;
    let (key, _) = next_task(&mut tasks, &early, "materialize").await;
    assert_eq!(key, format!("workspace.{host}"), "the waiting open is placed once the host is placeable");
    let session = format!("s-{tag}");
    let hosts_key = format!("{}:hosts", config.redis_prefix);
    let workspace_report_key = format!("{}:host:{host}:workspace", config.redis_prefix);
    eventually("the host's reports are recorded", || {
        let mut redis = redis.clone();
        let (hosts_key, host, workspace_report_key) = (hosts_key.clone(), host.clone(), workspace_report_key.clone());
        async move {
            redis.zscore::<_, _, Option<i64>>(&hosts_key, &host).await.expect("redis").is_some()
                && redis.exists::<_, bool>(&workspace_report_key).await.expect("redis")
        }
    })
    .await;
    let open = CloudEvent::new("session.open", "/test", Some(&session), json!({"user": "alice", "workspace": format!("w-{tag}")}));
    publish(&client, open).await;
    let (key, _) = next_task(&mut tasks, &session, "materialize").await;
    assert_eq!(key, format!("workspace.{host}"), "the session is placed on the reporting host");

    // The host never reports again: gone within three seconds (real time: the report's TTL).
    let gone_key = format!("{}:gone", config.redis_prefix);
    let record_key = format!("{}:failed-over:{host}", config.redis_prefix);
    let index_key = format!("{}:failed-over", config.redis_prefix);
    let noted_gone = || {
        let mut redis = redis.clone();
        let (gone_key, host) = (gone_key.clone(), host.clone());
        async move { redis.zscore::<_, _, Option<i64>>(&gone_key, &host).await.expect("redis").is_some() }
    };
    eventually("the silent host is noted gone", noted_gone).await;

    // Past failover_after the session moves off it (moving, queued, then materialized afresh with
    // no host reporting: the shared queue) and the move is recorded.
    clock.advance(FAILOVER_AFTER + Duration::from_secs(1));
    let (key, materialize) = next_task(&mut tasks, &session, "materialize").await;
    assert_eq!(key, "workspace", "reopened with no host reporting");
    assert_eq!(materialize.args["fence"], json!(true), "the reopened session fences its workspace");
    let recorded = || {
        let mut redis = redis.clone();
        let (record_key, index_key, host, session) = (record_key.clone(), index_key.clone(), host.clone(), session.clone());
        async move {
            let in_record: bool = redis.hexists(&record_key, &session).await.expect("redis");
            let indexed: Option<i64> = redis.zscore(&index_key, &host).await.expect("redis");
            in_record && indexed.is_some()
        }
    };
    assert!(recorded().await, "the failover is recorded and indexed");

    // Nothing is placed on it any more: it is no longer watched, but its record stays for its return.
    eventually("a gone host with no live session is dropped from gone", || async { !noted_gone().await }).await;
    clock.advance(FORGET_AFTER - FAILOVER_AFTER - Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(recorded().await, "still remembered a minute short of forget_after");

    // Past forget_after since that failover, record and index entry go.
    clock.advance(Duration::from_secs(120));
    eventually("the record of a host not back within forget_after is dropped", || async {
        let mut redis = redis.clone();
        let record: bool = redis.exists(&record_key).await.expect("redis");
        let indexed: Option<i64> = redis.zscore(&index_key, &host).await.expect("redis");
        !record && indexed.is_none()
    })
    .await;

    serving.stop().await.expect("engine ran");
    service::teardown(&bus, &profile.services.redis_url, &config).await.expect("teardown");
    for bus in [container, client, bus] {
        bus.close().await;
    }
}

/// A task for a host whose queue does not exist (its agent has not declared it yet, or it was
/// deleted) is not dropped by the broker without a word: it is published `mandatory`, the event
/// fails and is retried with its outbox kept, and the task arrives once the queue is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_for_a_missing_host_queue_waits_for_the_queue() {
    let World { profile, tag, config, bus, container, workspace, client, host } = World::new().await;
    let publish = |sender: &Bus, event: CloudEvent| publish_event(sender.clone(), config.events_exchange.clone(), event);
    // The shared queues and the host's container queue exist; its workspace queue does not.
    let mut tasks = collect_tasks_on(&bus, &config.tasks_exchange, &["workspace".to_owned(), format!("container.{host}")]).await;
    let pattern = load_pattern_file(&repository().join("patterns/workspace-session.json")).expect("workspace-session pattern");
    let engine = Engine::connect(profile.clone(), vec![pattern], config.clone()).await.expect("engine connects");
    let serving = Serving::start(&engine);
    // Both agents report (every 10 s: the host stays placeable throughout).
    let report = container_report(&profile, &host, 10);
    publish(&container, report.to_event("/test/container")).await;
    let workspace_report = HostReport { agent: AgentKind::Workspace, capacity: None, workspaces: Some(Vec::new()), ..report.clone() };
    publish(&workspace, workspace_report.to_event("/test/workspace")).await;
    let redis_client = redis::Client::open(profile.services.redis_url.as_str()).expect("redis url");
    let redis = redis_client.get_multiplexed_async_connection().await.expect("redis");
    let report_keys: Vec<String> =
        ["container", "workspace"].iter().map(|agent| format!("{}:host:{host}:{agent}", config.redis_prefix)).collect();
    eventually("both of the host's reports are recorded", || {
        let mut redis = redis.clone();
        let keys = report_keys.clone();
        async move { redis.exists::<_, u64>(&keys).await.expect("redis") == 2 }
    })
    .await;

    let session = format!("s-{tag}");
    publish(&client, CloudEvent::new("session.open", "/test", Some(&session), json!({"user": "alice", "workspace": format!("w-{tag}")})))
        .await;
    // Committed (the thred is live) and its outbox kept: the materialize could not be routed.
    let (live_key, outboxes_key) = (format!("{}:live:{session}", config.redis_prefix), format!("{}:outboxes", config.redis_prefix));
    eventually("the open is committed and its outbox kept", || {
        let mut redis = redis.clone();
        let (live_key, outboxes_key) = (live_key.clone(), outboxes_key.clone());
        async move {
            redis.scard::<_, u64>(&live_key).await.expect("redis") == 1 && redis.scard::<_, u64>(&outboxes_key).await.expect("redis") >= 1
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while let Ok((key, task)) = tasks.try_recv() {
        assert_ne!(
            (key.as_str(), task.action.as_str()),
            ("workspace", "materialize"),
            "the materialize did not go to the shared queue instead"
        );
    }
    assert_eq!(redis.clone().scard::<_, u64>(&outboxes_key).await.expect("redis"), 1, "the outbox is still kept after a retry");

    // The host's workspace agent declares its queue: the retried event publishes the task there.
    let mut on_host = collect_tasks_on(&bus, &config.tasks_exchange, &[format!("workspace.{host}")]).await;
    let (key, _) = tokio::time::timeout(Duration::from_secs(60), next_task(&mut on_host, &session, "materialize"))
        .await
        .expect("the materialize arrives once the queue exists");
    assert_eq!(key, format!("workspace.{host}"));
    eventually("the published outbox is deleted", || {
        let mut redis = redis.clone();
        let outboxes_key = outboxes_key.clone();
        async move { redis.scard::<_, u64>(&outboxes_key).await.expect("redis") == 0 }
    })
    .await;

    serving.stop().await.expect("engine ran");
    service::teardown(&bus, &profile.services.redis_url, &config).await.expect("teardown");
    for bus in [container, workspace, client, bus] {
        bus.close().await;
    }
}
