//! `berth bench proxy`: the session agent's reverse proxy next to the container's own port, in one
//! run on one real session (engine, agents, Docker): requests per second and p50/p99 latency
//! through `/s/{session}/` and direct, with one connection and with several; then wake on request:
//! the first byte of a request to a paused session, next to the same request to a running one.

use std::process::Command;
use std::time::{Duration, Instant};

use protocol::profile::HealthCheck;
use protocol::stats::{milliseconds, percentile};
use protocol::{Bus, BusConfig, CloudEvent, Profile};
use serde_json::json;
use session::loadgen::{self, LoadResult, Target};
use tokio::sync::watch;

use crate::dev::{spawn_components, Components};
use crate::{bootstrap, Reset};

const BENCH_IMAGE: &str = "berth-test/proxy-app:latest";
const LOAD_DURATION: Duration = Duration::from_secs(5);
const CONCURRENT_CONNECTIONS: usize = 16;
const WAKE_ROUNDS: usize = 20;
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// `berth bench proxy`.
pub async fn bench(mut profile: Profile) -> anyhow::Result<()> {
    // The test app serves at `/`; a short idle timeout makes the paused periods of the wake rounds.
    profile.container.image = BENCH_IMAGE.to_owned();
    profile.container.health = HealthCheck::Http("/".to_owned());
    profile.timers.idle_after_secs = 2;
    profile.timers.stop_after_idle_secs = 3600;
    profile.timers.autosave_secs = 0;
    profile.session.activity_debounce_secs = 1;
    profile.session.proxy.strip_prefix = true;
    profile.session.proxy.background_paths.clear();
    bootstrap(&profile, Reset::Keep).await?;

    let (stop, stopping) = watch::channel(false);
    let mut components = spawn_components(&profile, Components::Headless, &stopping);
    // The session agent this benchmark starts is the deployment's door: it runs as the session identity.
    let bus = Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Session, "berth-bench-proxy")?).await?;
    let secret = format!("bench-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let config = session::SessionConfig::with_key(&profile, &session::KeyMaterial::inline(&secret))?;
    let token = config.authority.mint("bench-proxy", &[], Duration::from_secs(3600))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let agent_address = listener.local_addr()?;
    let mut agent_stopping = stopping.clone();
    let (_handle, running) = session::start(config, bus.clone(), listener, async move {
        let _ = agent_stopping.wait_for(|stop| *stop).await;
    })
    .await?;
    let agent = tokio::spawn(running);

    let session = uuid::Uuid::now_v7().to_string();
    let outcome = measure(&bus, &session, agent_address, &token).await;
    let _ = publish(&bus, "session.close", &session, json!({"reason": "bench"})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(true);
    let _ = agent.await;
    while components.join_next().await.is_some() {}
    bus.close().await;
    outcome
}

async fn publish(bus: &Bus, event_type: &str, session: &str, data: serde_json::Value) -> anyhow::Result<()> {
    let event = CloudEvent::new(event_type, "/berth/bench", Some(session), data).with_extension("userid", "bench-proxy");
    bus.publish_event(&event).await?;
    Ok(())
}

async fn measure(bus: &Bus, session: &str, agent: std::net::SocketAddr, token: &str) -> anyhow::Result<()> {
    // A workspace of its own: an open of a workspace with a live session would join that one.
    let workspace = format!("bench-proxy-{}", &session[session.len() - 8..]);
    publish(bus, "session.open", session, json!({"user": "bench-proxy", "workspace": workspace})).await?;
    let proxied = Target { address: agent, path: format!("/s/{session}/"), headers: vec![("authorization".to_owned(), format!("Bearer {token}"))] };
    // The proxy holds a request until the session runs; until the store has its record, 404.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Ok((200, _)) = loadgen::first_byte(&proxied).await {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "session {session} never answered through the proxy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let container = container_of(session)?;
    let direct = Target { address: published_address(&container)?, path: "/".to_owned(), headers: Vec::new() };
    // Warm both paths (connection pools, caches) before measuring.
    loadgen::run(&direct, 2, Duration::from_millis(500)).await?;
    loadgen::run(&proxied, 2, Duration::from_millis(500)).await?;

    // Direct requests are no activity: a light proxied request twice a second keeps the session
    // from pausing under the direct rows.
    let keeper = {
        let proxied = proxied.clone();
        tokio::spawn(async move {
            loop {
                let _ = loadgen::first_byte(&proxied).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    println!("berth bench proxy: GET of the test app's / (a small JSON echo), keep-alive, {} s per row", LOAD_DURATION.as_secs());
    println!("  {:<34} {:>10} {:>9} {:>9} {:>8}", "", "req/s", "p50 ms", "p99 ms", "errors");
    for connections in [1, CONCURRENT_CONNECTIONS] {
        let direct_result = loadgen::run(&direct, connections, LOAD_DURATION).await?;
        let proxied_result = loadgen::run(&proxied, connections, LOAD_DURATION).await?;
        print_row(&format!("direct to the container, {connections} conn"), &direct_result);
        print_row(&format!("through the proxy, {connections} conn"), &proxied_result);
        println!(
            "  -> proxy throughput {:.0}% of direct, p50 added {:.3} ms",
            100.0 * proxied_result.requests_per_second() / direct_result.requests_per_second(),
            milliseconds(percentile(&proxied_result.latencies, 0.5)) - milliseconds(percentile(&direct_result.latencies, 0.5))
        );
    }

    keeper.abort();

    // Wake on request: a fresh connection's first byte, paused vs running.
    let mut running_first_bytes = Vec::new();
    for _ in 0..WAKE_ROUNDS {
        running_first_bytes.push(loadgen::first_byte(&proxied).await?.1);
    }
    let mut wake_first_bytes = Vec::new();
    for round in 0..WAKE_ROUNDS {
        let paused_by = Instant::now() + Duration::from_secs(30);
        while docker_state(&container) != "paused" {
            anyhow::ensure!(Instant::now() < paused_by, "round {round}: the session did not pause");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A paused period, then the request.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, first_byte) = loadgen::first_byte(&proxied).await?;
        anyhow::ensure!(status == 200, "round {round}: the woken session answered {status}");
        wake_first_bytes.push(first_byte);
    }
    let running_p50 = percentile(&running_first_bytes, 0.5);
    println!("wake on request: first byte on a fresh connection, {WAKE_ROUNDS} rounds");
    println!(
        "  running session  p50 {:>8.2} ms  p99 {:>8.2} ms",
        milliseconds(running_p50),
        milliseconds(percentile(&running_first_bytes, 0.99))
    );
    println!(
        "  paused session   p50 {:>8.2} ms  p99 {:>8.2} ms  (the wake adds {:.2} ms at p50)",
        milliseconds(percentile(&wake_first_bytes, 0.5)),
        milliseconds(percentile(&wake_first_bytes, 0.99)),
        milliseconds(percentile(&wake_first_bytes, 0.5)) - milliseconds(running_p50)
    );
    Ok(())
}

fn print_row(label: &str, result: &LoadResult) {
    println!(
        "  {label:<34} {:>10.0} {:>9.3} {:>9.3} {:>8}",
        result.requests_per_second(),
        milliseconds(percentile(&result.latencies, 0.5)),
        milliseconds(percentile(&result.latencies, 0.99)),
        result.errors
    );
    if let Some(first_error) = &result.first_error {
        println!("    first error: {}", first_error.chars().take(200).collect::<String>());
    }
}

fn container_of(session: &str) -> anyhow::Result<String> {
    let label = format!("label=berth.session={session}");
    let output = Command::new("docker").args(["ps", "-q", "--filter", &label]).output()?;
    let id = String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or_default().trim().to_owned();
    anyhow::ensure!(!id.is_empty(), "no container for session {session}");
    Ok(id)
}

/// The container's published service port, as the container agent reports it.
fn published_address(container: &str) -> anyhow::Result<std::net::SocketAddr> {
    let output = Command::new("docker").args(["inspect", "-f", "{{range $port, $bindings := .NetworkSettings.Ports}}{{range $bindings}}{{.HostIp}}:{{.HostPort}} {{end}}{{end}}", container]).output()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let first = text.split_whitespace().next().unwrap_or_default();
    Ok(first.parse()?)
}

fn docker_state(container: &str) -> String {
    Command::new("docker")
        .args(["inspect", "-f", "{{.State.Status}}", container])
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}
