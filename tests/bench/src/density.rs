//! `berth bench density`: how many sessions of the profile's image this host holds in each idle
//! tier — paused (memory held, wake in milliseconds) and stopped with the directory kept (dormant:
//! memory freed) — measured by opening sessions through the engine and the agents, in batches, up
//! to a bound (`--max-sessions`, 200 by default) or until the host's available memory falls below
//! a safe share of its total. Reported per tier: sessions held, host memory per session (the drop
//! of `MemAvailable`, which counts each container's shim and kernel memory too), the containers'
//! own memory (Docker's figure), disk per session, and an extrapolation to a 24 GiB host, stated
//! as such (not measured).

use std::process::Command;
use std::time::{Duration, Instant};

use protocol::{Bus, BusConfig, Profile};
use serde_json::json;
use tokio::sync::watch;

use crate::e2e::{expect_state, listen_for_states, publish, Waiters};
use bootstrap::{bootstrap, Reset};
use bootstrap::{spawn_components, Components};

/// Sessions opened at once.
const BATCH: usize = 10;
/// Opening stops when `MemAvailable` falls below this share of `MemTotal`: the machine is shared.
const SAFE_AVAILABLE_SHARE: f64 = 0.3;
const EXTRAPOLATED_HOST_GIB: f64 = 24.0;
/// Less host memory per session than this is below what `MemAvailable` resolves over a run on a
/// machine other work shares: reported as not measurable instead of extrapolated.
const MEASURABLE_BYTES_PER_SESSION: f64 = 64.0 * 1024.0;
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// What `berth bench density` runs.
#[derive(Debug, Clone)]
pub struct DensitySettings {
    pub max_sessions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Paused,
    Dormant,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Tier::Paused => "paused",
            Tier::Dormant => "stopped with disk (dormant)",
        }
    }

    /// The session state a session of this tier reaches.
    fn state(self) -> &'static str {
        match self {
            Tier::Paused => "idle",
            Tier::Dormant => "dormant",
        }
    }
}

struct Measured {
    tier: Tier,
    held: usize,
    stopped_because: String,
    host_bytes_per_session: f64,
    container_bytes_per_session: f64,
    disk_bytes_per_session: f64,
    seconds: f64,
}

/// `berth bench density`.
pub async fn bench(profile: Profile, settings: DensitySettings) -> anyhow::Result<()> {
    anyhow::ensure!(settings.max_sessions > 0, "--max-sessions must be positive");
    let mut results = Vec::new();
    for tier in [Tier::Paused, Tier::Dormant] {
        results.push(measure_tier(&profile, tier, settings.max_sessions).await?);
    }
    print_results(&profile, &results, settings.max_sessions);
    Ok(())
}

/// The profile for one tier: sessions go idle soon after they run and stay in `tier` until the
/// bench closes them; the limits are lifted so the bound is this host, not admission.
fn tier_profile(profile: &Profile, tier: Tier, max_sessions: usize) -> Profile {
    let mut profile = profile.clone();
    let timers = &mut profile.timers;
    timers.idle_after_secs = 3;
    timers.idle_warning_secs = 0;
    timers.stop_after_idle_secs = 7200;
    timers.max_age_secs = 14_400;
    timers.autosave_secs = 0;
    timers.dormant_after_idle_secs = match tier {
        Tier::Paused => 0,
        Tier::Dormant => 1,
    };
    let limits = &mut profile.limits;
    limits.max_sessions_per_user = u32::try_from(max_sessions + BATCH).unwrap_or(u32::MAX);
    limits.max_opens_per_user_per_minute = 100_000;
    // Admission would stop at the host's size; the bench measures what the host really holds.
    limits.host_memory_mib = (max_sessions as u64 + 1) * profile.container.memory_mib * 2;
    limits.host_cpus = (max_sessions as f64 + 1.0) * profile.container.cpus * 2.0;
    limits.daily_budget = 0.0;
    limits.monthly_budget = 0.0;
    profile
}

async fn measure_tier(base: &Profile, tier: Tier, max_sessions: usize) -> anyhow::Result<Measured> {
    let profile = tier_profile(base, tier, max_sessions);
    bootstrap(&profile, Reset::Keep).await?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let user = format!("density-{run}");
    let (stop, stopping) = watch::channel(false);
    let mut components = spawn_components(&profile, Components::Headless, &stopping);
    let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "berth-bench-density")).await?;
    let client =
        Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Client, "berth-bench-density-client")?)
            .await?;
    let waiters = Waiters::default();
    listen_for_states(&bus, std::slice::from_ref(&user), waiters.clone(), stopping.clone()).await?;
    // Settle, then the host's memory before any session.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (total_bytes, available_before) = meminfo()?;
    let started = Instant::now();
    let mut sessions: Vec<String> = Vec::new();
    let stopped_because = loop {
        if sessions.len() >= max_sessions {
            break format!("reached the bound of {max_sessions}");
        }
        let (_, available) = meminfo()?;
        if (available as f64) < total_bytes as f64 * SAFE_AVAILABLE_SHARE {
            break format!("available memory below {:.0} % of the host's", SAFE_AVAILABLE_SHARE * 100.0);
        }
        let batch = BATCH.min(max_sessions - sessions.len());
        let first = sessions.len();
        let opens = (first..first + batch).map(|index| open_into_tier(&client, &waiters, &user, index, tier));
        let opened = futures::future::join_all(opens).await;
        let mut failed = None;
        for outcome in opened {
            match outcome {
                Ok(session) => sessions.push(session),
                Err(error) => failed = Some(error.to_string()),
            }
        }
        eprintln!("{}: {} sessions held", tier.label(), sessions.len());
        if let Some(error) = failed {
            break format!("an open did not reach {}: {error}", tier.state());
        }
    };
    // Let the last containers settle into their tier before measuring: a dormant session's
    // notification comes with its stop task, before the container has stopped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if tier == Tier::Dormant {
        let deadline = Instant::now() + Duration::from_secs(120);
        while running_containers(&profile.deployment()) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let (_, available_after) = meminfo()?;
    let held = sessions.len().max(1) as f64;
    let container_bytes = deployment_container_memory(&profile.deployment());
    let disk_bytes = deployment_disk(&profile);
    let measured = Measured {
        tier,
        held: sessions.len(),
        stopped_because,
        host_bytes_per_session: available_before.saturating_sub(available_after) as f64 / held,
        container_bytes_per_session: container_bytes as f64 / held,
        disk_bytes_per_session: disk_bytes as f64 / held,
        seconds: started.elapsed().as_secs_f64(),
    };
    eprintln!("closing {} sessions ...", sessions.len());
    for chunk in sessions.chunks(20) {
        let closes = chunk.iter().map(|session| close_until_closed(&client, &waiters, session, &user));
        for outcome in futures::future::join_all(closes).await {
            if let Err(error) = outcome {
                eprintln!("close: {error}");
            }
        }
    }
    let _ = stop.send(true);
    while components.join_next().await.is_some() {}
    bus.close().await;
    client.close().await;
    {
        let profile = profile.clone();
        tokio::task::spawn_blocking(move || workspace::clear_cache(&profile)).await??;
    }
    Ok(measured)
}

/// Opens one session (its own workspace) and waits until it is in `tier`.
async fn open_into_tier(client: &Bus, waiters: &Waiters, user: &str, index: usize, tier: Tier) -> anyhow::Result<String> {
    let session = uuid::Uuid::now_v7().to_string();
    let running = expect_state(waiters, &session, "running");
    let in_tier = expect_state(waiters, &session, tier.state());
    publish(client, "session.open", &session, user, json!({"user": user, "workspace": format!("density-{index}")})).await?;
    tokio::time::timeout(STEP_TIMEOUT, running).await.map_err(|_| anyhow::anyhow!("{session} not running within {STEP_TIMEOUT:?}"))??;
    tokio::time::timeout(STEP_TIMEOUT, in_tier)
        .await
        .map_err(|_| anyhow::anyhow!("{session} not {} within {STEP_TIMEOUT:?}", tier.state()))??;
    Ok(session)
}

async fn close_until_closed(client: &Bus, waiters: &Waiters, session: &str, user: &str) -> anyhow::Result<()> {
    let closed = expect_state(waiters, session, "closed");
    publish(client, "session.close", session, user, json!({"reason": "bench"})).await?;
    tokio::time::timeout(STEP_TIMEOUT, closed).await.map_err(|_| anyhow::anyhow!("{session} not closed within {STEP_TIMEOUT:?}"))??;
    Ok(())
}

/// `MemTotal` and `MemAvailable` in bytes.
fn meminfo() -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text.lines().find(|line| line.starts_with(name)).ok_or_else(|| anyhow::anyhow!("{name} not in /proc/meminfo"))?;
        let kib: u64 = line.split_whitespace().nth(1).unwrap_or_default().parse()?;
        Ok(kib * 1024)
    };
    Ok((field("MemTotal:")?, field("MemAvailable:")?))
}

/// The deployment's containers that are running (paused ones included).
fn running_containers(deployment: &str) -> usize {
    let filter = format!("label=berth.deployment={deployment}");
    Command::new("docker")
        .args(["ps", "-q", "--filter", &filter])
        .output()
        .map(|listed| String::from_utf8_lossy(&listed.stdout).split_whitespace().count())
        .unwrap_or(0)
}

/// Memory Docker reports for the deployment's running or paused containers (0 for stopped ones).
fn deployment_container_memory(deployment: &str) -> u64 {
    let filter = format!("label=berth.deployment={deployment}");
    let Ok(listed) = Command::new("docker").args(["ps", "-q", "--filter", &filter]).output() else { return 0 };
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout).split_whitespace().map(str::to_owned).collect();
    if ids.is_empty() {
        return 0;
    }
    let Ok(stats) = Command::new("docker").args(["stats", "--no-stream", "--format", "{{.MemUsage}}"]).args(&ids).output() else {
        return 0;
    };
    String::from_utf8_lossy(&stats.stdout).lines().filter_map(|line| line.split('/').next()).filter_map(parse_size).sum()
}

/// `1.5MiB`, `880KiB`, `1.2GiB`, `512B` in bytes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.trim().parse().ok()?;
    let factor = match unit {
        "B" => 1.0,
        "KiB" | "kB" | "KB" => 1024.0,
        "MiB" | "MB" => 1024.0 * 1024.0,
        "GiB" | "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((number * factor) as u64)
}

/// Disk the deployment's sessions take: every file's allocated blocks under its root (images
/// are sparse), without following mounts into them.
fn deployment_disk(profile: &Profile) -> u64 {
    let Ok(output) = Command::new("du").args(["-sx", "--block-size=1"]).arg(profile.deployment_root()).output() else { return 0 };
    String::from_utf8_lossy(&output.stdout).split_whitespace().next().and_then(|bytes| bytes.parse().ok()).unwrap_or(0)
}

fn print_results(profile: &Profile, results: &[Measured], max_sessions: usize) {
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    println!(
        "berth bench density: sessions of {} ({} MiB limit each) this host holds, up to {max_sessions}, opened {BATCH} at a time",
        profile.container.image, profile.container.memory_mib
    );
    println!(
        "  {:<28} {:>6}  {:>16} {:>16} {:>14}  {:>8}  stopped because",
        "tier", "held", "host MiB/session", "cont. MiB/sess.", "disk MiB/sess.", "seconds"
    );
    for result in results {
        println!(
            "  {:<28} {:>6}  {:>16.2} {:>16.2} {:>14.2}  {:>8.0}  {}",
            result.tier.label(),
            result.held,
            mib(result.host_bytes_per_session),
            mib(result.container_bytes_per_session),
            mib(result.disk_bytes_per_session),
            result.seconds,
            result.stopped_because
        );
    }
    println!("extrapolation to a {EXTRAPOLATED_HOST_GIB} GiB host (not measured: the measured memory per session, scaled; the engine's admission and disk are further bounds):");
    for result in results {
        if result.host_bytes_per_session < MEASURABLE_BYTES_PER_SESSION {
            // Below what this (shared) machine's MemAvailable can resolve: memory does not bound
            // this tier; its disk and the engine's admission do.
            println!(
                "  {}: no measurable memory per session (under {:.2} MiB): memory is not its bound; disk is, at {:.2} MiB per session",
                result.tier.label(),
                mib(MEASURABLE_BYTES_PER_SESSION),
                mib(result.disk_bytes_per_session)
            );
            continue;
        }
        let sessions = EXTRAPOLATED_HOST_GIB * 1024.0 * 1024.0 * 1024.0 * (1.0 - SAFE_AVAILABLE_SHARE) / result.host_bytes_per_session;
        println!(
            "  {}: about {:.0} sessions in {:.0} % of {EXTRAPOLATED_HOST_GIB} GiB at {:.2} MiB each",
            result.tier.label(),
            sessions,
            (1.0 - SAFE_AVAILABLE_SHARE) * 100.0,
            mib(result.host_bytes_per_session)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn docker_sizes_parse() {
        assert_eq!(parse_size("1.5MiB "), Some(1_572_864));
        assert_eq!(parse_size(" 880KiB"), Some(901_120));
        assert_eq!(parse_size("512B"), Some(512));
        assert_eq!(parse_size("0B"), Some(0));
        assert_eq!(parse_size("n/a"), None);
    }
}
