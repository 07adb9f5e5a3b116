//! `berth bench open`: open→ready of whole sessions through the engine and the agents, all in one
//! run on this host, by kind of open, workload and concurrency, each next to its baseline measured
//! in the same run: `docker run` of the profile's image to its first health answer plus a raw
//! download of the same objects, run as many times at once as the opens.
//!
//! Rows: a cold open (no cached copy on the host) and a cached reopen (the host's workspace cache
//! holds the closed workspace, nothing changed in the store) at each concurrency level, for a
//! small workspace (10 files) and 50 MB in 500 files; then a reopen of a large workspace (1 GB by
//! default, `--large-mib`) with one file changed in the store since it was closed; then, with the
//! components started again on the same profile plus a warm pool as large as the highest level
//! (and plain-directory workspaces, which a pool needs), a warm-pool claim at each level and
//! workload, next to the cold row's baseline (a new, empty workspace too, and with
//! `--warm-only` every warm row, next to a baseline measured for it); last, with the components started again on the
//! profile with short idle-ladder timers, a wake from each tier ([`WakeTier`]: paused, and stopped
//! with the directory kept) of one session, `--wake-rounds` times, from `session.activity` to the
//! app's first HTTP answer, next to `docker unpause` (or `docker start`) plus the first answer of
//! a container of the profile's image run directly.
//!
//! How to add a row: a new kind of open is an [`OpenKind`] variant with its `prepare` (what must
//! hold before its opens: e.g. a warm pool filled to the level) and its label; [`measure_row`]
//! does the rest (the opens at the level, ready times, the closes). A wake is not an open: its
//! rows are [`measure_wake`]'s.

use std::time::{Duration, Instant};

use crate::stats::{milliseconds, percentile};
use protocol::{Bus, BusConfig, Profile};
use serde_json::json;
use tokio::sync::watch;

use crate::e2e::{docker_run_to_health, expect_state, listen_for_states, publish, Waiters};
use bootstrap::{bootstrap, Reset};
use bootstrap::{spawn_components, Components};

const WORKSPACE: &str = "open-bench";
const LARGE_WORKSPACE: &str = "open-bench-large";
/// Samples at concurrency 1 (one open after another).
const SEQUENTIAL_SAMPLES: usize = 10;
const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// Goals from issue 16.
const COLD_SEQUENTIAL_GOAL: f64 = 1.15;
const COLD_CONCURRENT_GOAL: f64 = 1.5;
const LARGE_CACHED_GOAL: Duration = Duration::from_secs(1);
/// Issue 16's goal for a warm claim with 50 concurrent opens.
const WARM_P50_GOAL: Duration = Duration::from_millis(50);
const WARM_P99_GOAL: Duration = Duration::from_millis(150);
const WAKE_WORKSPACE: &str = "open-bench-wake";
/// The wake rows' interval from pause to container stop: long enough that a paused round's wake
/// (milliseconds after the pause) never races the stop.
const WAKE_DORMANT_AFTER_SECS: u64 = 3;

/// What `berth bench open` runs.
#[derive(Debug, Clone)]
pub struct OpenBenchSettings {
    /// Concurrent opens per round (1 = one after another, `SEQUENTIAL_SAMPLES` times).
    pub levels: Vec<usize>,
    /// The large workspace's size.
    pub large_mib: u64,
    /// Wakes measured from each idle tier (and baseline rounds of each).
    pub wake_rounds: usize,
    /// Which rows run.
    pub rows: OpenRows,
}

/// The rows `berth bench open` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRows {
    /// Cold, cached, large, warm and wake rows.
    All,
    /// Only the warm-pool claims, each next to a baseline measured for it in the same run (for
    /// working on the claim path without the minutes the other rows take).
    Warm,
}

/// A workspace every user of a round holds a copy of.
#[derive(Debug, Clone, Copy)]
struct Workload {
    label: &'static str,
    files: usize,
    large_files: usize,
    bytes: usize,
}

const WORKLOADS: [Workload; 2] = [
    Workload { label: "10 files", files: 10, large_files: 0, bytes: 100 * 1000 },
    Workload { label: "500 files / 50 MB", files: 500, large_files: 5, bytes: 50 * 1000 * 1000 },
];

/// The warm rows' workloads: a new (empty) workspace too, whose materialize is one listing, so
/// the row shows what the claim itself costs apart from the store's downloads.
const WARM_WORKLOADS: [Workload; 3] = [Workload { label: "empty", files: 0, large_files: 0, bytes: 0 }, WORKLOADS[0], WORKLOADS[1]];

/// The kind of open a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenKind {
    /// Nothing of the workspace on the host: materialize everything from the store.
    Cold,
    /// The host's cache holds the closed workspace; nothing changed in the store.
    Cached,
    /// A free warm-pool slot for every open (and no cached copy): the container exists, running.
    Warm,
}

impl OpenKind {
    fn label(self) -> &'static str {
        match self {
            OpenKind::Cold => "cold open",
            OpenKind::Cached => "cached reopen",
            OpenKind::Warm => "warm-pool claim",
        }
    }
}

/// One measured row.
struct Row {
    workload: String,
    level: usize,
    label: String,
    samples: Vec<Duration>,
    baseline: Vec<Duration>,
}

/// What every round needs.
struct Bench<'a> {
    profile: &'a Profile,
    client: &'a Bus,
    store: &'a workspace::OpenedStore,
    waiters: &'a Waiters,
}

/// `berth bench open`.
pub async fn bench(mut profile: Profile, settings: OpenBenchSettings) -> anyhow::Result<()> {
    anyhow::ensure!(!settings.levels.is_empty() && settings.levels.iter().all(|level| *level > 0), "--levels needs positive numbers");
    let max_level = settings.levels.iter().copied().max().unwrap_or(1);
    let large_bytes = usize::try_from(settings.large_mib * 1024 * 1024)?;
    // The large workspace must fit its session, and every closed workspace of a round the cache.
    let large_quota_mib = settings.large_mib + settings.large_mib / 4 + 64;
    profile.workspace.quota_mib = profile.workspace.quota_mib.max(large_quota_mib);
    let medium_mib = (WORKLOADS[1].bytes / (1024 * 1024)) as u64 + 16;
    profile.workspace.cache_mib = profile.workspace.cache_mib.max(max_level as u64 * medium_mib + large_quota_mib);
    // The sequential rows open one user's workspace dozens of times a minute.
    profile.limits.max_opens_per_user_per_minute = profile.limits.max_opens_per_user_per_minute.max(1000);
    // Cold, cached and wake rows never claim: only the warm rows run with a pool (their own).
    profile.pool = None;
    bootstrap(&profile, Reset::Keep).await?;

    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    // One user per concurrent open: a workspace has at most one live session, and each user has
    // a live-session limit.
    let users: Vec<String> = (0..max_level).map(|index| format!("open-{run}-{index}")).collect();
    let store = workspace::open_store(&profile.services.object_store_url, &workspace::StoreSettings::from_env())?;

    let (stop, stopping) = watch::channel(false);
    let mut components = spawn_components(&profile, Components::Headless, &stopping);
    let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "berth-bench-open")).await?;
    let client =
        Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Client, "berth-bench-open-client")?).await?;
    let waiters: Waiters = Waiters::default();
    // The listener outlives the first components: the warm rows run on components of their own.
    let (stop_listening, listening) = watch::channel(false);
    listen_for_states(&bus, &users, waiters.clone(), listening).await?;
    let bench = Bench { profile: &profile, client: &client, store: &store, waiters: &waiters };

    let outcome = match settings.rows {
        OpenRows::All => measure(&bench, &users, &settings, large_bytes).await,
        OpenRows::Warm => Ok(Vec::new()),
    };
    let _ = stop.send(true);
    while components.join_next().await.is_some() {}
    let outcome = match outcome {
        Ok(mut rows) => {
            let warm = measure_warm(&bench, &users, &settings, &rows).await;
            warm.map(|warm_rows| {
                rows.extend(warm_rows);
                rows
            })
        }
        Err(error) => Err(error),
    };
    let outcome = match outcome {
        Ok(rows) if settings.rows == OpenRows::Warm => Ok(rows),
        Ok(mut rows) => measure_wake(&bench, &users[0], settings.wake_rounds).await.map(|wake_rows| {
            rows.extend(wake_rows);
            rows
        }),
        Err(error) => Err(error),
    };
    let _ = stop_listening.send(true);
    for user in &users {
        for workspace_name in [WORKSPACE, LARGE_WORKSPACE] {
            if let Ok(prefix) = crate::fixture::object_prefix(&profile, &store, user, workspace_name) {
                crate::fixture::delete_prefix(&store, &prefix).await;
            }
        }
    }
    let cleared = {
        let profile = profile.clone();
        tokio::task::spawn_blocking(move || workspace::clear_cache(&profile)).await??
    };
    eprintln!("cleared {cleared} cache entries");
    bus.close().await;
    client.close().await;
    let rows = outcome?;
    print_rows(&rows, &settings);
    Ok(())
}

async fn measure(bench: &Bench<'_>, users: &[String], settings: &OpenBenchSettings, large_bytes: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for workload in WORKLOADS {
        let mut prefixes = Vec::new();
        eprintln!("seeding {} users with {} ...", users.len(), workload.label);
        for user in users {
            let prefix = crate::fixture::object_prefix(bench.profile, bench.store, user, WORKSPACE)?;
            crate::fixture::delete_prefix(bench.store, &prefix).await;
            let layout = crate::fixture::layout(bench.profile, workload.files, workload.large_files, workload.bytes);
            crate::fixture::seed(bench.store, &prefix, layout).await?;
            prefixes.push(prefix);
        }
        for &level in &settings.levels {
            eprintln!("{}: {level} at once ...", workload.label);
            let baseline = measure_baseline(bench, &prefixes[..level]).await?;
            for kind in [OpenKind::Cold, OpenKind::Cached] {
                let samples = measure_row(bench, kind, &users[..level], WORKSPACE).await?;
                rows.push(Row {
                    workload: workload.label.to_owned(),
                    level,
                    label: kind.label().to_owned(),
                    samples,
                    baseline: baseline.clone(),
                });
            }
        }
        clear_cache(bench.profile).await?;
    }
    rows.push(measure_large(bench, &users[0], large_bytes, settings.large_mib).await?);
    clear_cache(bench.profile).await?;
    Ok(rows)
}

/// The warm rows: the components again, on the profile with a pool of the highest level (plain
/// directories: a pool needs them), each workload seeded again and claimed at each level; the
/// baseline is the cold row's of the same workload and level. The pool's containers, folders and
/// keys are removed afterwards (an engine keeps its pool across restarts on purpose).
async fn measure_warm(bench: &Bench<'_>, users: &[String], settings: &OpenBenchSettings, rows: &[Row]) -> anyhow::Result<Vec<Row>> {
    let max_level = settings.levels.iter().copied().max().unwrap_or(1);
    let mut profile = bench.profile.clone();
    profile.workspace.filesystem = protocol::profile::WorkspaceFilesystem::Directory;
    profile.pool = Some(protocol::profile::PoolSettings { size: u32::try_from(max_level)?, max_idle_secs: 0 });
    let (stop, stopping) = watch::channel(false);
    let mut components = spawn_components(&profile, Components::Headless, &stopping);
    let warm_bench = Bench { profile: &profile, ..*bench };
    let mut warm_rows = Vec::new();
    let measured = async {
        for workload in WARM_WORKLOADS {
            eprintln!("warm pool: seeding {} users with {} ...", users.len(), workload.label);
            for user in users {
                let prefix = crate::fixture::object_prefix(&profile, bench.store, user, WORKSPACE)?;
                crate::fixture::delete_prefix(bench.store, &prefix).await;
                let layout = crate::fixture::layout(&profile, workload.files, workload.large_files, workload.bytes);
                crate::fixture::seed(bench.store, &prefix, layout).await?;
            }
            for &level in &settings.levels {
                eprintln!("{}: {level} warm claims at once ...", workload.label);
                let samples = measure_row(&warm_bench, OpenKind::Warm, &users[..level], WORKSPACE).await?;
                let cold_baseline = rows
                    .iter()
                    .find(|row| row.workload == workload.label && row.level == level && row.label == OpenKind::Cold.label())
                    .map(|row| row.baseline.clone());
                let baseline = match cold_baseline {
                    Some(baseline) => baseline,
                    // No cold rows in this run: the warm row's own, measured now.
                    None => {
                        let prefixes = users[..level]
                            .iter()
                            .map(|user| crate::fixture::object_prefix(&profile, bench.store, user, WORKSPACE))
                            .collect::<Result<Vec<_>, _>>()?;
                        measure_baseline(&warm_bench, &prefixes).await?
                    }
                };
                warm_rows.push(Row {
                    workload: workload.label.to_owned(),
                    level,
                    label: OpenKind::Warm.label().to_owned(),
                    samples,
                    baseline,
                });
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = stop.send(true);
    while components.join_next().await.is_some() {}
    remove_pool(&profile).await;
    // A row that fails (the store timing out under the largest round, say) loses only itself:
    // the rows measured before it are printed with the error.
    if let Err(error) = &measured {
        if !warm_rows.is_empty() {
            eprintln!("a warm row failed ({error}); the rows measured before it:");
            print_rows(&warm_rows, settings);
        }
    }
    measured.map(|()| warm_rows)
}

/// Waits until the warm pool is full: every slot free, so no refill is making containers on the
/// same cores while the claims are measured (a row of 10 from a pool of 50 would otherwise run
/// beside the refill of the rounds before it).
async fn wait_for_full_pool(profile: &Profile) -> anyhow::Result<()> {
    let slots = profile.pool.as_ref().map_or(0, |pool| pool.size) as usize;
    let prefix = engine::service::EngineConfig::standard().redis_prefix;
    let deadline = Instant::now() + STEP_TIMEOUT;
    while engine::service::free_pool_slots(&profile.services.redis_url, &prefix).await? < slots as u64 {
        anyhow::ensure!(Instant::now() < deadline, "the warm pool did not reach {slots} free slots within {STEP_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Removes the bench's pool: its containers, its slot folders and its keys.
async fn remove_pool(profile: &Profile) {
    let deployment = format!("label=berth.deployment={}", profile.deployment());
    let listed =
        std::process::Command::new("docker").args(["ps", "-aq", "--filter", &deployment, "--filter", "label=berth.pool.slot"]).output();
    if let Ok(listed) = listed {
        for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
            let _ = std::process::Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
    let _ = std::fs::remove_dir_all(profile.deployment_root().join(protocol::profile::POOL_DIR));
    if let Err(error) =
        engine::service::clear_pool(&profile.services.redis_url, &engine::service::EngineConfig::standard().redis_prefix).await
    {
        eprintln!("could not clear the warm pool's keys: {error}");
    }
}

/// Makes the host hold (or not hold) a cached copy of each user's workspace, as `kind` needs.
async fn prepare(bench: &Bench<'_>, kind: OpenKind, users: &[String], workspace_name: &str) -> anyhow::Result<()> {
    match kind {
        OpenKind::Cold => clear_cache(bench.profile).await,
        OpenKind::Warm => {
            clear_cache(bench.profile).await?;
            anyhow::ensure!(
                bench.profile.pool.as_ref().is_some_and(|pool| pool.size as usize >= users.len()),
                "a warm row of {} opens needs a pool at least that large",
                users.len()
            );
            wait_for_full_pool(bench.profile).await
        }
        OpenKind::Cached => {
            // A cold open and close leaves a workspace in the cache (the cold row's closes did so
            // already for most).
            let cached = {
                let profile = bench.profile.clone();
                tokio::task::spawn_blocking(move || workspace::cached_workspaces(&profile)).await??
            };
            let missing: Vec<&String> = users
                .iter()
                .filter(|user| !cached.iter().any(|(cached_user, name)| cached_user == *user && name == workspace_name))
                .collect();
            let opened = futures::future::try_join_all(missing.iter().map(|user| open_until_running(bench, user, workspace_name))).await?;
            let closes = opened.iter().zip(&missing).map(|((session, _), user)| close_until_closed(bench, session, user));
            futures::future::try_join_all(closes).await?;
            Ok(())
        }
    }
}

/// Open→ready of `users.len()` opens of `kind` at once (at one user: `SEQUENTIAL_SAMPLES` opens,
/// one after another, each prepared afresh).
async fn measure_row(bench: &Bench<'_>, kind: OpenKind, users: &[String], workspace_name: &str) -> anyhow::Result<Vec<Duration>> {
    let rounds = if users.len() == 1 { SEQUENTIAL_SAMPLES } else { 1 };
    let mut samples = Vec::new();
    for round in 0..rounds {
        // A cached reopen's close caches it again: only the first round needs the cold open first.
        if kind != OpenKind::Cached || round == 0 {
            prepare(bench, kind, users, workspace_name).await?;
        }
        let opened = futures::future::try_join_all(users.iter().map(|user| open_until_running(bench, user, workspace_name))).await?;
        let closes = opened.iter().zip(users).map(|((session, _), user)| close_until_closed(bench, session, user));
        futures::future::try_join_all(closes).await?;
        samples.extend(opened.into_iter().map(|(_, elapsed)| elapsed));
    }
    Ok(samples)
}

/// A raw download of each prefix then `docker run`→health, all prefixes at once (at one prefix:
/// `SEQUENTIAL_SAMPLES` times, one after another).
async fn measure_baseline(bench: &Bench<'_>, prefixes: &[object_store::path::Path]) -> anyhow::Result<Vec<Duration>> {
    let rounds = if prefixes.len() == 1 { SEQUENTIAL_SAMPLES } else { 1 };
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let round = prefixes.iter().map(|prefix| async move {
            let started = Instant::now();
            crate::fixture::raw_download(bench.store, prefix, bench.profile.workspace.parallelism).await?;
            docker_run_to_health(bench.profile).await?;
            Ok::<_, anyhow::Error>(started.elapsed())
        });
        samples.extend(futures::future::try_join_all(round).await?);
    }
    Ok(samples)
}

/// The large workspace: opened cold once (its baseline beside it), closed into the cache, one
/// file changed in the store, reopened.
async fn measure_large(bench: &Bench<'_>, user: &str, large_bytes: usize, large_mib: u64) -> anyhow::Result<Row> {
    let prefix = crate::fixture::object_prefix(bench.profile, bench.store, user, LARGE_WORKSPACE)?;
    let files = (large_bytes / (1024 * 1024)).clamp(100, 2000);
    eprintln!("seeding the large workspace: {large_mib} MiB in {files} files ...");
    crate::fixture::seed(bench.store, &prefix, crate::fixture::layout(bench.profile, files, 10, large_bytes)).await?;
    let baseline = measure_baseline(bench, std::slice::from_ref(&prefix)).await?;
    clear_cache(bench.profile).await?;
    let (session, cold) = open_until_running(bench, user, LARGE_WORKSPACE).await?;
    eprintln!("large workspace cold open: {:.1} ms", milliseconds(cold));
    close_until_closed(bench, &session, user).await?;
    let changed: object_store::path::Path = prefix.parts().chain(object_store::path::Path::from("changed-elsewhere.txt").parts()).collect();
    bench.store.store.put(&changed, object_store::PutPayload::from(b"one file changed since the close".to_vec())).await?;
    let (session, reopened) = open_until_running(bench, user, LARGE_WORKSPACE).await?;
    close_until_closed(bench, &session, user).await?;
    crate::fixture::delete_prefix(bench.store, &prefix).await;
    Ok(Row {
        workload: format!("{large_mib} MiB in {files} files, one change"),
        level: 1,
        label: format!("cached reopen (cold: {:.0} ms)", milliseconds(cold)),
        samples: vec![reopened],
        baseline,
    })
}

async fn clear_cache(profile: &Profile) -> anyhow::Result<()> {
    let profile = profile.clone();
    tokio::task::spawn_blocking(move || workspace::clear_cache(&profile)).await??;
    Ok(())
}

async fn close_until_closed(bench: &Bench<'_>, session: &str, user: &str) -> anyhow::Result<()> {
    let closed = expect_state(bench.waiters, session, "closed");
    publish(bench.client, "session.close", session, user, json!({"reason": "bench"})).await?;
    tokio::time::timeout(STEP_TIMEOUT, closed)
        .await
        .map_err(|_| anyhow::anyhow!("session {session} not closed within {STEP_TIMEOUT:?}"))??;
    Ok(())
}

/// Opens one session and waits until it runs; returns its id and the open-to-ready time.
async fn open_until_running(bench: &Bench<'_>, user: &str, workspace_name: &str) -> anyhow::Result<(String, Duration)> {
    let session = uuid::Uuid::now_v7().to_string();
    let running = expect_state(bench.waiters, &session, "running");
    let started = Instant::now();
    publish(bench.client, "session.open", &session, user, json!({"user": user, "workspace": workspace_name})).await?;
    let ready_at = tokio::time::timeout(STEP_TIMEOUT, running)
        .await
        .map_err(|_| anyhow::anyhow!("session {session} not running within {STEP_TIMEOUT:?}"))??;
    Ok((session, ready_at - started))
}

fn print_rows(rows: &[Row], settings: &OpenBenchSettings) {
    println!("berth bench open: open→ready on this host, levels {:?}, large workspace {} MiB", settings.levels, settings.large_mib);
    println!(
        "  {:<34} {:>4}  {:<28} {:>9} {:>9} {:>9}   {:>9} {:>9}  {:>6}",
        "workload", "at", "open", "p50 ms", "p95 ms", "p99 ms", "base p50", "base p99", "×base"
    );
    for row in rows {
        let p50 = percentile(&row.samples, 0.5);
        let base = percentile(&row.baseline, 0.5);
        let ratio = p50.as_secs_f64() / base.as_secs_f64().max(f64::MIN_POSITIVE);
        println!(
            "  {:<34} {:>4}  {:<28} {:>9.1} {:>9.1} {:>9.1}   {:>9.1} {:>9.1}  {:>6.2}",
            row.workload,
            row.level,
            row.label,
            milliseconds(p50),
            milliseconds(percentile(&row.samples, 0.95)),
            milliseconds(percentile(&row.samples, 0.99)),
            milliseconds(base),
            milliseconds(percentile(&row.baseline, 0.99)),
            ratio
        );
    }
    println!("  baseline: a raw download of the same objects, then `docker run`→health, as many at once as the opens");
    println!("  warm-pool claims run on plain-directory workspaces (a pool needs them), with a pool as large as the highest level, full (no refill running) at the start of each round");
    println!("  wakes: from `session.activity` to the app's first HTTP answer on the port of the `running` notification, one session, one wake after another;");
    println!("    baseline: `docker unpause` (from paused) or `docker start` + its port (from stopped-with-disk), then the first answer, on a container of the image run directly");
    println!("goals (issue 16):");
    for row in rows.iter().filter(|row| row.label == OpenKind::Cold.label()) {
        let ratio = percentile(&row.samples, 0.5).as_secs_f64() / percentile(&row.baseline, 0.5).as_secs_f64().max(f64::MIN_POSITIVE);
        let goal = if row.level == 1 { COLD_SEQUENTIAL_GOAL } else { COLD_CONCURRENT_GOAL };
        println!(
            "  cold open, {}, {} at once: {ratio:.2}× the baseline at p50 (goal ≤ {goal}×): {}",
            row.workload,
            row.level,
            verdict(ratio <= goal)
        );
    }
    for row in rows.iter().filter(|row| row.label == OpenKind::Warm.label()) {
        let (p50, p99) = (percentile(&row.samples, 0.5), percentile(&row.samples, 0.99));
        println!(
            "  warm-pool claim, {}, {} at once: p50 {:.1} ms (goal < {} ms): {}, p99 {:.1} ms (goal < {} ms): {}",
            row.workload,
            row.level,
            milliseconds(p50),
            WARM_P50_GOAL.as_millis(),
            verdict(p50 < WARM_P50_GOAL),
            milliseconds(p99),
            WARM_P99_GOAL.as_millis(),
            verdict(p99 < WARM_P99_GOAL)
        );
    }
    let wake_labels = [WakeTier::Paused.label(), WakeTier::Dormant.label()];
    if let Some(large) = rows.iter().rev().find(|row| row.label != OpenKind::Warm.label() && !wake_labels.contains(&row.label.as_str())) {
        let reopened = percentile(&large.samples, 0.5);
        println!(
            "  cached reopen of {}: {:.1} ms (goal < {} ms): {}",
            large.workload,
            milliseconds(reopened),
            LARGE_CACHED_GOAL.as_millis(),
            verdict(reopened < LARGE_CACHED_GOAL)
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "missed"
    }
}

/// A tier of the idle ladder a wake row starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WakeTier {
    /// `idle`: the container paused, memory held.
    Paused,
    /// `dormant`: the container stopped, its directory kept.
    Dormant,
}

impl WakeTier {
    fn label(self) -> &'static str {
        match self {
            WakeTier::Paused => "wake from paused",
            WakeTier::Dormant => "wake from stopped-with-disk",
        }
    }

    /// The session state of this tier.
    fn state(self) -> &'static str {
        match self {
            WakeTier::Paused => "idle",
            WakeTier::Dormant => "dormant",
        }
    }

    /// What `docker inspect` says of the container once the tier is reached: the tier's
    /// notification comes with the pause or stop task, before Docker has done it.
    fn container_state(self) -> &'static str {
        match self {
            WakeTier::Paused => "paused",
            WakeTier::Dormant => "exited",
        }
    }
}

/// The profile of the wake rows: a session pauses one second after its last input or work, its
/// container stops `WAKE_DORMANT_AFTER_SECS` later, and nothing closes it during the rows.
fn wake_profile(profile: &Profile) -> Profile {
    let mut profile = profile.clone();
    let timers = &mut profile.timers;
    timers.idle_after_secs = 1;
    timers.idle_warning_secs = 0;
    timers.dormant_after_idle_secs = WAKE_DORMANT_AFTER_SECS;
    timers.stop_after_idle_secs = 3600;
    timers.max_age_secs = timers.max_age_secs.max(7200);
    timers.autosave_secs = 0;
    profile
}

/// The wake rows: the components again, on [`wake_profile`]; one session of a small workspace
/// is left quiet until it reaches the tier, then woken by `session.activity`, `rounds` times per
/// tier. A wake is timed from the activity's publication to the app's first HTTP answer on the
/// port of the `running` notification (a request to a container still frozen waits in the kernel
/// until it thaws, so the answer is the wake as the user sees it). Baselines, in the same run, on
/// a container of the profile's image run directly: `docker unpause` + first answer, and
/// `docker start` + its port + first answer.
async fn measure_wake(bench: &Bench<'_>, user: &str, rounds: usize) -> anyhow::Result<Vec<Row>> {
    anyhow::ensure!(rounds > 0, "--wake-rounds must be positive");
    let profile = wake_profile(bench.profile);
    let prefix = crate::fixture::object_prefix(&profile, bench.store, user, WAKE_WORKSPACE)?;
    crate::fixture::delete_prefix(bench.store, &prefix).await;
    let small = WORKLOADS[0];
    crate::fixture::seed(bench.store, &prefix, crate::fixture::layout(&profile, small.files, small.large_files, small.bytes)).await?;
    let mut baselines = Vec::new();
    for tier in [WakeTier::Paused, WakeTier::Dormant] {
        eprintln!("baseline of the {}: {rounds} rounds ...", tier.label());
        baselines.push(measure_wake_baseline(&profile, tier, rounds).await?);
    }
    let (stop, stopping) = watch::channel(false);
    let mut components = spawn_components(&profile, Components::Headless, &stopping);
    let wake_bench = Bench { profile: &profile, ..*bench };
    let measured = async {
        let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "berth-bench-open-wake")).await?;
        let mut inbox = listen_for_notifications(&bus, user, stopping.clone()).await?;
        let mut rows = Vec::new();
        let session = uuid::Uuid::now_v7().to_string();
        publish(bench.client, "session.open", &session, user, json!({"user": user, "workspace": WAKE_WORKSPACE})).await?;
        let (_, opened) = next_state(&mut inbox, &session, "running").await?;
        let mut port = port_of(&opened)?;
        let outcome = async {
            for (tier, baseline) in [WakeTier::Paused, WakeTier::Dormant].into_iter().zip(baselines) {
                eprintln!("{}: {rounds} rounds ...", tier.label());
                let mut samples = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    until_in_tier(&mut inbox, &session, tier).await?;
                    let (elapsed, woken_port) = wake(&wake_bench, &mut inbox, &session, user, port).await?;
                    port = woken_port;
                    samples.push(elapsed);
                }
                rows.push(Row { workload: small.label.to_owned(), level: 1, label: tier.label().to_owned(), samples, baseline });
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        close_until_closed(&wake_bench, &session, user).await?;
        bus.close().await;
        outcome.map(|()| rows)
    }
    .await;
    let _ = stop.send(true);
    while components.join_next().await.is_some() {}
    crate::fixture::delete_prefix(bench.store, &prefix).await;
    clear_cache(&profile).await?;
    measured
}

/// Publishes `session.activity` to a session in a tier of the ladder; returns the time to the
/// app's first HTTP answer and the port it answered on.
async fn wake(bench: &Bench<'_>, inbox: &mut Inbox, session: &str, user: &str, port: u16) -> anyhow::Result<(Duration, u16)> {
    // Only what follows the activity counts.
    while inbox.try_recv().is_ok() {}
    let started = Instant::now();
    publish(bench.client, "session.activity", session, user, json!({"source": "api"})).await?;
    let (_, running) = next_state(inbox, session, "running").await?;
    let port = port_of(&running).unwrap_or(port);
    first_answer(bench.profile, port).await?;
    Ok((started.elapsed(), port))
}

/// Waits for the session's notification of `tier`, then until Docker has done it.
async fn until_in_tier(inbox: &mut Inbox, session: &str, tier: WakeTier) -> anyhow::Result<()> {
    next_state(inbox, session, tier.state()).await?;
    let container = format!("berth-{session}");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while docker_state(&container).as_deref() != Some(tier.container_state()) {
        anyhow::ensure!(Instant::now() < deadline, "{container} not {} within {STEP_TIMEOUT:?}", tier.container_state());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The baseline of a tier's wake, `rounds` times on one container of the profile's image run
/// directly: into the tier (`docker pause`, or `docker stop`), untimed; then `docker unpause`, or
/// `docker start` and `docker port` (a restarted container may be given a new port), and the
/// first HTTP answer, timed.
async fn measure_wake_baseline(profile: &Profile, tier: WakeTier, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let name = format!("berth-bench-wake-{}", uuid::Uuid::new_v4().simple());
    let publish = format!("127.0.0.1::{}", profile.container.service_port);
    let measured = async {
        docker(&["run", "-d", "--name", &name, "-p", &publish, &profile.container.image])?;
        let mut port = published_port(profile, &name)?;
        first_answer(profile, port).await?;
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let started = match tier {
                WakeTier::Paused => {
                    docker(&["pause", &name])?;
                    let started = Instant::now();
                    docker(&["unpause", &name])?;
                    started
                }
                WakeTier::Dormant => {
                    docker(&["stop", "-t", "1", &name])?;
                    let started = Instant::now();
                    docker(&["start", &name])?;
                    port = published_port(profile, &name)?;
                    started
                }
            };
            first_answer(profile, port).await?;
            samples.push(started.elapsed());
        }
        Ok::<_, anyhow::Error>(samples)
    }
    .await;
    let _ = std::process::Command::new("docker").args(["rm", "-f", &name]).output();
    measured
}

/// Runs `docker args`; an error names the command and Docker's answer.
fn docker(args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new("docker").args(args).output()?;
    anyhow::ensure!(output.status.success(), "docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The host port Docker published the container's service port on.
fn published_port(profile: &Profile, container: &str) -> anyhow::Result<u16> {
    let mapping = docker(&["port", container, &profile.container.service_port.to_string()])?;
    let port = mapping.lines().next().and_then(|line| line.rsplit(':').next()).map(str::trim).unwrap_or_default();
    port.parse().map_err(|_| anyhow::anyhow!("no published port for {container} in {mapping:?}"))
}

/// `docker inspect`'s state of a container (`running`, `paused`, `exited`), if it exists.
fn docker_state(container: &str) -> Option<String> {
    docker(&["inspect", "-f", "{{.State.Status}}", container]).ok()
}

/// Waits for the first answer on the profile's health path (the container agent's readiness
/// rule, as the other baselines use).
async fn first_answer(profile: &Profile, port: u16) -> anyhow::Result<()> {
    let path = match &profile.container.health {
        protocol::profile::HealthCheck::Http(path) => path.clone(),
        _ => "/".to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(profile.container.ready_timeout_secs);
    while !container::probe::http_ready("127.0.0.1", port, &path).await {
        anyhow::ensure!(Instant::now() < deadline, "nothing answered on port {port} within {}s", profile.container.ready_timeout_secs);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The port a `running` notification carries.
fn port_of(running: &protocol::Notification) -> anyhow::Result<u16> {
    let port = &running.detail["port"];
    let number = port.as_u64().or_else(|| port.as_str().and_then(|text| text.parse().ok()));
    number.and_then(|number| u16::try_from(number).ok()).ok_or_else(|| anyhow::anyhow!("running without a port: {}", running.detail))
}

/// One user's notifications in order, with their arrival, from a private queue: the wake rows
/// need their detail (the port a woken session answers on), which the shared waiters drop.
type Inbox = tokio::sync::mpsc::UnboundedReceiver<(Instant, protocol::Notification)>;

async fn listen_for_notifications(bus: &Bus, user: &str, stopping: watch::Receiver<bool>) -> anyhow::Result<Inbox> {
    let queue = bus.declare_private_queue(protocol::topology::NOTIFY_EXCHANGE, &[protocol::topology::user_routing_key(user)]).await?;
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let consumer = bus.clone();
    tokio::spawn(async move {
        let handler = move |incoming: protocol::Incoming| {
            let sender = sender.clone();
            async move {
                let arrived = Instant::now();
                if let Ok(notification) = protocol::Notification::decode(&incoming.body) {
                    let _ = sender.send((arrived, notification));
                }
                protocol::Outcome::Ack
            }
        };
        let mut stopping = stopping;
        let stopped = async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        let _ = consumer.consume(protocol::ConsumeSpec::new(&queue, 100), handler, stopped).await;
    });
    Ok(receiver)
}

/// The session's next notification of `state`; a `failed` session fails the row.
async fn next_state(inbox: &mut Inbox, session: &str, state: &str) -> anyhow::Result<(Instant, protocol::Notification)> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, inbox.recv())
            .await
            .map_err(|_| anyhow::anyhow!("session {session} not {state} within {STEP_TIMEOUT:?}"))?;
        let (arrived, notification) = next.ok_or_else(|| anyhow::anyhow!("the notification queue closed"))?;
        if notification.session.as_deref() != Some(session) {
            continue;
        }
        anyhow::ensure!(notification.state != "failed", "session {session} failed: {}", notification.detail);
        if notification.state == state {
            return Ok((arrived, notification));
        }
    }
}
