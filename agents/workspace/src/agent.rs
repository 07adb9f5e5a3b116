//! The workspace agent's handler: `materialize`, `sync` and `remove` tasks, answered with events.
//!
//! Contract: [`WorkspaceAgent::handle`] does the work and answers; [`error_policy`] maps what it
//! could not answer to ack, retry or dead-letter. Idempotent by effect: a repeated `materialize`
//! of a complete workspace re-announces it without touching a file, a repeated `sync` finds
//! nothing new, a repeated `remove` of a removed workspace re-announces the removal.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetResultPayload, ObjectMeta, PutPayload, WriteMultipart};
use protocol::{AgentKind, Outcome, Profile, Task};
use serde::Deserialize;
use serde_json::json;

use crate::error::{Error, Result};
use crate::events::{EventSink, Reply};
use crate::fsops::{self, Confined, Ownership, Placed, Placement, Scan, StagedFile};
use crate::keys::WorkspacePath;
use crate::manifest::{self, Durability, FileEntry, FinalSync, Manifest, Phase};
use crate::store::OpenedStore;

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
}

impl AgentSettings {
    /// About a minute of retries: long enough to ride out a store restart.
    pub fn standard() -> AgentSettings {
        AgentSettings {
            final_sync_attempts: 8,
            final_sync_backoff_start: Duration::from_millis(500),
            final_sync_backoff_max: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaterializeArgs {
    user: String,
    workspace: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncArgs {
    user: String,
    workspace: String,
    #[serde(rename = "final", default)]
    final_sync: bool,
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
    directory: PathBuf,
    manifest_path: PathBuf,
    staging: PathBuf,
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
}

/// Maps an error that could not be answered with an event to what happens to the message.
pub fn error_policy(error: &Error) -> Outcome {
    if error.is_transient() {
        Outcome::Retry
    } else {
        Outcome::DeadLetter(error.to_string())
    }
}

/// Session, user and workspace ids become path segments and key prefixes: keep them plain.
fn check_identifier(what: &str, value: &str) -> Result<()> {
    let plain = !value.is_empty()
        && value.len() <= 128
        && !value.starts_with('.')
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if plain {
        Ok(())
    } else {
        Err(Error::BadTask(format!("{what} {value:?} must be 1-128 letters, digits, `-`, `_`, `.` or `@`, not starting with `.`")))
    }
}

fn parse_args<T: serde::de::DeserializeOwned>(task: &Task) -> Result<T> {
    serde_json::from_value(task.args.clone()).map_err(|error| Error::BadTask(format!("args of `{}`: {error}", task.action)))
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
    fn data(&self) -> serde_json::Value {
        json!({"files_done": self.files_done, "files_total": self.files_total, "bytes_done": self.bytes_done, "bytes_total": self.bytes_total})
    }
}

impl WorkspaceAgent {
    pub fn new(profile: Profile, store: OpenedStore, events: Arc<dyn EventSink>, settings: AgentSettings) -> WorkspaceAgent {
        let ownership = profile.container.user.as_deref().and_then(Ownership::parse);
        if profile.container.user.is_some() && ownership.is_none() {
            tracing::warn!(user = ?profile.container.user, "container user is not numeric uid[:gid]; workspace files stay owned by the agent");
        }
        WorkspaceAgent { profile: Arc::new(profile), store, events, settings, ownership, locks: std::sync::Mutex::new(HashMap::new()) }
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
                    let error = format!("bad task: {reason}");
                    let failure = match task.action.as_str() {
                        "sync" => {
                            let final_sync = task.args.get("final").and_then(serde_json::Value::as_bool).unwrap_or(false);
                            reply.event("workspace.sync_failed", json!({"final": final_sync, "error": error}))
                        }
                        "remove" => reply.event("workspace.sync_failed", json!({"final": true, "action": "remove", "error": error})),
                        _ => reply.event("workspace.failed", json!({"stage": "task", "error": error})),
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
        check_identifier("session", session)?;
        match task.action.as_str() {
            "materialize" => {
                let args: MaterializeArgs = parse_args(task)?;
                let target = self.target(session, &args.user, &args.workspace)?;
                let _guards = self.lock_workspace(&target).await;
                match self.materialize(&target, reply).await {
                    Ok(()) => Ok(()),
                    Err(error @ (Error::Publish(_) | Error::BadTask(_))) => Err(error),
                    Err(error) => {
                        let stage = match &error {
                            Error::UnsafeNames(_) => "validate",
                            Error::QuotaExceeded { .. } => "quota",
                            Error::Store(_) => "download",
                            _ => "write",
                        };
                        tracing::warn!(session, %error, "materialize failed");
                        self.events.emit(reply.event("workspace.failed", json!({"stage": stage, "error": error.to_string()}))).await
                    }
                }
            }
            "sync" => {
                let args: SyncArgs = parse_args(task)?;
                let target = self.target(session, &args.user, &args.workspace)?;
                let kind = if args.final_sync { SyncKind::Final } else { SyncKind::Routine };
                let _guards = self.lock_workspace(&target).await;
                let outcome = match kind {
                    SyncKind::Routine => self.sync_once(&target, kind, &mut BTreeSet::new()).await,
                    SyncKind::Final => self.final_sync(&target, task).await,
                };
                match outcome {
                    Ok(report) => {
                        let skipped: Vec<_> = report.skipped.iter().map(|(path, reason)| json!({"path": path, "reason": reason})).collect();
                        let data = json!({
                            "final": kind == SyncKind::Final, "uploaded": report.uploaded, "deleted": report.deleted,
                            "unchanged": report.unchanged, "bytes_uploaded": report.bytes_uploaded, "skipped": skipped,
                        });
                        self.events.emit(reply.event("workspace.synced", data)).await
                    }
                    Err(error @ (Error::Publish(_) | Error::BadTask(_))) => Err(error),
                    Err(error) => {
                        tracing::warn!(session, final_sync = kind == SyncKind::Final, %error, "sync failed; nothing removed");
                        let data = json!({"final": kind == SyncKind::Final, "error": error.to_string()});
                        self.events.emit(reply.event("workspace.sync_failed", data)).await
                    }
                }
            }
            "remove" => {
                let _guard = self.lock(format!("session:{session}")).await;
                match self.remove(session).await {
                    Ok(()) => self.events.emit(reply.event("workspace.removed", json!({}))).await,
                    Err(error @ (Error::Publish(_) | Error::BadTask(_))) => Err(error),
                    Err(error) => {
                        tracing::warn!(session, %error, "remove refused");
                        let data = json!({"final": true, "action": "remove", "error": error.to_string()});
                        self.events.emit(reply.event("workspace.sync_failed", data)).await
                    }
                }
            }
            other => Err(Error::BadTask(format!("unknown action {other:?} (expected materialize, sync or remove)"))),
        }
    }

    fn target(&self, session: &str, user: &str, workspace: &str) -> Result<Target> {
        check_identifier("user", user)?;
        check_identifier("workspace", workspace)?;
        let prefix_text = self.profile.workspace_prefix(user, workspace);
        let relative = ObjectPath::parse(&prefix_text).map_err(|error| Error::BadTask(format!("prefix {prefix_text:?}: {error}")))?;
        let prefix: ObjectPath = self.store.root.parts().chain(relative.parts()).collect();
        let root = &self.profile.services.workspace_root;
        Ok(Target {
            session: session.to_owned(),
            user: user.to_owned(),
            workspace: workspace.to_owned(),
            prefix_text,
            prefix,
            directory: self.profile.session_dir(session),
            manifest_path: manifest::manifest_path(root, session),
            staging: manifest::staging_path(root, session),
        })
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

    async fn materialize(&self, target: &Target, reply: &Reply) -> Result<()> {
        let mut manifest = match self.load_manifest(target).await? {
            Some(existing) if existing.phase == Phase::Complete => {
                // Already done (a redelivery): announce again, touch nothing the user may have changed.
                let (files, bytes) = (existing.files.len(), existing.total_bytes());
                let data = json!({"files": files, "bytes": bytes, "pending_large_files": 0, "pending_large_bytes": 0});
                self.events.emit(reply.event("workspace.materialized", data)).await?;
                return self.events.emit(reply.event("workspace.complete", json!({"files": files, "bytes": bytes}))).await;
            }
            Some(existing) if existing.phase != Phase::Removed => existing,
            _ => Manifest::new(&target.session, &target.user, &target.workspace, &target.prefix_text),
        };
        // If large files were already streaming, the container may be running: keep the user's files.
        let early_placement = if manifest.phase == Phase::Streaming { Placement::KeepExisting } else { Placement::ReplaceExisting };
        manifest.final_sync = None;

        let listing: Vec<ObjectMeta> = self.store.store.list(Some(&target.prefix)).try_collect().await.map_err(|error| match error {
            object_store::Error::InvalidPath { source } => Error::UnsafeNames(format!("an object key under {} is not a safe path: {source}", target.prefix)),
            other => Error::Store(other),
        })?;
        let mut wanted = Vec::with_capacity(listing.len());
        let mut refused = Vec::new();
        for meta in listing {
            match WorkspacePath::from_key(&meta.location, &target.prefix) {
                Ok(path) => wanted.push((path, meta)),
                Err(reason) => refused.push(reason),
            }
        }
        if !refused.is_empty() {
            // Nothing is written: a workspace with a hostile key is reported, not half-built.
            return Err(Error::UnsafeNames(refused.join("; ")));
        }
        let total_bytes: u64 = wanted.iter().map(|(_, meta)| meta.size).sum();
        let quota = self.profile.workspace.quota_mib * 1024 * 1024;
        if total_bytes > quota {
            return Err(Error::QuotaExceeded { bytes: total_bytes, quota });
        }

        // Lay out folders (skeleton and every parent) before anything can run in the workspace.
        let skeleton = self.profile.workspace.skeleton.clone();
        let directory = target.directory.clone();
        let staging = target.staging.clone();
        let owner = self.ownership;
        let parents: BTreeSet<WorkspacePath> = wanted
            .iter()
            .filter_map(|(path, _)| path.as_str().rsplit_once('/').and_then(|(parent, _)| WorkspacePath::parse(parent).ok()))
            .collect();
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
            announced: false,
            pending_large_files,
            pending_large_bytes,
        };
        let outcome = self.fetch_all(&mut pipeline, work).await;
        let Pipeline { mut manifest, progress, .. } = pipeline;
        manifest = self.checkpoint(target, manifest, outcome).await?;
        manifest.phase = Phase::Complete;
        manifest.final_sync = None;
        let manifest = manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
        self.events.emit(reply.event("workspace.progress", progress.data())).await?;
        let data = json!({"files": manifest.files.len(), "bytes": manifest.total_bytes()});
        tracing::info!(session = %target.session, files = manifest.files.len(), bytes = manifest.total_bytes(), "workspace complete");
        self.events.emit(reply.event("workspace.complete", data)).await
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
                let next = if large_has_room || small_queue.is_empty() { large_queue.pop_front().or_else(|| small_queue.pop_front()) } else { small_queue.pop_front() };
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
                async move {
                    let fetched = self.fetch(&staging, &confined, &path, &meta, class, early_placement).await;
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
                        self.events.emit(pipeline.reply.event("workspace.progress", pipeline.progress.data())).await?;
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
        let data = json!({
            "files": pipeline.progress.files_done, "bytes": pipeline.progress.bytes_done,
            "pending_large_files": pipeline.pending_large_files, "pending_large_bytes": pipeline.pending_large_bytes,
        });
        tracing::info!(session = %pipeline.target.session, files = pipeline.progress.files_done, pending_large_files = pipeline.pending_large_files, "workspace materialized");
        self.events.emit(pipeline.reply.event("workspace.materialized", data)).await
    }

    /// Links a downloaded large file into the (possibly running) workspace, never over a user's file.
    async fn place_large(&self, pipeline: &mut Pipeline<'_>, path: &WorkspacePath, staged: StagedObject) -> Result<()> {
        let size = staged.content.size;
        let entry = self.place(pipeline.confined, path, staged, Placement::KeepExisting).await?;
        self.record(pipeline, path, size, entry);
        pipeline.progress.last_sent = Instant::now();
        // Each large file is worth remembering at once: a restart won't fetch it again.
        pipeline.manifest = manifest::save(pipeline.target.manifest_path.clone(), pipeline.manifest.clone(), Durability::Ordered).await?;
        self.events.emit(pipeline.reply.event("workspace.progress", pipeline.progress.data())).await
    }

    /// Downloads one object; small ones are placed at once, large ones stay staged.
    async fn fetch(&self, staging: &std::path::Path, confined: &Arc<Confined>, path: &WorkspacePath, meta: &ObjectMeta, class: FileClass, placement: Placement) -> Result<Fetched> {
        let staged = self.fetch_to_staging(staging, path, meta).await?;
        match class {
            FileClass::Small => Ok(Fetched::Placed(self.place(confined, path, staged, placement).await?)),
            FileClass::Large => Ok(Fetched::Staged(staged)),
        }
    }

    /// Links a staged file into place. `None` when the user's own file at that path was kept.
    async fn place(&self, confined: &Arc<Confined>, path: &WorkspacePath, staged: StagedObject, placement: Placement) -> Result<Option<FileEntry>> {
        let confined = confined.clone();
        let placed_path = path.clone();
        let staged_path = staged.content.path.clone();
        let owner = self.ownership;
        let placed = blocking(move || {
            let placed = confined.place(&staged_path, &placed_path, placement, owner);
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

    /// Retries with backoff until every object is confirmed, or reports why not.
    async fn final_sync(&self, target: &Target, task: &Task) -> Result<SyncReport> {
        let mut deleted_keys = BTreeSet::new();
        let mut total = SyncReport::default();
        let mut backoff = self.settings.final_sync_backoff_start;
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
                    self.confirm(target, &deleted_keys).await
                }
                Err(error) => Err(error),
            };
            let error = match outcome {
                Ok(()) => {
                    self.record_final_sync(target, task, true).await?;
                    tracing::info!(session = %target.session, attempt, uploaded = total.uploaded, "final sync confirmed");
                    // Files uploaded by an earlier attempt and confirmed now were not "unchanged".
                    return Ok(total);
                }
                Err(error) => error,
            };
            if !error.is_transient() || attempt >= self.settings.final_sync_attempts {
                break error;
            }
            tracing::warn!(session = %target.session, attempt, %error, retry_in = ?backoff, "final sync not confirmed yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.settings.final_sync_backoff_max);
        };
        // Can't even record the failure? The manifest keeps the previous state, which is not confirmed either.
        if let Err(error) = self.record_final_sync(target, task, false).await {
            tracing::error!(session = %target.session, %error, "could not record the failed final sync");
        }
        tracing::error!(session = %target.session, attempts = attempt, error = %last_error, "final sync failed; workspace kept");
        Err(last_error)
    }

    async fn record_final_sync(&self, target: &Target, task: &Task, confirmed: bool) -> Result<()> {
        let Some(mut manifest) = self.load_manifest(target).await? else { return Ok(()) };
        manifest.final_sync = Some(FinalSync { task: task.id, confirmed, at: chrono::Utc::now() });
        manifest::save(target.manifest_path.clone(), manifest, Durability::Flushed).await.map(drop)
    }

    /// Uploads what changed since the manifest and deletes what was removed.
    async fn sync_once(&self, target: &Target, kind: SyncKind, deleted_keys: &mut BTreeSet<String>) -> Result<SyncReport> {
        let Some(mut manifest) = self.load_manifest(target).await? else {
            return Err(Error::BadTask(format!("session {} was never materialized here", target.session)));
        };
        if manifest.phase == Phase::Removed {
            return Err(Error::BadTask(format!("the workspace of session {} was already removed", target.session)));
        }
        let directory = target.directory.clone();
        let (confined, scan) = blocking(move || {
            let confined = Confined::open(&directory)?;
            let scan = fsops::scan(&directory)?;
            Ok((Arc::new(confined), scan))
        })
        .await?;
        let Scan { files, skipped } = scan;
        let local_bytes: u64 = files.iter().map(|file| file.size).sum();
        let quota = self.profile.workspace.quota_mib * 1024 * 1024;
        if local_bytes > quota {
            return Err(Error::QuotaExceeded { bytes: local_bytes, quota });
        }

        // Size and mtime first; a content hash confirms when only the mtime moved.
        let mut to_upload = Vec::new();
        let mut to_hash = Vec::new();
        let mut unchanged = 0;
        let mut refreshed_entries = 0;
        for file in &files {
            match manifest.files.get(file.path.as_str()) {
                Some(entry) if entry.size == file.size && entry.mtime_ns == file.mtime_ns => unchanged += 1,
                Some(entry) if entry.size == file.size => to_hash.push((file.clone(), entry.sha256.clone())),
                _ => to_upload.push(file.clone()),
            }
        }
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
                Ok((hash, mtime_ns)) if hash == known_hash => {
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
        let local_paths: BTreeSet<&str> = files.iter().map(|file| file.path.as_str()).collect();
        let removed: Vec<String> = manifest.files.keys().filter(|path| !local_paths.contains(path.as_str())).cloned().collect();

        let mut report = SyncReport { unchanged, skipped: skipped.into_iter().map(|skip| (skip.path, skip.reason)).collect(), ..SyncReport::default() };
        let uploads: Vec<_> = futures::stream::iter(to_upload)
            .map(|file| {
                let confined = confined.clone();
                async move {
                    let uploaded = self.upload(target, &confined, &file.path).await;
                    (file, uploaded)
                }
            })
            .buffer_unordered(parallelism)
            .collect()
            .await;
        let mut first_error = None;
        for (file, uploaded) in uploads {
            match uploaded {
                Ok(entry) => {
                    report.uploaded += 1;
                    report.bytes_uploaded += entry.size;
                    manifest.files.insert(file.path.as_str().to_owned(), entry);
                }
                Err(Error::UnsafeNames(reason)) => report.skipped.push((file.path.to_string(), reason)),
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(session = %target.session, path = %file.path, %error, "upload failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        if first_error.is_none() {
            for path in removed {
                let relative = WorkspacePath::parse(&path).map_err(|reason| Error::Manifest { path: target.manifest_path.clone(), reason })?;
                let key = relative.to_key(&target.prefix);
                match self.store.store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                        manifest.files.remove(&path);
                        deleted_keys.insert(key.to_string());
                        report.deleted += 1;
                    }
                    Err(error) => {
                        first_error = Some(Error::Store(error));
                        break;
                    }
                }
            }
        }
        // Whatever got through is recorded, so a retry does not redo it; an autosave that found
        // nothing to do writes nothing.
        if report.uploaded > 0 || report.deleted > 0 || refreshed_entries > 0 {
            manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        tracing::info!(
            session = %target.session, final_sync = kind == SyncKind::Final, uploaded = report.uploaded,
            deleted = report.deleted, unchanged = report.unchanged, bytes = report.bytes_uploaded, "workspace synced"
        );
        Ok(report)
    }

    /// Reads one file safely and uploads it (in parts when large).
    async fn upload(&self, target: &Target, confined: &Arc<Confined>, path: &WorkspacePath) -> Result<FileEntry> {
        let key = path.to_key(&target.prefix);
        let opener = confined.clone();
        let opened_path = path.clone();
        let (file, metadata) = blocking(move || opener.open_file(&opened_path)).await?;
        let size = metadata.len();
        let mtime_ns = fsops::mtime_ns(&metadata);
        if size <= MULTIPART_BYTES {
            let (content, sha256) = blocking(move || fsops::read_and_hash(file, size)).await?;
            let read_size = content.len() as u64;
            let result = self.store.store.put(&key, PutPayload::from(content)).await?;
            // A file that changed while we read it gets an mtime that forces a recheck next time.
            let mtime_ns = if read_size == size { mtime_ns } else { 0 };
            return Ok(FileEntry { size: read_size, mtime_ns, sha256, e_tag: result.e_tag, version: result.version });
        }
        let upload = self.store.store.put_multipart(&key).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_CHUNK_BYTES);
        let mut reader = Some((file, sha2::Sha256::default()));
        let mut read_size = 0u64;
        let finished = loop {
            let (file, hasher) = reader.take().ok_or_else(|| Error::Unconfirmed("reader lost".to_owned()))?;
            let chunk = blocking(move || {
                use sha2::Digest;
                use std::io::Read;
                let mut file = file;
                let mut hasher = hasher;
                let mut chunk = vec![0u8; MULTIPART_CHUNK_BYTES];
                let mut filled = 0;
                while filled < chunk.len() {
                    let read = file.read(&mut chunk[filled..]).map_err(|source| Error::io("reading", PathBuf::from("(workspace file)"), source))?;
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
        let result = writer.finish().await?;
        use sha2::Digest;
        let sha256 = fsops::hex(&finished.finalize());
        let mtime_ns = if read_size == size { mtime_ns } else { 0 };
        Ok(FileEntry { size: read_size, mtime_ns, sha256, e_tag: result.e_tag, version: result.version })
    }

    /// Lists the prefix and checks every manifest entry against it: present, same size, same ETag;
    /// and every deleted key gone. Mismatches leave the manifest so the next attempt re-uploads.
    async fn confirm(&self, target: &Target, deleted_keys: &BTreeSet<String>) -> Result<()> {
        let listing: Vec<ObjectMeta> = self.store.store.list(Some(&target.prefix)).try_collect().await?;
        let remote: BTreeMap<String, ObjectMeta> = listing.into_iter().map(|meta| (meta.location.to_string(), meta)).collect();
        let Some(mut manifest) = self.load_manifest(target).await? else {
            return Err(Error::BadTask(format!("session {} was never materialized here", target.session)));
        };
        let mut problems = Vec::new();
        manifest.files.retain(|path, entry| {
            let Ok(relative) = WorkspacePath::parse(path) else { return false };
            let key = relative.to_key(&target.prefix).to_string();
            let matches = remote.get(&key).is_some_and(|meta| {
                meta.size == entry.size && (entry.e_tag.is_none() || meta.e_tag.is_none() || meta.e_tag == entry.e_tag)
            });
            if !matches {
                problems.push(format!("{path}: {}", if remote.contains_key(&key) { "size or ETag differs" } else { "missing" }));
            }
            matches
        });
        for key in deleted_keys {
            if remote.contains_key(key) {
                problems.push(format!("{key}: still present after delete"));
            }
        }
        if problems.is_empty() {
            return Ok(());
        }
        manifest::save(target.manifest_path.clone(), manifest, Durability::Ordered).await?;
        let shown: Vec<_> = problems.iter().take(5).cloned().collect();
        Err(Error::Unconfirmed(format!("{} object(s) not as written: {}", problems.len(), shown.join("; "))))
    }

    // ----- remove --------------------------------------------------------------------------------

    async fn remove(&self, session: &str) -> Result<()> {
        let root = self.profile.services.workspace_root.clone();
        let directory = self.profile.session_dir(session);
        let manifest_path = manifest::manifest_path(&root, session);
        let staging = manifest::staging_path(&root, session);
        let manifest = manifest::load(manifest_path.clone()).await?;
        let directory_exists = tokio::fs::symlink_metadata(&directory).await.is_ok();
        let mut manifest = match manifest {
            Some(manifest) if manifest.phase == Phase::Removed && !directory_exists => return Ok(()),
            Some(manifest) => manifest,
            None if !directory_exists => return Ok(()),
            None => return Err(Error::RemoveRefused(format!("{} has no manifest, so no final sync ever covered it", directory.display()))),
        };
        if !manifest.final_sync_confirmed() {
            return Err(Error::RemoveRefused("the last final sync was not confirmed; the directory is kept".to_owned()));
        }
        let scanned_directory = directory.clone();
        let scan = blocking(move || fsops::scan(&scanned_directory)).await?;
        let changed = scan
            .files
            .iter()
            .filter(|file| !manifest.files.get(file.path.as_str()).is_some_and(|entry| entry.size == file.size && entry.mtime_ns == file.mtime_ns))
            .count();
        let local_paths: BTreeSet<&str> = scan.files.iter().map(|file| file.path.as_str()).collect();
        let missing = manifest.files.keys().filter(|path| !local_paths.contains(path.as_str())).count();
        if changed > 0 || missing > 0 {
            return Err(Error::RemoveRefused(format!(
                "{changed} file(s) changed or added and {missing} removed since the final sync; sync again first"
            )));
        }
        blocking(move || {
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
        manifest::save(manifest_path, manifest, Durability::Flushed).await?;
        tracing::info!(session, "workspace directory removed after a confirmed final sync");
        Ok(())
    }
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
    manifest::load_blocking(&manifest::manifest_path(&profile.services.workspace_root, session))
}
