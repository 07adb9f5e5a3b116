//! The fault matrix, end to end: each test runs a deployment as separate `berth` processes
//! (`bootstrap`, then `engine` and the four agents) on services of its own — a RabbitMQ vhost, its
//! own redis-server, a bucket reached through a proxy that can be cut, the Docker engine through
//! another, a workspace root and a deployment id — leaves unsynced work in sessions, injects one
//! fault and checks the exact bytes in the object store afterwards, that the exit went through the
//! freeze and a confirmed final sync before anything was removed, that nothing was dead-lettered
//! and that no container or directory is left. The harness and the cases live in
//! `bootstrap::faults`, which `berth bench faults` runs too.
//!
//! Deployments share nothing they restart, so the tests run side by side; a gate keeps at most
//! `BERTH_FAULTS_PARALLEL` (default 3) of them up at once on small machines.

use std::path::Path;
use std::sync::{Condvar, Mutex};

use bootstrap::faults::{run_case, Case, Deployment, HarnessConfig, WorkspacePhase};

struct Gate {
    running: Mutex<usize>,
    freed: Condvar,
}

/// No case takes this long unless something hangs.
const CASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

static GATE: Gate = Gate { running: Mutex::new(0), freed: Condvar::new() };

struct Permit;

impl Drop for Permit {
    fn drop(&mut self) {
        let mut running = GATE.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *running -= 1;
        GATE.freed.notify_one();
    }
}

async fn enter_gate() -> Permit {
    let limit: usize = std::env::var("BERTH_FAULTS_PARALLEL").ok().and_then(|text| text.parse().ok()).unwrap_or(3).max(1);
    tokio::task::spawn_blocking(move || {
        let mut running = GATE.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *running >= limit {
            running = GATE.freed.wait(running).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *running += 1;
        Permit
    })
    .await
    .expect("gate")
}

fn config() -> HarnessConfig {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    HarnessConfig::local(env!("CARGO_BIN_EXE_berth").into(), manifest.join("patterns"))
}

async fn check(case: Case) {
    check_with(case, config()).await;
}

async fn check_with(case: Case, config: HarnessConfig) {
    let _permit = enter_gate().await;
    let mut deployment = Deployment::start(&config).await.unwrap_or_else(|error| panic!("deployment for {}: {error:#}", case.name()));
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(CASE_TIMEOUT, run_case(&mut deployment, case, 1)).await;
    let tally = match outcome {
        Ok(Ok(tally)) => tally,
        Ok(Err(error)) => panic!("{error:#}\n{}", deployment.logs_tail(60)),
        Err(_) => panic!("{} did not finish within {CASE_TIMEOUT:?}\n{}", case.name(), deployment.logs_tail(60)),
    };
    eprintln!("{} in {:.1} s: {}", case.name(), started.elapsed().as_secs_f64(), tally.summary());
    assert!(tally.is_clean(), "{}\n{}\n{}", tally.summary(), tally.findings(), deployment.logs_tail(60));
    assert!(tally.injected > 0, "{}: no fault was injected", case.name());
    deployment.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_opens_at_once_over_amqp_and_websocket_share_one_session() {
    check(Case::TwoOpens).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_writer_keeps_its_version_and_ours_becomes_a_conflict_copy() {
    check(Case::OutsideWriter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_kill_with_unsynced_work_saves_it_and_fails_with_the_reason() {
    check(Case::DockerKill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_killed_main_process_saves_the_work_and_fails_with_the_reason() {
    check(Case::OomKill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_workspace_agent_mid_materialize_converges() {
    check(Case::KillWorkspaceAgent(WorkspacePhase::Materialize)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_workspace_agent_mid_incremental_sync_converges() {
    check(Case::KillWorkspaceAgent(WorkspacePhase::IncrementalSync)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_workspace_agent_mid_final_sync_converges() {
    check(Case::KillWorkspaceAgent(WorkspacePhase::FinalSync)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_workspace_agent_mid_remove_converges() {
    check(Case::KillWorkspaceAgent(WorkspacePhase::Remove)).await;
}

/// Without per-session images the remove deletes file by file, so the kill lands in a
/// half-deleted tree (which a sync once took for the user's deletions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_workspace_agent_mid_remove_of_a_plain_directory_converges() {
    check_with(Case::KillWorkspaceAgent(WorkspacePhase::Remove), config().with_plain_directories()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_container_agent_mid_provision_converges() {
    check(Case::KillContainerAgentProvisioning).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushall_under_a_running_session_recovers_its_work() {
    check(Case::RedisFlush).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_down_across_a_close_saves_once_it_is_back() {
    check(Case::StoreOutage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_and_a_docker_outage_dead_letter_nothing() {
    check(Case::RedisRestartAndDockerOutage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_empty_dirs_modes_and_odd_names_round_trip_or_are_kept() {
    check(Case::SpecialEntries).await;
}
