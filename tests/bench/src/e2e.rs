//! `berth bench e2e`: open-to-ready of whole sessions (50 MB in 500 files, cold) through the engine
//! and the agents, next to what the same work costs Docker and the object store alone, measured in
//! the same run: `docker run` to the first health answer, plus a raw download of the same objects.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::stats::{milliseconds, percentile};
use protocol::{topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Notification, Outcome, Profile};
use serde_json::json;
use tokio::sync::{oneshot, watch};

use bootstrap::{bootstrap, Reset};
use bootstrap::{spawn_components, Components};

const SEQUENTIAL_SESSIONS: usize = 20;
const CONCURRENT_SESSIONS: usize = 10;
const FIXTURE_FILES: usize = 500;
const FIXTURE_BYTES: usize = 50 * 1000 * 1000;
const LARGE_FILES: usize = 5;
const BENCH_WORKSPACE: &str = "e2e-bench";
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) type Waiters = Arc<Mutex<HashMap<(String, String), oneshot::Sender<Instant>>>>;

/// `berth bench e2e`.
pub async fn bench(mut profile: Profile) -> anyhow::Result<()> {
    // Cold means cold: the sequential opens reopen one workspace, which the host's workspace
    // cache would otherwise serve (`berth bench open` measures those reopens).
    profile.workspace.cache_mib = 0;
    bootstrap(&profile, Reset::Keep).await?;
    // One user for the sequential opens, and one per concurrent open: a workspace has at most one
    // live session (a second open would join it), and each user has a live-session limit.
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let users: Vec<String> =
        std::iter::once(format!("bench-{run}")).chain((0..CONCURRENT_SESSIONS).map(|index| format!("bench-{run}-c{index}"))).collect();
    let store = workspace::open_store(&profile.services.object_store_url, &workspace::StoreSettings::from_env())?;
    let mut prefixes = Vec::new();
    for user in &users {
        let prefix = crate::fixture::object_prefix(&profile, &store, user, BENCH_WORKSPACE)?;
        eprintln!("seeding {FIXTURE_FILES} objects ({} MB) under {prefix} ...", FIXTURE_BYTES / 1_000_000);
        crate::fixture::seed(&store, &prefix, crate::fixture::layout(&profile, FIXTURE_FILES, LARGE_FILES, FIXTURE_BYTES)).await?;
        prefixes.push(prefix);
    }

    let (stop, stopping) = watch::channel(false);
    let mut components = spawn_components(&profile, Components::Headless, &stopping);
    // Notifications are read as the admin; sessions are opened and closed as a client would.
    let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "berth-bench-e2e")).await?;
    let client =
        Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Client, "berth-bench-e2e-client")?).await?;
    let waiters: Waiters = Arc::default();
    listen_for_states(&bus, &users, waiters.clone(), stopping.clone()).await?;

    let outcome = measure(&profile, &client, &store, &prefixes[0], &users, &waiters).await;
    let _ = stop.send(true);
    while components.join_next().await.is_some() {}
    for prefix in &prefixes {
        crate::fixture::delete_prefix(&store, prefix).await;
    }
    bus.close().await;
    client.close().await;
    outcome
}

async fn measure(
    profile: &Profile,
    bus: &Bus,
    store: &workspace::OpenedStore,
    prefix: &object_store::path::Path,
    users: &[String],
    waiters: &Waiters,
) -> anyhow::Result<()> {
    let user = users[0].as_str();
    // Baselines, measured in this run on this machine.
    let mut docker_times = Vec::new();
    let mut download_times = Vec::new();
    for _ in 0..5 {
        docker_times.push(docker_run_to_health(profile).await?);
        download_times.push(crate::fixture::raw_download(store, prefix, profile.workspace.parallelism).await?.0);
    }
    let baseline = percentile(&docker_times, 0.5) + percentile(&download_times, 0.5);

    // Sequential opens of one workspace: each session is closed before the next open, which
    // would otherwise join it.
    let mut sequential = Vec::new();
    for _ in 0..SEQUENTIAL_SESSIONS {
        let (session, elapsed) = open_until_running(bus, user, waiters).await?;
        close_until_closed(bus, &session, user, waiters).await?;
        sequential.push(elapsed);
    }
    let concurrent: Vec<(String, Duration)> =
        futures::future::try_join_all(users[1..].iter().map(|concurrent_user| open_until_running(bus, concurrent_user, waiters))).await?;
    let sessions: Vec<(String, &str)> =
        concurrent.iter().zip(&users[1..]).map(|((session, _), concurrent_user)| (session.clone(), concurrent_user.as_str())).collect();
    let concurrent: Vec<Duration> = concurrent.into_iter().map(|(_, elapsed)| elapsed).collect();

    println!("berth bench e2e: open-to-ready, {FIXTURE_FILES} files / {} MB, cold", FIXTURE_BYTES / 1_000_000);
    println!(
        "  baseline  docker run→health p50 {:>8.1} ms + raw download p50 {:>8.1} ms = {:>8.1} ms",
        milliseconds(percentile(&docker_times, 0.5)),
        milliseconds(percentile(&download_times, 0.5)),
        milliseconds(baseline)
    );
    for (label, samples) in [("sequential x20", &sequential), ("concurrent x10", &concurrent)] {
        let p50 = percentile(samples, 0.5);
        println!(
            "  {label}  p50 {:>8.1} ms  p95 {:>8.1} ms  (p50 = {:.2}× the baseline)",
            milliseconds(p50),
            milliseconds(percentile(samples, 0.95)),
            p50.as_secs_f64() / baseline.as_secs_f64()
        );
    }

    eprintln!("closing {} sessions ...", sessions.len());
    let closes = sessions.iter().map(|(session, session_user)| close_until_closed(bus, session, session_user, waiters));
    futures::future::try_join_all(closes).await?;
    Ok(())
}

async fn close_until_closed(bus: &Bus, session: &str, user: &str, waiters: &Waiters) -> anyhow::Result<()> {
    let closed = expect_state(waiters, session, "closed");
    publish(bus, "session.close", session, user, json!({"reason": "bench"})).await?;
    tokio::time::timeout(STEP_TIMEOUT, closed).await??;
    Ok(())
}

/// Opens one session and waits until it runs; returns its id and the open-to-ready time.
async fn open_until_running(bus: &Bus, user: &str, waiters: &Waiters) -> anyhow::Result<(String, Duration)> {
    let session = uuid::Uuid::now_v7().to_string();
    let running = expect_state(waiters, &session, "running");
    let started = Instant::now();
    publish(bus, "session.open", &session, user, json!({"user": user, "workspace": BENCH_WORKSPACE})).await?;
    let ready_at = tokio::time::timeout(STEP_TIMEOUT, running)
        .await
        .map_err(|_| anyhow::anyhow!("session {session} not running within {STEP_TIMEOUT:?}"))??;
    Ok((session, ready_at - started))
}

pub(crate) fn expect_state(waiters: &Waiters, session: &str, state: &str) -> oneshot::Receiver<Instant> {
    let (sender, receiver) = oneshot::channel();
    lock(waiters).insert((session.to_owned(), state.to_owned()), sender);
    receiver
}

pub(crate) async fn publish(bus: &Bus, event_type: &str, session: &str, user: &str, data: serde_json::Value) -> anyhow::Result<()> {
    let event = CloudEvent::new(event_type, "/berth/bench", Some(session), data).with_extension("userid", user);
    bus.publish_event(&event).await?;
    Ok(())
}

/// Routes the bench user's notifications to whoever waits for a session's state; a `failed`
/// state fails the waiter's whole run, since the measurement would be meaningless.
pub(crate) async fn listen_for_states(
    bus: &Bus,
    users: &[String],
    waiters: Waiters,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let keys: Vec<String> = users.iter().map(|user| topology::user_routing_key(user)).collect();
    let queue = bus.declare_private_queue(topology::NOTIFY_EXCHANGE, &keys).await?;
    let consumer = bus.clone();
    tokio::spawn(async move {
        let handler = move |incoming: protocol::Incoming| {
            let waiters = waiters.clone();
            async move {
                let arrived = Instant::now();
                if let Ok(notification) = Notification::decode(&incoming.body) {
                    let Notification { session, state, detail, .. } = notification;
                    let session = session.unwrap_or_default();
                    if state == "failed" {
                        eprintln!("session {session} failed: {detail}");
                    }
                    if let Some(waiter) = lock(&waiters).remove(&(session, state)) {
                        let _ = waiter.send(arrived);
                    }
                }
                Outcome::Ack
            }
        };
        let mut stopping = stopping;
        let stopped = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        let _ = consumer.consume(ConsumeSpec::new(&queue, 100), handler, stopped).await;
    });
    Ok(())
}

/// `docker run` of the profile's image with its port published, until the health path answers.
pub(crate) async fn docker_run_to_health(profile: &Profile) -> anyhow::Result<Duration> {
    let container = &profile.container;
    let name = format!("berth-bench-baseline-{}", uuid::Uuid::new_v4().simple());
    // However this ends: answered, failed, or dropped mid-way because another baseline of the
    // same round failed first (the round's join then drops the rest).
    let _removal = RemovedOnDrop(name.clone());
    let started = Instant::now();
    let publish = format!("127.0.0.1::{}", container.service_port);
    let run = Command::new("docker").args(["run", "-d", "--rm", "--name", &name, "-p", &publish, &container.image]).output()?;
    anyhow::ensure!(run.status.success(), "docker run failed: {}", String::from_utf8_lossy(&run.stderr));
    let port_output = Command::new("docker").args(["port", &name, &container.service_port.to_string()]).output()?;
    let mapping = String::from_utf8_lossy(&port_output.stdout).lines().next().unwrap_or_default().to_owned();
    let port: u16 = mapping.rsplit(':').next().unwrap_or_default().trim().parse()?;
    let path = match &container.health {
        protocol::profile::HealthCheck::Http(path) => path.clone(),
        _ => "/".to_owned(),
    };
    // As long as the session pattern gives a provisioning (3 × ready_timeout + 30 s): fifty
    // `docker run`s at once on a small machine take longer than one container's ready timeout,
    // and the opens they are compared with get that long too.
    let deadline = Instant::now() + Duration::from_secs(container.ready_timeout_secs * 3 + 30);
    let elapsed = loop {
        // The same readiness rule the container agent applies.
        if container::probe::http_ready("127.0.0.1", port, &path).await {
            break started.elapsed();
        }
        if Instant::now() > deadline {
            anyhow::bail!("baseline container never answered on {path}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Ok(elapsed)
}

/// A baseline container, force-removed when its measurement is over or dropped.
struct RemovedOnDrop(String);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn lock(waiters: &Waiters) -> std::sync::MutexGuard<'_, HashMap<(String, String), oneshot::Sender<Instant>>> {
    waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
