//! `berth bench workspace`: materialize throughput (MB/s and files/s) for 50 MB in 500 files next
//! to a raw `object_store` download of the same objects in the same run, and the time of an
//! incremental sync with one changed file in a 10,000-file workspace.
//!
//! Runs against the profile's object store under a fresh `bench-…` user prefix, in a temporary
//! workspace root, and removes both afterwards.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use protocol::events::WorkspaceSynced;
use protocol::ids::{UserId, WorkspaceId};
use protocol::tasks::{TaskArgs, WorkspaceMaterialize, WorkspaceSync};
use protocol::{Outcome, Profile, Task};
use uuid::Uuid;

use workspace::{AgentSettings, CollectedEvents, OpenedStore, StoreSettings, WorkspaceAgent};

use crate::fixture;

const THROUGHPUT_FILES: usize = 500;
const THROUGHPUT_LARGE_FILES: usize = 5;
const THROUGHPUT_BYTES: usize = 50 * 1000 * 1000;
const SYNC_FILES: usize = 10_000;
const ROUNDS: usize = 5;
const SYNC_ROUNDS: usize = 5;

/// The figures one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub files: usize,
    pub bytes: u64,
    pub raw_mb_per_s: f64,
    pub materialize_mb_per_s: f64,
    pub materialize_files_per_s: f64,
    /// Best materialize against best raw download.
    pub materialize_vs_raw_percent: f64,
    /// Median over rounds of (raw time / materialize time) in the same round: steadier on a busy machine.
    pub materialize_vs_raw_percent_median_round: f64,
    pub time_to_materialized_ms: f64,
    pub sync_workspace_files: usize,
    pub sync_one_change_ms_median: f64,
    pub sync_one_change_ms_best: f64,
}

/// `berth bench workspace`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let report = run_with(profile, &StoreSettings::from_env()).await?;
    println!("workspace benchmark ({} files, {:.1} MB):", report.files, report.bytes as f64 / 1e6);
    println!("  raw object_store download   {:>8.1} MB/s", report.raw_mb_per_s);
    println!(
        "  materialize                 {:>8.1} MB/s  {:>8.0} files/s  ({:.0}% of raw, median round {:.0}%, goal >= 80%)",
        report.materialize_mb_per_s,
        report.materialize_files_per_s,
        report.materialize_vs_raw_percent,
        report.materialize_vs_raw_percent_median_round
    );
    println!("  time to workspace.materialized {:>6.0} ms", report.time_to_materialized_ms);
    println!(
        "  incremental sync, 1 of {} files changed: median {:.1} ms, best {:.1} ms (goal < 200 ms)",
        report.sync_workspace_files, report.sync_one_change_ms_median, report.sync_one_change_ms_best
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The benchmark with explicit store settings (tests pass the moto endpoint here).
pub async fn run_with(mut profile: Profile, settings: &StoreSettings) -> anyhow::Result<BenchReport> {
    let run_id = Uuid::new_v4().simple().to_string();
    let scratch = std::env::temp_dir().join(format!("berth-bench-{run_id}"));
    profile.services.workspace_root = scratch.join("workspaces");
    // Owner changes are not what is measured here.
    profile.container.user = None;
    profile.workspace.quota_mib = profile.workspace.quota_mib.max(1024);
    let store = workspace::open_store(&profile.services.object_store_url, settings)?;
    let user = format!("bench-{}", &run_id[..12]);
    let outcome = measure(&profile, &store, &user).await;
    // Clean up whatever happened.
    let prefix: ObjectPath = {
        let relative = ObjectPath::parse(profile.workspace_prefix(&user, "x"))?;
        let parts: Vec<_> = relative.parts().collect();
        // Everything under the bench user's folder (the prefix minus its workspace segment).
        store.root.parts().chain(parts[..parts.len().saturating_sub(1)].iter().cloned()).collect()
    };
    fixture::delete_prefix(&store, &prefix).await;
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    outcome
}

fn task<T: TaskArgs>(session: &str, args: &T) -> Task {
    Task::of(Uuid::now_v7(), Some(session), args)
}

/// A materialize of `user`'s `workspace`, cold (no pool slot, no fence).
fn materialize(user: &str, workspace: &str) -> anyhow::Result<WorkspaceMaterialize> {
    Ok(WorkspaceMaterialize { user: UserId::parse(user)?, workspace: WorkspaceId::parse(workspace)?, slot: None, fence: false })
}

async fn measure(profile: &Profile, store: &OpenedStore, user: &str) -> anyhow::Result<BenchReport> {
    let parallelism = profile.workspace.parallelism.max(1);
    // 50 MB in 500 files: a few above the large-file threshold, the rest equal small files.
    let files = fixture::layout(profile, THROUGHPUT_FILES, THROUGHPUT_LARGE_FILES, THROUGHPUT_BYTES);
    let prefix = fixture::object_prefix(profile, store, user, "throughput")?;
    eprintln!("seeding {} objects ...", files.len());
    fixture::seed(store, &prefix, files).await?;

    let events = Arc::new(CollectedEvents::new());
    let agent = WorkspaceAgent::new(profile.clone(), store.clone(), events.clone(), AgentSettings::standard());
    let mut best_raw = Duration::MAX;
    let mut best_materialize = Duration::MAX;
    let mut best_to_materialized = Duration::MAX;
    let mut total_bytes = 0;
    let mut round_ratios = Vec::new();
    for round in 0..ROUNDS {
        let (raw, bytes) = fixture::raw_download(store, &prefix, parallelism).await?;
        best_raw = best_raw.min(raw);
        total_bytes = bytes;
        let session = format!("bench-{round}-{}", Uuid::new_v4().simple());
        let materialized_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let timed_events = {
            let materialized_at = materialized_at.clone();
            Arc::new(CollectedEvents::inspecting(move |event| {
                if event.event_type == "workspace.materialized" {
                    *materialized_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
                }
            }))
        };
        let timed_agent = WorkspaceAgent::new(profile.clone(), store.clone(), timed_events.clone(), AgentSettings::standard());
        let started = Instant::now();
        let outcome = timed_agent.handle(&task(&session, &materialize(user, "throughput")?)).await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            outcome == Outcome::Ack && timed_events.events().iter().any(|e| e.event_type == "workspace.complete"),
            "materialize failed: {:?}",
            timed_events.events()
        );
        best_materialize = best_materialize.min(elapsed);
        round_ratios.push(100.0 * raw.as_secs_f64() / elapsed.as_secs_f64());
        if let Some(at) = *materialized_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            best_to_materialized = best_to_materialized.min(at - started);
        }
        let _ = tokio::fs::remove_dir_all(profile.session_dir(&session)).await;
        eprintln!("round {round}: raw {raw:?}, materialize {elapsed:?}");
    }

    // Incremental sync in a 10,000-file workspace.
    let sync_prefix = fixture::object_prefix(profile, store, user, "sync")?;
    eprintln!("seeding {SYNC_FILES} objects ...");
    fixture::seed(store, &sync_prefix, (0..SYNC_FILES).map(|index| (format!("d{:02}/f{index:05}.txt", index % 50), 512)).collect()).await?;
    let session = format!("bench-sync-{}", Uuid::new_v4().simple());
    let outcome = agent.handle(&task(&session, &materialize(user, "sync")?)).await?;
    anyhow::ensure!(outcome == Outcome::Ack, "materialize of the sync workspace failed");
    let changed = profile.session_dir(&session).join("d07/f00007.txt");
    let sync = WorkspaceSync { user: UserId::parse(user)?, workspace: WorkspaceId::parse("sync")?, final_sync: false };
    let mut timings = Vec::new();
    for round in 0..SYNC_ROUNDS {
        tokio::fs::write(&changed, format!("change {round}")).await?;
        events.take();
        let started = Instant::now();
        agent.handle(&task(&session, &sync)).await?;
        timings.push(started.elapsed());
        let synced = events.events().into_iter().find_map(|event| event.data_as::<WorkspaceSynced>().ok());
        anyhow::ensure!(synced.as_ref().is_some_and(|synced| synced.uploaded == 1), "sync did not upload exactly one file: {synced:?}");
    }
    timings.sort();
    round_ratios.sort_by(f64::total_cmp);
    let megabytes = total_bytes as f64 / 1e6;
    let raw_mb_per_s = megabytes / best_raw.as_secs_f64();
    let materialize_mb_per_s = megabytes / best_materialize.as_secs_f64();
    Ok(BenchReport {
        files: THROUGHPUT_FILES,
        bytes: total_bytes,
        raw_mb_per_s,
        materialize_mb_per_s,
        materialize_files_per_s: THROUGHPUT_FILES as f64 / best_materialize.as_secs_f64(),
        materialize_vs_raw_percent: 100.0 * materialize_mb_per_s / raw_mb_per_s,
        materialize_vs_raw_percent_median_round: round_ratios[round_ratios.len() / 2],
        time_to_materialized_ms: best_to_materialized.as_secs_f64() * 1000.0,
        sync_workspace_files: SYNC_FILES,
        sync_one_change_ms_median: timings[timings.len() / 2].as_secs_f64() * 1000.0,
        sync_one_change_ms_best: timings[0].as_secs_f64() * 1000.0,
    })
}
