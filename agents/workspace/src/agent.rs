//! The workspace agent's handler: `materialize`, `sync` and `remove` tasks, answered with events.
//!
//! Contract: [`WorkspaceAgent::handle`] does the work and answers; [`error_policy`] maps what it
//! could not answer to ack, retry or dead-letter. Idempotent by effect: a repeated `materialize`
//! of a complete workspace re-announces it without touching a file, a repeated `sync` finds
//! nothing new, a repeated `remove` of a removed workspace re-announces the removal.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetResultPayload, ObjectMeta, PutPayload, WriteMultipart};
use protocol::events::{
    CacheReuse, DirectoryEntry, Skipped, WorkspaceComplete, WorkspaceConflict, WorkspaceFailed, WorkspaceInventory, WorkspaceMaterialized,
    WorkspaceProgress, WorkspaceQuotaExceeded, WorkspaceRemoved, WorkspaceSyncFailed, WorkspaceSynced,
};
use protocol::ids::{SessionId, UserId, WorkspaceId};
use protocol::tasks::{TaskArgs, WorkspaceMaterialize, WorkspaceRecover, WorkspaceRemove, WorkspaceSync};
use protocol::{AgentKind, Outcome, Profile, Task};

use uuid::Uuid;

use crate::cache;
use crate::conditional::{self, Expected, Written};
use crate::error::{Error, Result};
use crate::events::{EventSink, Reply};
use crate::fsops::{self, Confined, LocalFile, Ownership, Placed, Placement, Scan, ScanLimits, StagedFile};
use crate::inventory;
use crate::keys::WorkspacePath;
use crate::manifest::{self, Durability, FileEntry, FinalSync, Manifest, Phase};
use crate::plan::{self, Hashed, SyncPlan};
use crate::store::OpenedStore;
use crate::tree::{self, Tree};
use crate::volume::{self, Volume};
use protocol::profile::WorkspaceFilesystem;

mod recover;

/// Objects up to this size are fetched in one response and written in one blocking call.
const WHOLE_OBJECT_BYTES: u64 = 4 * 1024 * 1024;
/// Reads and writes of downloaded content happen in pieces of this size.
const COPY_BUFFER_BYTES: usize = 1024 * 1024;
/// Files above this size are uploaded in parts.
const MULTIPART_BYTES: u64 = 16 * 1024 * 1024;
const MULTIPART_CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// At most one progress event per this interval while small files come in.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Tunables that are not part of the run-profile.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Attempts of a final sync before it reports `workspace.sync_failed`.
    pub final_sync_attempts: u32,
    pub final_sync_backoff_start: Duration,
    pub final_sync_backoff_max: Duration,
    /// How often `workspace.inventory` lists this deployment's directories (and once at start).
    pub inventory_interval: Duration,
    /// At most this many directories per `workspace.inventory` event; more go in several events.
    pub inventory_batch: usize,
    /// How often image-backed workspaces are checked for being full (`workspace.quota_exceeded`).
    pub quota_check_interval: Duration,
    /// Entries (files, folders, links) one workspace may hold; a sync or materialize over it is refused.
    pub max_files: usize,
    /// Folder levels a sync enters; deeper folders are kept locally and reported as skipped.
    pub max_path_depth: usize,
}

impl AgentSettings {
    /// About a minute of retries: long enough to ride out a store restart.
    pub fn standard() -> AgentSettings {
        AgentSettings {
            final_sync_attempts: 8,
            final_sync_backoff_start: Duration::from_millis(500),
            final_sync_backoff_max: Duration::from_secs(15),
            inventory_interval: Duration::from_secs(60),
            inventory_batch: 1000,
            quota_check_interval: Duration::from_secs(5),
            max_files: 200_000,
            max_path_depth: 64,
        }
    }
}

/// What `remove` does with a directory the confirmed final sync covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Delete,
    Cache,
}

/// Whether a task may make the session's file system or only mount an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    Yes,
    No,
}

/// Whether a sync is the one before stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    Routine,
    Final,
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub uploaded: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub bytes_uploaded: u64,
    pub skipped: Vec<(String, String)>,
    /// Objects someone else changed meanwhile: both versions were kept.
    pub conflicts: Vec<ConflictRecord>,
    /// The directory doesn't exist (the session failed before materialize): nothing to save.
    pub missing: bool,
}

/// Where one session's workspace lives and what it maps to.
#[derive(Debug, Clone)]
struct Target {
    session: String,
    user: String,
    workspace: String,
    /// Prefix from the profile (stored in the manifest).
    prefix_text: String,
    /// Full key prefix in the store (the store URL's own prefix + the profile's).
    prefix: ObjectPath,
    /// Where the agent reads and writes the workspace: `Profile::session_dir`, or for an
    /// image-backed session the workspace folder inside the image's own mount.
    directory: PathBuf,
    manifest_path: PathBuf,
    staging: PathBuf,
    /// The session's own file system, when it has (or is to get) one.
    volume: Option<Volume>,
}

/// Where one session's workspace is read and written.
pub struct Location {
    /// The workspace as the agents read and write it (inside the image's own mount when
    /// image-backed: staged files can be hard-linked into it, which the bind mount can't take).
    pub directory: PathBuf,
    /// Where files are written before they are linked into `directory` (same file system).
    pub staging: PathBuf,
    pub volume: Option<Volume>,
}

/// Whether `path` is a folder with something in it (a plain workspace directory).
fn has_content(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some())
}

impl Target {
    /// This workspace as another session of the same deployment holds it.
    fn for_session(&self, session: &str, profile: &Profile) -> Target {
        let deployment_root = profile.deployment_root();
        let location = locate(profile, session);
        Target {
            session: session.to_owned(),
            directory: location.directory,
            manifest_path: manifest::manifest_path(&deployment_root, session),
            staging: location.staging,
            volume: location.volume,
            ..self.clone()
        }
    }
}

/// A session is image-backed when its image exists (or is lost: its mount point is left), or
/// when the profile says `image` and no plain directory with content is in its place (one made
/// before the profile changed stays a plain directory until it is removed).
pub fn locate(profile: &Profile, session: &str) -> Location {
    let deployment_root = profile.deployment_root();
    let volume = Volume::of(&deployment_root, session);
    let image_backed = volume.exists()
        || volume.lost()
        || (profile.workspace.filesystem == WorkspaceFilesystem::Image && !has_content(&profile.session_dir(session)));
    if image_backed {
        Location { directory: volume.workspace(), staging: volume.staging(), volume: Some(volume) }
    } else {
        Location { directory: profile.session_dir(session), staging: manifest::staging_path(&deployment_root, session), volume: None }
    }
}

/// The agent: one per process, shared by every in-flight task.
pub struct WorkspaceAgent {
    profile: Arc<Profile>,
    store: OpenedStore,
    events: Arc<dyn EventSink>,
    settings: AgentSettings,
    ownership: Option<Ownership>,
    /// One lock per session and per store prefix: two tasks for the same workspace never overlap.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Image-backed sessions last found full: `workspace.quota_exceeded` goes out once per filling.
    full: std::sync::Mutex<BTreeSet<String>>,
}

/// Maps an error that could not be answered with an event to what happens to the message.
pub fn error_policy(error: &Error) -> Outcome {
    if error.is_unavailable() {
        Outcome::RetryUnavailable
    } else if error.is_transient() {
        Outcome::Retry
    } else {
        Outcome::DeadLetter(error.to_string())
    }
}

/// Session, user and workspace ids become path segments and key prefixes: each is checked by its
/// one rule in `protocol::ids`.
fn check_identifier<Id>(parse: fn(&str) -> std::result::Result<Id, protocol::ids::IdError>, value: &str) -> Result<()> {
    parse(value).map(drop).map_err(|error| Error::BadTask(error.to_string()))
}

/// The task's args as their `protocol::tasks` type; args that do not fit are a bad task.
fn parse_args<T: TaskArgs>(task: &Task) -> Result<T> {
    task.args_as::<T>().map_err(|error| Error::BadTask(error.to_string()))
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await?
}

struct Progress {
    files_total: usize,
    bytes_total: u64,
    files_done: usize,
    bytes_done: u64,
    last_sent: Instant,
}

impl Progress {
    fn data(&self) -> WorkspaceProgress {
        WorkspaceProgress {
            files_done: self.files_done as u64,
            files_total: self.files_total as u64,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
        }
    }
}

impl WorkspaceAgent {
    pub fn new(profile: Profile, store: OpenedStore, events: Arc<dyn EventSink>, settings: AgentSettings) -> WorkspaceAgent {
        let ownership = profile.container.user.as_deref().and_then(Ownership::parse);
        if profile.container.user.is_some() && ownership.is_none() {
            tracing::warn!(user = ?profile.container.user, "container user is not numeric uid[:gid]; workspace files stay owned by the agent");
        }
        WorkspaceAgent {
            profile: Arc::new(profile),
            store,
            events,
            settings,
            ownership,
            locks: std::sync::Mutex::new(HashMap::new()),
            full: std::sync::Mutex::new(BTreeSet::new()),
        }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Decodes and handles one message from the queue.
    pub async fn handle_message(&self, body: &[u8]) -> Outcome {
        let task = match Task::decode(body) {
            Ok(task) => task,
            Err(error) => return Outcome::DeadLetter(format!("undecodable task: {error}")),
        };
        if task.agent != AgentKind::Workspace {
            return Outcome::DeadLetter(format!("task for the {} agent reached the workspace agent", task.agent));
        }
        match self.handle(&task).await {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(task_id = %task.id, action = %task.action, %error, "task not answered");
                error_policy(&error)
            }
        }
    }

    /// Handles one task and answers it. `Err` only when no answer could be sent.
    pub async fn handle(&self, task: &Task) -> Result<Outcome> {
        let reply = Reply::to(task);
        let answered = self.dispatch(task, &reply).await;
        match answered {
            Ok(()) => Ok(Outcome::Ack),
            Err(error @ Error::Publish(_)) => Err(error),
            Err(Error::BadTask(reason)) => {
                // Tell the thred (when there is one) and park the message for an operator.
                if reply.session.is_some() {
                    let error = event_text(&format!("bad task: {reason}"));
                    let failure = match task.action.as_str() {
                        "sync" => {
                            let final_sync = task.args.get("final").and_then(serde_json::Value::as_bool).unwrap_or(false);
                            reply.event(&WorkspaceSyncFailed { final_sync, error, action: None })
                        }
                        "remove" => reply.event(&WorkspaceSyncFailed { final_sync: true, error, action: Some("remove".to_owned()) }),
                        _ => reply.event(&WorkspaceFailed { stage: "task".to_owned(), error }),
                    };
                    self.events.emit(failure).await?;
                }
                Ok(Outcome::DeadLetter(format!("bad task: {reason}")))
            }
            Err(error) => Err(error),
        }
    }

    async fn dispatch(&self, task: &Task, reply: &Reply) -> Result<()> {
        let session = task.session.as_deref().ok_or_else(|| Error::BadTask("task has no session".to_owned()))?;
        check_identifier(SessionId::parse, session)?;
        match task.action.as_str() {
            "materialize" => {
                let args: WorkspaceMaterialize = parse_args(task)?;
                let slot = args.slot.as_ref().map(SessionId::as_str);
                let target = self.target(session, args.user.as_str(), args.workspace.as_str())?;
                let _guards = self.lock_workspace(&target).await;
                if let Some(slot) = slot {
                    self.take_pool_slot(session, slot).await?;
                }
                if args.fence {
                    // Before the listing: a sync the old host managed before this is in what is read.
                    self.write_fence(session, &target.prefix).await?;
                }
                match self.materialize(&target, reply).await {
                    Ok(()) => Ok(()),
                    Err(error @ (Error::Publish(_) | Error::BadTask(_))) => Err(error),
                    // The store is down: not a failure of this workspace. The task waits and comes back.
                    Err(error) if error.is_unavailable() => Err(error),
                    Err(error) => {
                        let stage = match &error {
                            Error::UnsafeNames(_) => "validate",
                            Error::QuotaExceeded { .. } => "quota",
                            Error::OverLimit(_) => "limit",
                            Error::Filesystem(_) => "filesystem",
                            Error::Store(_) => "download",
                            _ => "write",
                        };
                        tracing::warn!(session, %error, "materialize failed");
                        self.events
                            .emit(reply.event(&WorkspaceFailed { stage: stage.to_owned(), error: event_text(&error.to_string()) }))
                            .await
                    }
                }
            }
            "sync" => {
                let args: WorkspaceSync = parse_args(task)?;
                let target = self.target(session, args.user.as_str(), args.workspace.as_str())?;
                let kind = if args.final_sync { SyncKind::Final } else { SyncKind::Routine };
                let _guards = self.lock_workspace(&target).await;
                let outcome = match kind {
                    SyncKind::Routine => self.sync_once(&target, kind, &mut BTreeSet::new()).await,
                    SyncKind::Final => self.final_sync(&target, task.id).await,
                };
                match outcome {
                    Ok(report) => {
                        self.report_conflicts(reply, &report.conflicts, None).await?;
                        self.events.emit(reply.event(&synced_data(kind, &report))).await
                    }
                    Err(error @ (Error::Publish(_) | Error::BadTask(_))) => Err(error),
                    Err(error @ Error::Superseded(_)) => {
                        tracing::info!(session, %error, "stale sync refused: the session lives on another host now");
                        let data = WorkspaceSyncFailed {
                            final_sync: kind == SyncKind::Final,
                            error: event_text(&error.to_string()),
                            action: None,
                        };
                        self.events.emit(reply.event(&data)).await
                    }
                    Err(error) => {
                        tracing::warn!(session, final_sync = kind == SyncKind::Final, %error, "sync failed; nothing removed");
                        let data = WorkspaceSyncFailed {
                            final_sync: kind == SyncKind::Final,
                            error: event_text(&error.to_string()),
                            action: None,
                        };
                        self.events.emit(reply.event(&data)).await
                    }
                }
            }
            "remove" => {
                let args: WorkspaceRemove = parse_args(task)?;
                let keep = if args.cache && self.profile.workspace.cache_mib > 0 { Keep::Cache } else { Keep::Delete };
                let _guard = self.lock(format!("session:{session}")).await;
                match self.remove(session, keep).await {
                    Ok(preserved) => {
                        let (shown, total) = bounded_list(&preserved);
                        let preserved_total = (total > shown.len()).then_some(total as u64);
                        self.events.emit(reply.event(&WorkspaceRemoved { preserved: shown, preserved_total })).await
                    }
                    Err(error @ (Error::Publish(_) | Error::BadTask(_))) => Err(error),
                    Err(error) => {
                        tracing::warn!(session, %error, "remove refused");
                        let data = WorkspaceSyncFailed {
                            final_sync: true,
                            error: event_text(&error.to_string()),
                            action: Some("remove".to_owned()),
                        };
                        self.events.emit(reply.event(&data)).await
                    }
                }
            }
            "recover" => {
                let args: WorkspaceRecover = parse_args(task)?;
                self.recover(session, args, reply).await
            }
            other => Err(Error::BadTask(format!("unknown action {other:?} (expected materialize, sync, remove or recover)"))),
        }
    }

    fn target(&self, session: &str, user: &str, workspace: &str) -> Result<Target> {
        check_identifier(UserId::parse, user)?;
        check_identifier(WorkspaceId::parse, workspace)?;
        let prefix_text = self.profile.workspace_prefix(user, workspace);
        let relative = ObjectPath::parse(&prefix_text).map_err(|error| Error::BadTask(format!("prefix {prefix_text:?}: {error}")))?;
        let prefix: ObjectPath = self.store.root.parts().chain(relative.parts()).collect();
        let root = &self.profile.deployment_root();
        let location = locate(&self.profile, session);
        Ok(Target {
            session: session.to_owned(),
            user: user.to_owned(),
            workspace: workspace.to_owned(),
            prefix_text,
            prefix,
            directory: location.directory,
            manifest_path: manifest::manifest_path(root, session),
            staging: location.staging,
            volume: location.volume,
        })
    }

    /// Mounts the session's own file system (making it first with `Create::Yes`) before anything
    /// reads or writes the workspace. An image-backed session whose image is gone, or that can't
    /// be mounted, is refused: its mount point is an empty folder, and syncing that would delete
    /// the user's work in the store.
    async fn prepare(&self, target: &Target, create: Create) -> Result<()> {
        self.prepare_volume(&target.session, target.volume.as_ref(), create).await
    }

    async fn prepare_volume(&self, session: &str, volume: Option<&Volume>, create: Create) -> Result<()> {
        let Some(volume) = volume.cloned() else { return Ok(()) };
        let quota = self.profile.workspace.quota_mib * 1024 * 1024;
        let owner = self.ownership;
        let session = session.to_owned();
        blocking(move || {
            if volume.lost() {
                return Err(Error::Filesystem(format!(
                    "session {session} is image-backed but its image {} is gone; its directory is not taken for an empty workspace",
                    volume.image.display()
                )));
            }
            let started = Instant::now();
            let made = !volume.exists() && create == Create::Yes;
            if volume::attach(&volume, quota, owner, create == Create::Yes)? && made {
                tracing::info!(session, ms = started.elapsed().as_millis() as u64, image = %volume.image.display(), "workspace file system made and mounted");
            }
            Ok(())
        })
        .await
    }

    /// Mounts every image of this deployment that isn't (after a reboot or an agent restart), so
    /// the inventory and every task see the workspace, never an empty mount point. Sessions busy
    /// with a task are left to it.
    pub async fn attach_images(&self) -> Result<usize> {
        let root = self.profile.deployment_root();
        let sessions = blocking(move || volume::sessions_with_images(&root)).await?;
        let mut attached = 0;
        for session in sessions {
            let Some(_guard) = self.try_lock(format!("session:{session}")) else { continue };
            let volume = Volume::of(&self.profile.deployment_root(), &session);
            let quota = self.profile.workspace.quota_mib * 1024 * 1024;
            let owner = self.ownership;
            let attaching = session.clone();
            match blocking(move || volume::attach(&volume, quota, owner, false)).await {
                Ok(_) => attached += 1,
                Err(error) => {
                    tracing::error!(session = %attaching, %error, "workspace image not mounted; its session's syncs are refused until it is")
                }
            }
        }
        Ok(attached)
    }

    /// Checks every mounted image: one that is full gets one `workspace.quota_exceeded`
    /// (subject = its session) until it has room again. Returns the sessions newly found full.
    pub async fn check_quotas(&self) -> Result<Vec<String>> {
        let root = self.profile.deployment_root();
        let found = blocking(move || {
            let mut found = Vec::new();
            let table = volume::MountTable::read()?;
            for session in volume::sessions_with_images(&root)? {
                let volume = Volume::of(&root, &session);
                if !table.attached(&volume) {
                    continue;
                }
                match volume::usage(&volume) {
                    Ok(usage) => found.push((session, usage)),
                    Err(error) => tracing::debug!(session, %error, "usage not read"),
                }
            }
            Ok(found)
        })
        .await?;
        let quota_mib = self.profile.workspace.quota_mib;
        let mut newly_full = Vec::new();
        for (session, usage) in found {
            let first = {
                let mut full = self.full.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if usage.full() {
                    full.insert(session.clone())
                } else {
                    full.remove(&session);
                    false
                }
            };
            if !first {
                continue;
            }
            let used_mib = usage.used_bytes / (1024 * 1024);
            tracing::warn!(session, used_mib, quota_mib, "workspace full: writes inside the container get ENOSPC");
            let event =
                protocol::CloudEvent::of(crate::events::EVENT_SOURCE, Some(&session), &WorkspaceQuotaExceeded { used_mib, quota_mib });
            if let Err(error) = self.events.emit(event).await {
                // Not sent: try again at the next check.
                self.full.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&session);
                return Err(error);
            }
            newly_full.push(session);
        }
        Ok(newly_full)
    }

    /// Checks the images every `quota_check_interval`, until dropped.
    pub async fn quota_loop(&self) {
        let mut interval = tokio::time::interval(self.settings.quota_check_interval.max(Duration::from_millis(100)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(error) = self.check_quotas().await {
                tracing::warn!(%error, "workspace quotas not checked");
            }
        }
    }

    fn scan_limits(&self) -> ScanLimits {
        ScanLimits { max_entries: self.settings.max_files, max_depth: self.settings.max_path_depth }
    }

    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Forget locks nobody holds or waits for, so the map doesn't grow with every session.
            locks.retain(|_, mutex| Arc::strong_count(mutex) > 1);
            locks.entry(key).or_default().clone()
        };
        mutex.lock_owned().await
    }

    /// Locks the session, then its store prefix (always in this order, so two locks can't deadlock).
    async fn lock_workspace(&self, target: &Target) -> (tokio::sync::OwnedMutexGuard<()>, tokio::sync::OwnedMutexGuard<()>) {
        let session = self.lock(format!("session:{}", target.session)).await;
        let prefix = self.lock(format!("prefix:{}", target.prefix)).await;
        (session, prefix)
    }

    /// The lock for `key` if nobody holds it right now.
    fn try_lock(&self, key: String) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.retain(|_, mutex| Arc::strong_count(mutex) > 1);
            locks.entry(key).or_default().clone()
        };
        mutex.try_lock_owned().ok()
    }

    /// Tells the session's thred about conflicts (both versions were kept).
    /// Many conflicts go in several events, each well below the bus's event size limit.
    async fn report_conflicts(&self, reply: &Reply, conflicts: &[ConflictRecord], from_session: Option<&SessionId>) -> Result<()> {
        for chunk in chunks_within(conflicts, usize::MAX, EVENT_LIST_BYTES) {
            let data = WorkspaceConflict { files: chunk.to_vec(), from_session: from_session.cloned() };
            self.events.emit(reply.event(&data)).await?;
        }
        Ok(())
    }

    /// Final-syncs every other directory of this workspace in this deployment (a stranded session:
    /// the agent or the engine lost track of it), so the store holds its work before a new session
    /// is materialized from the store. A sibling that one of its own tasks holds is being handled.
    async fn save_siblings(&self, target: &Target, reply: &Reply) -> Result<()> {
        let root = self.profile.deployment_root();
        let prefix = target.prefix_text.clone();
        let (user, workspace, profile, session) =
            (target.user.clone(), target.workspace.clone(), self.profile.name.clone(), target.session.clone());
        let siblings = blocking(move || {
            let mut siblings = Vec::new();
            for sibling in inventory::marked(&root, &prefix)? {
                if sibling == session {
                    continue;
                }
                // Markers are written for sessions of valid tasks: any other name is not ours.
                let Ok(sibling) = SessionId::parse(&sibling) else {
                    tracing::warn!(sibling, prefix, "workspace index entry that is no session id; ignored");
                    continue;
                };
                let header = manifest::load_header_blocking(&manifest::manifest_path(&root, sibling.as_str())).ok().flatten();
                let directory_exists = std::fs::symlink_metadata(root.join(sibling.as_str())).is_ok();
                match header {
                    Some(header) if header.phase != Phase::Removed && directory_exists => {
                        let same_workspace = header.prefix == prefix
                            && header.user == user
                            && header.workspace == workspace
                            && (header.profile.is_empty() || header.profile == profile);
                        if same_workspace {
                            siblings.push(sibling);
                        }
                    }
                    // Removed, or gone without a remove: nothing to save any more.
                    _ if !directory_exists => inventory::unmark(&root, &prefix, sibling.as_str()),
                    _ => {}
                }
            }
            Ok(siblings)
        })
        .await?;
        for sibling in siblings {
            let Some(_sibling_guard) = self.try_lock(format!("session:{}", sibling)) else {
                tracing::info!(session = %target.session, sibling = %sibling, "sibling directory busy with its own task; not saved here");
                continue;
            };
            let sibling_target = target.for_session(sibling.as_str(), &self.profile);
            match self.final_sync(&sibling_target, Uuid::now_v7()).await {
                Ok(report) => {
                    tracing::info!(
                        session = %target.session, sibling = %sibling, uploaded = report.uploaded,
                        conflicts = report.conflicts.len(), "saved a sibling directory before materializing"
                    );
                    self.report_conflicts(reply, &report.conflicts, Some(&sibling)).await?;
                }
                // The store is down or flaky: materializing now could hand out an older copy.
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => tracing::error!(
                    session = %target.session, sibling = %sibling, %error,
                    "could not save a sibling directory; it is kept and listed in the inventory"
                ),
            }
        }
        Ok(())
    }

    /// This deployment's session directories, as `workspace.inventory` lists them.
    pub async fn inventory(&self) -> Result<Vec<DirectoryEntry>> {
        if let Err(error) = self.attach_images().await {
            tracing::warn!(%error, "workspace images not listed");
        }
        let root = self.profile.deployment_root();
        let found = blocking(move || inventory::list(&root)).await?;
        let mut directories = Vec::with_capacity(found.len());
        for entry in found {
            // Only a session id names a session's directory; any other folder is not one of ours.
            let Ok(session) = SessionId::parse(&entry.session) else {
                tracing::warn!(directory = entry.session, "folder that is no session id; not listed");
                continue;
            };
            let confirmed = match &entry.manifest {
                Some(header) if header.final_sync_confirmed() => {
                    let directory = locate(&self.profile, &entry.session).directory;
                    let limits = self.scan_limits();
                    let manifest_path = manifest::manifest_path(&self.profile.deployment_root(), &entry.session);
                    let unchanged = blocking(move || {
                        let Some(manifest) = manifest::load_blocking(&manifest_path)? else { return Ok(false) };
                        Ok(manifest.final_sync_confirmed()
                            && plan::changes_since_final_sync(&manifest, &fsops::scan_within(&directory, &limits)?).is_none())
                    });
                    unchanged.await.unwrap_or(false)
                }
                _ => false,
            };
            let manifest = entry.manifest.as_ref();
            // A manifest's owner that is no valid id (not written by this agent) is listed as
            // unknown, like a directory without a manifest: the engine then leaves it alone.
            let owner =
                manifest.and_then(|manifest| Some((UserId::parse(&manifest.user).ok()?, WorkspaceId::parse(&manifest.workspace).ok()?)));
            if manifest.is_some() && owner.is_none() {
                tracing::warn!(session = %session, "manifest names no valid user and workspace id; listed without an owner");
            }
            let (user, workspace) = owner.unzip();
            directories.push(DirectoryEntry {
                session,
                user,
                workspace,
                profile: manifest.map(|manifest| manifest.profile.clone()).filter(|profile| !profile.is_empty()),
                modified: entry.modified.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                confirmed,
            });
        }
        Ok(directories)
    }

    /// Publishes `workspace.inventory` (no subject), in events of at most `inventory_batch`
    /// directories; one event with an empty list when there are none. Returns the count.
    pub async fn publish_inventory(&self) -> Result<usize> {
        let directories = self.inventory().await?;
        let mut chunks = chunks_within(&directories, self.settings.inventory_batch.max(1), EVENT_LIST_BYTES);
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let data = WorkspaceInventory {
                deployment: self.profile.deployment().to_owned(),
                host: self.profile.host().to_owned(),
                directories: chunk.to_vec(),
            };
            let event = protocol::CloudEvent::of(crate::events::EVENT_SOURCE, None, &data);
            self.events.emit(event).await?;
        }
        Ok(directories.len())
    }

    /// Publishes the inventory now and then every `inventory_interval`, until dropped.
    pub async fn inventory_loop(&self) {
        let mut interval = tokio::time::interval(self.settings.inventory_interval.max(Duration::from_secs(1)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            match self.publish_inventory().await {
                Ok(count) => tracing::debug!(directories = count, "inventory published"),
                Err(error) => tracing::warn!(%error, "inventory not published"),
            }
            // A lowered budget (a restart with a new profile) takes effect here too.
            self.evict_cache().await;
        }
    }

    async fn load_manifest(&self, target: &Target) -> Result<Option<Manifest>> {
        let manifest = manifest::load(target.manifest_path.clone()).await?;
        if let Some(existing) = &manifest {
            if existing.prefix != target.prefix_text && existing.phase != Phase::Removed {
                return Err(Error::BadTask(format!(
                    "session {} holds workspace {}/{}, not {}/{}",
                    target.session, existing.user, existing.workspace, target.user, target.workspace
                )));
            }
        }
        Ok(manifest)
    }

    // ----- materialize -------------------------------------------------------------------------

    /// A warm claim: the slot's directory (empty, and bind-mounted in the slot's container since
    /// its creation) is renamed into the session directory, so the container sees what is
    /// materialized next without being created again. A rename keeps the inode the container's
    /// mount holds. Idempotent: a session directory that exists already (a redelivery, or a slot
    /// that was gone and the open went cold) is left as it is.
    async fn take_pool_slot(&self, session: &str, slot: &str) -> Result<()> {
        if self.profile.workspace.filesystem == WorkspaceFilesystem::Image {
            tracing::warn!(session, slot, "warm-pool slot ignored: image-backed workspaces are never pooled");
            return Ok(());
        }
        let (slot_dir, session_dir) = (self.profile.pool_slot_dir(slot), self.profile.session_dir(session));
        let claimed = blocking(move || {
            if std::fs::symlink_metadata(&session_dir).is_ok() {
                return Ok(false);
            }
            match std::fs::symlink_metadata(&slot_dir) {
                Ok(metadata) if metadata.is_dir() => {
                    std::fs::rename(&slot_dir, &session_dir)
                        .map_err(|source| Error::io("claiming the pool slot's directory", &slot_dir, source))?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await?;
        tracing::info!(session, slot, claimed, "warm-pool slot directory");
        Ok(())
    }

    async fn materialize(&self, target: &Target, reply: &Reply) -> Result<()> {
        let (mut manifest, fresh) = match self.load_manifest(target).await? {
            Some(existing) if existing.phase == Phase::Complete => {
                // Already done (a redelivery): announce again, touch nothing the user may have changed.
                let (files, bytes) = (existing.files.len() as u64, existing.total_bytes());
                let data = WorkspaceMaterialized { files, bytes, pending_large_files: 0, pending_large_bytes: 0 };
                self.events.emit(reply.event(&data)).await?;
                let data = WorkspaceComplete { files, bytes, downloaded_files: 0, downloaded_bytes: 0, cache: None };
                return self.events.emit(reply.event(&data)).await;
            }
            Some(existing) if existing.phase != Phase::Removed => (existing, false),
            _ => (Manifest::new(&target.session, &target.user, &target.workspace, &self.profile.name, &target.prefix_text), true),
        };
        manifest.profile.clone_from(&self.profile.name);
        // A sibling directory of this workspace (a stranded session) may hold newer work than the
        // store: save it first, so this session starts from the newest copy, never an older one.
        self.save_siblings(target, reply).await?;
        // If large files were already streaming, the container may be running: keep the user's files.
        let early_placement = if manifest.phase == Phase::Streaming { Placement::KeepExisting } else { Placement::ReplaceExisting };
        manifest.final_sync = None;

        let listing: Vec<ObjectMeta> = self.store.store.list(Some(&target.prefix)).try_collect().await.map_err(|error| match error {
            object_store::Error::InvalidPath { source } => {
                Error::UnsafeNames(format!("an object key under {} is not a safe path: {source}", target.prefix))
            }
            other => Error::Store(other),
        })?;
        let mut wanted = Vec::with_capacity(listing.len());
        let mut refused = Vec::new();
        let mut sidecar_listed = false;
        for meta in listing {
            match WorkspacePath::from_key(&meta.location, &target.prefix) {
                // Berth's own metadata, never a workspace file.
                Ok(path) if tree::is_reserved(path.as_str()) => sidecar_listed |= path.as_str() == tree::SIDECAR_PATH,
                Ok(path) => wanted.push((path, meta)),
                Err(reason) => refused.push(reason),
            }
        }
        if !refused.is_empty() {
            // Nothing is written: a workspace with a hostile key is reported, not half-built.
            return Err(Error::UnsafeNames(refused.join("; ")));
        }
        let (remote_tree, tree_meta) = match sidecar_listed {
            // A hostile sidecar (a path outside the workspace) is refused like a hostile key.
            true => match self.read_tree(&target.prefix).await? {
                Some((Ok(remote_tree), meta)) => (remote_tree, Some(meta)),
                Some((Err(reason), _)) => return Err(Error::UnsafeNames(reason)),
                None => (Tree::default(), None),
            },
            false => (Tree::default(), None),
        };
        if wanted.len() > self.settings.max_files {
            return Err(Error::OverLimit(format!(
                "the workspace holds {} files in the store, over the cap of {}",
                wanted.len(),
                self.settings.max_files
            )));
        }
        if let Some(deep) = wanted.iter().find(|(path, _)| path.as_str().split('/').count() > self.settings.max_path_depth) {
            return Err(Error::OverLimit(format!("{} is deeper than {} levels", deep.0, self.settings.max_path_depth)));
        }
        let total_bytes: u64 = wanted.iter().map(|(_, meta)| meta.size).sum();
        let quota = self.profile.workspace.quota_mib * 1024 * 1024;
        if total_bytes > quota {
            return Err(Error::QuotaExceeded { bytes: total_bytes, quota });
        }

        // The manifest exists before the directory does, so every directory of this deployment
        // says whose it is (the inventory, a later final sync), even if the agent dies right now.
        let mut manifest = manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
        let (root, prefix, session) = (self.profile.deployment_root(), target.prefix_text.clone(), target.session.clone());
        blocking(move || inventory::mark(&root, &prefix, &session)).await?;
        // A new session of a workspace this host closed before starts from the cached copy,
        // revalidated against the listing just made: only what changed is downloaded below.
        let adopted_target;
        let mut adopted = None;
        let target = match fresh && self.cache_budget_bytes() > 0 {
            true => match self.adopt_cached(target, &wanted, &remote_tree).await {
                Some(revalidated) => {
                    adopted_target = self.target(&target.session, &target.user, &target.workspace)?;
                    manifest.files.clone_from(&revalidated.files);
                    manifest = manifest::save(adopted_target.manifest_path.clone(), manifest, Durability::Ordered).await?;
                    adopted = Some(revalidated);
                    &adopted_target
                }
                None => target,
            },
            false => target,
        };
        // The session's own file system is mounted before anything is written into it.
        self.prepare(target, Create::Yes).await?;

        // Lay out folders (skeleton and every parent) before anything can run in the workspace.
        let skeleton = self.profile.workspace.skeleton.clone();
        let directory = target.directory.clone();
        let staging = target.staging.clone();
        let owner = self.ownership;
        let mut parents: BTreeSet<WorkspacePath> = wanted
            .iter()
            .filter_map(|(path, _)| path.as_str().rsplit_once('/').and_then(|(parent, _)| WorkspacePath::parse(parent).ok()))
            .collect();
        let folders: Vec<WorkspacePath> = remote_tree.directories.keys().filter_map(|path| WorkspacePath::parse(path).ok()).collect();
        parents.extend(folders);
        let links: Vec<(WorkspacePath, String)> = remote_tree
            .links
            .iter()
            .filter_map(|(path, link_target)| Some((WorkspacePath::parse(path).ok()?, link_target.clone())))
            .collect();
        let link_placement = early_placement;
        let confined = Arc::new(
            blocking(move || {
                std::fs::create_dir_all(&directory).map_err(|source| Error::io("creating workspace", &directory, source))?;
                if let Some(owner) = owner {
                    fsops::change_owner(&directory, owner);
                }
                let _ = std::fs::remove_dir_all(&staging);
                let confined = Confined::open(&directory)?;
                for folder in &skeleton {
                    let folder = WorkspacePath::parse(folder).map_err(Error::UnsafeNames)?;
                    confined.create_folder(&folder, owner)?;
                }
                for folder in &parents {
                    confined.create_folder(folder, owner)?;
                }
                // Links hold their target text verbatim; created inside the opened parent, never followed.
                for (path, link_target) in &links {
                    if confined.create_symlink(path, link_target, link_placement, owner)? == Placed::KeptExisting {
                        tracing::info!(path = %path, "kept the user's own entry where the store has a symlink");
                    }
                }
                Ok(confined)
            })
            .await?,
        );

        // An object gone from the store since an interrupted run leaves the manifest, so the next
        // sync uploads the local copy again instead of trusting a stale entry.
        let listed: BTreeSet<&str> = wanted.iter().map(|(path, _)| path.as_str()).collect();
        manifest.files.retain(|path, _| listed.contains(path.as_str()));
        drop(listed);
        // Files already in place from an interrupted run are kept when they still match.
        let threshold = self.profile.workspace.large_file_threshold_kib * 1024;
        let mut small = Vec::new();
        let mut large = Vec::new();
        let mut present_bytes = 0;
        let mut present_files = 0;
        for (path, meta) in wanted {
            let already = manifest.files.get(path.as_str()).is_some_and(|entry| entry.size == meta.size && entry.e_tag == meta.e_tag);
            if already {
                present_files += 1;
                present_bytes += meta.size;
            } else if meta.size >= threshold {
                large.push((path, meta));
            } else {
                small.push((path, meta));
            }
        }
        small.sort_by_key(|(_, meta)| meta.size);
        large.sort_by_key(|(_, meta)| meta.size);
        let downloaded_files = small.len() + large.len();
        let downloaded_bytes: u64 = small.iter().chain(large.iter()).map(|(_, meta)| meta.size).sum();
        let progress = Progress {
            files_total: present_files + small.len() + large.len(),
            bytes_total: total_bytes,
            files_done: present_files,
            bytes_done: present_bytes,
            last_sent: Instant::now(),
        };

        let pending_large_files = large.len();
        let pending_large_bytes: u64 = large.iter().map(|(_, meta)| meta.size).sum();
        let work: Vec<(WorkspacePath, ObjectMeta, FileClass)> = small
            .into_iter()
            .map(|(path, meta)| (path, meta, FileClass::Small))
            .chain(large.into_iter().map(|(path, meta)| (path, meta, FileClass::Large)))
            .collect();
        let mut pipeline = Pipeline {
            target,
            confined: &confined,
            reply,
            manifest,
            progress,
            early_placement,
            tree: remote_tree.clone(),
            announced: false,
            pending_large_files,
            pending_large_bytes,
        };
        let outcome = self.fetch_all(&mut pipeline, work).await;
        let Pipeline { mut manifest, progress, .. } = pipeline;
        manifest = self.checkpoint(target, manifest, outcome).await?;
        // Folder modes last: a read-only folder must not stop its own files from arriving.
        let folder_modes: Vec<(WorkspacePath, u32)> =
            remote_tree.directories.iter().filter_map(|(path, mode)| Some((WorkspacePath::parse(path).ok()?, mode.0))).collect();
        let moded = confined.clone();
        blocking(move || {
            for (folder, mode) in &folder_modes {
                if let Err(error) = moded.set_folder_mode(folder, *mode) {
                    tracing::warn!(path = %folder, %error, "folder mode not applied");
                }
            }
            Ok(())
        })
        .await?;
        manifest.phase = Phase::Complete;
        manifest.final_sync = None;
        manifest.tree = remote_tree;
        manifest.tree_e_tag = tree_meta.as_ref().and_then(|meta| meta.e_tag.clone());
        manifest.tree_version = tree_meta.and_then(|meta| meta.version);
        let manifest = manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
        self.events.emit(reply.event(&progress.data())).await?;
        let cache = adopted.map(|adopted| CacheReuse {
            kept_files: adopted.files.len() as u64,
            kept_bytes: adopted.kept_bytes,
            removed: adopted.removed as u64,
        });
        let cached = cache.is_some();
        let data = WorkspaceComplete {
            files: manifest.files.len() as u64,
            bytes: manifest.total_bytes(),
            downloaded_files: downloaded_files as u64,
            downloaded_bytes,
            cache,
        };
        tracing::info!(session = %target.session, files = manifest.files.len(), bytes = manifest.total_bytes(), downloaded_files, cached, "workspace complete");
        self.events.emit(reply.event(&data)).await
    }

    /// Saves what was done so far; then passes on the error, if any.
    async fn checkpoint(&self, target: &Target, manifest: Manifest, outcome: Result<()>) -> Result<Manifest> {
        let manifest = manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
        outcome.map(|()| manifest)
    }

    /// Downloads with bounded parallelism, smallest first. Small files are linked into place as they
    /// arrive; large ones download meanwhile in their own lanes but wait in the staging folder until
    /// every small file is in place and `workspace.materialized` is sent, so the container starts
    /// as early as possible while the network stays busy.
    async fn fetch_all(&self, pipeline: &mut Pipeline<'_>, work: Vec<(WorkspacePath, ObjectMeta, FileClass)>) -> Result<()> {
        let parallelism = self.profile.workspace.parallelism.max(1);
        let mut small_left = work.iter().filter(|(_, _, class)| *class == FileClass::Small).count();
        if small_left == 0 {
            self.announce(pipeline).await?;
        }
        let early_placement = pipeline.early_placement;
        let tree = Arc::new(pipeline.tree.clone());
        let confined = pipeline.confined.clone();
        let staging = pipeline.target.staging.clone();
        // One pool of `parallelism` lanes. Whenever a lane frees up it takes the next large file if
        // fewer than a quarter of the lanes hold one, else the next small file (smallest first): the
        // long transfers overlap the small files instead of trailing after them, the small files
        // keep most of the bandwidth, and no lane sits idle while work is left.
        let (small_work, large_work): (Vec<_>, Vec<_>) = work.into_iter().partition(|(_, _, class)| *class == FileClass::Small);
        let mut small_queue: std::collections::VecDeque<_> = small_work.into();
        let mut large_queue: std::collections::VecDeque<_> = large_work.into();
        let large_lane_limit = (parallelism / 4).max(1);
        let large_running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let next_work = {
            let large_running = large_running.clone();
            futures::stream::poll_fn(move |_| {
                let large_has_room = large_running.load(std::sync::atomic::Ordering::SeqCst) < large_lane_limit;
                let next = if large_has_room || small_queue.is_empty() {
                    large_queue.pop_front().or_else(|| small_queue.pop_front())
                } else {
                    small_queue.pop_front()
                };
                if let Some((_, _, FileClass::Large)) = &next {
                    large_running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                std::task::Poll::Ready(next)
            })
        };
        let mut fetches = next_work
            .map(|(path, meta, class)| {
                let confined = confined.clone();
                let staging = staging.clone();
                let large_running = large_running.clone();
                let tree = tree.clone();
                async move {
                    let mode = tree.file_mode(path.as_str());
                    let fetched = self.fetch(&staging, &confined, &path, &meta, class, early_placement, mode).await;
                    if class == FileClass::Large {
                        large_running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    (path, meta, class, fetched)
                }
            })
            .buffer_unordered(parallelism);
        let mut held: Vec<(WorkspacePath, StagedObject)> = Vec::new();
        let mut first_error = None;
        while let Some((path, meta, class, fetched)) = fetches.next().await {
            match fetched {
                Err(error) => {
                    tracing::warn!(session = %pipeline.target.session, path = %path, %error, "download failed");
                    first_error.get_or_insert(error);
                    if class == FileClass::Small {
                        // The container must not start on a workspace missing a small file: stop here.
                        // A large file that fails is reported after the others are in place.
                        break;
                    }
                }
                Ok(Fetched::Placed(entry)) => {
                    small_left -= 1;
                    self.record(pipeline, &path, meta.size, entry);
                    if pipeline.progress.last_sent.elapsed() >= PROGRESS_INTERVAL {
                        pipeline.progress.last_sent = Instant::now();
                        self.events.emit(pipeline.reply.event(&pipeline.progress.data())).await?;
                    }
                }
                Ok(Fetched::Staged(staged)) if !pipeline.announced => held.push((path, staged)),
                Ok(Fetched::Staged(staged)) => self.place_large(pipeline, &path, staged).await?,
            }
            if !pipeline.announced && small_left == 0 {
                self.announce(pipeline).await?;
                for (path, staged) in std::mem::take(&mut held) {
                    self.place_large(pipeline, &path, staged).await?;
                }
            }
        }
        drop(fetches);
        for (_, staged) in held {
            let _ = tokio::fs::remove_file(&staged.content.path).await;
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn record(&self, pipeline: &mut Pipeline<'_>, path: &WorkspacePath, object_size: u64, entry: Option<FileEntry>) {
        pipeline.progress.files_done += 1;
        pipeline.progress.bytes_done += object_size;
        // `None`: the user created this file meanwhile; theirs is newer and the next sync uploads it.
        if let Some(entry) = entry {
            pipeline.manifest.files.insert(path.as_str().to_owned(), entry);
        }
    }

    /// Every small file is in place: remember that, then tell the engine the container may start.
    async fn announce(&self, pipeline: &mut Pipeline<'_>) -> Result<()> {
        pipeline.manifest.phase = Phase::Streaming;
        // Not flushed: an fsync here would also force out every file just written (ext4 ordered
        // mode). A process crash keeps the renamed manifest; after a host crash the container is
        // gone too, so a resumed materialize can't overwrite a running user's files.
        pipeline.manifest = manifest::save(pipeline.target.manifest_path.clone(), pipeline.manifest.clone(), Durability::Ordered).await?;
        pipeline.announced = true;
        let data = WorkspaceMaterialized {
            files: pipeline.progress.files_done as u64,
            bytes: pipeline.progress.bytes_done,
            pending_large_files: pipeline.pending_large_files as u64,
            pending_large_bytes: pipeline.pending_large_bytes,
        };
        tracing::info!(session = %pipeline.target.session, files = pipeline.progress.files_done, pending_large_files = pipeline.pending_large_files, "workspace materialized");
        self.events.emit(pipeline.reply.event(&data)).await
    }

    /// Links a downloaded large file into the (possibly running) workspace, never over a user's file.
    async fn place_large(&self, pipeline: &mut Pipeline<'_>, path: &WorkspacePath, staged: StagedObject) -> Result<()> {
        let size = staged.content.size;
        let mode = pipeline.tree.file_mode(path.as_str());
        let entry = self.place(pipeline.confined, path, staged, Placement::KeepExisting, mode).await?;
        self.record(pipeline, path, size, entry);
        pipeline.progress.last_sent = Instant::now();
        // Each large file is worth remembering at once: a restart won't fetch it again.
        pipeline.manifest = manifest::save(pipeline.target.manifest_path.clone(), pipeline.manifest.clone(), Durability::Ordered).await?;
        self.events.emit(pipeline.reply.event(&pipeline.progress.data())).await
    }

    /// Downloads one object; small ones are placed at once, large ones stay staged.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        staging: &Path,
        confined: &Arc<Confined>,
        path: &WorkspacePath,
        meta: &ObjectMeta,
        class: FileClass,
        placement: Placement,
        mode: u32,
    ) -> Result<Fetched> {
        let staged = self.fetch_to_staging(staging, path, meta).await?;
        match class {
            FileClass::Small => Ok(Fetched::Placed(self.place(confined, path, staged, placement, mode).await?)),
            FileClass::Large => Ok(Fetched::Staged(staged)),
        }
    }

    /// Links a staged file into place. `None` when the user's own file at that path was kept.
    async fn place(
        &self,
        confined: &Arc<Confined>,
        path: &WorkspacePath,
        staged: StagedObject,
        placement: Placement,
        mode: u32,
    ) -> Result<Option<FileEntry>> {
        let confined = confined.clone();
        let placed_path = path.clone();
        let staged_path = staged.content.path.clone();
        let owner = self.ownership;
        let placed = blocking(move || {
            let placed = confined.place(&staged_path, &placed_path, placement, owner, mode);
            if placed.is_err() {
                let _ = std::fs::remove_file(&staged_path);
            }
            placed
        })
        .await?;
        let StagedObject { content, e_tag, version } = staged;
        Ok(match placed {
            Placed::Placed => Some(FileEntry { size: content.size, mtime_ns: content.mtime_ns, sha256: content.sha256, e_tag, version }),
            Placed::KeptExisting => None,
        })
    }

    /// Downloads one object into the staging folder, hashing as it goes.
    async fn fetch_to_staging(&self, staging: &std::path::Path, path: &WorkspacePath, meta: &ObjectMeta) -> Result<StagedObject> {
        let result = self.store.store.get(&meta.location).await?;
        let e_tag = result.meta.e_tag.clone();
        let version = result.meta.version.clone();
        let expected_size = result.meta.size;
        let range = result.range.clone();
        let staging = staging.to_path_buf();
        let owner = self.ownership;
        let content = match result.payload {
            // The local backend hands over an open file: copy it in one blocking call.
            GetResultPayload::File(mut file, _) => {
                blocking(move || {
                    use std::io::{Read, Seek, SeekFrom};
                    let mut staged = StagedFile::create(&staging)?;
                    let copied = (|| -> std::io::Result<()> {
                        file.seek(SeekFrom::Start(range.start))?;
                        let mut remaining = range.end - range.start;
                        let mut buffer = vec![0u8; COPY_BUFFER_BYTES.min(usize::try_from(remaining).unwrap_or(COPY_BUFFER_BYTES)).max(1)];
                        while remaining > 0 {
                            let want = buffer.len().min(usize::try_from(remaining).unwrap_or(buffer.len()));
                            let read = file.read(&mut buffer[..want])?;
                            if read == 0 {
                                break;
                            }
                            staged.write(&buffer[..read]).map_err(std::io::Error::other)?;
                            remaining -= read as u64;
                        }
                        Ok(())
                    })();
                    match copied {
                        Ok(()) => staged.finish(owner),
                        Err(source) => {
                            staged.discard();
                            Err(Error::io("copying object", PathBuf::from(path_text(&range)), source))
                        }
                    }
                })
                .await?
            }
            GetResultPayload::Stream(stream) if expected_size <= WHOLE_OBJECT_BYTES => {
                let chunks: Vec<Bytes> = stream.try_collect().await?;
                blocking(move || {
                    let mut staged = StagedFile::create(&staging)?;
                    for chunk in &chunks {
                        staged.write(chunk)?;
                    }
                    staged.finish(owner)
                })
                .await?
            }
            GetResultPayload::Stream(mut stream) => {
                // Stream into one blocking writer through a small channel (bounded memory); network
                // chunks are small, so they are gathered into larger writes first.
                let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
                let writer = tokio::task::spawn_blocking(move || -> Result<fsops::StagedContent> {
                    let mut staged = StagedFile::create(&staging)?;
                    while let Some(chunk) = receiver.blocking_recv() {
                        if let Err(error) = staged.write(&chunk) {
                            staged.discard();
                            return Err(error);
                        }
                    }
                    staged.finish(owner)
                });
                let mut stream_error = None;
                let mut gathered = bytes::BytesMut::with_capacity(COPY_BUFFER_BYTES);
                loop {
                    match stream.next().await {
                        Some(Ok(chunk)) => {
                            gathered.extend_from_slice(&chunk);
                            if gathered.len() < COPY_BUFFER_BYTES {
                                continue;
                            }
                        }
                        Some(Err(error)) => {
                            stream_error = Some(error);
                            break;
                        }
                        None => break,
                    }
                    if sender.send(gathered.split().freeze()).await.is_err() {
                        break;
                    }
                }
                if stream_error.is_none() && !gathered.is_empty() {
                    let _ = sender.send(gathered.split().freeze()).await;
                }
                drop(sender);
                let staged = writer.await??;
                if let Some(error) = stream_error {
                    let _ = tokio::fs::remove_file(&staged.path).await;
                    return Err(Error::Store(error));
                }
                staged
            }
        };
        if content.size != expected_size {
            let _ = tokio::fs::remove_file(&content.path).await;
            return Err(Error::Unconfirmed(format!("{path}: got {} bytes, the store said {expected_size}", content.size)));
        }
        Ok(StagedObject { content, e_tag, version })
    }

    // ----- sync ----------------------------------------------------------------------------------

    /// Retries with backoff until every object is confirmed, or reports why not. A directory that
    /// doesn't exist (the session failed before materialize) has nothing to save: `missing`.
    async fn final_sync(&self, target: &Target, task_id: Uuid) -> Result<SyncReport> {
        self.prepare(target, Create::No).await?;
        if tokio::fs::symlink_metadata(&target.directory).await.is_err() {
            tracing::info!(session = %target.session, "final sync of a directory that doesn't exist: nothing to save");
            return Ok(SyncReport { missing: true, ..SyncReport::default() });
        }
        if self.load_manifest(target).await?.is_some_and(|manifest| manifest.phase == Phase::Removing) {
            tracing::info!(session = %target.session, "final sync of a directory being removed after a confirmed final sync: nothing left to save");
            return Ok(SyncReport::default());
        }
        let mut deleted_keys = BTreeSet::new();
        let mut total = SyncReport::default();
        let backoff_max = self.settings.final_sync_backoff_max;
        let mut delays = protocol::backoff::doubling(self.settings.final_sync_backoff_start, backoff_max);
        let mut attempt = 0;
        let last_error = loop {
            attempt += 1;
            let outcome = match self.sync_once(target, SyncKind::Final, &mut deleted_keys).await {
                Ok(report) => {
                    total.uploaded += report.uploaded;
                    total.deleted += report.deleted;
                    total.bytes_uploaded += report.bytes_uploaded;
                    total.unchanged = report.unchanged;
                    total.skipped = report.skipped;
                    total.conflicts.extend(report.conflicts);
                    self.confirm(target, &deleted_keys).await
                }
                Err(error) => Err(error),
            };
            let error = match outcome {
                Ok(()) => {
                    self.record_final_sync(target, task_id, true).await?;
                    tracing::info!(session = %target.session, attempt, uploaded = total.uploaded, conflicts = total.conflicts.len(), "final sync confirmed");
                    return Ok(total);
                }
                Err(error) => error,
            };
            if !error.is_transient() || attempt >= self.settings.final_sync_attempts {
                break error;
            }
            let delay = protocol::backoff::next_delay(&mut delays, backoff_max);
            tracing::warn!(session = %target.session, attempt, %error, retry_in = ?delay, "final sync not confirmed yet; retrying");
            tokio::time::sleep(delay).await;
        };
        // Can't even record the failure? The manifest keeps the previous state, which is not confirmed either.
        if let Err(error) = self.record_final_sync(target, task_id, false).await {
            tracing::error!(session = %target.session, %error, "could not record the failed final sync");
        }
        tracing::error!(session = %target.session, attempts = attempt, error = %last_error, "final sync failed; workspace kept");
        Err(last_error)
    }

    async fn record_final_sync(&self, target: &Target, task_id: Uuid, confirmed: bool) -> Result<()> {
        let Some(mut manifest) = self.load_manifest(target).await? else { return Ok(()) };
        manifest.final_sync = Some(FinalSync { task: task_id, confirmed, at: chrono::Utc::now() });
        manifest::save(target.manifest_path.clone(), manifest, Durability::Flushed).await.map(drop)
    }

    /// Uploads what changed since the manifest and deletes what was removed, never replacing an
    /// object version this session did not see (see `conditional`); a version someone else wrote
    /// meanwhile is kept and the local one becomes a conflict copy next to it.
    async fn sync_once(&self, target: &Target, kind: SyncKind, deleted_keys: &mut BTreeSet<String>) -> Result<SyncReport> {
        self.prepare(target, Create::No).await?;
        let directory_exists = tokio::fs::symlink_metadata(&target.directory).await.is_ok();
        let loaded = self.load_manifest(target).await?;
        let manifest_is_new = loaded.is_none();
        let mut manifest = match loaded {
            Some(manifest) if manifest.phase == Phase::Removed => {
                return Err(Error::BadTask(format!("the workspace of session {} was already removed", target.session)));
            }
            // Half deleted by an interrupted remove: its missing files are no user's deletions.
            Some(manifest) if manifest.phase == Phase::Removing => return Ok(SyncReport::default()),
            Some(manifest) => manifest,
            // A directory without a manifest (the agent died before saving the first one): every
            // file in it is new; identical objects are adopted, different ones kept as conflicts.
            None if directory_exists => {
                Manifest::new(&target.session, &target.user, &target.workspace, &self.profile.name, &target.prefix_text)
            }
            None => return Err(Error::BadTask(format!("session {} was never materialized here", target.session))),
        };
        let directory = target.directory.clone();
        let limits = self.scan_limits();
        let (confined, scan) = blocking(move || {
            let confined = Confined::open(&directory)?;
            let scan = fsops::scan_within(&directory, &limits)?;
            Ok((Arc::new(confined), scan))
        })
        .await?;
        // An image is the bound itself (ext4 takes a little more than the quota for its own
        // metadata): whatever fits in it is the user's work and is saved, never refused.
        let quota = match target.volume {
            None => Some(self.profile.workspace.quota_mib * 1024 * 1024),
            Some(_) => None,
        };
        let SyncPlan { mut unchanged, to_hash, mut to_upload, to_delete: removed, skipped } = plan::plan_sync(&manifest, &scan, quota)?;
        // A session moved to another host is written only from there (its fence in the store).
        self.check_fence(&target.session, &target.prefix).await?;
        let Scan { tree: local_tree, .. } = scan;
        let mut refreshed_entries = 0;
        let parallelism = self.profile.workspace.parallelism.max(1);
        let hashed: Vec<_> = futures::stream::iter(to_hash)
            .map(|(file, known_hash)| {
                let confined = confined.clone();
                async move {
                    let path = file.path.clone();
                    let hash = blocking(move || {
                        let (handle, metadata) = confined.open_file(&path)?;
                        Ok((fsops::hash_file(handle)?, fsops::mtime_ns(&metadata)))
                    })
                    .await;
                    (file, known_hash, hash)
                }
            })
            .buffer_unordered(parallelism)
            .collect()
            .await;
        for (file, known_hash, hash) in hashed {
            match hash {
                Ok((hash, mtime_ns)) if plan::after_hash(&hash, &known_hash) == Hashed::Unchanged => {
                    unchanged += 1;
                    if let Some(entry) = manifest.files.get_mut(file.path.as_str()) {
                        entry.mtime_ns = mtime_ns;
                        refreshed_entries += 1;
                    }
                }
                Ok(_) => to_upload.push(file),
                // Gone or swapped for something else since the scan: the next sync sees it as it is.
                Err(Error::UnsafeNames(reason)) => tracing::warn!(path = %file.path, %reason, "skipped"),
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        let mut report = SyncReport { unchanged, skipped, ..SyncReport::default() };
        let uploads: Vec<_> = futures::stream::iter(to_upload)
            .map(|file| {
                let confined = confined.clone();
                let expected = expected_version(manifest.files.get(file.path.as_str()));
                async move {
                    let uploaded = self.upload(target, &confined, &file.path, &expected).await;
                    (file, uploaded)
                }
            })
            .buffer_unordered(parallelism)
            .collect()
            .await;
        let mut first_error = None;
        let mut conflicted = Vec::new();
        let mut changed_manifest = false;
        for (file, uploaded) in uploads {
            match uploaded {
                Ok(Uploaded::Done(entry)) => {
                    report.uploaded += 1;
                    report.bytes_uploaded += entry.size;
                    manifest.files.insert(file.path.as_str().to_owned(), entry);
                }
                Ok(Uploaded::Conflict) => conflicted.push(file),
                Err(Error::UnsafeNames(reason)) => report.skipped.push((file.path.to_string(), reason)),
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(session = %target.session, path = %file.path, %error, "upload failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        for file in conflicted {
            if first_error.is_some() {
                break;
            }
            changed_manifest = true;
            match self.resolve_conflict(target, &confined, &file, &mut manifest).await {
                Ok(Some((conflict, uploaded_bytes))) => {
                    tracing::warn!(session = %target.session, path = %conflict.path, copy = ?conflict.conflict_copy, reason = %conflict.reason, "conflict: both versions kept");
                    report.uploaded += 1;
                    report.bytes_uploaded += uploaded_bytes;
                    report.conflicts.push(conflict);
                }
                Ok(None) => report.unchanged += 1,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if first_error.is_none() {
            for path in removed {
                let relative =
                    WorkspacePath::parse(&path).map_err(|reason| Error::Manifest { path: target.manifest_path.clone(), reason })?;
                let key = relative.to_key(&target.prefix);
                let expected = expected_version(manifest.files.get(&path));
                match conditional::delete(self.store.store.as_ref(), &key, &expected).await {
                    Ok(true) => {
                        manifest.files.remove(&path);
                        deleted_keys.insert(key.to_string());
                        report.deleted += 1;
                    }
                    Ok(false) => {
                        // Someone else wrote it after this session saw it: theirs stays, and comes back here.
                        changed_manifest = true;
                        manifest.files.remove(&path);
                        match self.restore(target, &confined, &relative, &manifest.tree, &mut manifest.files).await {
                            Ok(()) => report.conflicts.push(ConflictRecord {
                                path: path.clone(),
                                conflict_copy: None,
                                reason: "changed in the store by another writer after it was deleted here: the store's version was kept and restored".to_owned(),
                            }),
                            Err(error) => {
                                first_error = Some(error);
                                break;
                            }
                        }
                    }
                    Err(error) => {
                        first_error = Some(error);
                        break;
                    }
                }
            }
        }
        if first_error.is_none() && local_tree != manifest.tree {
            match self.write_tree(target, &mut manifest, local_tree).await {
                Ok(()) => changed_manifest = true,
                Err(error) => first_error = Some(error),
            }
        }
        // Whatever got through is recorded, so a retry does not redo it; an autosave that found
        // nothing to do writes nothing.
        if report.uploaded > 0 || report.deleted > 0 || refreshed_entries > 0 || changed_manifest || manifest_is_new {
            manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        tracing::info!(
            session = %target.session, final_sync = kind == SyncKind::Final, uploaded = report.uploaded,
            deleted = report.deleted, unchanged = report.unchanged, bytes = report.bytes_uploaded,
            conflicts = report.conflicts.len(), "workspace synced"
        );
        Ok(report)
    }

    /// Someone else wrote (or deleted) the object at `file.path` since this session saw it.
    /// Identical content is simply adopted; otherwise the store's version is downloaded into the
    /// file's place and the local content is kept next to it as a conflict copy, locally and in
    /// the store. `None`: no conflict after all; else the conflict and the bytes uploaded for it.
    ///
    /// The local content goes up under the conflict-copy name before anything moves locally, so
    /// a failure at any point leaves a state the next sync resolves the same way, never a local
    /// file that is in neither place.
    async fn resolve_conflict(
        &self,
        target: &Target,
        confined: &Arc<Confined>,
        file: &LocalFile,
        manifest: &mut Manifest,
    ) -> Result<Option<(ConflictRecord, u64)>> {
        let path = &file.path;
        let key = path.to_key(&target.prefix);
        for _ in 0..3 {
            let Some(meta) = conditional::head(self.store.store.as_ref(), &key).await? else {
                // Deleted in the store meanwhile: this session's version goes up again.
                match self.upload(target, confined, path, &Expected::Absent).await? {
                    Uploaded::Done(entry) => {
                        let size = entry.size;
                        manifest.files.insert(path.as_str().to_owned(), entry);
                        let record = ConflictRecord {
                            path: path.to_string(),
                            conflict_copy: None,
                            reason: "deleted in the store by another writer: this session's version was uploaded again".to_owned(),
                        };
                        return Ok(Some((record, size)));
                    }
                    Uploaded::Conflict => continue,
                }
            };
            let staged = self.fetch_to_staging(&target.staging, path, &meta).await?;
            let hashed_confined = confined.clone();
            let hashed_path = path.clone();
            let local = blocking(move || {
                let (handle, metadata) = hashed_confined.open_file(&hashed_path)?;
                Ok((fsops::hash_file(handle)?, metadata.len(), fsops::mtime_ns(&metadata)))
            })
            .await;
            let (local_hash, local_size, local_mtime_ns) = match local {
                Ok(found) => found,
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    // Deleted here meanwhile: the store's version takes its place, nothing to keep twice.
                    let _ = tokio::fs::remove_file(&staged.content.path).await;
                    return Ok(None);
                }
                Err(error) => {
                    let _ = tokio::fs::remove_file(&staged.content.path).await;
                    return Err(error);
                }
            };
            if local_hash == staged.content.sha256 {
                let _ = tokio::fs::remove_file(&staged.content.path).await;
                let entry = FileEntry {
                    size: local_size,
                    mtime_ns: local_mtime_ns,
                    sha256: local_hash,
                    e_tag: staged.e_tag,
                    version: staged.version,
                };
                manifest.files.insert(path.as_str().to_owned(), entry);
                return Ok(None);
            }
            let (copy, copy_entry) = match self.keep_as_conflict_copy(target, confined, path).await {
                Ok(kept) => kept,
                Err(error) => {
                    let _ = tokio::fs::remove_file(&staged.content.path).await;
                    return Err(error);
                }
            };
            let uploaded_bytes = copy_entry.size;
            manifest.files.insert(copy.as_str().to_owned(), copy_entry);
            match self.place(confined, path, staged, Placement::KeepExisting, file.mode).await? {
                Some(entry) => manifest.files.insert(path.as_str().to_owned(), entry),
                // The user created the file again meanwhile: the next sync sees it as new.
                None => manifest.files.remove(path.as_str()),
            };
            let record = ConflictRecord {
                path: path.to_string(),
                conflict_copy: Some(copy.to_string()),
                reason: "changed in the store by another writer since this session saw it: the store's version is at the path, this session's is the conflict copy".to_owned(),
            };
            return Ok(Some((record, uploaded_bytes)));
        }
        Err(Error::Unconfirmed(format!("{path}: the object kept changing while resolving a conflict")))
    }

    /// Uploads the local file under a conflict-copy name that is free locally and in the store,
    /// then renames the local file to it. Returns the name and its manifest entry.
    async fn keep_as_conflict_copy(
        &self,
        target: &Target,
        confined: &Arc<Confined>,
        path: &WorkspacePath,
    ) -> Result<(WorkspacePath, FileEntry)> {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        for attempt in 0..20 {
            let copy = conflict_copy_path(path, &target.session, &stamp, attempt).map_err(Error::UnsafeNames)?;
            let checked = confined.clone();
            let checked_copy = copy.clone();
            if blocking(move || checked.exists(&checked_copy)).await? {
                continue;
            }
            let entry = match self.upload_as(target, confined, path, &copy, &Expected::Absent).await? {
                Uploaded::Done(entry) => entry,
                Uploaded::Conflict => continue,
            };
            let moved = confined.clone();
            let (from, to) = (path.clone(), copy.clone());
            if blocking(move || moved.rename_aside(&from, &to)).await? {
                return Ok((copy, entry));
            }
            // The name was taken locally in between: the object stays (it is this session's
            // content) and another name is tried.
            tracing::warn!(session = %target.session, path = %copy, "conflict-copy name taken locally meanwhile; trying another");
        }
        Err(Error::Unconfirmed(format!("{path}: no free conflict-copy name")))
    }

    /// Downloads the store's version of `path` into its place (never over a file the user made).
    async fn restore(
        &self,
        target: &Target,
        confined: &Arc<Confined>,
        path: &WorkspacePath,
        tree: &Tree,
        files: &mut BTreeMap<String, FileEntry>,
    ) -> Result<()> {
        let key = path.to_key(&target.prefix);
        let Some(meta) = conditional::head(self.store.store.as_ref(), &key).await? else { return Ok(()) };
        let staged = self.fetch_to_staging(&target.staging, path, &meta).await?;
        if let Some(entry) = self.place(confined, path, staged, Placement::KeepExisting, tree.file_mode(path.as_str())).await? {
            files.insert(path.as_str().to_owned(), entry);
        }
        Ok(())
    }

    /// Replaces a local file that is still exactly as `entry` recorded it with the store's newer
    /// version `meta`. `None` when the local file changed (or went) meanwhile: nothing replaced.
    async fn refresh(
        &self,
        target: &Target,
        confined: &Arc<Confined>,
        path: &WorkspacePath,
        meta: &ObjectMeta,
        entry: &FileEntry,
        mode: u32,
    ) -> Result<Option<FileEntry>> {
        let staged = self.fetch_to_staging(&target.staging, path, meta).await?;
        let checked = confined.clone();
        let checked_path = path.clone();
        let (size, mtime_ns) = (entry.size, entry.mtime_ns);
        let unchanged = blocking(move || {
            let (_, metadata) = checked.open_file(&checked_path)?;
            Ok(metadata.len() == size && fsops::mtime_ns(&metadata) == mtime_ns)
        })
        .await;
        if !matches!(unchanged, Ok(true)) {
            let _ = tokio::fs::remove_file(&staged.content.path).await;
            return Ok(None);
        }
        self.place(confined, path, staged, Placement::ReplaceExisting, mode).await
    }

    /// Writes the sidecar conditionally; when another writer replaced it meanwhile, this
    /// session's changes (against what it last agreed with the store) go on top of theirs.
    async fn write_tree(&self, target: &Target, manifest: &mut Manifest, local: Tree) -> Result<()> {
        let key = sidecar_key(&target.prefix);
        let mut expected = match (&manifest.tree_e_tag, &manifest.tree_version) {
            (None, None) => Expected::Absent,
            (e_tag, version) => Expected::Version { e_tag: e_tag.clone(), version: version.clone() },
        };
        let mut wanted = local.clone();
        for _ in 0..5 {
            let bytes = wanted.to_sidecar_bytes().map_err(|reason| Error::Manifest { path: target.manifest_path.clone(), reason })?;
            let payload = PutPayload::from(bytes);
            match conditional::put(self.store.store.as_ref(), &key, payload, &expected).await? {
                Written::Done(result) => {
                    // The base for the next merge is this session's own view, not the merge.
                    manifest.tree = local;
                    manifest.tree_e_tag = result.e_tag;
                    manifest.tree_version = result.version;
                    return Ok(());
                }
                Written::Conflict => {
                    let (remote, meta) = match self.read_tree(&target.prefix).await? {
                        Some((Ok(remote), meta)) => (remote, Some(meta)),
                        // Unreadable metadata someone else wrote: this session's tree replaces it.
                        Some((Err(reason), meta)) => {
                            tracing::warn!(session = %target.session, %reason, "unreadable tree metadata in the store; replacing it");
                            (Tree::default(), Some(meta))
                        }
                        None => (Tree::default(), None),
                    };
                    expected = match meta {
                        Some(meta) => Expected::Version { e_tag: meta.e_tag, version: meta.version },
                        None => Expected::Absent,
                    };
                    wanted = Tree::merged(&manifest.tree, &local, &remote);
                    tracing::info!(session = %target.session, "tree metadata changed in the store meanwhile; merged");
                }
            }
        }
        Err(Error::Unconfirmed(format!("{key}: kept changing while merging")))
    }

    /// The sidecar (or why it can't be read as one) and its metadata; `None` when there is none.
    async fn read_tree(&self, prefix: &ObjectPath) -> Result<Option<(Result<Tree, String>, ObjectMeta)>> {
        let key = sidecar_key(prefix);
        let result = match self.store.store.get(&key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let meta = result.meta.clone();
        let bytes = result.bytes().await?;
        Ok(Some((Tree::from_sidecar_bytes(&bytes), meta)))
    }

    /// Reads one file safely and uploads it (in parts when large), only over the `expected` version.
    async fn upload(&self, target: &Target, confined: &Arc<Confined>, path: &WorkspacePath, expected: &Expected) -> Result<Uploaded> {
        self.upload_as(target, confined, path, path, expected).await
    }

    /// Uploads the local file at `path` to the key of `key_path`.
    async fn upload_as(
        &self,
        target: &Target,
        confined: &Arc<Confined>,
        path: &WorkspacePath,
        key_path: &WorkspacePath,
        expected: &Expected,
    ) -> Result<Uploaded> {
        let key = key_path.to_key(&target.prefix);
        let opener = confined.clone();
        let opened_path = path.clone();
        let (file, metadata) = blocking(move || opener.open_file(&opened_path)).await?;
        let size = metadata.len();
        let mtime_ns = fsops::mtime_ns(&metadata);
        if size <= MULTIPART_BYTES {
            let (content, sha256) = blocking(move || fsops::read_and_hash(file, size)).await?;
            let read_size = content.len() as u64;
            let result = match conditional::put(self.store.store.as_ref(), &key, PutPayload::from(content), expected).await? {
                Written::Done(result) => result,
                Written::Conflict => return Ok(Uploaded::Conflict),
            };
            // A file that changed while we read it gets an mtime that forces a recheck next time.
            let mtime_ns = if read_size == size { mtime_ns } else { 0 };
            return Ok(Uploaded::Done(FileEntry { size: read_size, mtime_ns, sha256, e_tag: result.e_tag, version: result.version }));
        }
        // `object_store` can't make a multipart upload conditional: check before it starts (no
        // wasted upload) and again right before it is completed.
        if !expected.matches(conditional::head(self.store.store.as_ref(), &key).await?.as_ref()) {
            return Ok(Uploaded::Conflict);
        }
        let upload = self.store.store.put_multipart(&key).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_CHUNK_BYTES);
        let mut reader = Some((file, sha2::Sha256::default()));
        let mut read_size = 0u64;
        let finished = loop {
            let (file, hasher) = reader.take().ok_or_else(|| Error::Unconfirmed("reader lost".to_owned()))?;
            // Never past the size the file had when it was opened: one that keeps growing is
            // read once to that size (and synced again next time), not forever.
            let remaining = usize::try_from(size.saturating_sub(read_size)).unwrap_or(usize::MAX);
            let chunk = blocking(move || {
                use sha2::Digest;
                use std::io::Read;
                let mut file = file;
                let mut hasher = hasher;
                let mut chunk = vec![0u8; MULTIPART_CHUNK_BYTES.min(remaining)];
                let mut filled = 0;
                while filled < chunk.len() {
                    let read = file
                        .read(&mut chunk[filled..])
                        .map_err(|source| Error::io("reading", PathBuf::from("(workspace file)"), source))?;
                    if read == 0 {
                        break;
                    }
                    filled += read;
                }
                chunk.truncate(filled);
                hasher.update(&chunk);
                Ok((file, hasher, chunk))
            })
            .await;
            let (file, hasher, chunk) = match chunk {
                Ok(parts) => parts,
                Err(error) => {
                    let _ = writer.abort().await;
                    return Err(error);
                }
            };
            if chunk.is_empty() {
                break hasher;
            }
            read_size += chunk.len() as u64;
            writer.write(&chunk);
            if let Err(error) = writer.wait_for_capacity(2).await {
                // The writer has already given up on the upload; nothing more to abort.
                return Err(Error::Store(error));
            }
            reader = Some((file, hasher));
        };
        if let Err(error) = writer.wait_for_capacity(0).await {
            return Err(Error::Store(error));
        }
        let current = match conditional::head(self.store.store.as_ref(), &key).await {
            Ok(current) => current,
            Err(error) => {
                let _ = writer.abort().await;
                return Err(error);
            }
        };
        if !expected.matches(current.as_ref()) {
            let _ = writer.abort().await;
            return Ok(Uploaded::Conflict);
        }
        let result = writer.finish().await?;
        use sha2::Digest;
        let sha256 = fsops::hex(&finished.finalize());
        let mtime_ns = if read_size == size { mtime_ns } else { 0 };
        Ok(Uploaded::Done(FileEntry { size: read_size, mtime_ns, sha256, e_tag: result.e_tag, version: result.version }))
    }

    /// Lists the prefix and checks every manifest entry against it: present, same size, same ETag;
    /// the sidecar as last written; and every deleted key gone. Mismatches leave the manifest so
    /// the next attempt writes them again (conditionally: a version someone else wrote meanwhile
    /// becomes a conflict, never an overwrite).
    async fn confirm(&self, target: &Target, deleted_keys: &BTreeSet<String>) -> Result<()> {
        let listing: Vec<ObjectMeta> = self.store.store.list(Some(&target.prefix)).try_collect().await?;
        let remote: BTreeMap<String, ObjectMeta> = listing.into_iter().map(|meta| (meta.location.to_string(), meta)).collect();
        let Some(mut manifest) = self.load_manifest(target).await? else {
            return Err(Error::BadTask(format!("session {} was never materialized here", target.session)));
        };
        let mut problems = Vec::new();
        let mut newer = Vec::new();
        manifest.files.retain(|path, entry| {
            let Ok(relative) = WorkspacePath::parse(path) else { return false };
            let key = relative.to_key(&target.prefix).to_string();
            match remote.get(&key) {
                Some(meta) if meta.size == entry.size && (entry.e_tag.is_none() || meta.e_tag.is_none() || meta.e_tag == entry.e_tag) => {
                    true
                }
                Some(meta) => {
                    newer.push((relative, meta.clone(), entry.clone()));
                    true
                }
                None => {
                    problems.push(format!("{path}: missing"));
                    false
                }
            }
        });
        // Someone else wrote these since this session did. Where the local file is still what this
        // session last saw, the store simply has a newer version: it replaces the local copy (no
        // conflict). Otherwise the entry is forgotten and the next attempt keeps both versions.
        let mut refreshed = 0;
        if !newer.is_empty() {
            let directory = target.directory.clone();
            let confined = Arc::new(blocking(move || Confined::open(&directory)).await?);
            for (relative, meta, entry) in newer {
                let mode = manifest.tree.file_mode(relative.as_str());
                match self.refresh(target, &confined, &relative, &meta, &entry, mode).await {
                    Ok(Some(fresh)) => {
                        tracing::info!(session = %target.session, path = %relative, "newer version from the store replaced an unchanged local file");
                        manifest.files.insert(relative.as_str().to_owned(), fresh);
                        refreshed += 1;
                    }
                    Ok(None) => {
                        manifest.files.remove(relative.as_str());
                        problems.push(format!("{relative}: changed in the store and here"));
                    }
                    Err(error) => {
                        manifest.files.remove(relative.as_str());
                        problems.push(format!("{relative}: {error}"));
                    }
                }
            }
        }
        let sidecar = sidecar_key(&target.prefix).to_string();
        let sidecar_matches = match (&manifest.tree_e_tag, remote.get(&sidecar)) {
            (None, None) => manifest.tree.is_empty(),
            (None, Some(_)) => manifest.tree.is_empty(),
            (Some(_), None) => false,
            (Some(e_tag), Some(meta)) => meta.e_tag.is_none() || meta.e_tag.as_ref() == Some(e_tag),
        };
        if !sidecar_matches {
            problems.push(format!("{}: not as written", tree::SIDECAR_PATH));
            // Forget the base: the next attempt merges everything local into whatever is there.
            manifest.tree = Tree::default();
            manifest.tree_e_tag = None;
            manifest.tree_version = None;
        }
        for key in deleted_keys {
            if remote.contains_key(key) {
                problems.push(format!("{key}: still present after delete"));
            }
        }
        if problems.is_empty() {
            if refreshed > 0 {
                manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
            }
            return Ok(());
        }
        manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
        let shown: Vec<_> = problems.iter().take(5).cloned().collect();
        Err(Error::Unconfirmed(format!("{} object(s) not as written: {}", problems.len(), shown.join("; "))))
    }

    // ----- remove --------------------------------------------------------------------------------

    /// Deletes the directory after a confirmed final sync that covers it. What can't be stored is
    /// moved to the preserved area first: afterwards every entry of the directory is either
    /// confirmed in the store or preserved. Returns the preserved paths (lossy UTF-8).
    async fn remove(&self, session: &str, keep: Keep) -> Result<Vec<String>> {
        let deployment_root = self.profile.deployment_root();
        let Location { directory, staging, volume } = locate(&self.profile, session);
        let manifest_path = manifest::manifest_path(&deployment_root, session);
        let preserved_root = manifest::preserved_path(&deployment_root, session);
        let manifest = manifest::load(manifest_path.clone()).await?;
        self.prepare_volume(session, volume.as_ref(), Create::No).await?;
        let directory_exists = tokio::fs::symlink_metadata(&directory).await.is_ok();
        if !directory_exists {
            if let Some(volume) = volume.clone() {
                // Nothing in it (never materialized, or a remove that died after deleting): the
                // empty mount points and the image go, so no empty directory is left listed.
                blocking(move || volume::release(&volume)).await?;
            }
        }
        let mut manifest = match manifest {
            // Already removed (a redelivery): the same answer again.
            Some(manifest) if !directory_exists && manifest.phase == Phase::Removed => return Ok(manifest.preserved),
            Some(mut manifest) if !directory_exists => {
                // Gone already (never materialized, or a remove that died after deleting).
                let _ = tokio::fs::remove_dir_all(&staging).await;
                let preserved = manifest.preserved.clone();
                manifest.phase = Phase::Removed;
                manifest.files.clear();
                manifest::save(manifest_path, manifest, Durability::Flushed).await?;
                return Ok(preserved);
            }
            Some(manifest) => manifest,
            None if !directory_exists => return Ok(Vec::new()),
            None => return Err(Error::RemoveRefused(format!("{} has no manifest, so no final sync ever covered it", directory.display()))),
        };
        // An interrupted remove (the agent died while deleting) carries on: the directory was
        // covered when it started, and what is missing now is what it had deleted.
        let resuming = manifest.phase == Phase::Removing;
        if !resuming && !manifest.final_sync_confirmed() {
            return Err(Error::RemoveRefused("the last final sync was not confirmed; the directory is kept".to_owned()));
        }
        let scanned_directory = directory.clone();
        let limits = self.scan_limits();
        let scan = blocking(move || fsops::scan_within(&scanned_directory, &limits)).await?;
        if !resuming {
            if let Some(changes) = plan::changes_since_final_sync(&manifest, &scan) {
                return Err(Error::RemoveRefused(format!("{changes} since the final sync; sync again first")));
            }
        }
        let unsyncable = scan.unsyncable;
        let session_text = session.to_owned();
        let preserve_directory = directory.clone();
        let newly_preserved = blocking(move || {
            let directory = preserve_directory;
            let confined = Confined::open(&directory)?;
            let mut preserved = Vec::new();
            for entry in &unsyncable {
                let mut destination = preserved_root.clone();
                if let Some(parent) = &entry.parent {
                    destination = parent.under(&destination);
                }
                std::fs::create_dir_all(&destination).map_err(|source| Error::io("creating preserved folder", &destination, source))?;
                let destination = destination.join(&entry.name);
                if std::fs::symlink_metadata(&destination).is_ok() {
                    // Kept by an earlier, interrupted remove: keep both.
                    let mut renamed = destination.clone().into_os_string();
                    renamed.push(format!(".{}", Uuid::new_v4().simple()));
                    confined.move_out(entry.parent.as_ref(), &entry.name, Path::new(&renamed))?;
                } else {
                    confined.move_out(entry.parent.as_ref(), &entry.name, &destination)?;
                }
                tracing::warn!(session = %session_text, path = %entry.path, reason = %entry.reason, to = %destination.display(), "kept in the preserved area: it can't be stored");
                preserved.push(entry.path.clone());
            }
            // Everything left was confirmed in the store; make sure the walk saw it all.
            let rest = fsops::scan_within(&directory, &limits)?;
            if !rest.unsyncable.is_empty() {
                return Err(Error::RemoveRefused(format!("{} entries appeared that can't be stored; sync again first", rest.unsyncable.len())));
            }
            Ok(preserved)
        })
        .await?;
        let mut preserved = manifest.preserved.clone();
        preserved.extend(newly_preserved);
        // Only a whole, unchanged workspace of this profile is cached; a resumed remove may have
        // deleted part of the directory already, so it always finishes deleting.
        let cached = match keep {
            Keep::Cache
                if !resuming
                    && manifest.phase == Phase::Complete
                    && (manifest.profile.is_empty() || manifest.profile == self.profile.name) =>
            {
                let mut record_manifest = manifest.clone();
                record_manifest.preserved.clear();
                Some(record_manifest)
            }
            _ => None,
        };
        // Durable before the first deletion: a remove cut short resumes instead of looking like
        // the user deleted files (which a sync would then delete in the store).
        manifest.phase = Phase::Removing;
        manifest.preserved.clone_from(&preserved);
        manifest::save(manifest_path.clone(), manifest.clone(), Durability::Flushed).await?;
        let cached = match cached {
            Some(record_manifest) => self.cache_directory(session, record_manifest, &directory, &staging, volume.as_ref()).await?,
            None => false,
        };
        let volume = volume.filter(|_| !cached);
        blocking(move || {
            if cached {
                return Ok(());
            }
            if let Some(volume) = volume {
                // The files go with the image: unmounted, then deleted (the image last).
                let started = Instant::now();
                volume::release(&volume)?;
                tracing::info!(ms = started.elapsed().as_millis() as u64, image = %volume.image.display(), "workspace file system unmounted and deleted");
                return Ok(());
            }
            std::fs::remove_dir_all(&directory).map_err(|source| Error::io("removing workspace", &directory, source))?;
            match std::fs::remove_dir_all(&staging) {
                Ok(()) => Ok(()),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(Error::io("removing staging folder", &staging, source)),
            }
        })
        .await?;
        manifest.phase = Phase::Removed;
        manifest.files.clear();
        manifest.preserved.clone_from(&preserved);
        let prefix = manifest.prefix.clone();
        manifest::save(manifest_path, manifest, Durability::Flushed).await?;
        inventory::unmark(&deployment_root, &prefix, session);
        if cached {
            tracing::info!(
                session,
                preserved = preserved.len(),
                "workspace directory kept in the host's cache after a confirmed final sync"
            );
            self.evict_cache().await;
        } else {
            tracing::info!(session, preserved = preserved.len(), "workspace directory removed after a confirmed final sync");
        }
        Ok(preserved)
    }

    // ----- the local workspace cache -------------------------------------------------------------

    fn cache_budget_bytes(&self) -> u64 {
        self.profile.workspace.cache_mib.saturating_mul(1024 * 1024)
    }

    fn cache_owner(&self, user: &str, workspace: &str, prefix: &str) -> cache::Owner {
        cache::Owner {
            profile: self.profile.name.clone(),
            user: user.to_owned(),
            workspace: workspace.to_owned(),
            prefix: prefix.to_owned(),
        }
    }

    /// Moves a removed session's directory (or image) into the cache. `false` when it does not
    /// fit the budget at all: the caller deletes it as without a cache.
    async fn cache_directory(
        &self,
        session: &str,
        record_manifest: Manifest,
        directory: &Path,
        staging: &Path,
        volume: Option<&Volume>,
    ) -> Result<bool> {
        let owner = self.cache_owner(&record_manifest.user, &record_manifest.workspace, &record_manifest.prefix);
        let _cache_guard = self.lock(format!("cache:{}", owner.key())).await;
        let budget = self.cache_budget_bytes();
        let (root, session, directory, staging, volume) =
            (self.profile.deployment_root(), session.to_owned(), directory.to_owned(), staging.to_owned(), volume.cloned());
        blocking(move || {
            let (holder, bytes, source) = match volume {
                Some(volume) => (cache::Holder::Image, cache::allocated_bytes(&volume.image)?, cache::Source::Image(volume)),
                None => (cache::Holder::Directory, record_manifest.total_bytes(), cache::Source::Directory(directory)),
            };
            if bytes > budget {
                tracing::info!(session, bytes, budget, "workspace larger than the whole cache budget; deleted instead");
                return Ok(false);
            }
            let record = cache::Record::new(&owner, holder, bytes, record_manifest);
            let entry = cache::insert(&root, &session, &record, source)?;
            match std::fs::remove_dir_all(&staging) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::io("removing staging folder", &staging, source)),
            }
            tracing::debug!(session, entry = %entry.display(), bytes, "cached");
            Ok(true)
        })
        .await
    }

    /// Deletes the least recently closed cache entries beyond the budget (all of them with a
    /// budget of 0). An entry a task holds right now is left for the next round.
    pub async fn evict_cache(&self) -> usize {
        let root = self.profile.deployment_root();
        let budget = self.cache_budget_bytes();
        let listed = match blocking(move || cache::list(&root)).await {
            Ok(listed) => listed,
            Err(error) => {
                tracing::warn!(%error, "workspace cache not listed");
                return 0;
            }
        };
        let mut evicted = 0;
        for entry in cache::over_budget(listed, budget) {
            let Some(_guard) = self.try_lock(format!("cache:{}", entry.key)) else { continue };
            let folder = entry.folder.clone();
            match blocking(move || cache::discard(&folder)).await {
                Ok(()) => {
                    evicted += 1;
                    tracing::info!(entry = %entry.key, bytes = entry.record.as_ref().map_or(0, |record| record.bytes), "cached workspace evicted");
                }
                Err(error) => tracing::warn!(entry = %entry.key, %error, "cached workspace not evicted"),
            }
        }
        evicted
    }

    /// Takes this workspace's cache entry, if the host has one, and makes it the session's
    /// directory, revalidated against `wanted` (the store's listing): files the store no longer
    /// has, or has in another version, are deleted locally (the download replaces them); what is
    /// kept is returned with the listing's versions, which the conditional writes of later syncs
    /// need. `None` (the cold path, into a fresh directory) when there is no entry, or it is not
    /// exactly what the confirmed final sync left (then it is moved to the preserved area), or
    /// anything fails on the way (then it is deleted).
    async fn adopt_cached(&self, target: &Target, wanted: &[(WorkspacePath, ObjectMeta)], remote_tree: &Tree) -> Option<Revalidated> {
        let owner = self.cache_owner(&target.user, &target.workspace, &target.prefix_text);
        let _cache_guard = self.lock(format!("cache:{}", owner.key())).await;
        let started = Instant::now();
        let root = self.profile.deployment_root();
        let listed: BTreeMap<String, Listed> = wanted
            .iter()
            .map(|(path, meta)| {
                (path.as_str().to_owned(), Listed { size: meta.size, e_tag: meta.e_tag.clone(), version: meta.version.clone() })
            })
            .collect();
        let placing = Placing {
            session_dir: self.profile.session_dir(&target.session),
            session_volume: Volume::of(&root, &target.session),
            preserved: manifest::preserved_path(&root, &target.session),
            quota_bytes: self.profile.workspace.quota_mib * 1024 * 1024,
            owner: self.ownership,
            limits: self.scan_limits(),
        };
        let (remote_tree, session) = (remote_tree.clone(), target.session.clone());
        let outcome = blocking(move || {
            let Some(taken) = cache::take(&root, &owner, &session)? else { return Ok(None) };
            revalidate_cached(taken, &listed, &remote_tree, &placing)
        })
        .await;
        match outcome {
            Ok(Some(revalidated)) => {
                tracing::info!(
                    session = %target.session, kept_files = revalidated.files.len(), kept_bytes = revalidated.kept_bytes,
                    removed = revalidated.removed, ms = started.elapsed().as_millis() as u64, "reopened from the host's workspace cache"
                );
                Some(revalidated)
            }
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(session = %target.session, %error, "cached workspace not used; materializing from the store");
                None
            }
        }
    }

    /// At start, before any task: deletes what interrupted cache moves left, then evicts.
    pub async fn tend_cache_at_start(&self) -> Result<usize> {
        let root = self.profile.deployment_root();
        let swept = blocking(move || cache::sweep(&root)).await?;
        Ok(swept + self.evict_cache().await)
    }
}

/// Lists in events stay below this many bytes of JSON: the bus refuses events over 256 KiB
/// (`protocol::event::DEFAULT_MAX_EVENT_BYTES`).
const EVENT_LIST_BYTES: usize = 128 * 1024;

/// Consecutive pieces of `items`, each at most `count` items and about `max_bytes` of JSON (an
/// item bigger than that alone still gets a piece of its own).
fn chunks_within<T: serde::Serialize>(items: &[T], count: usize, max_bytes: usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, item) in items.iter().enumerate() {
        let size = serde_json::to_vec(item).map_or(0, |encoded| encoded.len() + 1);
        if index > start && (index - start >= count || bytes + size > max_bytes) {
            chunks.push(&items[start..index]);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// Error texts in events are cut to this many bytes (10,000 refused keys make a long message).
const EVENT_TEXT_BYTES: usize = 8 * 1024;

/// `text`, cut at a character boundary below `EVENT_TEXT_BYTES` with a note of how much was left out.
fn event_text(text: &str) -> String {
    if text.len() <= EVENT_TEXT_BYTES {
        return text.to_owned();
    }
    let mut end = EVENT_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end)
}

/// The first items of a list that fit in one event (half the list budget), and how many there are.
fn bounded_list<T: serde::Serialize + Clone>(items: &[T]) -> (Vec<T>, usize) {
    let shown = chunks_within(items, usize::MAX, EVENT_LIST_BYTES / 2).first().map(|chunk| chunk.to_vec()).unwrap_or_default();
    (shown, items.len())
}

/// `workspace.synced`'s data: `skipped` cut to fit the event, `skipped_total` when it was.
fn synced_data(kind: SyncKind, report: &SyncReport) -> WorkspaceSynced {
    let skipped: Vec<_> = report.skipped.iter().map(|(path, reason)| Skipped { path: path.clone(), reason: reason.clone() }).collect();
    let (skipped, skipped_total) = bounded_list(&skipped);
    WorkspaceSynced {
        final_sync: kind == SyncKind::Final,
        uploaded: report.uploaded as u64,
        deleted: report.deleted as u64,
        unchanged: report.unchanged as u64,
        bytes_uploaded: report.bytes_uploaded,
        skipped_total: (skipped_total > skipped.len()).then_some(skipped_total as u64),
        skipped,
        conflicts: report.conflicts.len() as u64,
        missing: report.missing,
    }
}

/// One object of the store's listing, as revalidation compares it.
struct Listed {
    size: u64,
    e_tag: Option<String>,
    version: Option<String>,
}

/// Where a revalidated cache entry goes.
struct Placing {
    session_dir: PathBuf,
    session_volume: Volume,
    preserved: PathBuf,
    quota_bytes: u64,
    owner: Option<Ownership>,
    limits: ScanLimits,
}

/// What a reopen kept from the cache.
struct Revalidated {
    /// Manifest entries of the files kept, with the listing's ETags and versions.
    files: BTreeMap<String, FileEntry>,
    kept_bytes: u64,
    /// Files and links deleted locally: gone from the store, or changed there.
    removed: usize,
}

/// Whether a cached file is still the store's: same size and ETag (and version, when both have
/// one), and the same mode in the sidecar. Without an ETag nothing can be compared: downloaded.
fn still_stored(path: &str, entry: &FileEntry, listed: &BTreeMap<String, Listed>, cached_tree: &Tree, remote_tree: &Tree) -> bool {
    let Some(object) = listed.get(path) else { return false };
    let same_version = match (&object.version, &entry.version) {
        (Some(listed_version), Some(cached_version)) => listed_version == cached_version,
        _ => true,
    };
    object.size == entry.size
        && object.e_tag.is_some()
        && object.e_tag == entry.e_tag
        && same_version
        && remote_tree.file_mode(path) == cached_tree.file_mode(path)
}

/// Checks a taken cache entry against its record and prunes it to what the store still has,
/// then moves it into the session's place. Blocking.
fn revalidate_cached(
    taken: cache::Taken,
    listed: &BTreeMap<String, Listed>,
    remote_tree: &Tree,
    placing: &Placing,
) -> Result<Option<Revalidated>> {
    let holder = taken.record.holder;
    let checked = (|| -> Result<std::result::Result<Revalidated, String>> {
        let directory = match holder {
            cache::Holder::Directory => taken.directory(),
            cache::Holder::Image => {
                let volume = taken.volume();
                if !volume::attach(&volume, placing.quota_bytes, placing.owner, false)? {
                    return Ok(Err("the cached image is missing".to_owned()));
                }
                volume.workspace()
            }
        };
        let cached = &taken.record.manifest;
        let scan = fsops::scan_within(&directory, &placing.limits)?;
        // After a confirmed final sync with nothing changed since, the directory is exactly the
        // manifest: anything else (a file it doesn't list, a changed one) is not served.
        if !scan.unsyncable.is_empty() {
            return Ok(Err(format!("{} entries that can't be stored", scan.unsyncable.len())));
        }
        if let Some(changes) = plan::changes_since_final_sync(cached, &scan) {
            return Ok(Err(changes));
        }
        let confined = Confined::open(&directory)?;
        let mut revalidated = Revalidated { files: BTreeMap::new(), kept_bytes: 0, removed: 0 };
        for (path, entry) in &cached.files {
            if still_stored(path, entry, listed, &cached.tree, remote_tree) {
                let version = listed.get(path).and_then(|object| object.version.clone());
                revalidated.files.insert(path.clone(), FileEntry { version, ..entry.clone() });
                revalidated.kept_bytes += entry.size;
                continue;
            }
            let relative = WorkspacePath::parse(path).map_err(Error::UnsafeNames)?;
            confined.remove_entry(&relative, fsops::Removal::EmptyFolder)?;
            revalidated.removed += 1;
        }
        for (path, link_target) in &cached.tree.links {
            if remote_tree.links.get(path) == Some(link_target) {
                continue;
            }
            let relative = WorkspacePath::parse(path).map_err(Error::UnsafeNames)?;
            confined.remove_entry(&relative, fsops::Removal::EmptyFolder)?;
            revalidated.removed += 1;
        }
        // Folders the store no longer has, deepest first; one still holding a file stays (the
        // listing's files need it).
        let mut folders: Vec<&String> =
            cached.tree.directories.keys().filter(|path| !remote_tree.directories.contains_key(*path)).collect();
        folders.sort_by_key(|path| std::cmp::Reverse(path.matches('/').count()));
        for folder in folders {
            if let Ok(relative) = WorkspacePath::parse(folder) {
                let _ = confined.remove_entry(&relative, fsops::Removal::EmptyFolder);
            }
        }
        drop(confined);
        if holder == cache::Holder::Image {
            volume::detach(&taken.volume())?;
        }
        Ok(Ok(revalidated))
    })();
    let revalidated = match checked {
        Ok(Ok(revalidated)) => revalidated,
        Ok(Err(reason)) => {
            let aside = placing.preserved.join(format!("rejected-cache-{}", Uuid::new_v4().simple()));
            tracing::error!(reason, kept_at = %aside.display(), "a cached workspace is not what its confirmed final sync left; not served, kept aside");
            if holder == cache::Holder::Image {
                volume::detach(&taken.volume())?;
            }
            if let Some(parent) = aside.parent() {
                std::fs::create_dir_all(parent).map_err(|source| Error::io("creating preserved folder", parent, source))?;
            }
            std::fs::rename(&taken.folder, &aside).map_err(|source| Error::io("moving aside", &taken.folder, source))?;
            return Ok(None);
        }
        Err(error) => {
            cache::discard(&taken.folder)?;
            return Err(error);
        }
    };
    if let Err(error) = place_cached(&taken, placing) {
        cache::discard(&taken.folder)?;
        return Err(error);
    }
    if let Err(error) = std::fs::remove_dir_all(&taken.folder) {
        tracing::warn!(folder = %taken.folder.display(), %error, "emptied cache entry not deleted; the next start deletes it");
    }
    Ok(Some(revalidated))
}

/// Moves a revalidated cache entry into the session's place: the directory to
/// `Profile::session_dir`, or the image to the session's image (mounted by `prepare`).
fn place_cached(taken: &cache::Taken, placing: &Placing) -> Result<()> {
    if placing.session_volume.exists() {
        return Err(Error::Filesystem(format!("{} already exists", placing.session_volume.image.display())));
    }
    // An empty session directory that exists already is a claimed warm-pool slot's, bind-mounted
    // in its container since before the claim: replacing it would leave the container on the old,
    // deleted inode. The cached entries move into it instead (each a rename on the same file
    // system), and it takes the cached folder's mode and owner.
    let existing_empty = std::fs::read_dir(&placing.session_dir).is_ok_and(|mut entries| entries.next().is_none());
    if taken.record.holder == cache::Holder::Directory && existing_empty {
        let cached = taken.directory();
        let entries = std::fs::read_dir(&cached).map_err(|source| Error::io("listing the cached workspace", &cached, source))?;
        for entry in entries {
            let entry = entry.map_err(|source| Error::io("listing the cached workspace", &cached, source))?;
            let destination = placing.session_dir.join(entry.file_name());
            std::fs::rename(entry.path(), &destination).map_err(|source| Error::io("moving a cached entry to", &destination, source))?;
        }
        if let Ok(metadata) = std::fs::metadata(&cached) {
            let _ = std::fs::set_permissions(&placing.session_dir, metadata.permissions());
        }
        if let Some(owner) = placing.owner {
            fsops::change_owner(&placing.session_dir, owner);
        }
        return Ok(());
    }
    match std::fs::remove_dir(&placing.session_dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(Error::io("making room for the cached workspace at", &placing.session_dir, source)),
    }
    match taken.record.holder {
        cache::Holder::Directory => std::fs::rename(taken.directory(), &placing.session_dir)
            .map_err(|source| Error::io("moving the cached workspace to", &placing.session_dir, source)),
        cache::Holder::Image => {
            let image = &placing.session_volume.image;
            if let Some(folder) = image.parent() {
                std::fs::create_dir_all(folder).map_err(|source| Error::io("creating images folder", folder, source))?;
            }
            std::fs::rename(taken.volume().image, image).map_err(|source| Error::io("moving the cached image to", image, source))
        }
    }
}

/// The version the manifest recorded for a file, or "no object" for a file it doesn't know.
fn expected_version(entry: Option<&FileEntry>) -> Expected {
    match entry {
        Some(entry) => Expected::Version { e_tag: entry.e_tag.clone(), version: entry.version.clone() },
        None => Expected::Absent,
    }
}

/// The sidecar's key under a workspace prefix.
fn sidecar_key(prefix: &ObjectPath) -> ObjectPath {
    prefix.parts().chain(ObjectPath::from(tree::SIDECAR_PATH).parts()).collect()
}

/// `<stem>.conflict-<first 8 chars of the session id>-<UTC yyyymmddThhmmssZ><.ext>`, with `-2`,
/// `-3`… after the stamp when that name is taken. The extension is what follows the last dot of
/// the file name (none for names without one or starting with their only dot).
pub fn conflict_copy_path(path: &WorkspacePath, session: &str, stamp: &str, attempt: usize) -> Result<WorkspacePath, String> {
    let name = path.file_name();
    let (stem, extension) = match name.rfind('.') {
        Some(dot) if dot > 0 => (&name[..dot], &name[dot..]),
        _ => (name, ""),
    };
    let session_part: String = session.chars().take(8).collect();
    let counter = if attempt == 0 { String::new() } else { format!("-{}", attempt + 1) };
    path.with_file_name(&format!("{stem}.conflict-{session_part}-{stamp}{counter}{extension}"))
}

/// One conflict, as `workspace.conflict` reports it.
pub type ConflictRecord = protocol::events::ConflictFile;

/// What a conditional upload did.
enum Uploaded {
    Done(FileEntry),
    Conflict,
}

/// Small files are in place before `workspace.materialized`; large ones stream in after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileClass {
    Small,
    Large,
}

enum Fetched {
    Placed(Option<FileEntry>),
    Staged(StagedObject),
}

/// A downloaded object waiting in the staging folder.
struct StagedObject {
    content: fsops::StagedContent,
    e_tag: Option<String>,
    version: Option<String>,
}

/// The state of one materialization, threaded through the download loop.
struct Pipeline<'a> {
    target: &'a Target,
    confined: &'a Arc<Confined>,
    reply: &'a Reply,
    manifest: Manifest,
    progress: Progress,
    early_placement: Placement,
    /// The store's tree metadata (modes of the files being placed).
    tree: Tree,
    announced: bool,
    pending_large_files: usize,
    pending_large_bytes: u64,
}

fn path_text(range: &std::ops::Range<u64>) -> String {
    format!("(object bytes {}..{})", range.start, range.end)
}

/// Where the session's directory is, for callers that only know the profile.
pub fn session_directory(profile: &Profile, session: &str) -> PathBuf {
    profile.session_dir(session)
}

/// The manifest of a session, for tests and tools.
pub fn read_manifest(profile: &Profile, session: &str) -> Result<Option<Manifest>> {
    manifest::load_blocking(&manifest::manifest_path(&profile.deployment_root(), session))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(path: &str, attempt: usize, expected: &str) {
        let path = WorkspacePath::parse(path).unwrap();
        assert_eq!(conflict_copy_path(&path, "0193a5c4-7e1f-7000", "20261201T101500Z", attempt).unwrap().as_str(), expected);
    }

    #[test]
    fn conflict_copy_names() {
        check("notes.txt", 0, "notes.conflict-0193a5c4-20261201T101500Z.txt");
        check("a/b/archive.tar.gz", 0, "a/b/archive.tar.conflict-0193a5c4-20261201T101500Z.gz");
        check("Makefile", 0, "Makefile.conflict-0193a5c4-20261201T101500Z");
        check("dots/.bashrc", 0, "dots/.bashrc.conflict-0193a5c4-20261201T101500Z");
        check("notes.txt", 2, "notes.conflict-0193a5c4-20261201T101500Z-3.txt");
    }

    #[test]
    fn event_lists_are_split_by_count_and_size() {
        let items: Vec<String> = (0..10).map(|index| format!("{index:0>98}")).collect();
        let sizes = |chunks: Vec<&[String]>| chunks.iter().map(|chunk| chunk.len()).collect::<Vec<_>>();
        assert_eq!(sizes(chunks_within(&items, 4, usize::MAX)), vec![4, 4, 2]);
        assert_eq!(sizes(chunks_within(&items, usize::MAX, 310)), vec![3, 3, 3, 1]);
        assert_eq!(sizes(chunks_within(&items, usize::MAX, 10)), vec![1; 10], "an oversized item still goes");
        assert!(chunks_within::<String>(&[], 4, 100).is_empty());
        let (shown, total) = bounded_list(&items);
        assert_eq!((shown.len(), total), (10, 10));
    }

    /// 100,000 skipped entries (long names, long reasons) still make one event the bus accepts.
    #[test]
    fn a_huge_skipped_list_fits_in_one_event() {
        let skipped = (0..100_000)
            .map(|index| (format!("{}/{index}\\bad", "deep/".repeat(40)), "name can't be an object key: backslash".to_owned()))
            .collect();
        let report = SyncReport { skipped, ..SyncReport::default() };
        let data = synced_data(SyncKind::Final, &report);
        assert_eq!(data.skipped_total, Some(100_000));
        let event = protocol::CloudEvent::of(crate::events::EVENT_SOURCE, Some("s-1"), &data);
        let bytes = event.to_bytes();
        assert!(bytes.len() < protocol::event::DEFAULT_MAX_EVENT_BYTES, "{} bytes", bytes.len());
        protocol::CloudEvent::parse(&bytes, protocol::event::DEFAULT_MAX_EVENT_BYTES).unwrap();
        let long = "x".repeat(100_000);
        assert!(event_text(&long).len() < EVENT_TEXT_BYTES + 32 && event_text(&long).ends_with("(91808 more bytes)"));
        assert_eq!(event_text("short"), "short");
    }

    #[test]
    fn expected_versions_follow_the_manifest() {
        assert_eq!(expected_version(None), Expected::Absent);
        let entry = FileEntry { size: 1, mtime_ns: 1, sha256: String::new(), e_tag: Some("\"e\"".into()), version: None };
        assert_eq!(expected_version(Some(&entry)), Expected::Version { e_tag: Some("\"e\"".into()), version: None });
    }
}
