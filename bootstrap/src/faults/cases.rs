//! The fault matrix: each case opens sessions on a [`Deployment`], leaves unsynced work in them,
//! injects its fault, lets the system converge and then counts, file by file, what reached the
//! object store ([`Tally`]). A case returns an error when the system behaved wrongly in a way that
//! is not a count (a wrong end state, a dead-lettered message, a component that died by itself).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::harness::{Component, Deployment, STEP_TIMEOUT};

/// What a case (or a whole run) found.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Faults injected.
    pub injected: usize,
    /// Files (and special entries) whose bytes or metadata were checked.
    pub files_checked: usize,
    /// Files whose bytes are not in the store after their session ended.
    pub lost: Vec<String>,
    /// Versions written by someone else that were replaced without a conflict copy.
    pub overwritten: Vec<String>,
    /// Containers or directories left behind.
    pub stranded: Vec<String>,
    /// `stopping` → `saving` of every ended session: what the freeze adds to a close.
    pub freeze: Vec<Duration>,
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        self.injected += other.injected;
        self.files_checked += other.files_checked;
        self.lost.extend(other.lost);
        self.overwritten.extend(other.overwritten);
        self.stranded.extend(other.stranded);
        self.freeze.extend(other.freeze);
    }

    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.overwritten.is_empty() && self.stranded.is_empty()
    }

    /// `faults: N injected, X files checked, 0 lost, 0 overwritten, 0 stranded`
    pub fn summary(&self) -> String {
        format!(
            "faults: {} injected, {} files checked, {} lost, {} overwritten, {} stranded",
            self.injected,
            self.files_checked,
            self.lost.len(),
            self.overwritten.len(),
            self.stranded.len()
        )
    }

    /// Every finding, one a line (empty when clean).
    pub fn findings(&self) -> String {
        let mut text = String::new();
        for (kind, items) in [("lost", &self.lost), ("overwritten", &self.overwritten), ("stranded", &self.stranded)] {
            for item in items {
                text.push_str(&format!("{kind}: {item}\n"));
            }
        }
        text
    }
}

/// Where the workspace agent is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkspacePhase {
    Materialize,
    IncrementalSync,
    FinalSync,
    Remove,
}

/// One row of the fault matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// Two opens of one workspace at once, one over AMQP and one over the WebSocket.
    TwoOpens,
    /// An outside writer changes an object during the session.
    OutsideWriter,
    /// `docker kill` of the session container with unsynced work.
    DockerKill,
    /// The container's main process is killed by the OOM killer.
    OomKill,
    /// SIGKILL of the workspace agent in one phase, then a restart.
    KillWorkspaceAgent(WorkspacePhase),
    /// SIGKILL of the container agent while it provisions, then a restart.
    KillContainerAgentProvisioning,
    /// Redis FLUSHALL under running sessions; the engine keeps running.
    RedisFlush,
    /// The object store is unreachable across a close, longer than one sync attempt's retries.
    StoreOutage,
    /// A 3 s Redis restart and a 3 s Docker engine outage during running sessions.
    RedisRestartAndDockerOutage,
    /// Symlink, empty directory, executable, backslash and non-UTF-8 names round-trip or are kept.
    SpecialEntries,
}

impl Case {
    pub const ALL: [Case; 13] = [
        Case::TwoOpens,
        Case::OutsideWriter,
        Case::DockerKill,
        Case::OomKill,
        Case::KillWorkspaceAgent(WorkspacePhase::Materialize),
        Case::KillWorkspaceAgent(WorkspacePhase::IncrementalSync),
        Case::KillWorkspaceAgent(WorkspacePhase::FinalSync),
        Case::KillWorkspaceAgent(WorkspacePhase::Remove),
        Case::KillContainerAgentProvisioning,
        Case::RedisFlush,
        Case::StoreOutage,
        Case::RedisRestartAndDockerOutage,
        Case::SpecialEntries,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::TwoOpens => "two-opens",
            Case::OutsideWriter => "outside-writer",
            Case::DockerKill => "docker-kill",
            Case::OomKill => "oom-kill",
            Case::KillWorkspaceAgent(WorkspacePhase::Materialize) => "kill-workspace-materialize",
            Case::KillWorkspaceAgent(WorkspacePhase::IncrementalSync) => "kill-workspace-incremental-sync",
            Case::KillWorkspaceAgent(WorkspacePhase::FinalSync) => "kill-workspace-final-sync",
            Case::KillWorkspaceAgent(WorkspacePhase::Remove) => "kill-workspace-remove",
            Case::KillContainerAgentProvisioning => "kill-container-provision",
            Case::RedisFlush => "redis-flushall",
            Case::StoreOutage => "store-outage",
            Case::RedisRestartAndDockerOutage => "redis-restart-docker-outage",
            Case::SpecialEntries => "special-entries",
        }
    }
}

/// Runs `case` over `sessions` concurrent sessions and checks that the deployment is clean after.
pub async fn run_case(deployment: &mut Deployment, case: Case, sessions: usize) -> anyhow::Result<Tally> {
    let sessions = sessions.max(1);
    let tag = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
    let users: Vec<String> = (0..sessions).map(|index| format!("{}-{index}-{tag}", short_name(case))).collect();
    let mut tally = Tally::default();
    let outcome = match case {
        Case::TwoOpens => two_opens(deployment, &users, &mut tally).await,
        Case::OutsideWriter => outside_writer(deployment, &users, &mut tally).await,
        Case::DockerKill => container_dies(deployment, &users, ContainerDeath::Killed, &mut tally).await,
        Case::OomKill => container_dies(deployment, &users, ContainerDeath::OutOfMemory, &mut tally).await,
        Case::KillWorkspaceAgent(WorkspacePhase::Materialize) => kill_mid_materialize(deployment, &users, &mut tally).await,
        Case::KillWorkspaceAgent(WorkspacePhase::IncrementalSync) => {
            kill_mid_sync(deployment, &users, SyncKind::Incremental, &mut tally).await
        }
        Case::KillWorkspaceAgent(WorkspacePhase::FinalSync) => kill_mid_sync(deployment, &users, SyncKind::Final, &mut tally).await,
        Case::KillWorkspaceAgent(WorkspacePhase::Remove) => kill_mid_remove(deployment, &users, &mut tally).await,
        Case::KillContainerAgentProvisioning => kill_mid_provision(deployment, &users, &mut tally).await,
        Case::RedisFlush => redis_flush(deployment, &users, &mut tally).await,
        Case::StoreOutage => store_outage(deployment, &users, &mut tally).await,
        Case::RedisRestartAndDockerOutage => redis_and_docker_outage(deployment, &users, &mut tally).await,
        Case::SpecialEntries => special_entries(deployment, &users, &mut tally).await,
    };
    outcome.with_context(|| format!("case {}", case.name()))?;
    check_deployment_clean(deployment, &mut tally).await.with_context(|| format!("case {} (afterwards)", case.name()))?;
    Ok(tally)
}

fn short_name(case: Case) -> &'static str {
    match case {
        Case::TwoOpens => "two",
        Case::OutsideWriter => "outside",
        Case::DockerKill => "kill",
        Case::OomKill => "oom",
        Case::KillWorkspaceAgent(WorkspacePhase::Materialize) => "wsmat",
        Case::KillWorkspaceAgent(WorkspacePhase::IncrementalSync) => "wsinc",
        Case::KillWorkspaceAgent(WorkspacePhase::FinalSync) => "wsfin",
        Case::KillWorkspaceAgent(WorkspacePhase::Remove) => "wsrm",
        Case::KillContainerAgentProvisioning => "prov",
        Case::RedisFlush => "flush",
        Case::StoreOutage => "store",
        Case::RedisRestartAndDockerOutage => "outage",
        Case::SpecialEntries => "special",
    }
}

const WORKSPACE: &str = "w";

/// Deterministic content, different for every `seed`.
pub fn payload(seed: &str, size: usize) -> Vec<u8> {
    let line = format!("{seed} — berth keeps every byte\n");
    line.as_bytes().iter().copied().cycle().take(size).collect()
}

/// What one user's workspace must hold in the store once its session has ended.
#[derive(Debug, Clone, Default)]
struct Expected {
    files: BTreeMap<String, Vec<u8>>,
}

impl Expected {
    fn add(&mut self, path: &str, bytes: Vec<u8>) {
        self.files.insert(path.to_owned(), bytes);
    }
}

async fn seed(deployment: &Deployment, user: &str, files: &[(String, Vec<u8>)], expected: &mut Expected) -> anyhow::Result<()> {
    let uploads = files.iter().map(|(path, bytes)| async move {
        let key = Deployment::object_key(user, WORKSPACE, path);
        deployment.put_object(&key, bytes.clone()).await
    });
    futures::stream::iter(uploads).buffer_unordered(16).collect::<Vec<_>>().await.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    for (path, bytes) in files {
        expected.add(path, bytes.clone());
    }
    Ok(())
}

/// Writes one file inside the session's container and expects it in the store.
fn write_work(deployment: &Deployment, session: &str, path: &str, bytes: Vec<u8>, expected: &mut Expected) -> anyhow::Result<()> {
    deployment.write_inside(session, path, &bytes)?;
    expected.add(path, bytes);
    Ok(())
}

/// For every user: a seeded workspace, a running session, and `work` done inside it; returns
/// the sessions and what the store must hold for each afterwards.
async fn open_running_with(
    deployment: &Deployment,
    users: &[String],
    mut work: impl FnMut(&Deployment, &str, &str, &mut Expected) -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<String>, Vec<Expected>)> {
    let mut sessions = Vec::new();
    let mut expectations = Vec::new();
    for user in users {
        let mut expected = Expected::default();
        seed(deployment, user, &[("seeded.txt".to_owned(), payload(user, 100))], &mut expected).await?;
        let session = open_running(deployment, user).await?;
        work(deployment, &session, user, &mut expected)?;
        sessions.push(session);
        expectations.push(expected);
    }
    Ok((sessions, expectations))
}

async fn open_running(deployment: &Deployment, user: &str) -> anyhow::Result<String> {
    let session = deployment.open_amqp(user, WORKSPACE).await?;
    deployment.inbox.wait_state(&session, "running", STEP_TIMEOUT).await?;
    Ok(session)
}

/// Compares the store with `expected`, file by file.
async fn check_store(deployment: &Deployment, user: &str, expected: &Expected, tally: &mut Tally) -> anyhow::Result<()> {
    for (path, bytes) in &expected.files {
        tally.files_checked += 1;
        let key = Deployment::object_key(user, WORKSPACE, path);
        match deployment.get_object(&key).await? {
            Some(stored) if &stored == bytes => {}
            Some(stored) => {
                tally.lost.push(format!("{key}: the store holds {} other bytes, not the {} written", stored.len(), bytes.len()))
            }
            None => tally.lost.push(format!("{key}: not in the store")),
        }
    }
    Ok(())
}

/// Waits for the session's end, checks it is one of `terminals`, that its exit went through the
/// freeze and a confirmed final sync before anything was removed, and that nothing is left of it.
async fn check_ended(
    deployment: &Deployment,
    session: &str,
    terminals: &[&str],
    tally: &mut Tally,
) -> anyhow::Result<protocol::Notification> {
    let end = deployment.inbox.wait_terminal(session, STEP_TIMEOUT).await?;
    if !terminals.contains(&end.state.as_str()) {
        bail!("session {session} ended {} ({}), expected one of {terminals:?}", end.state, end.detail);
    }
    check_exit_path(deployment, session, &end.state, tally).await?;
    if let Some(state) = deployment.container_state(session) {
        tally.stranded.push(format!("container of {session} ({state}) after it ended {}", end.state));
    }
    if deployment.session_dir(session).exists() {
        tally.stranded.push(format!("directory of {session} after it ended {}", end.state));
    }
    Ok(end)
}

fn parse_at(entry: &Value) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(entry["at"].as_str()?).ok()
}

/// The audit trail says: stopping → saving → removing_container (entered on a confirmed final
/// `workspace.synced`, never before) → removing_workspace → the end. Records the freeze cost.
async fn check_exit_path(deployment: &Deployment, session: &str, terminal: &str, tally: &mut Tally) -> anyhow::Result<()> {
    // Audit records are written fire-and-forget; the last one may trail the notification a little.
    let deadline = Instant::now() + Duration::from_secs(15);
    let history = loop {
        let history = deployment.history(session).await?;
        if history.iter().any(|entry| entry["to"] == terminal) || Instant::now() > deadline {
            break history;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let targets: Vec<&str> = history.iter().filter_map(|entry| entry["to"].as_str()).collect();
    let position = |state: &str, from: usize| targets.iter().skip(from).position(|t| *t == state).map(|p| p + from);
    let Some(stopping) = targets.iter().rposition(|t| *t == "stopping") else {
        bail!("session {session} never went through stopping: {targets:?}");
    };
    let saving = position("saving", stopping).ok_or_else(|| anyhow!("session {session}: no saving after stopping: {targets:?}"))?;
    let removing =
        position("removing_container", saving).ok_or_else(|| anyhow!("session {session}: no removing_container: {targets:?}"))?;
    position("removing_workspace", removing).ok_or_else(|| anyhow!("session {session}: no removing_workspace: {targets:?}"))?;
    for entry in &history {
        if entry["to"] == "removing_container" && entry["event_type"] != "workspace.synced" {
            bail!("session {session} removed its container on {} instead of a confirmed final sync: {targets:?}", entry["event_type"]);
        }
    }
    if let (Some(frozen_at), Some(saving_at)) = (parse_at(&history[stopping]), parse_at(&history[saving])) {
        tally.freeze.push((saving_at - frozen_at).to_std().unwrap_or_default());
    }
    Ok(())
}

/// Nothing of the deployment's sessions is left, nothing was dead-lettered, no component died.
async fn check_deployment_clean(deployment: &mut Deployment, tally: &mut Tally) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let containers = deployment.containers();
        let directories = deployment.directories();
        if containers.is_empty() && directories.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let leftovers = containers
                .into_iter()
                .map(|name| format!("container {name}"))
                .chain(directories.into_iter().map(|name| format!("directory {name}")));
            for leftover in leftovers {
                if deployment.reported_leftovers.insert(leftover.clone()) {
                    tally.stranded.push(leftover);
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let dead = deployment.dead_letters().await?;
    if !dead.is_empty() {
        bail!("{} messages dead-lettered:\n{}", dead.len(), dead.join("\n"));
    }
    let exited = deployment.exited_components();
    if !exited.is_empty() {
        bail!("components exited by themselves: {exited:?}");
    }
    Ok(())
}

/// Runs `work` for every user at once; the first error wins.
async fn for_each_user<'a, F, T>(users: &'a [String], work: impl Fn(&'a str) -> F) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = anyhow::Result<T>> + 'a,
{
    futures::future::try_join_all(users.iter().map(|user| work(user.as_str()))).await
}

// ----- two opens -----

async fn two_opens(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    let deployment = &*deployment;
    let results = for_each_user(users, |user| async move {
        let mut tally = Tally::default();
        let mut expected = Expected::default();
        seed(deployment, user, &[("readme.txt".to_owned(), payload(user, 300))], &mut expected).await?;
        let token = deployment.mint_token(user)?;
        let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(deployment.websocket_url(&token))?;
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.context("websocket connects")?;
        next_frame(&mut socket, |frame| frame["type"] == "snapshot").await?;
        let open_frame = json!({"type": "open", "id": "o1", "workspace": WORKSPACE, "profile": super::harness::PROFILE_NAME});
        // Both opens at once.
        let (amqp_session, websocket_opened) = tokio::join!(deployment.open_amqp(user, WORKSPACE), async {
            socket.send(Message::text(open_frame.to_string())).await?;
            next_frame(&mut socket, |frame| frame["id"] == "o1").await
        });
        tally.injected += 1;
        let amqp_session = amqp_session?;
        let websocket_opened = websocket_opened?;
        let websocket_session = websocket_opened["session"].as_str().unwrap_or_default().to_owned();
        if websocket_opened["type"] != "ok" || websocket_session != amqp_session {
            bail!("two opens gave two answers: AMQP {amqp_session}, WebSocket {websocket_opened}");
        }
        let session = amqp_session;
        deployment.inbox.wait_state(&session, "running", STEP_TIMEOUT).await?;
        // The WebSocket client sees it running too.
        socket.send(Message::text(json!({"type": "subscribe", "id": "s1", "session": session}).to_string())).await?;
        next_frame(&mut socket, |frame| {
            (frame["type"] == "status" && frame["session"] == session.as_str() && frame["state"] == "running")
                || (frame["id"] == "s1" && frame["status"]["state"] == "running")
        })
        .await
        .context("the WebSocket client sees the session running")?;
        let user_filter = format!("label=berth.user={user}");
        let deployment_filter = format!("label=berth.deployment={}", deployment.id);
        let listed =
            std::process::Command::new("docker").args(["ps", "-aq", "--filter", &user_filter, "--filter", &deployment_filter]).output()?;
        let containers = String::from_utf8_lossy(&listed.stdout).split_whitespace().count();
        if containers != 1 {
            bail!("{containers} containers for one workspace of {user}");
        }
        // Each client's edit.
        write_work(deployment, &session, "from-amqp.txt", payload(&format!("{user} amqp"), 1000), &mut expected)?;
        write_work(deployment, &session, "from-websocket.txt", payload(&format!("{user} websocket"), 1000), &mut expected)?;
        socket.send(Message::text(json!({"type": "close", "id": "c1", "session": session}).to_string())).await?;
        next_frame(&mut socket, |frame| frame["type"] == "status" && frame["session"] == session.as_str() && frame["state"] == "closed")
            .await
            .context("the WebSocket client sees the close")?;
        check_ended(deployment, &session, &["closed"], &mut tally).await?;
        check_store(deployment, user, &expected, &mut tally).await?;
        Ok(tally)
    })
    .await?;
    results.into_iter().for_each(|found| tally.merge(found));
    Ok(())
}

async fn next_frame<S>(socket: &mut S, matches: impl Fn(&Value) -> bool) -> anyhow::Result<Value>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let message =
            tokio::time::timeout_at(deadline, socket.next()).await.map_err(|_| anyhow!("no matching frame within {STEP_TIMEOUT:?}"))?;
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            other => bail!("socket ended while waiting for a frame: {other:?}"),
        };
        let frame: Value = serde_json::from_str(&text)?;
        if matches(&frame) {
            return Ok(frame);
        }
    }
}

// ----- an outside writer -----

async fn outside_writer(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    let deployment = &*deployment;
    let results = for_each_user(users, |user| async move {
        let mut tally = Tally::default();
        let mut expected = Expected::default();
        seed(deployment, user, &[("notes.txt".to_owned(), payload(&format!("{user} base"), 500))], &mut expected).await?;
        let session = open_running(deployment, user).await?;
        let theirs = payload(&format!("{user} theirs"), 700);
        let ours = payload(&format!("{user} ours"), 900);
        deployment.put_object(&Deployment::object_key(user, WORKSPACE, "notes.txt"), theirs.clone()).await?;
        tally.injected += 1;
        deployment.write_inside(&session, "notes.txt", &ours)?;
        deployment.close(&session, user).await?;
        check_ended(deployment, &session, &["closed"], &mut tally).await?;
        // Both versions somewhere: theirs at the key, ours in a conflict copy (or the other way).
        let prefix = Deployment::object_key(user, WORKSPACE, "");
        let keys = deployment.list_objects(prefix.trim_end_matches('/')).await?;
        let mut versions = Vec::new();
        for key in keys.iter().filter(|key| key.contains("notes")) {
            versions.push((key.clone(), deployment.get_object(key).await?.unwrap_or_default()));
        }
        tally.files_checked += 2;
        let key = Deployment::object_key(user, WORKSPACE, "notes.txt");
        if !versions.iter().any(|(_, bytes)| *bytes == theirs) {
            tally.overwritten.push(format!(
                "{key}: the outside writer's version is gone (store has {:?})",
                versions.iter().map(|v| &v.0).collect::<Vec<_>>()
            ));
        }
        if !versions.iter().any(|(_, bytes)| *bytes == ours) {
            tally
                .lost
                .push(format!("{key}: the session's version is gone (store has {:?})", versions.iter().map(|v| &v.0).collect::<Vec<_>>()));
        }
        let copy_prefix = format!("{}notes.conflict-{}-", prefix, &session[..8]);
        if !keys.iter().any(|key| key.starts_with(&copy_prefix) && key.ends_with(".txt")) {
            bail!("no conflict copy named {copy_prefix}<UTC>.txt among {keys:?}");
        }
        let reported = deployment.inbox.find(|n| {
            n.session.as_deref() == Some(session.as_str())
                && n.detail["conflicts"].as_array().is_some_and(|conflicts| !conflicts.is_empty())
        });
        if reported.is_none() {
            bail!("the conflict was not reported to the user (states {:?})", deployment.inbox.states(&session));
        }
        Ok(tally)
    })
    .await?;
    results.into_iter().for_each(|found| tally.merge(found));
    Ok(())
}

// ----- the container dies -----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContainerDeath {
    Killed,
    OutOfMemory,
}

async fn container_dies(deployment: &mut Deployment, users: &[String], death: ContainerDeath, tally: &mut Tally) -> anyhow::Result<()> {
    let deployment = &*deployment;
    let results = for_each_user(users, |user| async move {
        let mut tally = Tally::default();
        let mut expected = Expected::default();
        seed(deployment, user, &[("kept.txt".to_owned(), payload(user, 200))], &mut expected).await?;
        let session = open_running(deployment, user).await?;
        write_work(deployment, &session, "unsynced/work.txt", payload(&format!("{user} work"), 64 * 1024), &mut expected)?;
        match death {
            ContainerDeath::Killed => {
                std::process::Command::new("docker").args(["kill", &Deployment::container_name(&session)]).output()?;
            }
            ContainerDeath::OutOfMemory => {
                // The image's main process becomes a memory hog once this file exists.
                write_work(deployment, &session, "oom-now", Vec::new(), &mut expected)?;
            }
        }
        tally.injected += 1;
        let end = check_ended(deployment, &session, &["failed"], &mut tally).await?;
        let error = end.detail["error"].as_str().unwrap_or_default();
        let wanted = match death {
            ContainerDeath::Killed => "container exited",
            ContainerDeath::OutOfMemory => "out of memory",
        };
        if !error.contains(wanted) {
            bail!("session {session} failed with {error:?}; expected the reason to say {wanted:?} ({})", end.detail);
        }
        check_store(deployment, user, &expected, &mut tally).await?;
        Ok(tally)
    })
    .await?;
    results.into_iter().for_each(|found| tally.merge(found));
    Ok(())
}

// ----- SIGKILL of the workspace agent -----

fn count_files(directory: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(directory) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => count_files(&entry.path()),
            Ok(kind) if kind.is_file() => 1,
            _ => 0,
        })
        .sum()
}

/// Kills `component`, waits a moment, starts it again.
async fn kill_and_restart(deployment: &mut Deployment, component: Component, tally: &mut Tally) -> anyhow::Result<()> {
    deployment.kill(component);
    tally.injected += 1;
    tokio::time::sleep(Duration::from_millis(700)).await;
    deployment.start_component(component)
}

async fn kill_mid_materialize(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    let mut expectations = Vec::new();
    for user in users {
        let mut expected = Expected::default();
        let mut files: Vec<(String, Vec<u8>)> =
            (0..300).map(|index| (format!("small/f{index:03}.txt"), payload(&format!("{user} {index}"), 40 * 1024))).collect();
        files.push(("large/one.bin".to_owned(), payload(&format!("{user} large one"), 3 * 1024 * 1024)));
        files.push(("large/two.bin".to_owned(), payload(&format!("{user} large two"), 3 * 1024 * 1024)));
        seed(deployment, user, &files, &mut expected).await?;
        expectations.push(expected);
    }
    let mut sessions = Vec::new();
    for user in users {
        sessions.push(deployment.open_amqp(user, WORKSPACE).await?);
    }
    // Kill as soon as the first files land in a directory, while it is still materializing.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if sessions.iter().any(|session| count_files(&deployment.session_dir(session)) > 0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("no workspace started to materialize");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let partial: Vec<usize> = sessions.iter().map(|session| count_files(&deployment.session_dir(session))).collect();
    kill_and_restart(deployment, Component::Workspace, tally).await?;
    tracing::info!(?partial, "workspace agent killed mid-materialize");
    let deployment = &*deployment;
    for ((user, session), mut expected) in users.iter().zip(&sessions).zip(expectations) {
        deployment.inbox.wait_state(session, "running", STEP_TIMEOUT).await?;
        // Large files stream in after `materialized`; wait for them, then compare the host copy.
        let directory = deployment.session_dir(session);
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let wrong: Vec<&String> = expected
                .files
                .iter()
                .filter(|(path, bytes)| std::fs::read(directory.join(path)).ok().as_ref() != Some(*bytes))
                .map(|(path, _)| path)
                .collect();
            if wrong.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} files of {session} not materialized correctly after the restart, e.g. {:?}",
                    wrong.len(),
                    &wrong[..wrong.len().min(5)]
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        write_work(deployment, session, "after-restart.txt", payload(&format!("{user} after"), 5000), &mut expected)?;
        deployment.close(session, user).await?;
        check_ended(deployment, session, &["closed"], tally).await?;
        check_store(deployment, user, &expected, tally).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncKind {
    Incremental,
    Final,
}

/// Many small files and one large one, written inside the container, so a sync takes a while.
fn write_bulk(deployment: &Deployment, session: &str, user: &str, expected: &mut Expected) -> anyhow::Result<()> {
    let line = format!("{user} bulk");
    deployment.exec(session, &format!("mkdir -p /workspace/bulk && cd /workspace/bulk && for i in $(seq 1 150); do echo \"{line} $i\" > f$i.txt; done && yes '{line}' | head -c 20971520 > big.bin"))?;
    for index in 1..=150 {
        expected.add(&format!("bulk/f{index}.txt"), format!("{line} {index}\n").into_bytes());
    }
    let big: Vec<u8> = format!("{line}\n").as_bytes().iter().copied().cycle().take(20 * 1024 * 1024).collect();
    expected.add("bulk/big.bin", big);
    Ok(())
}

/// Waits until the first of the bulk files shows up in the store: a sync is under way.
async fn wait_upload_started(deployment: &Deployment, user: &str) -> anyhow::Result<()> {
    let prefix = Deployment::object_key(user, WORKSPACE, "bulk");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while deployment.list_objects(&prefix).await?.is_empty() {
        if Instant::now() > deadline {
            bail!("no upload of {prefix} started");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn kill_mid_sync(deployment: &mut Deployment, users: &[String], kind: SyncKind, tally: &mut Tally) -> anyhow::Result<()> {
    let (sessions, expectations) = open_running_with(deployment, users, write_bulk).await?;
    if kind == SyncKind::Final {
        for (user, session) in users.iter().zip(&sessions) {
            deployment.close(session, user).await?;
        }
        for session in &sessions {
            deployment.inbox.wait_state(session, "saving", STEP_TIMEOUT).await?;
        }
    }
    // The autosave (every few seconds) or the final sync is uploading the bulk.
    wait_upload_started(deployment, &users[0]).await?;
    kill_and_restart(deployment, Component::Workspace, tally).await?;
    let deployment = &*deployment;
    for ((user, session), mut expected) in users.iter().zip(&sessions).zip(expectations) {
        if kind == SyncKind::Incremental {
            write_work(deployment, session, "after-restart.txt", payload(&format!("{user} after"), 5000), &mut expected)?;
            deployment.close(session, user).await?;
        }
        check_ended(deployment, session, &["closed"], tally).await?;
        check_store(deployment, user, &expected, tally).await?;
    }
    Ok(())
}

/// Files in the workspace of the remove case: enough that removing the directory takes a while.
const REMOVE_FILES: usize = 2000;

async fn kill_mid_remove(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    let (sessions, expectations) = open_running_with(deployment, users, |deployment, session, user, expected| {
        let line = format!("{user} many");
        deployment.exec(
            session,
            &format!(
                "mkdir -p /workspace/many && cd /workspace/many && for i in $(seq 1 {REMOVE_FILES}); do echo \"{line} $i\" > f$i.txt; done"
            ),
        )?;
        for index in 1..=REMOVE_FILES {
            expected.add(&format!("many/f{index}.txt"), format!("{line} {index}\n").into_bytes());
        }
        Ok(())
    })
    .await?;
    for (user, session) in users.iter().zip(&sessions) {
        deployment.close(session, user).await?;
    }
    // The directory starts to go (after the confirmed final sync): kill while it is half gone.
    let directory = deployment.session_dir(&sessions[0]);
    let total = expectations[0].files.len() - 1;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let left = loop {
        let left = count_files(&directory);
        if left < total {
            break left;
        }
        if Instant::now() > deadline {
            bail!("the directory of {} never started to go", sessions[0]);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    kill_and_restart(deployment, Component::Workspace, tally).await?;
    tracing::info!(left, total, "workspace agent killed mid-remove");
    for ((user, session), expected) in users.iter().zip(&sessions).zip(expectations) {
        check_ended(deployment, session, &["closed"], tally).await?;
        check_store(deployment, user, &expected, tally).await?;
    }
    Ok(())
}

// ----- SIGKILL of the container agent -----

async fn kill_mid_provision(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    let mut sessions = Vec::new();
    let mut expectations = Vec::new();
    for user in users {
        let mut expected = Expected::default();
        seed(deployment, user, &[("seeded.txt".to_owned(), payload(user, 100))], &mut expected).await?;
        sessions.push(deployment.open_amqp(user, WORKSPACE).await?);
        expectations.push(expected);
    }
    deployment.inbox.wait_state(&sessions[0], "provisioning", STEP_TIMEOUT).await?;
    kill_and_restart(deployment, Component::Container, tally).await?;
    let deployment = &*deployment;
    for ((user, session), mut expected) in users.iter().zip(&sessions).zip(expectations) {
        deployment.inbox.wait_state(session, "running", STEP_TIMEOUT).await?;
        let of_session: Vec<String> = deployment.containers().into_iter().filter(|name| name.contains(session.as_str())).collect();
        if of_session.len() != 1 {
            bail!("session {session} has containers {of_session:?}");
        }
        write_work(deployment, session, "work.txt", payload(&format!("{user} work"), 10_000), &mut expected)?;
        deployment.close(session, user).await?;
        check_ended(deployment, session, &["closed"], tally).await?;
        check_store(deployment, user, &expected, tally).await?;
    }
    Ok(())
}

// ----- Redis -----

async fn redis_flush(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    let (sessions, expectations) = open_running_with(deployment, users, |deployment, session, user, expected| {
        write_work(deployment, session, "unsynced.txt", payload(&format!("{user} unsynced"), 30_000), expected)
    })
    .await?;
    deployment.redis_flushall()?;
    tally.injected += 1;
    for ((user, session), expected) in users.iter().zip(&sessions).zip(expectations) {
        // The inventories find the container and the directory nobody owns any more.
        check_ended(deployment, session, &["recovered"], tally).await?;
        check_store(deployment, user, &expected, tally).await?;
    }
    Ok(())
}

async fn redis_and_docker_outage(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    let (sessions, mut expectations) = open_running_with(deployment, users, |deployment, session, user, expected| {
        write_work(deployment, session, "before.txt", payload(&format!("{user} before"), 10_000), expected)
    })
    .await?;
    // Redis away for 3 s while users are active.
    deployment.stop_redis();
    tally.injected += 1;
    for (user, session) in users.iter().zip(&sessions) {
        deployment.publish(session, user, &protocol::events::SessionActivity { source: protocol::events::InputSource::Api }).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    deployment.start_redis()?;
    // The restarted Redis forgot the engine's CONFIG SET; the engine turns expiry events on again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flags = deployment.redis_config("notify-keyspace-events")?;
        if flags.contains('E') && flags.contains('x') {
            break;
        }
        if Instant::now() > deadline {
            bail!("after the Redis restart notify-keyspace-events is {flags:?}: timers only fire by sweep");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for ((user, session), expected) in users.iter().zip(&sessions).zip(expectations.iter_mut()) {
        write_work(deployment, session, "after-redis.txt", payload(&format!("{user} after redis"), 10_000), expected)?;
    }
    // Docker away for 3 s while the sessions close (the freeze needs Docker).
    deployment.cut_docker();
    tally.injected += 1;
    for (user, session) in users.iter().zip(&sessions) {
        deployment.close(session, user).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    deployment.restore_docker()?;
    for ((user, session), expected) in users.iter().zip(&sessions).zip(expectations) {
        check_ended(deployment, session, &["closed"], tally).await?;
        check_store(deployment, user, &expected, tally).await?;
    }
    Ok(())
}

// ----- the object store -----

async fn store_outage(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    let (sessions, expectations) = open_running_with(deployment, users, |deployment, session, user, expected| {
        write_work(deployment, session, "unsynced.txt", payload(&format!("{user} unsynced"), 50_000), expected)
    })
    .await?;
    deployment.cut_store();
    tally.injected += 1;
    for (user, session) in users.iter().zip(&sessions) {
        deployment.close(session, user).await?;
    }
    // One attempt's retries run out: the session waits in sync_backoff, nothing removed.
    for session in &sessions {
        deployment.inbox.wait_state(session, "sync_backoff", Duration::from_secs(180)).await?;
        if deployment.container_state(session).is_none() || !deployment.session_dir(session).exists() {
            bail!("session {session}: container or directory removed while the store was down");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    deployment.restore_store()?;
    for ((user, session), expected) in users.iter().zip(&sessions).zip(expectations) {
        check_ended(deployment, session, &["closed"], tally).await?;
        check_store(deployment, user, &expected, tally).await?;
    }
    Ok(())
}

// ----- special entries -----

/// The non-UTF-8 name, as bytes (Latin-1 "café.txt").
const NON_UTF8_NAME: &[u8] = b"caf\xe9.txt";

async fn special_entries(deployment: &mut Deployment, users: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let deployment = &*deployment;
    let results = for_each_user(users, |user| async move {
        let mut tally = Tally::default();
        let mut expected = Expected::default();
        seed(deployment, user, &[("target.txt".to_owned(), payload(user, 100))], &mut expected).await?;
        let first = open_running(deployment, user).await?;
        deployment.exec(
            &first,
            "cd /workspace && ln -s target.txt link.txt && mkdir -p empty/inner && printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod 755 run.sh \
             && echo backslash > 'back\\slash.txt' && echo latin1 > \"$(printf 'caf\\351.txt')\"",
        )?;
        expected.add("run.sh", b"#!/bin/sh\necho hi\n".to_vec());
        // The odd entries are this case's fault: things a plain file sync would drop.
        tally.injected += 1;
        deployment.close(&first, user).await?;
        let first_end = check_ended(deployment, &first, &["closed"], &mut tally).await?;
        check_store(deployment, user, &expected, &mut tally).await?;
        // What was moved aside is named to the user.
        let told: Vec<String> = first_end.detail["preserved"].as_array().into_iter().flatten().filter_map(|entry| entry.as_str().map(str::to_owned)).collect();
        if deployment.preserved_dir(&first).join("back\\slash.txt").exists() && !told.iter().any(|entry| entry.contains("slash")) {
            bail!("back\\slash.txt was preserved but the closed notification lists only {told:?}");
        }

        let second = open_running(deployment, user).await?;
        let directory = deployment.session_dir(&second);
        let preserved = deployment.preserved_dir(&first);
        tally.files_checked += 5;
        match std::fs::read_link(directory.join("link.txt")) {
            Ok(target) if target == Path::new("target.txt") => {}
            other => tally.lost.push(format!("{user}/link.txt: symlink came back as {other:?}")),
        }
        if !directory.join("empty/inner").is_dir() {
            tally.lost.push(format!("{user}/empty/inner: the empty directory did not come back"));
        }
        match std::fs::metadata(directory.join("run.sh")) {
            Ok(meta) if meta.permissions().mode() & 0o111 != 0 => {}
            other => tally.lost.push(format!("{user}/run.sh: not executable after the round trip ({:?})", other.map(|m| m.permissions().mode()))),
        }
        let kept = |name: &Path, content: &[u8]| {
            std::fs::read(directory.join(name)).ok().as_deref() == Some(content) || std::fs::read(preserved.join(name)).ok().as_deref() == Some(content)
        };
        if !kept(Path::new("back\\slash.txt"), b"backslash\n") {
            tally.lost.push(format!("{user}/back\\slash.txt: neither round-tripped nor preserved"));
        }
        if !kept(Path::new(std::ffi::OsStr::from_bytes(NON_UTF8_NAME)), b"latin1\n") {
            tally.lost.push(format!("{user}/caf\\xe9.txt: neither round-tripped nor preserved"));
        }
        deployment.close(&second, user).await?;
        check_ended(deployment, &second, &["closed"], &mut tally).await?;
        Ok(tally)
    })
    .await?;
    results.into_iter().for_each(|found| tally.merge(found));
    Ok(())
}
