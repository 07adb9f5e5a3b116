//! `berth bench engine`: the engine's sustained rate (consume → step → commit → publish → ack) for
//! 10,000 threds next to the raw broker's consume-and-ack rate for the same messages, publish-to-task
//! latency, and timer precision for 1,000 timers. Runs on isolated names and cleans up after itself.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use protocol::bus::{Acks, Durability, QueueSpec};
use protocol::{Bus, BusConfig, CloudEvent, Profile, Properties, Task};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use engine::service::{self, Keys, Serving};
use engine::timers::TimerMember;
use engine::{Engine, EngineConfig};

use crate::stats::{milliseconds, Latencies};

const THREDS: usize = 10_000;
const TIMERS: usize = 1_000;
const PUBLISH_PARALLELISM: usize = 64;

/// Room for every session and no per-user rate: the engine benches measure the engine, not
/// admission.
pub(crate) fn without_limits(profile: &mut Profile) {
    profile.limits.host_memory_mib = u64::MAX / 4;
    profile.limits.host_cpus = 1e9;
    profile.limits.max_opens_per_user_per_minute = u32::MAX;
}

/// An engine bench's own exchanges, queue and Redis prefix (`tag`), declared on the operator's
/// bus and torn down by [`IsolatedEngine::close`].
pub(crate) struct IsolatedEngine {
    pub config: EngineConfig,
    pub bus: Bus,
}

impl IsolatedEngine {
    pub(crate) async fn declare(profile: &Profile, tag: &str, connection_name: &str) -> anyhow::Result<IsolatedEngine> {
        let config = EngineConfig::isolated(tag);
        let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, connection_name)).await?;
        service::declare(&bus, &config).await?;
        Ok(IsolatedEngine { config, bus })
    }

    pub(crate) async fn close(self, profile: &Profile) -> anyhow::Result<()> {
        service::teardown(&self.bus, &profile.services.redis_url, &self.config).await?;
        self.bus.close().await;
        Ok(())
    }
}

/// `berth bench engine`.
pub async fn bench(mut profile: Profile) -> anyhow::Result<()> {
    without_limits(&mut profile);
    let patterns = engine::load_profile_patterns(&profile)?;
    let world = IsolatedEngine::declare(&profile, &format!("bench-{}", Uuid::now_v7().simple()), "berth-bench").await?;
    let outcome = measure(&profile, patterns, &world.config, &world.bus).await;
    world.close(&profile).await?;
    outcome
}

async fn publish_all(bus: &Bus, exchange: &str, messages: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
    let stream = futures::stream::iter(messages.into_iter().map(|(routing_key, body)| {
        let bus = bus.clone();
        let exchange = exchange.to_owned();
        async move {
            let properties = Properties::cloud_event();
            bus.publish(&exchange, &routing_key, &body, properties).await
        }
    }));
    let results: Vec<_> = stream.buffered(PUBLISH_PARALLELISM).collect().await;
    for result in results {
        result?;
    }
    Ok(())
}

/// A private queue bound to `exchange` whose deliveries (receipt instant, body) arrive on a channel.
async fn listen(bus: &Bus, exchange: &str, keys: &[&str]) -> anyhow::Result<mpsc::UnboundedReceiver<(Instant, Vec<u8>)>> {
    let keys: Vec<String> = keys.iter().map(|key| (*key).to_owned()).collect();
    let queue = bus.declare_private_queue(exchange, &keys).await?;
    let mut subscription = bus.subscribe(&queue, Acks::Automatic).await?;
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = subscription.next().await {
            if sender.send((Instant::now(), delivery.body)).is_err() {
                return;
            }
        }
    });
    Ok(receiver)
}

/// The raw broker: the same bodies through a queue, consumed and acked one by one. `Durable` is
/// a queue like the engine's own (durable, its persistent messages written by the broker);
/// `Transient` a queue the broker keeps in memory only.
async fn raw_broker_rate(bus: &Bus, bodies: &[Vec<u8>], prefetch: u16, durability: Durability) -> anyhow::Result<f64> {
    let queue = format!("berth-bench.raw.{}", Uuid::now_v7().simple());
    bus.declare_queue(&QueueSpec::classic(&queue, durability).expiring_after(Duration::from_secs(600))).await?;
    publish_all(bus, "", bodies.iter().map(|body| (queue.clone(), body.clone())).collect()).await?;
    // Each message acked as it arrives, one by one, at most `prefetch` unacknowledged.
    let mut subscription = bus.subscribe(&queue, Acks::OnReceipt { prefetch }).await?;
    let started = Instant::now();
    let mut received = 0;
    while received < bodies.len() {
        let Some(delivery) = subscription.next().await else { anyhow::bail!("raw consumer ended") };
        delivery?;
        received += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    subscription.close().await;
    bus.delete_queue(&queue).await?;
    Ok(bodies.len() as f64 / elapsed)
}

pub async fn wait_handled(engine: &Engine, target: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let metrics = engine.metrics();
    while metrics.events_handled.load(Ordering::Relaxed) < target {
        if Instant::now() > deadline {
            anyhow::bail!("engine handled {} of {target} events in {timeout:?}", metrics.events_handled.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Publishes `events` (at `rate` per second, or flat out) while collecting the tasks they cause
/// (`action`); returns the achieved rate and the publish→task latencies.
async fn live_phase(
    bus: &Bus,
    exchange: &str,
    events: Vec<CloudEvent>,
    rate: Option<f64>,
    tasks: &mut mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    action: &str,
) -> anyhow::Result<(f64, Latencies)> {
    let expected = events.len();
    let (sender, mut published) = mpsc::unbounded_channel::<(String, Instant)>();
    let bus = bus.clone();
    let exchange = exchange.to_owned();
    let started = Instant::now();
    let publisher = tokio::spawn(async move {
        let publish_one = |event: CloudEvent| {
            let bus = bus.clone();
            let exchange = exchange.clone();
            let sender = sender.clone();
            async move {
                let _ = sender.send((event.id.clone(), Instant::now()));
                let properties = Properties::cloud_event();
                bus.publish(&exchange, &event.event_type, &event.to_bytes(), properties).await
            }
        };
        match rate {
            None => {
                let results: Vec<_> =
                    futures::stream::iter(events.into_iter().map(publish_one)).buffered(PUBLISH_PARALLELISM).collect().await;
                results.into_iter().collect::<Result<Vec<()>, _>>()?;
            }
            Some(per_second) => {
                // Ticks of 10 ms, each publishing its share concurrently.
                let per_tick = (per_second / 100.0).max(1.0);
                let mut ticker = tokio::time::interval(Duration::from_millis(10));
                let mut sent = 0.0_f64;
                let mut remaining = events.into_iter();
                let mut in_flight = tokio::task::JoinSet::new();
                loop {
                    ticker.tick().await;
                    sent += per_tick;
                    let mut batch = Vec::new();
                    while (batch.len() as f64) < sent.floor() {
                        match remaining.next() {
                            Some(event) => batch.push(event),
                            None => break,
                        }
                    }
                    sent -= batch.len() as f64;
                    if batch.is_empty() {
                        break;
                    }
                    for event in batch {
                        in_flight.spawn(publish_one(event));
                    }
                }
                while let Some(result) = in_flight.join_next().await {
                    result??;
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    let mut published_at: HashMap<String, Instant> = HashMap::with_capacity(expected);
    let mut latencies = Latencies::new();
    let mut pending: Vec<(Instant, String)> = Vec::new();
    while latencies.len() < expected as u64 {
        let Ok(Some((received_at, body))) = tokio::time::timeout(Duration::from_secs(30), tasks.recv()).await else { break };
        while let Ok((id, at)) = published.try_recv() {
            published_at.insert(id, at);
        }
        let Ok(task) = Task::decode(&body) else { continue };
        if task.action != action {
            continue;
        }
        let Some(cause) = task.cause else { continue };
        pending.push((received_at, cause));
        pending.retain(|(received_at, cause)| match published_at.get(cause) {
            Some(at) => {
                latencies.record(received_at.duration_since(*at));
                false
            }
            None => true,
        });
    }
    let elapsed = started.elapsed().as_secs_f64();
    publisher.await??;
    Ok((latencies.len() as f64 / elapsed, latencies))
}

async fn measure(profile: &Profile, patterns: Vec<engine::Pattern>, config: &EngineConfig, bus: &Bus) -> anyhow::Result<()> {
    let sessions: Vec<String> = (0..THREDS).map(|index| format!("bench-{index}-{}", Uuid::now_v7())).collect();
    let opens: Vec<CloudEvent> = sessions
        .iter()
        .enumerate()
        .map(|(index, session)| {
            CloudEvent::new("session.open", "/bench", Some(session), json!({"user": format!("bench{index}"), "workspace": "w"}))
        })
        .collect();
    let bodies: Vec<Vec<u8>> = opens.iter().map(CloudEvent::to_bytes).collect();

    println!("berth bench engine: {THREDS} threds, prefetch {}", config.prefetch);
    // The pure core alone: start a thred and apply the next event, no IO.
    if let Some(pattern) = patterns.iter().find(|pattern| pattern.start.events.contains("session.open")) {
        let started = Instant::now();
        for event in &opens {
            let input = service::event_input(event);
            let seed = json!({"session": event.subject, "user": "bench", "workspace": "w", "profile": profile.name,
                              "timers": {"idle_after_secs": 60, "stop_after_idle_secs": 60, "max_age_secs": 60, "autosave_secs": 60, "ready_timeout_secs": 20}});
            let seed = seed.as_object().cloned().unwrap_or_default();
            let step = engine::start(pattern, &event.id, seed, &input, 0)?;
            let next = CloudEvent::new("workspace.materialized", "/bench", event.subject.as_deref(), json!({}));
            engine::step(pattern, &step.thred, &service::event_input(&next), 1)?;
        }
        let rate = (2 * THREDS) as f64 / started.elapsed().as_secs_f64();
        println!("  pure core (start + step):          {rate:>9.0} steps/s");
    }
    let raw_transient = raw_broker_rate(bus, &bodies, config.prefetch, Durability::Transient).await?;
    println!("  raw broker consume+ack, transient: {raw_transient:>9.0} msg/s");
    let raw_rate = raw_broker_rate(bus, &bodies, config.prefetch, Durability::Durable).await?;
    println!("  raw broker consume+ack, durable:   {raw_rate:>9.0} msg/s");

    // Phase 1: a backlog of 10,000 session.open, drained by the engine (each creates a thred and
    // emits a task, a notification and two persistence records).
    // Each event is published as the identity the engine accepts it from, as in a deployment.
    protocol::broker_admin::ensure_identities(&profile.services.amqp_url).await?;
    let as_identity = |identity: protocol::Identity| {
        let url = profile.services.amqp_url.clone();
        async move { Bus::connect(BusConfig::for_identity(&url, identity, "berth-bench-sender")?).await }
    };
    let (as_client, as_workspace, as_container) = (
        as_identity(protocol::Identity::Client).await?,
        as_identity(protocol::Identity::Workspace).await?,
        as_identity(protocol::Identity::Container).await?,
    );
    publish_all(&as_client, &config.events_exchange, opens.iter().map(|event| (event.event_type.clone(), event.to_bytes())).collect())
        .await?;
    let engine = Engine::connect(profile.clone(), patterns, config.clone()).await?;
    let serving = Serving::start(&engine);
    let started = Instant::now();
    wait_handled(&engine, THREDS as u64, Duration::from_secs(600)).await?;
    let open_rate = THREDS as f64 / started.elapsed().as_secs_f64();
    println!("  engine, backlog of session.open:   {open_rate:>9.0} events/s  ({:.0}% of raw)", 100.0 * open_rate / raw_rate);

    // Phase 2: live traffic, one workspace.materialized per thred published as fast as possible
    // while the engine runs; latency = publish → the resulting provision task.
    let mut tasks = listen(bus, &config.tasks_exchange, &["container", "persistence"]).await?;
    let answers: Vec<CloudEvent> = sessions
        .iter()
        .map(|session| CloudEvent::new("workspace.materialized", "/bench", Some(session), json!({"files": 1, "bytes": 1})))
        .collect();
    let (live_rate, latencies) = live_phase(&as_workspace, &config.events_exchange, answers, None, &mut tasks, "provision").await?;
    println!(
        "  engine, live, publisher flat out:  {live_rate:>9.0} events/s  ({:.0}% of raw); publish→task p50 {:.1} ms, p99 {:.1} ms ({} tasks; queueing included)",
        100.0 * live_rate / raw_rate,
        milliseconds(latencies.percentile(0.50)),
        milliseconds(latencies.percentile(0.99)),
        latencies.len()
    );

    // Phase 2b: latency at a sustainable load, a quarter of the backlog rate (the bench client
    // shares the machine and the process with the engine): container.ready for the
    // threds, measured to the persistence task each transition emits.
    let paced_rate = (open_rate / 4.0).max(10.0);
    let ready: Vec<CloudEvent> = sessions
        .iter()
        .take(THREDS / 2)
        .map(|session| {
            CloudEvent::new("container.ready", "/bench", Some(session), json!({"container_id": "c", "host": "127.0.0.1", "port": 1}))
        })
        .collect();
    let (_, latencies) = live_phase(&as_container, &config.events_exchange, ready, Some(paced_rate), &mut tasks, "group").await?;
    println!(
        "  engine, paced at {paced_rate:.0} events/s:      publish→task p50 {:.1} ms, p99 {:.1} ms ({} tasks)",
        milliseconds(latencies.percentile(0.50)),
        milliseconds(latencies.percentile(0.99)),
        latencies.len()
    );

    // Phase 3: timer precision for 1,000 timers due 1–3 s from now.
    let mut fired = listen(bus, &config.events_exchange, &["timer.fired"]).await?;
    let keys = Keys::new(&config.redis_prefix);
    let client = redis::Client::open(profile.services.redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut pipeline = redis::pipe();
    for index in 0..TIMERS {
        let delay_ms = 1000 + (index as i64 * 2000) / TIMERS as i64;
        let member = TimerMember::new(&Uuid::now_v7().to_string(), 1, "bench", &format!("bench-timer-{index}")).encode();
        pipeline.cmd("SET").arg(format!("{}{member}", keys.timer_prefix())).arg(1).arg("PX").arg(delay_ms).ignore();
        pipeline.zadd(keys.deadlines(), &member, now_ms + delay_ms).ignore();
    }
    let _: () = pipeline.query_async(&mut redis).await?;
    // Fired − deadline; a fire a millisecond early (the two clocks' rounding) counts as on time.
    let mut lateness = Latencies::new();
    while lateness.len() < TIMERS as u64 {
        let Ok(Some((_, body))) = tokio::time::timeout(Duration::from_secs(10), fired.recv()).await else { break };
        let received_ms = chrono::Utc::now().timestamp_millis();
        let Ok(event) = CloudEvent::parse(&body, protocol::event::DEFAULT_MAX_EVENT_BYTES) else { continue };
        if let Some(deadline) = event.data.get("deadline_ms").and_then(serde_json::Value::as_i64) {
            lateness.record(Duration::from_millis(u64::try_from(received_ms - deadline).unwrap_or(0)));
        }
    }
    println!(
        "  timers: {} of {TIMERS} fired; fired − deadline p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        lateness.len(),
        milliseconds(lateness.percentile(0.50)),
        milliseconds(lateness.percentile(0.99)),
        milliseconds(lateness.max())
    );

    let snapshot = engine.metrics().snapshot();
    println!("  engine metrics: {}", serde_json::to_string(&snapshot)?);
    serving.stop().await?;
    for sender in [as_client, as_workspace, as_container] {
        sender.close().await;
    }
    Ok(())
}
