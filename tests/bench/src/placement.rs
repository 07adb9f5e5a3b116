//! `berth bench placement`: how long placing a session takes, and what hosts cost the engine.
//!
//! 1. The pure decision (`placement::place`) over 3 and over 100 hosts.
//! 2. The whole decision a real open makes (the hosts' reports, what the engine placed on each and
//!    the decision), against an isolated engine whose Redis holds 3 host reports.
//! 3. The engine's backlog rate of `session.open` with no host reporting (placed on no host, as
//!    one machine runs) next to the same with 3 hosts reporting, in the same run: the baseline.
//!
//! Runs on isolated names and cleans up after itself.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use protocol::host::{HostCapacity, HostReport};
use protocol::{AgentKind, Bus, BusConfig, CloudEvent, Profile};
use serde_json::json;
use uuid::Uuid;

use engine::admission::Committed;
use engine::placement::{self, HostView};
use engine::service::Keys;
use engine::{Engine, EngineConfig};

use crate::engine_rate::{without_limits, IsolatedEngine};
use engine::service::Serving;

const OPENS: usize = 2_000;
const DECISIONS: usize = 2_000;

/// `berth bench placement`.
pub async fn bench(mut profile: Profile) -> anyhow::Result<()> {
    // Room for every session on every host: this measures placement, not limits.
    without_limits(&mut profile);
    println!("berth bench placement");
    pure_decisions();
    let patterns = engine::load_profile_patterns(&profile)?;
    let tag = format!("bench-placement-{}", Uuid::now_v7().simple());
    let world = IsolatedEngine::declare(&profile, &tag, "berth-bench-placement").await?;
    // Opens come from the client identity, the only one (with the session agent's) that may send
    // them.
    protocol::broker_admin::ensure_identities(&profile.services.amqp_url).await?;
    let client =
        Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Client, "berth-bench-placement-client")?)
            .await?;
    let measured = measure(&profile, patterns, &world.config, &client).await;
    client.close().await;
    world.close(&profile).await?;
    measured
}

fn hosts(count: usize) -> Vec<HostView> {
    (0..count)
        .map(|index| HostView {
            id: format!("h{index}"),
            budget_memory_mib: 32 * 1024,
            budget_cpu_millis: 16_000,
            committed: Committed { memory_mib: (index as u64 * 977) % (24 * 1024), cpu_millis: (index as u64 * 311) % 12_000 },
            sessions: index as u64 % 7,
            has_workspace: index == count / 2,
        })
        .collect()
}

fn pure_decisions() {
    let need = Committed { memory_mib: 4096, cpu_millis: 2000 };
    for count in [3, 100] {
        let views = hosts(count);
        let rounds = 200_000 / count.max(1);
        let began = Instant::now();
        let mut picked = 0usize;
        for _ in 0..rounds {
            picked += usize::from(placement::place(need, std::hint::black_box(&views)).is_some());
        }
        let per = began.elapsed().as_secs_f64() / rounds as f64 * 1e9;
        println!("  pure decision over {count:>3} hosts:            {per:>9.0} ns  ({picked} of {rounds} placed)");
    }
}

/// Writes `count` container and workspace host reports straight into the engine's Redis, as its
/// handler of `container.host_report` would, kept for 10 minutes.
async fn seed_hosts(redis: &mut redis::aio::MultiplexedConnection, keys: &Keys, profile: &Profile, count: usize) -> anyhow::Result<()> {
    let mut pipeline = redis::pipe();
    for index in 0..count {
        let host = format!("bench-h{index}");
        let mut capacity = HostCapacity::of(profile, 0);
        capacity.memory_mib = u64::MAX / 4;
        capacity.cpu_millis = u64::MAX / 4;
        let container = HostReport {
            host: host.clone(),
            deployment: profile.deployment(),
            agent: AgentKind::Container,
            interval_secs: 5,
            capacity: Some(capacity),
            workspaces: None,
        };
        let workspace = HostReport {
            host: host.clone(),
            deployment: profile.deployment(),
            agent: AgentKind::Workspace,
            interval_secs: 5,
            capacity: None,
            workspaces: Some((0..50).map(|workspace| format!("bench{index}/w{workspace}")).collect()),
        };
        for (agent, report) in [(AgentKind::Container, &container), (AgentKind::Workspace, &workspace)] {
            pipeline.cmd("SET").arg(keys.host_report(&host, agent)).arg(serde_json::to_string(report)?).arg("PX").arg(600_000).ignore();
        }
        pipeline.zadd(keys.hosts(), &host, chrono::Utc::now().timestamp_millis()).ignore();
    }
    let _: () = pipeline.query_async(redis).await?;
    Ok(())
}

async fn backlog_rate(engine: &Engine, bus: &Bus, config: &EngineConfig, label: &str) -> anyhow::Result<f64> {
    let opens: Vec<CloudEvent> = (0..OPENS)
        .map(|index| {
            let session = format!("bench-{label}-{index}-{}", Uuid::now_v7().simple());
            CloudEvent::new("session.open", "/bench", Some(&session), json!({"user": format!("{label}{index}"), "workspace": "w"}))
                .with_extension("userid", format!("{label}{index}"))
        })
        .collect();
    let handled_before = engine.metrics().events_handled.load(Ordering::Relaxed);
    let began = Instant::now();
    let publishes = futures::stream::iter(opens.into_iter().map(|event| {
        let bus = bus.clone();
        let exchange = config.events_exchange.clone();
        async move {
            let properties = protocol::Properties::cloud_event();
            bus.publish(&exchange, &event.event_type, &event.to_bytes(), properties).await
        }
    }));
    let published: Vec<_> = publishes.buffered(64).collect().await;
    for result in published {
        result?;
    }
    crate::engine_rate::wait_handled(engine, handled_before + OPENS as u64, Duration::from_secs(600)).await?;
    Ok(OPENS as f64 / began.elapsed().as_secs_f64())
}

async fn measure(profile: &Profile, patterns: Vec<engine::Pattern>, config: &EngineConfig, bus: &Bus) -> anyhow::Result<()> {
    let engine = Engine::connect(profile.clone(), patterns, config.clone()).await?;
    let serving = Serving::start(&engine);
    let client = redis::Client::open(profile.services.redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let keys = Keys::new(&config.redis_prefix);

    // The tasks' queues, shared and per host, as in a deployment: a task for a host goes out
    // `mandatory` and would fail its event where no queue takes it. One queue for both phases.
    let mut task_keys = vec!["workspace".to_owned(), "container".to_owned()];
    for index in 0..3 {
        task_keys.extend(["workspace", "container"].map(|agent| format!("{agent}.bench-h{index}")));
    }
    let tasks_queue = bus.declare_private_queue(&config.tasks_exchange, &task_keys).await?;

    // The baseline first: no host reports, every session placed on no host.
    let unplaced = backlog_rate(&engine, bus, config, "unplaced").await?;
    seed_hosts(&mut redis, &keys, profile, 3).await?;

    let mut decisions = Vec::with_capacity(DECISIONS);
    let mut cached_hits = 0;
    for index in 0..DECISIONS {
        let user = format!("bench{}", index % 3);
        let began = Instant::now();
        let host = engine.placement_decision(&user, &format!("w{}", index % 100)).await?;
        decisions.push(began.elapsed());
        // bench-hN holds w0..w49 of benchN (and only those): a cached copy must win.
        if index % 100 < 50 {
            cached_hits += usize::from(host.as_deref() == Some(&format!("bench-h{}", index % 3)));
        }
    }
    let at = |fraction: f64| crate::stats::percentile(&decisions, fraction).as_secs_f64() * 1e6;
    println!(
        "  whole decision, 3 hosts in Redis:         p50 {:.0} µs, p99 {:.0} µs ({DECISIONS} decisions; {cached_hits} of {} with a cached copy went to its host)",
        at(0.50),
        at(0.99),
        DECISIONS / 2
    );
    anyhow::ensure!(cached_hits == DECISIONS / 2, "placement did not prefer the host holding the workspace");

    let placed = backlog_rate(&engine, bus, config, "placed").await?;
    println!("  engine, backlog of session.open, no host:      {unplaced:>7.0} events/s (baseline)");
    println!(
        "  engine, backlog of session.open, 3 hosts:      {placed:>7.0} events/s ({:.0}% of the baseline: each open is placed)",
        100.0 * placed / unplaced
    );
    serving.stop().await?;
    bus.delete_queue(&tasks_queue).await?;
    Ok(())
}
