//! `berth bench proxy`: the session agent's reverse proxy next to the container's own port, in one
//! run on one real session (engine, agents, Docker): requests per second and p50/p99 latency
//! through `/s/{session}/` and direct (the published port, and the container's own address for
//! scale), with one connection and with several: the same client, concurrency and answer on
//! every path, the paths taken in turns in short slices so the machine's load weighs on all
//! alike; then wake on request: the first byte of a request to a paused session, next to the same
//! request to a running one.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::loadgen::{self, LoadResult, Target};
use crate::stats::{milliseconds, percentile};
use protocol::profile::HealthCheck;
use protocol::{Bus, BusConfig, CloudEvent, Profile};
use serde_json::json;
use tokio::sync::watch;

use bootstrap::{bootstrap, Reset};
use bootstrap::{spawn_components, Components};

const BENCH_IMAGE: &str = "berth-test/proxy-app:latest";
const LOAD_DURATION: Duration = Duration::from_secs(5);
/// Each path's time is cut into this many slices, taken in turns (ABBA), so a change in the
/// machine's load during a row weighs on every path alike.
const SLICES: u32 = 10;
/// Issue 14's throughput goal, through the proxy against direct.
const THROUGHPUT_GOAL_PERCENT: f64 = 80.0;
const CONCURRENT_CONNECTIONS: usize = 16;
const WAKE_ROUNDS: usize = 20;
const PAUSE_TIMEOUT: Duration = Duration::from_secs(90);
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
    let outcome = measure(&bus, &session, agent_address, &token, profile.container.service_port).await;
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

async fn measure(bus: &Bus, session: &str, agent: std::net::SocketAddr, token: &str, service_port: u16) -> anyhow::Result<()> {
    // A workspace of its own: an open of a workspace with a live session would join that one.
    let workspace = format!("bench-proxy-{}", &session[session.len() - 8..]);
    publish(bus, "session.open", session, json!({"user": "bench-proxy", "workspace": workspace})).await?;
    let proxied =
        Target { address: agent, path: format!("/s/{session}/"), headers: vec![("authorization".to_owned(), format!("Bearer {token}"))] };
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
    // The same answer on every path, from the same client at the same concurrency: the app
    // echoes the request's headers, so direct requests carry the ones the proxy adds (same
    // names, same lengths) and the echo is as long on every path.
    let added = vec![
        ("x-berth-user".to_owned(), "bench-proxy".to_owned()),
        ("x-berth-session".to_owned(), session.to_owned()),
        ("x-forwarded-host".to_owned(), agent.to_string()),
        ("x-forwarded-proto".to_owned(), "http".to_owned()),
        ("x-forwarded-prefix".to_owned(), format!("/s/{session}")),
    ];
    let direct = Target { address: published_address(&container)?, path: "/".to_owned(), headers: added.clone() };
    // The container's own address on the session network: the published port minus Docker's
    // port proxy, for scale (a host-side hop that the proxy's path crosses too).
    let network = network_address(&container, service_port).map(|address| Target { address, path: "/".to_owned(), headers: added });
    // Warm every path (connection pools, caches) before measuring.
    loadgen::run(&direct, 2, Duration::from_millis(500)).await?;
    loadgen::run(&proxied, 2, Duration::from_millis(500)).await?;
    if let Some(network) = &network {
        loadgen::run(network, 2, Duration::from_millis(500)).await?;
    }

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
    println!(
        "berth bench proxy: GET / of the test app (a JSON echo of the request, as long on every path), keep-alive, {} s per path, interleaved in {SLICES} slices",
        LOAD_DURATION.as_secs()
    );
    println!("  {:<44} {:>10} {:>9} {:>9} {:>8}", "", "req/s", "p50 ms", "p99 ms", "errors");
    for connections in [1, CONCURRENT_CONNECTIONS] {
        let mut targets = vec![("direct to the container's published port", &direct), ("through the proxy", &proxied)];
        if let Some(network) = &network {
            targets.push(("direct to the container's own address", network));
        }
        let results = interleaved(&targets, connections).await?;
        for ((label, _), result) in targets.iter().zip(&results) {
            print_row(&format!("{label}, {connections} conn"), result);
        }
        let (direct_result, proxied_result) = (&results[0], &results[1]);
        let share = 100.0 * proxied_result.requests_per_second() / direct_result.requests_per_second();
        println!(
            "  -> proxy throughput {share:.0}% of direct (goal: at least {THROUGHPUT_GOAL_PERCENT}%: {}), p50 added {:.3} ms (goal: under 1 ms)",
            if share >= THROUGHPUT_GOAL_PERCENT { "met" } else { "not met" },
            milliseconds(percentile(&proxied_result.latencies, 0.5)) - milliseconds(percentile(&direct_result.latencies, 0.5))
        );
        if let Some(network_result) = results.get(2) {
            println!(
                "     ({:.0}% of direct to the container's own address)",
                100.0 * proxied_result.requests_per_second() / network_result.requests_per_second()
            );
        }
    }

    keeper.abort();

    // Wake on request: a fresh connection's first byte, paused vs running.
    let mut running_first_bytes = Vec::new();
    for _ in 0..WAKE_ROUNDS {
        running_first_bytes.push(loadgen::first_byte(&proxied).await?.1);
    }
    let mut wake_first_bytes = Vec::new();
    for round in 0..WAKE_ROUNDS {
        // The idle rule samples the container's CPU too, which a loaded machine can hold up.
        let paused_by = Instant::now() + PAUSE_TIMEOUT;
        while docker_state(&container) != "paused" {
            anyhow::ensure!(Instant::now() < paused_by, "round {round}: the session did not pause within {PAUSE_TIMEOUT:?}");
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

/// Each target's load for [`LOAD_DURATION`] in all, in [`SLICES`] slices taken in turns
/// (forwards, then backwards), merged per target.
async fn interleaved(targets: &[(&str, &Target)], connections: usize) -> anyhow::Result<Vec<LoadResult>> {
    let slice = LOAD_DURATION / SLICES;
    let mut merged: Vec<LoadResult> =
        targets.iter().map(|_| LoadResult { elapsed: Duration::ZERO, latencies: Vec::new(), errors: 0, first_error: None }).collect();
    for round in 0..SLICES {
        let order: Vec<usize> = if round % 2 == 0 { (0..targets.len()).collect() } else { (0..targets.len()).rev().collect() };
        for index in order {
            let result = loadgen::run(targets[index].1, connections, slice).await?;
            let total = &mut merged[index];
            total.elapsed += result.elapsed;
            total.latencies.extend(result.latencies);
            total.errors += result.errors;
            total.first_error = total.first_error.take().or(result.first_error);
        }
    }
    Ok(merged)
}

fn print_row(label: &str, result: &LoadResult) {
    println!(
        "  {label:<44} {:>10.0} {:>9.3} {:>9.3} {:>8}",
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

/// The container's address on its first network with the service port, if Docker says.
fn network_address(container: &str, service_port: u16) -> Option<std::net::SocketAddr> {
    let output = Command::new("docker")
        .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let ip: std::net::IpAddr = text.split_whitespace().next()?.parse().ok()?;
    Some(std::net::SocketAddr::new(ip, service_port))
}

/// The container's published service port, as the container agent reports it.
fn published_address(container: &str) -> anyhow::Result<std::net::SocketAddr> {
    let output = Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{range $port, $bindings := .NetworkSettings.Ports}}{{range $bindings}}{{.HostIp}}:{{.HostPort}} {{end}}{{end}}",
            container,
        ])
        .output()?;
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
