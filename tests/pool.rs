//! The warm pool end to end, on a deployment of separate `berth` processes (the fault harness:
//! its own vhost, redis-server, bucket, workspace root and deployment id) with `[pool]` set:
//!
//! - slots are made ahead of demand, running, with an empty slot directory and no session identity;
//! - an open claims one (the claim and the materialize side by side): ready on the pool's own
//!   container, which keeps its pool name (a claim renames and unpauses nothing), with the
//!   workspace's files and the session's identity in `/run/berth/session.json`; the pool refills;
//!   closing runs the normal exit (final sync first) and removes the container, found through the
//!   claim: it never returns to the pool;
//! - a warm open whose materialize fails ends failed, and its slot leaks nowhere;
//! - twenty opens racing for five slots: each of the five goes to exactly one session, the others
//!   open cold, all twenty run;
//! - the engine killed while opens are claiming: after its restart every slot is free or claimed
//!   by a live session, every session runs, and no pool container is left that nobody accounts for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bootstrap::faults::harness::http_get;
use bootstrap::faults::{Component, Deployment, HarnessConfig};
use protocol::events::SessionOpen;
use serde_json::Value;

const STEP: Duration = Duration::from_secs(120);
/// The engine's Redis keys (the standard prefix: `berth engine` runs with production names).
const POOL_FREE: &str = "berth:engine:pool:free";
const POOL_SLOTS: &str = "berth:engine:pool:slots";

fn config(size: u32) -> HarnessConfig {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config = HarnessConfig::local(env!("CARGO_BIN_EXE_berth").into(), manifest.join("patterns")).with_plain_directories();
    config.profile_text = config.profile_text.replace("berth-test/oom:latest", "berth-test/busybox:latest")
        + &format!("\n[pool]\nsize = {size}\nmax_idle_secs = 0\n");
    // Twenty sessions of 48 MiB and 0.5 CPU must fit the budget; users are distinct.
    config.profile_text = config.profile_text.replace("host_memory_mib = 0", "host_memory_mib = 8192");
    // The host's workspace cache on, so a warm reopen takes it.
    config.profile_text = config.profile_text.replace("quota_mib = 512", "quota_mib = 512\ncache_mib = 512");
    config
}

fn docker(arguments: &[&str]) -> String {
    let output = Command::new("docker").args(arguments).output().expect("docker runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// This deployment's containers: name → (state, pool slot label or '').
fn containers(deployment: &Deployment) -> BTreeMap<String, (String, String)> {
    let filter = format!("label=berth.deployment={}", deployment.id);
    docker(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}} {{.State}} {{.Label \"berth.pool.slot\"}}"])
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let name = parts.next()?.to_owned();
            let state = parts.next()?.to_owned();
            Some((name, (state, parts.next().unwrap_or_default().to_owned())))
        })
        .collect()
}

fn free_slots(deployment: &Deployment) -> BTreeSet<String> {
    deployment.redis_cli(&["zrange", POOL_FREE, "0", "-1"]).unwrap_or_default().split_whitespace().map(str::to_owned).collect()
}

/// `pool:slots`: slot → state text.
fn slot_states(deployment: &Deployment) -> BTreeMap<String, String> {
    let text = deployment.redis_cli(&["hgetall", POOL_SLOTS]).unwrap_or_default();
    let words: Vec<&str> = text.split_whitespace().collect();
    words.chunks(2).filter(|pair| pair.len() == 2).map(|pair| (pair[0].to_owned(), pair[1].to_owned())).collect()
}

async fn wait_until(what: &str, deployment: &Deployment, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !condition() {
        assert!(Instant::now() < deadline, "{what} did not happen\n{}", deployment.logs_tail(40));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `size` slots are free and every one of them is a running pool container.
async fn wait_for_full_pool(deployment: &Deployment, size: usize) -> BTreeSet<String> {
    wait_until(&format!("{size} free pool slots"), deployment, || free_slots(deployment).len() == size).await;
    let slots = free_slots(deployment);
    let listed = containers(deployment);
    for slot in &slots {
        let name = format!("berth-pool-{slot}");
        assert_eq!(
            listed.get(&name).map(|(state, label)| (state.as_str(), label.as_str())),
            Some(("running", slot.as_str())),
            "{listed:?}"
        );
    }
    slots
}

/// The container a `running` notification names: (its name, its state, its pool slot label or '').
fn container_of(running: &Value) -> (String, String, String) {
    let id = running["container_id"].as_str().expect("running names the container");
    let text = docker(&["inspect", "-f", "{{.Name}} {{.State.Status}} {{index .Config.Labels \"berth.pool.slot\"}}", id]);
    let mut parts = text.split_whitespace().map(str::to_owned);
    let name = parts.next().unwrap_or_default().trim_start_matches('/').to_owned();
    (name, parts.next().unwrap_or_default(), parts.next().unwrap_or_default())
}

/// Runs a shell command inside a container.
fn exec_in(container: &str, script: &str) -> Result<String, String> {
    let output = Command::new("docker").args(["exec", container, "sh", "-c", script]).output().expect("docker runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The session a claimed slot's identity file names, if any.
fn claimant(deployment: &Deployment, slot: &str) -> Option<String> {
    let file = deployment.deployment_root().join(".berth-pool").join(format!("{slot}.identity")).join("session.json");
    let claim: Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    claim["session"].as_str().map(str::to_owned)
}

fn port_of(detail: &Value) -> u16 {
    let port = &detail["port"];
    port.as_u64().or_else(|| port.as_str().and_then(|text| text.parse().ok())).expect("running carries the port") as u16
}

async fn open(deployment: &Deployment, session: &str, user: &str, workspace: &str) {
    let open = SessionOpen { user: user.parse().expect("a user id"), workspace: workspace.parse().expect("a workspace id"), profile: None };
    deployment.publish(session, user, &open).await.expect("open published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_claim_runs_on_the_pool_container_with_the_files_and_its_close_removes_it() {
    let deployment = Deployment::start(&config(2)).await.expect("deployment");
    let slots = wait_for_full_pool(&deployment, 2).await;
    // Before a claim a slot holds nothing of anyone: an empty directory, no identity, no session.
    for slot in &slots {
        let slot_dir = deployment.deployment_root().join(".berth-pool").join(slot);
        assert_eq!(std::fs::read_dir(&slot_dir).expect("slot directory").count(), 0, "{}", slot_dir.display());
        let identity = deployment.deployment_root().join(".berth-pool").join(format!("{slot}.identity"));
        assert_eq!(std::fs::read_dir(&identity).expect("identity folder").count(), 0);
        let env = docker(&["inspect", "-f", "{{json .Config.Env}} {{json .Config.Labels}}", &format!("berth-pool-{slot}")]);
        assert!(!env.contains("BERTH_SESSION") && !env.contains("berth.session") && !env.contains("berth.user"), "{env}");
    }

    let user = "ana";
    deployment.put_object(&Deployment::object_key(user, "w1", "hello.txt"), b"hello from the store\n".to_vec()).await.expect("put");
    let session = uuid::Uuid::now_v7().to_string();
    open(&deployment, &session, user, "w1").await;
    let running = deployment.inbox.wait_state(&session, "running", STEP).await.expect("running");
    let (name, state, slot) = container_of(&running.notification.detail);
    assert_eq!(state, "running");
    assert!(slots.contains(&slot), "the session runs on a pool container ({slot:?} of {slots:?})");
    assert_eq!(name, format!("berth-pool-{slot}"), "a claim renames nothing");
    assert!(!containers(&deployment).contains_key(&Deployment::container_name(&session)), "no container of the session's own name");
    let index = deployment.deployment_root().join(".berth-pool").join(".sessions").join(&session);
    assert_eq!(std::fs::read_to_string(&index).expect("the claim's index entry"), slot);
    // The files, through the container's own mount, and the identity the claim handed it.
    let (status, body) = http_get(port_of(&running.notification.detail), "/hello.txt").expect("the workspace answers");
    assert_eq!((status, body.as_slice()), (200, b"hello from the store\n".as_slice()));
    let identity: Value = serde_json::from_str(&exec_in(&name, "cat /run/berth/session.json").expect("identity")).expect("json");
    assert_eq!(
        (identity["session"].as_str(), identity["user"].as_str(), identity["slot"].as_str()),
        (Some(session.as_str()), Some(user), Some(slot.as_str()))
    );
    assert!(exec_in(&name, "echo forged > /run/berth/session.json").is_err(), "the identity is read-only inside");
    let states = slot_states(&deployment);
    assert!(states.get(&slot).is_some_and(|state| state.starts_with("claimed:")), "{states:?}");

    // The pool refills in the background: two free slots again, the claimed one not among them.
    let refilled = wait_for_full_pool(&deployment, 2).await;
    assert!(!refilled.contains(&slot));

    // Close: final sync first (the pause before it and the removal after it find the pool
    // container through the claim), then the container goes, and never back into the pool.
    exec_in(&name, "echo work > /workspace/made-inside.txt").expect("write inside");
    deployment.close(&session, user).await.expect("close");
    let closed = deployment.inbox.wait_terminal(&session, STEP).await.expect("closed");
    assert_eq!(closed.state, "closed", "{closed:?}");
    assert_eq!(deployment.get_object(&Deployment::object_key(user, "w1", "made-inside.txt")).await.expect("get"), Some(b"work\n".to_vec()));
    let states = deployment.inbox.states(&session);
    assert!(states.iter().any(|state| state == "saving"), "the exit saved first: {states:?}");
    let listed = containers(&deployment);
    assert!(!listed.contains_key(&name), "{listed:?}");
    assert!(!index.exists(), "the claim's index entry went with the container");
    wait_until("the ended claim forgotten", &deployment, || !slot_states(&deployment).contains_key(&slot)).await;
    assert!(!free_slots(&deployment).contains(&slot));
    assert!(!deployment.directories().contains(&session), "{:?}", deployment.directories());

    // Reopened warm, the workspace comes from the host's cache into the claimed slot's directory
    // (the one the container has mounted), never in place of it.
    let reopened = uuid::Uuid::now_v7().to_string();
    open(&deployment, &reopened, user, "w1").await;
    let running = deployment.inbox.wait_state(&reopened, "running", STEP).await.expect("running again");
    let (reopened_name, _, slot) = container_of(&running.notification.detail);
    assert!(!slot.is_empty(), "reopened on a pool container");
    assert!(deployment.log(Component::Workspace).contains("reopened from the host's workspace cache"), "the cache was used");
    let port = port_of(&running.notification.detail);
    for (path, content) in [("/hello.txt", &b"hello from the store\n"[..]), ("/made-inside.txt", &b"work\n"[..])] {
        let (status, body) = http_get(port, path).expect("the workspace answers");
        assert_eq!((status, body.as_slice()), (200, content), "{path}");
    }
    exec_in(&reopened_name, "echo again > /workspace/again.txt").expect("the container writes in its workspace");
    deployment.close(&reopened, user).await.expect("close");
    deployment.inbox.wait_terminal(&reopened, STEP).await.expect("closed");
    assert_eq!(deployment.get_object(&Deployment::object_key(user, "w1", "again.txt")).await.expect("get"), Some(b"again\n".to_vec()));
    assert_eq!(deployment.dead_letters().await.expect("dead letters"), Vec::<String>::new());
    deployment.teardown().await;
}

/// A warm open claims its slot and materializes side by side (`claiming`); when the materialize
/// fails (the workspace is over the quota), the session fails through the usual exit and the
/// slot does not leak: its container (claimed or not by then) and folders are gone, Redis
/// forgets the claim, and the pool refills with a new slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_open_whose_materialize_fails_ends_without_leaking_its_slot() {
    let mut config = config(1);
    config.profile_text = config.profile_text.replace("quota_mib = 512\n", "quota_mib = 1\n");
    let deployment = Deployment::start(&config).await.expect("deployment");
    let slots = wait_for_full_pool(&deployment, 1).await;
    let slot = slots.first().cloned().expect("one slot");
    let user = "over";
    deployment.put_object(&Deployment::object_key(user, "big", "big.bin"), vec![7u8; 2 * 1024 * 1024]).await.expect("put");
    let session = uuid::Uuid::now_v7().to_string();
    open(&deployment, &session, user, "big").await;
    let ended = deployment.inbox.wait_terminal(&session, STEP).await.expect("the session ends");
    assert_eq!(ended.state, "failed", "{ended:?}");
    let states = deployment.inbox.states(&session);
    assert!(states.iter().any(|state| state == "claiming"), "a warm open: {states:?}");
    assert!(!states.iter().any(|state| state == "running" || state == "provisioning"), "never provisioned: {states:?}");
    wait_until("the failed claim forgotten", &deployment, || !slot_states(&deployment).contains_key(&slot)).await;
    wait_until("the slot's container gone", &deployment, || {
        let listed = containers(&deployment);
        !listed.contains_key(&format!("berth-pool-{slot}")) && !listed.contains_key(&Deployment::container_name(&session))
    })
    .await;
    let pool = deployment.deployment_root().join(".berth-pool");
    wait_until("the slot's folders gone", &deployment, || !pool.join(&slot).exists() && !pool.join(format!("{slot}.identity")).exists())
        .await;
    assert!(!deployment.directories().contains(&session), "{:?}", deployment.directories());
    let refilled = wait_for_full_pool(&deployment, 1).await;
    assert!(!refilled.contains(&slot), "a claimed slot never returns to the pool");
    assert_eq!(deployment.dead_letters().await.expect("dead letters"), Vec::<String>::new());
    deployment.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_racing_opens_on_a_pool_of_five_claim_each_slot_exactly_once() {
    let deployment = Deployment::start(&config(5)).await.expect("deployment");
    let initial = wait_for_full_pool(&deployment, 5).await;
    let sessions: Vec<(String, String)> = (0..20).map(|index| (uuid::Uuid::now_v7().to_string(), format!("racer-{index}"))).collect();
    let opens = sessions.iter().map(|(session, user)| open(&deployment, session, user, "w"));
    futures::future::join_all(opens).await;
    let mut claimed_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut cold = 0;
    for (session, _) in &sessions {
        let running = deployment.inbox.wait_state(session, "running", STEP).await.expect("every open runs");
        let (name, state, slot) = container_of(&running.notification.detail);
        assert_eq!(state, "running");
        if slot.is_empty() {
            assert_eq!(name, Deployment::container_name(session));
            cold += 1;
        } else {
            // The slot's own container, claimed by this session and no other.
            assert_eq!(name, format!("berth-pool-{slot}"));
            assert_eq!(claimant(&deployment, &slot).as_deref(), Some(session.as_str()), "slot {slot}");
            claimed_by.entry(slot).or_default().push(session.clone());
        }
    }
    // Every slot went to one session at most, and each of the five free at the start to exactly one.
    assert!(claimed_by.values().all(|owners| owners.len() == 1), "{claimed_by:?}");
    let initial_claimed: BTreeSet<String> = claimed_by.keys().filter(|slot| initial.contains(*slot)).cloned().collect();
    assert_eq!(initial_claimed, initial, "{claimed_by:?}");
    // Slots made during the race may have been claimed too; everything else opened cold.
    assert_eq!(cold + claimed_by.len(), 20);
    eprintln!("20 racing opens on 5 slots: {} warm ({} of them from the refill), {cold} cold", claimed_by.len(), claimed_by.len() - 5);
    // Redis agrees: each claimed slot is recorded for one thred, none of them is free.
    let states = slot_states(&deployment);
    let free = free_slots(&deployment);
    for slot in claimed_by.keys() {
        assert!(states.get(slot).is_some_and(|state| state.starts_with("claimed:")), "{slot}: {states:?}");
        assert!(!free.contains(slot));
    }
    let claiming_threds: BTreeSet<&String> = states.values().filter(|state| state.starts_with("claimed:")).collect();
    assert_eq!(claiming_threds.len(), states.values().filter(|state| state.starts_with("claimed:")).count(), "one thred per claim");

    for (session, user) in &sessions {
        deployment.close(session, user).await.expect("close");
    }
    for (session, _) in &sessions {
        let ended = deployment.inbox.wait_terminal(session, STEP).await.expect("closed");
        assert_eq!(ended.state, "closed");
    }
    // Only the refilled pool is left: running pool containers of free slots, none of a session.
    let free = wait_for_full_pool(&deployment, 5).await;
    let leftovers: Vec<String> =
        containers(&deployment).into_keys().filter(|name| !free.iter().any(|slot| *name == format!("berth-pool-{slot}"))).collect();
    assert_eq!(leftovers, Vec::<String>::new());
    assert_eq!(deployment.dead_letters().await.expect("dead letters"), Vec::<String>::new());
    deployment.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_or_container_agent_killed_mid_claim_leaves_every_slot_claimed_or_free() {
    let mut deployment = Deployment::start(&config(3)).await.expect("deployment");
    // The engine dies at a different moment of the claims each round: before it consumed the
    // opens, between the commits and their tasks, and after; then the container agent, between a
    // claim's identity file, its index entry and provision's readiness check.
    let kills = [
        (Component::Engine, 0u64),
        (Component::Engine, 10),
        (Component::Engine, 25),
        (Component::Engine, 60),
        (Component::Container, 150),
        (Component::Container, 300),
    ];
    for (round, (component, kill_after_ms)) in kills.into_iter().enumerate() {
        let initial = wait_for_full_pool(&deployment, 3).await;
        let sessions: Vec<(String, String)> =
            (0..3).map(|index| (uuid::Uuid::now_v7().to_string(), format!("crash-{round}-{index}"))).collect();
        let opens = sessions.iter().map(|(session, user)| open(&deployment, session, user, "w"));
        futures::future::join_all(opens).await;
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        deployment.kill(component);
        let after_kill = slot_states(&deployment);
        eprintln!("round {round}, {} killed after {kill_after_ms} ms: {after_kill:?}", component.name());
        for slot in &initial {
            let state = after_kill.get(slot).cloned().unwrap_or_default();
            assert!(state.starts_with("free:") || state.starts_with("claimed:"), "slot {slot} is {state:?}: neither free nor claimed");
        }
        deployment.start_component(component).expect("the killed component restarts");
        for (session, _) in &sessions {
            deployment.inbox.wait_state(session, "running", STEP).await.expect("every open runs after the restart");
        }
        // Every slot claimed is its session's container now; every other one is still free.
        let listed = containers(&deployment);
        let states = slot_states(&deployment);
        let free = free_slots(&deployment);
        for slot in &initial {
            let state = states.get(slot).cloned().unwrap_or_default();
            if state.starts_with("claimed:") {
                assert!(listed.contains_key(&format!("berth-pool-{slot}")), "the claimed slot's container: {listed:?}");
                let owner = claimant(&deployment, slot).unwrap_or_default();
                assert!(sessions.iter().any(|(candidate, _)| *candidate == owner), "slot {slot} is {owner:?}'s, not one of the sessions'");
                assert!(!free.contains(slot));
            } else {
                assert!(state.starts_with("free:") && free.contains(slot), "slot {slot} is {state:?}: leaked");
                assert!(listed.contains_key(&format!("berth-pool-{slot}")));
            }
        }
        // No pool container nobody accounts for: each is free, being made, or a session's.
        for (name, (_, slot)) in &listed {
            if !slot.is_empty() {
                assert!(states.contains_key(slot), "{name} (slot {slot}) is in no state: {states:?}");
            }
        }
        for (session, user) in &sessions {
            deployment.close(session, user).await.expect("close");
        }
        for (session, _) in &sessions {
            deployment.inbox.wait_terminal(session, STEP).await.expect("closed");
        }
    }
    assert_eq!(deployment.dead_letters().await.expect("dead letters"), Vec::<String>::new());
    deployment.teardown().await;
}

/// Open→running for `concurrency` opens published at once on one client connection (distinct
/// users), each closed (and waited for) before the next round; returns one duration per open.
/// Each sample: (open → running, the container's part: provisioning → running, or claiming → running
/// for a warm claim that needed no provisioning).
async fn timed_opens(
    deployment: &Deployment,
    client: &protocol::Bus,
    rounds: usize,
    concurrency: usize,
    tag: &str,
) -> Vec<(Duration, Duration)> {
    let mut samples = Vec::new();
    for round in 0..rounds {
        let sessions: Vec<(String, String)> =
            (0..concurrency).map(|index| (uuid::Uuid::now_v7().to_string(), format!("{tag}-{round}-{index}"))).collect();
        // A small workspace each (10 files), put before the clock starts.
        for (_, user) in &sessions {
            for index in 0..10 {
                let key = Deployment::object_key(user, "w", &format!("src/file-{index}.txt"));
                deployment.put_object(&key, format!("file {index}\n").into_bytes()).await.expect("put");
            }
        }
        let began = Instant::now();
        let publishes = sessions.iter().map(|(session, user)| {
            let open =
                SessionOpen { user: user.parse().expect("a user id"), workspace: "w".parse().expect("a workspace id"), profile: None };
            let event = protocol::CloudEvent::of("/tests/pool", Some(session), &open).with_extension("userid", user.clone());
            async move { client.publish_event(&event).await.expect("published") }
        });
        futures::future::join_all(publishes).await;
        for (session, _) in &sessions {
            let running = deployment.inbox.wait_state(session, "running", STEP).await.expect("running");
            // A warm claim that found its container answering runs straight from `claiming`.
            let container_from =
                if deployment.inbox.states(session).iter().any(|state| state == "provisioning") { "provisioning" } else { "claiming" };
            let from = deployment.inbox.wait_state(session, container_from, STEP).await.expect("the container's part began");
            samples.push((running.at.saturating_duration_since(began), running.at.saturating_duration_since(from.at)));
        }
        for (session, user) in &sessions {
            deployment.close(session, user).await.expect("close");
        }
        for (session, _) in &sessions {
            deployment.inbox.wait_terminal(session, STEP).await.expect("closed");
        }
    }
    samples
}

fn summary(samples: &[Duration]) -> String {
    let ms = |fraction| bench::stats::milliseconds(bench::stats::percentile(samples, fraction));
    format!("n={:>3}  p50 {:>7.1} ms  p95 {:>7.1} ms  p99 {:>7.1} ms", samples.len(), ms(0.50), ms(0.95), ms(0.99))
}

/// Figures, not a check (`cargo test --test pool open_figures -- --ignored --nocapture`): open →
/// running for a warm claim and for a cold open of a small workspace (10 files) at 1, 10 and 50
/// concurrent opens, one deployment each (pool of 50, and none), in the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "figures for the README; takes a few minutes"]
async fn open_figures() {
    let mut table = Vec::new();
    for (kind, size) in [("warm", 50u32), ("cold", 0)] {
        let deployment = Deployment::start(&config(size)).await.expect("deployment");
        let client = protocol::Bus::connect(
            protocol::BusConfig::for_identity(deployment.bus.url(), protocol::Identity::Client, "pool-figures").expect("client identity"),
        )
        .await
        .expect("client");
        let plan: Vec<(usize, usize)> = match std::env::var("BERTH_POOL_FIGURES").as_deref() {
            Ok("quick") => vec![(1, 10), (10, 1)],
            _ => vec![(1, 20), (10, 3), (50, 1)],
        };
        for (concurrency, rounds) in plan {
            if size > 0 {
                wait_for_full_pool(&deployment, size as usize).await;
            }
            let samples = timed_opens(&deployment, &client, rounds, concurrency, &format!("{kind}-{concurrency}")).await;
            let opens: Vec<Duration> = samples.iter().map(|(open, _)| *open).collect();
            let containers: Vec<Duration> = samples.iter().map(|(_, container)| *container).collect();
            table.push(format!("{kind} {concurrency:>2} at once  open→running     {}", summary(&opens)));
            table.push(format!("{kind} {concurrency:>2} at once  container part → running {}", summary(&containers)));
            eprintln!("{}", table[table.len() - 2..].join("\n"));
        }
        client.close().await;
        if let Ok(keep) = std::env::var("BERTH_POOL_FIGURES_LOGS") {
            let target = Path::new(&keep).join(kind);
            let _ = std::fs::create_dir_all(&target);
            for name in ["engine", "container", "workspace"] {
                let _ = std::fs::copy(deployment.root.join("logs").join(format!("{name}.log")), target.join(format!("{name}.log")));
            }
        }
        deployment.teardown().await;
    }
    eprintln!("\n{}", table.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_removes_pool_containers_nobody_knows_and_replaces_dead_ones() {
    let deployment = Deployment::start(&config(2)).await.expect("deployment");
    let slots: Vec<String> = wait_for_full_pool(&deployment, 2).await.into_iter().collect();
    let (unknown, dead) = (slots[0].clone(), slots[1].clone());
    // One slot Redis forgets (as after a lost write), one whose container dies while free.
    deployment.redis_cli(&["zrem", POOL_FREE, &unknown]).expect("zrem");
    deployment.redis_cli(&["hdel", POOL_SLOTS, &unknown]).expect("hdel");
    let dead_name = format!("berth-pool-{dead}");
    docker(&["kill", &dead_name]);
    let unknown_name = format!("berth-pool-{unknown}");
    wait_until("both pool containers gone", &deployment, || {
        let listed = containers(&deployment);
        !listed.contains_key(&unknown_name) && !listed.contains_key(&dead_name)
    })
    .await;
    let states = slot_states(&deployment);
    assert!(!states.contains_key(&unknown) && !states.contains_key(&dead), "{states:?}");
    // And the pool is whole again, with new slots.
    let refilled = wait_for_full_pool(&deployment, 2).await;
    assert!(!refilled.contains(&unknown) && !refilled.contains(&dead));
    for slot in [&unknown, &dead] {
        assert!(!deployment.deployment_root().join(".berth-pool").join(slot).exists(), "slot {slot}'s directory is gone");
    }
    assert_eq!(deployment.dead_letters().await.expect("dead letters"), Vec::<String>::new());
    deployment.teardown().await;
}
