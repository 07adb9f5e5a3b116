//! The workspace agent against real object stores: the moto S3 server on 127.0.0.1:9000 (plus a
//! private moto process for the outage test) and the local file-system backend, and once through
//! the real RabbitMQ broker.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use protocol::events::kind::{WORKSPACE_CONFLICT, WORKSPACE_MATERIALIZED};
use protocol::events::{
    ConflictFile, DirectoryEntry, EventData, WorkspaceComplete, WorkspaceConflict, WorkspaceFailed, WorkspaceInventory,
    WorkspaceMaterialized, WorkspaceRemoved, WorkspaceSyncFailed, WorkspaceSynced,
};
use protocol::{AgentKind, CloudEvent, Outcome, Profile, Task};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use workspace::{AgentSettings, CollectedEvents, OpenedStore, StoreSettings, WorkspaceAgent};

const MOTO: &str = "127.0.0.1:9000";
const LARGE_THRESHOLD_KIB: u64 = 64;

// ----- backends ------------------------------------------------------------------------------------

/// An object store for one test, removed at the end.
struct Backend {
    url: String,
    settings: StoreSettings,
    kind: BackendKind,
}

enum BackendKind {
    S3 { address: String, bucket: String },
    File { directory: PathBuf },
}

impl Backend {
    async fn s3_at(address: &str) -> anyhow::Result<Backend> {
        let bucket = format!("berth-ws-{}", Uuid::new_v4().simple());
        let status = raw_http(address, "PUT", &format!("/{bucket}"), b"").await?;
        ensure!(status == 200, "creating bucket {bucket} answered {status}");
        Ok(Backend {
            url: format!("s3://{bucket}/tests"),
            settings: StoreSettings::s3_compatible(&format!("http://{address}")),
            kind: BackendKind::S3 { address: address.to_owned(), bucket },
        })
    }

    async fn s3() -> anyhow::Result<Backend> {
        Backend::s3_at(MOTO).await
    }

    fn file() -> Backend {
        let directory = std::env::temp_dir().join(format!("berth-ws-objects-{}", Uuid::new_v4()));
        Backend {
            url: format!("file://{}", directory.display()),
            settings: StoreSettings::default(),
            kind: BackendKind::File { directory },
        }
    }

    fn open(&self) -> OpenedStore {
        workspace::open_store(&self.url, &self.settings).expect("store opens")
    }

    async fn cleanup(self) {
        match self.kind {
            BackendKind::S3 { address, bucket } => {
                let store = workspace::open_store(&self.url.replace("/tests", ""), &self.settings).expect("store opens");
                let keys: Vec<ObjectPath> = store.store.list(None).map_ok(|meta| meta.location).try_collect().await.unwrap_or_default();
                for key in keys {
                    let _ = store.store.delete(&key).await;
                }
                let _ = raw_http(&address, "DELETE", &format!("/{bucket}"), b"").await;
            }
            BackendKind::File { directory } => {
                let _ = std::fs::remove_dir_all(directory);
            }
        }
    }
}

/// A minimal HTTP/1.1 request over TCP, for what `object_store` can't do (create buckets, write
/// keys it would refuse). Returns the status code.
async fn raw_http(address: &str, method: &str, path: &str, body: &[u8]) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).context("no status line")?.parse()?;
    Ok(status)
}

/// Counts writes that reach the store, to prove what a sync uploads.
#[derive(Debug)]
struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    puts: AtomicUsize,
    deletes: AtomicUsize,
    gets: AtomicUsize,
    /// Reads of keys containing this text fail, as if the store broke down mid-way.
    failing_reads: Mutex<Option<String>>,
    /// Writes of keys containing this text fail.
    failing_writes: Mutex<Option<String>>,
    /// Listings fail, as if the store were unreachable for them.
    failing_lists: AtomicBool,
}

impl std::fmt::Display for CountingStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Counting({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for CountingStore {
    /// Counts writes that happened: a conditional put `file://` refuses as not implemented (the
    /// agent then checks and writes unconditionally) is not a write.
    async fn put_opts(&self, location: &ObjectPath, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        let failing = self.failing_writes.lock().unwrap().clone();
        if failing.is_some_and(|text| location.as_ref().contains(&text)) {
            return Err(object_store::Error::Generic { store: "test", source: "injected write failure".into() });
        }
        let result = self.inner.put_opts(location, payload, opts).await;
        if result.is_ok() {
            self.puts.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
    async fn put_multipart_opts(&self, location: &ObjectPath, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> object_store::Result<GetResult> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        let failing = self.failing_reads.lock().unwrap().clone();
        if failing.is_some_and(|text| location.as_ref().contains(&text)) {
            return Err(object_store::Error::Generic { store: "test", source: "injected read failure".into() });
        }
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &ObjectPath) -> object_store::Result<()> {
        self.deletes.fetch_add(1, Ordering::SeqCst);
        self.inner.delete(location).await
    }
    fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if self.failing_lists.load(Ordering::SeqCst) {
            let failure = object_store::Error::Generic { store: "test", source: "injected listing failure".into() };
            return futures::stream::once(async move { Err(failure) }).boxed();
        }
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

// ----- fixtures --------------------------------------------------------------------------------------

/// One test's agent, profile, store and collected events, with its own temporary workspace root.
struct Harness {
    profile: Profile,
    store: OpenedStore,
    counting: Arc<CountingStore>,
    events: Arc<CollectedEvents>,
    agent: Arc<WorkspaceAgent>,
    session: String,
    user: String,
    workspace: String,
    scratch: PathBuf,
    _scratch_guard: Arc<ScratchGuard>,
}

/// Removes a test's scratch directory when the last harness using it goes, also after a failed
/// assertion.
struct ScratchGuard(PathBuf);

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        remove_scratch(&self.0);
    }
}

/// Unmounts the workspace images under a scratch directory, then removes it.
fn remove_scratch(scratch: &Path) {
    if let Err(error) = workspace::unmount_all_under(scratch) {
        eprintln!("unmounting under {}: {error}", scratch.display());
    }
    let _ = std::fs::remove_dir_all(scratch);
}

fn test_profile(backend_url: &str, scratch: &Path) -> Profile {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../run-profiles/dev/profile.toml")).expect("dev profile");
    let mut profile = Profile::parse(&text, Path::new("dev/profile.toml")).expect("dev profile parses");
    profile.services.object_store_url = backend_url.to_owned();
    profile.services.workspace_root = scratch.join("workspaces");
    profile.workspace.skeleton = vec!["pleadings".into(), "motions".into(), "discovery".into(), "correspondence/outgoing".into()];
    profile.workspace.large_file_threshold_kib = LARGE_THRESHOLD_KIB;
    profile.workspace.parallelism = 8;
    profile.container.user = Some("1000:1000".into());
    profile
}

fn quick_settings() -> AgentSettings {
    AgentSettings {
        final_sync_attempts: 3,
        final_sync_backoff_start: Duration::from_millis(100),
        final_sync_backoff_max: Duration::from_millis(400),
        ..AgentSettings::standard()
    }
}

impl Harness {
    fn new(backend: &Backend, events: CollectedEvents, settings: AgentSettings) -> Harness {
        Harness::with_profile(backend, events, settings, |_| {})
    }

    /// A harness whose profile `adjust` changes first.
    fn with_profile(backend: &Backend, events: CollectedEvents, settings: AgentSettings, adjust: impl FnOnce(&mut Profile)) -> Harness {
        let scratch = std::env::temp_dir().join(format!("berth-ws-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let mut profile = test_profile(&backend.url, &scratch);
        adjust(&mut profile);
        let opened = backend.open();
        let counting = Arc::new(CountingStore {
            inner: opened.store.clone(),
            puts: AtomicUsize::new(0),
            deletes: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
            failing_reads: Mutex::new(None),
            failing_writes: Mutex::new(None),
            failing_lists: AtomicBool::new(false),
        });
        let store = OpenedStore { store: counting.clone(), root: opened.root.clone(), url: opened.url.clone() };
        let events = Arc::new(events);
        let agent = Arc::new(WorkspaceAgent::new(profile.clone(), store.clone(), events.clone(), settings));
        let id = Uuid::new_v4().simple().to_string();
        Harness {
            profile,
            store,
            counting,
            events,
            agent,
            session: format!("s-{id}"),
            user: format!("u-{}", &id[..8]),
            workspace: "case-1".to_owned(),
            _scratch_guard: Arc::new(ScratchGuard(scratch.clone())),
            scratch,
        }
    }

    fn directory(&self) -> PathBuf {
        self.profile.session_dir(&self.session)
    }

    fn prefix(&self) -> ObjectPath {
        let relative = ObjectPath::parse(self.profile.workspace_prefix(&self.user, &self.workspace)).expect("prefix");
        self.store.root.parts().chain(relative.parts()).collect()
    }

    fn key(&self, relative: &str) -> ObjectPath {
        let mut parts: Vec<_> = self.prefix().parts().map(|part| part.as_ref().to_owned()).collect();
        parts.extend(relative.split('/').map(str::to_owned));
        ObjectPath::parse(parts.join("/")).expect("key")
    }

    fn task(&self, action: &str, args: Value) -> Task {
        Task {
            id: Uuid::now_v7(),
            agent: AgentKind::Workspace,
            action: action.to_owned(),
            session: Some(self.session.clone()),
            thred: Some(format!("thred-{}", self.session)),
            cause: None,
            args,
        }
    }

    fn materialize_task(&self) -> Task {
        self.task("materialize", json!({"user": self.user, "workspace": self.workspace}))
    }

    fn sync_task(&self, final_sync: bool) -> Task {
        self.task("sync", json!({"user": self.user, "workspace": self.workspace, "final": final_sync}))
    }

    async fn run(&self, task: &Task) -> Outcome {
        self.agent.handle(task).await.expect("task answered")
    }

    async fn seed(&self, files: &BTreeMap<String, Vec<u8>>) {
        let writes = futures::stream::iter(files.iter().map(|(path, content)| {
            let key = self.key(path);
            let store = self.store.store.clone();
            let content = Bytes::from(content.clone());
            async move { store.put(&key, PutPayload::from(content)).await }
        }))
        .buffer_unordered(16);
        writes.try_collect::<Vec<_>>().await.expect("fixture uploaded");
        self.counting.puts.store(0, Ordering::SeqCst);
    }

    /// The workspace's objects (without the `.berth/` metadata), byte for byte.
    async fn remote(&self) -> BTreeMap<String, Vec<u8>> {
        let prefix = self.prefix();
        let metas: Vec<ObjectMeta> = self.store.store.list(Some(&prefix)).try_collect().await.expect("list");
        let mut objects = BTreeMap::new();
        for meta in metas {
            let relative: Vec<_> =
                meta.location.prefix_match(&prefix).expect("under prefix").map(|part| part.as_ref().to_owned()).collect();
            if relative[0] == ".berth" {
                continue;
            }
            let content = self.store.store.get(&meta.location).await.expect("get").bytes().await.expect("bytes");
            objects.insert(relative.join("/"), content.to_vec());
        }
        objects
    }

    /// The tree-metadata sidecar as stored.
    async fn sidecar(&self) -> workspace::Tree {
        let bytes = self.store.store.get(&self.key(workspace::SIDECAR_PATH)).await.expect("sidecar stored").bytes().await.expect("bytes");
        let value: Value = serde_json::from_slice(&bytes).expect("sidecar is JSON");
        assert_eq!(value["version"], json!(1));
        let mut value = value;
        value.as_object_mut().unwrap().remove("version");
        serde_json::from_value(value).expect("sidecar format")
    }

    /// This session's events of one type.
    fn events_of(&self, event_type: &str) -> Vec<CloudEvent> {
        self.events
            .events()
            .into_iter()
            .filter(|event| event.event_type == event_type && event.subject.as_deref() == Some(self.session.as_str()))
            .collect()
    }

    /// Another session of the same user's workspace, through the same agent.
    fn other_session(&self) -> Harness {
        Harness {
            profile: self.profile.clone(),
            store: self.store.clone(),
            counting: self.counting.clone(),
            events: self.events.clone(),
            agent: self.agent.clone(),
            session: format!("t-{}", Uuid::new_v4().simple()),
            user: self.user.clone(),
            workspace: self.workspace.clone(),
            scratch: self.scratch.clone(),
            _scratch_guard: self._scratch_guard.clone(),
        }
    }

    async fn put(&self, relative: &str, content: &[u8]) {
        self.store.store.put(&self.key(relative), PutPayload::from(content.to_vec())).await.expect("outside write");
    }

    fn preserved(&self) -> PathBuf {
        self.profile.deployment_root().join(workspace::PRESERVED_DIR).join(&self.session)
    }

    fn last(&self, event_type: &str) -> CloudEvent {
        self.events_of(event_type).pop().unwrap_or_else(|| panic!("no {event_type} among {:?}", self.event_types()))
    }

    /// The data of this session's last event of `T`'s type.
    fn last_of<T: EventData>(&self) -> T {
        let event = self.last(T::KIND);
        event.data_as().unwrap_or_else(|error| panic!("{error}: {}", event.data))
    }

    fn event_types(&self) -> Vec<String> {
        self.events.events().into_iter().map(|event| event.event_type).collect()
    }

    fn cleanup(self) {
        remove_scratch(&self.scratch);
    }
}

/// Deterministic pseudo-random content.
fn content(seed: u64, size: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// `count` files in nested folders, the last `large` of them above the large-file threshold.
fn fixture(count: usize, large: usize) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for index in 0..count {
        let size = if index >= count - large { 150 * 1024 + index * 977 } else { (index * 131) % 6000 };
        let path = match index % 5 {
            0 => format!("pleadings/{index:04} complaint.txt"),
            1 => format!("discovery/set-{}/exhibit-{index}.bin", index % 3),
            2 => format!("notes/{index}-100% done.md"),
            3 => format!("motions/Ünïcode-{index}.pdf"),
            _ => format!("f{index}"),
        };
        files.insert(path, content(index as u64, size));
    }
    files
}

fn local_files(directory: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, folder: &Path, files: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(folder).expect("read dir") {
            let entry = entry.expect("entry");
            let file_type = entry.file_type().expect("type");
            if file_type.is_dir() {
                walk(root, &entry.path(), files);
            } else if file_type.is_file() {
                let relative = entry.path().strip_prefix(root).expect("under root").to_string_lossy().into_owned();
                files.insert(relative, std::fs::read(entry.path()).expect("read"));
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(directory, directory, &mut files);
    files
}

/// Sets a file's mtime to the Unix epoch + `seconds` (touching the content stays the same).
fn set_mtime(path: &Path, seconds: i64) {
    let time = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).expect("positive"));
    let file = std::fs::File::options().write(true).open(path).expect("open");
    file.set_modified(time).expect("set mtime");
}

// ----- the suite, run on both backends ---------------------------------------------------------------

async fn materializes_byte_for_byte_small_first(backend: Backend) {
    // What the directory held at the moment `workspace.materialized` was sent.
    let seen_at_materialized: Arc<Mutex<Option<(usize, usize)>>> = Arc::default();
    let files = fixture(500, 5);
    let large: Vec<String> = files.iter().filter(|(_, c)| c.len() as u64 >= LARGE_THRESHOLD_KIB * 1024).map(|(p, _)| p.clone()).collect();
    let small: Vec<String> = files.iter().filter(|(_, c)| (c.len() as u64) < LARGE_THRESHOLD_KIB * 1024).map(|(p, _)| p.clone()).collect();
    assert_eq!(large.len(), 5);
    let directory_slot: Arc<Mutex<Option<PathBuf>>> = Arc::default();
    let events = {
        let seen = seen_at_materialized.clone();
        let directory_slot = directory_slot.clone();
        let (small, large) = (small.clone(), large.clone());
        CollectedEvents::inspecting(move |event| {
            if event.event_type != "workspace.materialized" {
                return;
            }
            let directory = directory_slot.lock().unwrap().clone().expect("directory known");
            let small_present = small.iter().filter(|path| directory.join(path).is_file()).count();
            let large_present = large.iter().filter(|path| directory.join(path).exists()).count();
            *seen.lock().unwrap() = Some((small_present, large_present));
        })
    };
    let harness = Harness::new(&backend, events, quick_settings());
    *directory_slot.lock().unwrap() = Some(harness.directory());
    harness.seed(&files).await;

    let task = harness.materialize_task();
    assert_eq!(harness.run(&task).await, Outcome::Ack);

    let (small_present, large_present) = seen_at_materialized.lock().unwrap().expect("materialized was sent");
    assert_eq!(small_present, small.len(), "every small file is in place when the container may start");
    assert_eq!(large_present, 0, "large files stream in afterwards, and no stub stands in for them");
    let types = harness.event_types();
    let materialized_at = types.iter().position(|t| t == "workspace.materialized").expect("materialized");
    let complete_at = types.iter().position(|t| t == "workspace.complete").expect("complete");
    assert!(materialized_at < complete_at, "{types:?}");
    assert!(types[materialized_at..complete_at].iter().filter(|t| *t == "workspace.progress").count() >= large.len(), "{types:?}");
    let materialized_event = harness.last(WORKSPACE_MATERIALIZED);
    let materialized: WorkspaceMaterialized = materialized_event.data_as().unwrap();
    assert_eq!(materialized.files, small.len() as u64);
    assert_eq!(materialized.pending_large_files, 5);
    let large_bytes: usize = large.iter().map(|path| files[path].len()).sum();
    assert_eq!(materialized.pending_large_bytes, large_bytes as u64);
    let complete = harness.last_of::<WorkspaceComplete>();
    assert_eq!(complete.files, 500);
    let total: usize = files.values().map(Vec::len).sum();
    assert_eq!(complete.bytes, total as u64);
    assert_eq!(materialized_event.subject.as_deref(), Some(harness.session.as_str()));
    assert_eq!(materialized_event.extension("taskid"), Some(task.id.to_string().as_str()));
    assert_eq!(materialized_event.extension("thredid"), Some(format!("thred-{}", harness.session).as_str()));

    // Byte for byte, nothing more, nothing less; the skeleton is there; the user owns it all.
    assert_eq!(local_files(&harness.directory()), files);
    for folder in ["pleadings", "motions", "discovery", "correspondence/outgoing"] {
        assert!(harness.directory().join(folder).is_dir(), "skeleton folder {folder}");
    }
    let owner = std::fs::metadata(harness.directory().join(&large[0])).unwrap();
    let folder_owner = std::fs::metadata(harness.directory().join("correspondence/outgoing")).unwrap();
    if nix_is_root() {
        assert_eq!((owner.uid(), owner.gid()), (1000, 1000));
        assert_eq!(folder_owner.uid(), 1000);
    }
    let manifest = workspace::read_manifest(&harness.profile, &harness.session).unwrap().expect("manifest");
    assert_eq!(manifest.files.len(), 500);
    assert_eq!(manifest.phase, workspace::Phase::Complete);
    let entry = &manifest.files[&large[0]];
    assert_eq!(entry.size, files[&large[0]].len() as u64);
    assert!(entry.e_tag.is_some(), "the manifest keeps the ETag");
    assert_eq!(entry.sha256.len(), 64);
    assert!(!harness.directory().join(".berth-manifests").exists(), "the manifest is not inside the workspace");

    // A redelivered materialize announces again and leaves the user's edits alone.
    std::fs::write(harness.directory().join(&small[3]), b"edited by the user").unwrap();
    harness.events.take();
    assert_eq!(harness.run(&task).await, Outcome::Ack);
    assert_eq!(harness.event_types(), vec!["workspace.materialized", "workspace.complete"]);
    assert_eq!(std::fs::read(harness.directory().join(&small[3])).unwrap(), b"edited by the user");

    harness.cleanup();
    backend.cleanup().await;
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|meta| meta.uid() == 0).unwrap_or(false)
}

async fn incremental_sync_uploads_exactly_the_changes(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    let files = fixture(40, 2);
    harness.seed(&files).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let paths: Vec<String> = files.keys().cloned().collect();
    let directory = harness.directory();

    // No file changed: the first sync writes only the tree metadata (the folders the store
    // didn't know), the second nothing at all.
    assert_eq!(harness.run(&harness.sync_task(false)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert_eq!((synced.uploaded, synced.deleted, synced.unchanged), (0, 0, 40));
    assert_eq!(harness.counting.puts.load(Ordering::SeqCst), 1, "the sidecar");
    assert!(harness.sidecar().await.directories.contains_key("correspondence/outgoing"));
    harness.counting.puts.store(0, Ordering::SeqCst);
    assert_eq!(harness.run(&harness.sync_task(false)).await, Outcome::Ack);
    assert_eq!(harness.counting.puts.load(Ordering::SeqCst), 0);

    // Two edits (one keeps its size), one new file, one deletion, one touch without a change.
    std::fs::write(directory.join(&paths[0]), b"a different content").unwrap();
    let same_size_edit = content(999, files[&paths[1]].len());
    std::fs::write(directory.join(&paths[1]), &same_size_edit).unwrap();
    std::fs::write(directory.join("pleadings/new filing.txt"), b"new").unwrap();
    std::fs::remove_file(directory.join(&paths[2])).unwrap();
    set_mtime(&directory.join(&paths[3]), 1_000_000_000);
    assert_eq!(harness.run(&harness.sync_task(false)).await, Outcome::Ack);

    let synced = harness.last_of::<WorkspaceSynced>();
    assert!(!synced.final_sync);
    assert_eq!(synced.uploaded, 3, "{synced:?}");
    assert_eq!(synced.deleted, 1);
    assert_eq!(synced.unchanged, 37);
    assert_eq!(synced.bytes_uploaded, (19 + same_size_edit.len() + 3) as u64);
    assert_eq!(harness.counting.puts.load(Ordering::SeqCst), 3, "exactly the changed files are PUT");
    assert_eq!(harness.counting.deletes.load(Ordering::SeqCst), 1);
    let remote = harness.remote().await;
    assert_eq!(remote, local_files(&directory), "the store holds exactly the workspace");
    assert!(!remote.contains_key(&paths[2]), "deletion propagated");

    // And a sync right after does nothing again.
    harness.counting.puts.store(0, Ordering::SeqCst);
    assert_eq!(harness.run(&harness.sync_task(false)).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceSynced>().uploaded, 0);
    assert_eq!(harness.counting.puts.load(Ordering::SeqCst), 0);

    harness.cleanup();
    backend.cleanup().await;
}

async fn hostile_keys_are_refused_and_nothing_is_written(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(5, 0)).await;
    // Keys object_store accepts but that mean `..` or a separator to anything that decodes them.
    for hostile in ["a\\..\\..\\escaped.txt", "%2E%2E/escaped.txt", "notes/x%2Fy"] {
        let key = ObjectPath::parse(format!("{}/{hostile}", harness.prefix())).expect("object_store accepts the key");
        harness.store.store.put(&key, PutPayload::from_static(b"evil")).await.expect("hostile object written");
    }
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let failed = harness.last_of::<WorkspaceFailed>();
    assert_eq!(failed.stage, "validate", "{failed:?}");
    let error = failed.error;
    assert!(error.contains("escaped.txt") && error.contains("x%2Fy"), "{error}");
    assert!(harness.events_of("workspace.materialized").is_empty());
    assert!(!harness.directory().exists(), "nothing was written");
    assert!(local_files(&harness.scratch).is_empty(), "no file anywhere under the workspace root");
    harness.cleanup();
    backend.cleanup().await;
}

async fn symlinks_are_stored_as_links_and_never_followed(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(6, 0)).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let directory = harness.directory();
    // A host file the user must never be able to exfiltrate, and a host folder.
    let secret = harness.scratch.join("host-secret.txt");
    std::fs::write(&secret, b"root:$6$secret").unwrap();
    let host_folder = harness.scratch.join("host-folder");
    std::fs::create_dir_all(&host_folder).unwrap();
    std::fs::write(host_folder.join("inside.txt"), b"host data").unwrap();
    std::os::unix::fs::symlink(&secret, directory.join("pleadings/shadow")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", directory.join("etc-shadow")).unwrap();
    std::os::unix::fs::symlink(&host_folder, directory.join("linked-folder")).unwrap();
    let fifo = std::process::Command::new("mkfifo").arg(directory.join("pipe")).status().expect("mkfifo runs");
    assert!(fifo.success());
    std::fs::write(directory.join("motions/real.txt"), b"real").unwrap();

    assert_eq!(harness.run(&harness.sync_task(false)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert_eq!(synced.uploaded, 1, "{synced:?}");
    let skipped: Vec<String> = synced.skipped.iter().map(|skipped| skipped.path.clone()).collect();
    assert_eq!(skipped, vec!["pipe".to_owned()], "only the FIFO can't be stored");
    // The links are data: their target text, never what they point at.
    let links = harness.sidecar().await.links;
    assert_eq!(links.get("pleadings/shadow").map(String::as_str), secret.to_str());
    assert_eq!(links.get("etc-shadow").map(String::as_str), Some("/etc/shadow"));
    assert_eq!(links.get("linked-folder").map(String::as_str), host_folder.to_str());
    let remote = harness.remote().await;
    assert!(remote.keys().all(|key| !key.contains("shadow") && !key.contains("linked-folder") && key != "pipe"), "{:?}", remote.keys());
    assert!(remote.values().all(|content| content != b"root:$6$secret" && content != b"host data"));
    assert_eq!(remote["motions/real.txt"], b"real");
    harness.cleanup();
    backend.cleanup().await;
}

async fn remove_only_after_a_confirmed_final_sync(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(12, 1)).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let directory = harness.directory();
    let remove = harness.task("remove", json!({}));

    // No final sync yet: refused, everything kept.
    assert_eq!(harness.run(&remove).await, Outcome::Ack);
    let refused = harness.last_of::<WorkspaceSyncFailed>();
    assert_eq!(refused.action.as_deref(), Some("remove"));
    assert!(directory.is_dir());

    // A confirmed final sync, then a change: refused again.
    std::fs::write(directory.join("discovery/late.txt"), b"late").unwrap();
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert!(synced.final_sync);
    assert_eq!(synced.uploaded, 1);
    assert!(workspace::read_manifest(&harness.profile, &harness.session).unwrap().unwrap().final_sync.unwrap().confirmed);
    std::fs::write(directory.join("discovery/later.txt"), b"later").unwrap();
    harness.events.take();
    assert_eq!(harness.run(&remove).await, Outcome::Ack);
    assert_eq!(harness.event_types(), vec!["workspace.sync_failed"]);
    assert!(directory.join("discovery/later.txt").is_file());

    // Final sync again: now the directory goes, and a repeated remove says so again.
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    assert_eq!(harness.run(&remove).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceRemoved>(), WorkspaceRemoved { preserved: Vec::new(), preserved_total: None });
    assert!(!directory.exists());
    assert!(harness.remote().await.contains_key("discovery/later.txt"));
    harness.events.take();
    assert_eq!(harness.run(&remove).await, Outcome::Ack);
    assert_eq!(harness.event_types(), vec!["workspace.removed"]);
    harness.cleanup();
    backend.cleanup().await;
}

async fn tasks_for_one_workspace_never_overlap(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(60, 4)).await;
    let materialize = harness.materialize_task();
    let sync = harness.sync_task(false);
    let (first, second) = tokio::join!(harness.run(&materialize), async {
        // Let the materialize take the lock first.
        tokio::time::sleep(Duration::from_millis(5)).await;
        harness.run(&sync).await
    });
    assert_eq!((first, second), (Outcome::Ack, Outcome::Ack));
    let types = harness.event_types();
    let complete_at = types.iter().position(|t| t == "workspace.complete").expect("complete");
    let synced_at = types.iter().position(|t| t == "workspace.synced").expect("synced");
    assert!(complete_at < synced_at, "the sync waited for the materialize: {types:?}");
    assert_eq!(harness.last_of::<WorkspaceSynced>().uploaded, 0);
    harness.cleanup();
    backend.cleanup().await;
}

async fn bad_tasks_get_clear_answers(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    let mut no_session = harness.materialize_task();
    no_session.session = None;
    assert!(matches!(harness.run(&no_session).await, Outcome::DeadLetter(reason) if reason.contains("no session")));
    let unknown = harness.task("explode", json!({}));
    assert!(matches!(harness.run(&unknown).await, Outcome::DeadLetter(reason) if reason.contains("unknown action")));
    let traversal = harness.task("materialize", json!({"user": "../../etc", "workspace": "w"}));
    assert!(matches!(harness.run(&traversal).await, Outcome::DeadLetter(_)));
    let failed = harness.last_of::<WorkspaceFailed>();
    assert!(failed.error.contains("user"), "{failed:?}");
    let bad_args = harness.task("sync", json!({"user": "a"}));
    assert!(matches!(harness.run(&bad_args).await, Outcome::DeadLetter(reason) if reason.contains("workspace")));
    let never = harness.sync_task(false);
    assert!(matches!(harness.run(&never).await, Outcome::DeadLetter(reason) if reason.contains("never materialized")));
    assert!(
        matches!(harness.agent.handle_message(b"{not json").await, Outcome::DeadLetter(reason) if reason.starts_with("undecodable task"))
    );
    // The workspace quota is enforced before anything is written.
    let mut profile = harness.profile.clone();
    profile.workspace.quota_mib = 0;
    let tight = WorkspaceAgent::new(profile, harness.store.clone(), harness.events.clone(), quick_settings());
    harness.seed(&fixture(3, 0)).await;
    assert_eq!(tight.handle(&harness.materialize_task()).await.unwrap(), Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceFailed>().stage, "quota");
    assert!(!harness.directory().exists());
    harness.cleanup();
    backend.cleanup().await;
}

/// Files above the multipart threshold go up in parts and come back down streamed; the final sync
/// confirms them by ETag like any other.
async fn large_files_go_up_in_parts_and_come_back_streamed(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(3, 0)).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let big = content(77, 17 * 1024 * 1024 + 333);
    std::fs::write(harness.directory().join("discovery/recording.wav"), &big).unwrap();
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert_eq!((synced.final_sync, synced.uploaded), (true, 1), "{synced:?}");
    assert_eq!(harness.remote().await["discovery/recording.wav"], big);
    let manifest = workspace::read_manifest(&harness.profile, &harness.session).unwrap().unwrap();
    let expected_hash: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&big).iter().map(|byte| format!("{byte:02x}")).collect()
    };
    assert_eq!(manifest.files["discovery/recording.wav"].sha256, expected_hash);

    // A new session of the same workspace streams it back in.
    let second = Harness { session: format!("{}-again", harness.session), ..harness };
    assert_eq!(second.run(&second.materialize_task()).await, Outcome::Ack);
    assert_eq!(second.last_of::<WorkspaceMaterialized>().pending_large_files, 1);
    assert_eq!(std::fs::read(second.directory().join("discovery/recording.wav")).unwrap(), big);
    second.cleanup();
    backend.cleanup().await;
}

/// A materialize that breaks down after `workspace.materialized` reports it; the next one picks up
/// where it stopped without fetching again what is already in place.
async fn an_interrupted_materialize_resumes(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    let mut files = fixture(30, 0);
    files.insert("discovery/huge-video.bin".into(), content(5, 300 * 1024));
    harness.seed(&files).await;
    *harness.counting.failing_reads.lock().unwrap() = Some("huge-video".into());
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceMaterialized>().pending_large_files, 1);
    let failed = harness.last_of::<WorkspaceFailed>();
    assert_eq!(failed.stage, "download", "{failed:?}");
    assert!(harness.events_of("workspace.complete").is_empty());
    assert!(!harness.directory().join("discovery/huge-video.bin").exists(), "no stub for the missing file");
    // A sync meanwhile must not delete the object that never arrived.
    assert_eq!(harness.run(&harness.sync_task(false)).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceSynced>().deleted, 0);

    *harness.counting.failing_reads.lock().unwrap() = None;
    harness.counting.gets.store(0, Ordering::SeqCst);
    harness.events.take();
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceComplete>().files, 31);
    assert_eq!(harness.counting.gets.load(Ordering::SeqCst), 2, "only the missing file (and the sidecar the sync wrote) is fetched again");
    assert_eq!(local_files(&harness.directory()), files);
    harness.cleanup();
    backend.cleanup().await;
}

// ----- never lose work ---------------------------------------------------------------------------------

/// The conflict copy's name: `<stem>.conflict-<first 8 of the session>-<stamp><.ext>`.
fn assert_conflict_copy_name(copy: &str, original_stem: &str, extension: &str, session: &str) {
    let prefix = format!("{original_stem}.conflict-{}-", &session[..8]);
    assert!(copy.starts_with(&prefix) && copy.ends_with(extension), "{copy} is not {prefix}<stamp>{extension}");
    let stamp = &copy[prefix.len()..copy.len() - extension.len()];
    assert_eq!(stamp.len(), 16, "{stamp}");
    assert!(chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").is_ok(), "{stamp}");
}

/// Two sessions of one workspace each edit `notes.txt`: the second sync keeps both versions.
async fn two_sessions_editing_one_file_keep_both(backend: Backend) {
    let first = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    first.seed(&BTreeMap::from([("notes.txt".to_owned(), b"version 0".to_vec()), ("other.md".to_owned(), b"untouched".to_vec())])).await;
    let second = first.other_session();
    assert_eq!(first.run(&first.materialize_task()).await, Outcome::Ack);
    assert_eq!(second.run(&second.materialize_task()).await, Outcome::Ack);

    std::fs::write(first.directory().join("notes.txt"), b"edited in the first session").unwrap();
    std::fs::write(first.directory().join("other.md"), b"only the first session touched this").unwrap();
    assert_eq!(first.run(&first.sync_task(false)).await, Outcome::Ack);
    assert_eq!(first.last_of::<WorkspaceSynced>().conflicts, 0);
    assert!(first.events_of("workspace.conflict").is_empty());

    std::fs::write(second.directory().join("notes.txt"), b"edited in the second session").unwrap();
    assert_eq!(second.run(&second.sync_task(true)).await, Outcome::Ack);
    let synced = second.last_of::<WorkspaceSynced>();
    assert_eq!((synced.final_sync, synced.conflicts), (true, 1), "{synced:?}");
    let conflict_event = second.last(WORKSPACE_CONFLICT);
    assert_eq!(conflict_event.extension("thredid"), Some(format!("thred-{}", second.session).as_str()));
    let conflict: WorkspaceConflict = conflict_event.data_as().unwrap();
    let files = &conflict.files;
    assert_eq!(files.len(), 1, "{conflict:?}");
    assert_eq!(files[0].path, "notes.txt");
    let copy = files[0].conflict_copy.clone().expect("a conflict copy");
    assert_conflict_copy_name(&copy, "notes", ".txt", &second.session);
    assert!(!files[0].reason.is_empty());

    // Both versions in the store; the store's at the path, locally too.
    let remote = second.remote().await;
    assert_eq!(remote["notes.txt"], b"edited in the first session");
    assert_eq!(remote[&copy], b"edited in the second session");
    assert_eq!(
        remote["other.md"], b"only the first session touched this",
        "a newer version the second session never changed is no conflict"
    );
    assert_eq!(remote.len(), 3);
    assert_eq!(local_files(&second.directory()), remote, "the second session's directory is what the store holds");
    // Confirmed: the directory can go.
    assert_eq!(second.run(&second.task("remove", json!({}))).await, Outcome::Ack);
    assert!(!second.directory().exists());
    first.cleanup();
    backend.cleanup().await;
}

/// A sidecar with a path outside the workspace is refused like a hostile key; one that isn't a
/// sidecar at all is replaced by the next sync's tree.
async fn hostile_or_broken_tree_metadata(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(2, 0)).await;
    harness.put(workspace::SIDECAR_PATH, br#"{"version": 1, "links": {"../../escape": "/etc"}}"#).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceFailed>().stage, "validate");
    assert!(!harness.directory().exists());
    assert!(!harness.scratch.join("escape").exists());

    harness.put(workspace::SIDECAR_PATH, br#"{"version": 1}"#).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    harness.put(workspace::SIDECAR_PATH, b"not json").await;
    std::os::unix::fs::symlink("pleadings", harness.directory().join("shortcut")).unwrap();
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    assert!(harness.last_of::<WorkspaceSynced>().final_sync);
    assert_eq!(harness.sidecar().await.links.get("shortcut").map(String::as_str), Some("pleadings"));
    harness.cleanup();
    backend.cleanup().await;
}

/// The conflict copy can't be uploaded: nothing moves locally, the final sync says it failed, and
/// the next one keeps both versions and reports it.
async fn a_failed_conflict_copy_upload_changes_nothing(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&BTreeMap::from([("notes.txt".to_owned(), b"v1".to_vec())])).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    harness.put("notes.txt", b"v2 from outside").await;
    std::fs::write(harness.directory().join("notes.txt"), b"v2 from the user").unwrap();
    *harness.counting.failing_writes.lock().unwrap() = Some(".conflict-".into());
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    assert!(harness.last_of::<WorkspaceSyncFailed>().final_sync);
    assert_eq!(local_files(&harness.directory()), BTreeMap::from([("notes.txt".to_owned(), b"v2 from the user".to_vec())]));
    assert_eq!(harness.remote().await, BTreeMap::from([("notes.txt".to_owned(), b"v2 from outside".to_vec())]));
    assert_eq!(harness.run(&harness.task("remove", json!({}))).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceSyncFailed>().action.as_deref(), Some("remove"), "nothing is removed");

    *harness.counting.failing_writes.lock().unwrap() = None;
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceSynced>().conflicts, 1);
    let copy = harness.last_of::<WorkspaceConflict>().files[0].conflict_copy.clone().expect("a conflict copy");
    let remote = harness.remote().await;
    assert_eq!(remote["notes.txt"], b"v2 from outside");
    assert_eq!(remote[&copy], b"v2 from the user");
    assert_eq!(local_files(&harness.directory()), remote);
    harness.cleanup();
    backend.cleanup().await;
}

/// Someone outside the session changes, deletes and adds objects while the user works: nothing
/// of either side is lost, and each case is reported.
async fn an_outside_writer_is_never_overwritten(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    let seeded = BTreeMap::from([
        ("report.txt".to_owned(), b"report v1".to_vec()),
        ("deleted-outside.txt".to_owned(), b"d v1".to_vec()),
        ("deleted-here.txt".to_owned(), b"h v1".to_vec()),
        ("calm.txt".to_owned(), b"calm".to_vec()),
    ]);
    harness.seed(&seeded).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let directory = harness.directory();

    harness.put("report.txt", b"report v2 from outside").await;
    harness.store.store.delete(&harness.key("deleted-outside.txt")).await.unwrap();
    harness.put("deleted-here.txt", b"h v2 from outside").await;
    std::fs::write(directory.join("report.txt"), b"report v2 from the user").unwrap();
    std::fs::write(directory.join("deleted-outside.txt"), b"d v2 from the user").unwrap();
    std::fs::remove_file(directory.join("deleted-here.txt")).unwrap();

    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert_eq!((synced.final_sync, synced.conflicts, synced.deleted), (true, 3, 0), "{synced:?}");
    let conflict = harness.last_of::<WorkspaceConflict>();
    let files: BTreeMap<String, ConflictFile> = conflict.files.into_iter().map(|file| (file.path.clone(), file)).collect();
    assert_eq!(files.keys().cloned().collect::<Vec<_>>(), vec!["deleted-here.txt", "deleted-outside.txt", "report.txt"]);
    assert_eq!(files["deleted-outside.txt"].conflict_copy, None);
    assert_eq!(files["deleted-here.txt"].conflict_copy, None);
    let copy = files["report.txt"].conflict_copy.clone().expect("a conflict copy");
    assert_conflict_copy_name(&copy, "report", ".txt", &harness.session);

    let remote = harness.remote().await;
    assert_eq!(remote["report.txt"], b"report v2 from outside", "the outside version stays at its key");
    assert_eq!(remote[&copy], b"report v2 from the user", "the user's version is the conflict copy");
    assert_eq!(remote["deleted-outside.txt"], b"d v2 from the user", "deleted outside, changed here: uploaded again");
    assert_eq!(remote["deleted-here.txt"], b"h v2 from outside", "changed outside, deleted here: kept");
    assert_eq!(remote["calm.txt"], b"calm");
    assert_eq!(remote.len(), 5);
    assert_eq!(local_files(&directory), remote, "and the directory holds the same");
    harness.cleanup();
    backend.cleanup().await;
}

/// Symlinks (relative, absolute, escaping), empty folders and modes come back exactly in a new
/// session; links are created as links, never followed.
async fn tree_metadata_round_trips(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&BTreeMap::from([("reports/2026.txt".to_owned(), b"figures".to_vec())])).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let directory = harness.directory();
    std::os::unix::fs::symlink("reports/2026.txt", directory.join("latest")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", directory.join("reports/absolute")).unwrap();
    std::os::unix::fs::symlink("../../../outside", directory.join("escaping")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", directory.join("dangling")).unwrap();
    std::fs::create_dir_all(directory.join("empty/nested")).unwrap();
    std::fs::create_dir_all(directory.join("private")).unwrap();
    std::fs::set_permissions(directory.join("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir_all(directory.join("bin")).unwrap();
    std::fs::write(directory.join("bin/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(directory.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(directory.join("bin/secret.key"), b"k").unwrap();
    std::fs::set_permissions(directory.join("bin/secret.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert!(synced.final_sync, "{synced:?}");
    assert_eq!(synced.skipped, Vec::new());
    assert_eq!(harness.run(&harness.task("remove", json!({}))).await, Outcome::Ack);
    assert!(!directory.exists());
    let sidecar = harness.sidecar().await;
    assert_eq!(sidecar.links.len(), 4);
    assert_eq!(sidecar.modes.get("bin/run.sh"), Some(&workspace::Mode(0o755)));

    let next = harness.other_session();
    assert_eq!(next.run(&next.materialize_task()).await, Outcome::Ack);
    assert_eq!(next.last_of::<WorkspaceComplete>().files, 3);
    let again = next.directory();
    for (link, target) in [
        ("latest", "reports/2026.txt"),
        ("reports/absolute", "/etc/hostname"),
        ("escaping", "../../../outside"),
        ("dangling", "does/not/exist"),
    ] {
        let metadata = std::fs::symlink_metadata(again.join(link)).unwrap();
        assert!(metadata.file_type().is_symlink(), "{link} is a symlink");
        assert_eq!(std::fs::read_link(again.join(link)).unwrap(), PathBuf::from(target), "{link}");
    }
    assert!(!harness.scratch.join("outside").exists(), "the escaping link was never followed");
    assert!(std::fs::symlink_metadata(again.join("empty/nested")).unwrap().is_dir());
    assert_eq!(std::fs::read_dir(again.join("empty/nested")).unwrap().count(), 0);
    let mode = |path: &str| std::fs::symlink_metadata(again.join(path)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("bin/run.sh"), 0o755);
    assert_eq!(mode("bin/secret.key"), 0o600);
    assert_eq!(mode("reports/2026.txt"), 0o644);
    assert_eq!(mode("private"), 0o700);
    assert_eq!(std::fs::read(again.join("bin/run.sh")).unwrap(), b"#!/bin/sh\necho hi\n");
    // Nothing changed: a sync writes nothing.
    next.counting.puts.store(0, Ordering::SeqCst);
    assert_eq!(next.run(&next.sync_task(false)).await, Outcome::Ack);
    assert_eq!(next.counting.puts.load(Ordering::SeqCst), 0, "{:?}", next.last_of::<WorkspaceSynced>());
    harness.cleanup();
    backend.cleanup().await;
}

/// What can't be stored — a backslash name, a non-UTF-8 name, a FIFO, a folder with a bad
/// name, the reserved `.berth` — is never deleted: `remove` moves it to the preserved area.
async fn unsyncable_entries_are_preserved_on_remove(backend: Backend) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(4, 0)).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let directory = harness.directory();
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    std::fs::write(directory.join("pleadings/report\\final.docx"), b"backslash").unwrap();
    std::fs::write(directory.join("pleadings").join(latin1), b"latin-1").unwrap();
    assert!(std::process::Command::new("mkfifo").arg(directory.join("pipe")).status().unwrap().success());
    std::fs::create_dir_all(directory.join("bad\\folder/inner")).unwrap();
    std::fs::write(directory.join("bad\\folder/inner/file.txt"), b"inside a bad folder").unwrap();
    std::fs::create_dir_all(directory.join(".berth")).unwrap();
    std::fs::write(directory.join(".berth/tree.json"), b"{\"forged\": true}").unwrap();
    std::fs::write(directory.join("motions/fine.txt"), b"fine").unwrap();

    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert!(synced.final_sync, "{synced:?}");
    let mut skipped: Vec<String> = synced.skipped.iter().map(|entry| entry.path.clone()).collect();
    skipped.sort();
    let mut expected = vec![
        ".berth".to_owned(),
        "bad\\folder".to_owned(),
        "pipe".to_owned(),
        "pleadings/caf\u{FFFD}.txt".to_owned(),
        "pleadings/report\\final.docx".to_owned(),
    ];
    expected.sort();
    assert_eq!(skipped, expected);
    assert_ne!(harness.sidecar().await.links.get("forged"), Some(&"true".to_owned()));
    assert!(harness.remote().await.contains_key("motions/fine.txt"));

    assert_eq!(harness.run(&harness.task("remove", json!({}))).await, Outcome::Ack);
    let removed = harness.last_of::<WorkspaceRemoved>();
    let mut preserved = removed.preserved.clone();
    preserved.sort();
    assert_eq!(preserved, expected);
    assert!(!directory.exists());
    // A redelivered remove answers the same.
    assert_eq!(harness.run(&harness.task("remove", json!({}))).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceRemoved>(), removed);
    let kept = harness.preserved();
    assert_eq!(std::fs::read(kept.join("pleadings/report\\final.docx")).unwrap(), b"backslash");
    assert_eq!(std::fs::read(kept.join("pleadings").join(latin1)).unwrap(), b"latin-1", "the name byte for byte");
    assert!(std::fs::symlink_metadata(kept.join("pipe")).unwrap().file_type().is_fifo());
    assert_eq!(std::fs::read(kept.join("bad\\folder/inner/file.txt")).unwrap(), b"inside a bad folder");
    assert_eq!(std::fs::read(kept.join(".berth/tree.json")).unwrap(), b"{\"forged\": true}");
    assert!(!harness.profile.deployment_root().join(".berth-preserved").starts_with(&directory));
    harness.cleanup();
    backend.cleanup().await;
}

/// A materialize that died part-way (a download failed; then, as after a SIGKILL, the manifest
/// lost entries or was never written) is followed by a final sync: nothing in the store that
/// simply wasn't downloaded yet is deleted, and files already in place are not conflicts.
async fn sync_after_an_interrupted_materialize_deletes_nothing(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    let files = fixture(40, 0);
    harness.seed(&files).await;
    let failing = files.keys().nth(25).unwrap().clone();
    *harness.counting.failing_reads.lock().unwrap() = Some(failing.clone());
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceFailed>().stage, "download");
    *harness.counting.failing_reads.lock().unwrap() = None;
    let present = local_files(&harness.directory());
    assert!(present.len() < files.len(), "the materialize stopped part-way ({} of {})", present.len(), files.len());

    // As if the agent was killed before saving what it had placed: half of the entries are lost.
    let manifest_path = harness.profile.deployment_root().join(workspace::MANIFESTS_DIR).join(format!("{}.json", harness.session));
    let mut manifest = workspace::read_manifest(&harness.profile, &harness.session).unwrap().unwrap();
    let forgotten: Vec<String> = manifest.files.keys().step_by(2).cloned().collect();
    assert!(!forgotten.is_empty());
    for path in &forgotten {
        manifest.files.remove(path);
    }
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    harness.counting.deletes.store(0, Ordering::SeqCst);
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert_eq!((synced.final_sync, synced.deleted, synced.conflicts), (true, 0, 0), "{synced:?}");
    assert_eq!(harness.counting.deletes.load(Ordering::SeqCst), 0);
    assert_eq!(harness.remote().await, files, "the store is exactly as seeded");

    // And with no manifest at all (killed before the first save).
    std::fs::remove_file(&manifest_path).unwrap();
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert_eq!((synced.final_sync, synced.deleted, synced.conflicts), (true, 0, 0), "{synced:?}");
    assert_eq!(harness.remote().await, files);
    harness.cleanup();
    backend.cleanup().await;
}

/// A session that failed before materialize has no directory: its final sync and remove answer.
async fn a_missing_directory_syncs_and_removes_as_nothing(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(3, 0)).await;
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert_eq!(
        synced,
        WorkspaceSynced {
            final_sync: true,
            missing: true,
            uploaded: 0,
            deleted: 0,
            unchanged: 0,
            bytes_uploaded: 0,
            skipped: Vec::new(),
            conflicts: 0,
            skipped_total: None,
        }
    );
    assert_eq!(harness.run(&harness.task("remove", json!({}))).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceRemoved>(), WorkspaceRemoved { preserved: Vec::new(), preserved_total: None });
    assert_eq!(harness.remote().await, fixture(3, 0), "the store is untouched");
    harness.cleanup();
    backend.cleanup().await;
}

/// Session 1's directory was stranded with unsaved work; session 2 of the same workspace starts
/// from that newer copy, never from the older one in the store.
async fn materialize_saves_a_stranded_sibling_first(backend: Backend) {
    let stranded = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    stranded.seed(&BTreeMap::from([("notes.txt".to_owned(), b"old".to_vec())])).await;
    assert_eq!(stranded.run(&stranded.materialize_task()).await, Outcome::Ack);
    std::fs::write(stranded.directory().join("notes.txt"), b"newer, never synced").unwrap();
    std::fs::write(stranded.directory().join("added.txt"), b"also new").unwrap();
    // An unrelated workspace of the same user is left alone.
    let unrelated = Harness { workspace: "case-2".into(), ..stranded.other_session() };
    assert_eq!(unrelated.run(&unrelated.materialize_task()).await, Outcome::Ack);
    std::fs::write(unrelated.directory().join("elsewhere.txt"), b"not this workspace").unwrap();

    let next = stranded.other_session();
    assert_eq!(next.run(&next.materialize_task()).await, Outcome::Ack);
    assert_eq!(std::fs::read(next.directory().join("notes.txt")).unwrap(), b"newer, never synced");
    assert_eq!(std::fs::read(next.directory().join("added.txt")).unwrap(), b"also new");
    assert_eq!(stranded.remote().await["notes.txt"], b"newer, never synced");
    let manifest = workspace::read_manifest(&stranded.profile, &stranded.session).unwrap().unwrap();
    assert!(manifest.final_sync_confirmed(), "the stranded directory's final sync is recorded");
    assert!(stranded.directory().join("notes.txt").is_file(), "and it is kept until the engine removes it");
    assert!(!unrelated.remote().await.contains_key("elsewhere.txt"));
    stranded.cleanup();
    backend.cleanup().await;
}

/// Multipart uploads can't be conditional in `object_store`: the agent checks the version right
/// before completing, so a large file changed outside is kept and ours becomes the conflict copy.
async fn a_large_file_changed_outside_is_kept(backend: Backend) {
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    let original = content(1, 17 * 1024 * 1024);
    harness.seed(&BTreeMap::from([("media/take.wav".to_owned(), original)])).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let outside = content(2, 17 * 1024 * 1024 + 5);
    harness.put("media/take.wav", &outside).await;
    let ours = content(3, 17 * 1024 * 1024 + 9);
    std::fs::write(harness.directory().join("media/take.wav"), &ours).unwrap();
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert_eq!((synced.final_sync, synced.conflicts), (true, 1), "{synced:?}");
    let copy = harness.last_of::<WorkspaceConflict>().files[0].conflict_copy.clone().expect("a conflict copy");
    assert_conflict_copy_name(&copy, "media/take", ".wav", &harness.session);
    let remote = harness.remote().await;
    assert!(remote["media/take.wav"] == outside, "the outside version stays");
    assert!(remote[&copy] == ours, "ours is the conflict copy");
    assert_eq!(remote.len(), 2);
    harness.cleanup();
    backend.cleanup().await;
}

// ----- what each backend supports, measured -----------------------------------------------------------

/// What `object_store` does with conditional writes on each backend, as the README states it:
/// moto (S3 with `If-None-Match`/`If-Match`) does both natively; `file://` does `Create`
/// natively and refuses `Update` and attributes (the agent checks, then writes).
async fn conditional_write_support(backend: Backend) {
    use object_store::{Attribute, Attributes, PutMode, UpdateVersion};
    let store = backend.open();
    let key = ObjectPath::from(format!("probe-{}/object", Uuid::new_v4().simple()));
    let first = store.store.put_opts(&key, PutPayload::from_static(b"one"), PutMode::Create.into()).await.expect("create on a free key");
    let again = store.store.put_opts(&key, PutPayload::from_static(b"two"), PutMode::Create.into()).await;
    assert!(matches!(again, Err(object_store::Error::AlreadyExists { .. })), "{again:?}");
    let stale = UpdateVersion { e_tag: Some("\"not-the-etag\"".into()), version: None };
    let stale_update = store.store.put_opts(&key, PutPayload::from_static(b"three"), PutMode::Update(stale).into()).await;
    let current = UpdateVersion { e_tag: first.e_tag.clone(), version: first.version.clone() };
    let good_update = store.store.put_opts(&key, PutPayload::from_static(b"four"), PutMode::Update(current).into()).await;
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::Metadata("berth-mode".into()), "755".into());
    let with_attributes = store.store.put_opts(&key.child("attributes"), PutPayload::from_static(b"x"), attributes.into()).await;
    let content = store.store.get(&key).await.unwrap().bytes().await.unwrap();
    match &backend.kind {
        BackendKind::S3 { .. } => {
            assert!(matches!(stale_update, Err(object_store::Error::Precondition { .. })), "{stale_update:?}");
            assert!(good_update.is_ok(), "{good_update:?}");
            assert_eq!(content.as_ref(), b"four");
            assert!(with_attributes.is_ok(), "{with_attributes:?}");
        }
        BackendKind::File { .. } => {
            assert!(matches!(stale_update, Err(object_store::Error::NotImplemented)), "{stale_update:?}");
            assert!(matches!(good_update, Err(object_store::Error::NotImplemented)), "{good_update:?}");
            assert_eq!(content.as_ref(), b"one");
            assert!(matches!(with_attributes, Err(object_store::Error::NotImplemented)), "{with_attributes:?}");
        }
    }
    backend.cleanup().await;
}

// ----- inventory and outages -------------------------------------------------------------------------

/// Two deployments share one workspace root: each agent's inventory lists only its own
/// directories, in events of at most `inventory_batch`, and says which are confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_lists_only_this_deployments_directories() {
    let backend = Backend::file();
    let scratch = std::env::temp_dir().join(format!("berth-ws-test-{}", Uuid::new_v4()));
    let tag = Uuid::new_v4().simple().to_string();
    let mut agents = Vec::new();
    for deployment in [format!("a-{}", &tag[..8]), format!("b-{}", &tag[..8])] {
        let mut profile = test_profile(&backend.url, &scratch);
        profile.services.deployment = Some(deployment);
        let events = Arc::new(CollectedEvents::new());
        let settings = AgentSettings { inventory_batch: 1, ..quick_settings() };
        let agent = Arc::new(WorkspaceAgent::new(profile.clone(), backend.open(), events.clone(), settings));
        agents.push((profile, events, agent));
    }
    let user = format!("u-{}", &tag[..8]);
    let mut sessions = Vec::new();
    for (index, (profile, _, agent)) in agents.iter().enumerate() {
        for number in 0..(2 - index) {
            let session = format!("inv-{index}-{number}-{tag}");
            let task = Task {
                id: Uuid::now_v7(),
                agent: AgentKind::Workspace,
                action: "materialize".into(),
                session: Some(session.clone()),
                thred: None,
                cause: None,
                args: json!({"user": user, "workspace": format!("w{number}")}),
            };
            assert_eq!(agent.handle(&task).await.unwrap(), Outcome::Ack);
            assert!(profile.session_dir(&session).is_dir());
            sessions.push((index, session));
        }
    }
    let (profile_a, events_a, agent_a) = &agents[0];
    // A folder no session id names (no task could have made it) is not listed.
    std::fs::create_dir_all(profile_a.deployment_root().join("not a session")).unwrap();
    assert_eq!(agent_a.publish_inventory().await.unwrap(), 2);
    let inventories: Vec<CloudEvent> = events_a.take().into_iter().filter(|event| event.event_type == "workspace.inventory").collect();
    assert_eq!(inventories.len(), 2, "one directory per event with inventory_batch = 1");
    assert!(inventories.iter().all(|event| event.subject.is_none()));
    let inventories: Vec<WorkspaceInventory> = inventories.iter().map(|event| event.data_as().unwrap()).collect();
    assert!(inventories.iter().all(|inventory| inventory.deployment == profile_a.deployment()));
    let listed: Vec<DirectoryEntry> = inventories.into_iter().flat_map(|inventory| inventory.directories).collect();
    let names: Vec<&str> = listed.iter().map(|entry| entry.session.as_str()).collect();
    let ours: Vec<&str> = sessions.iter().filter(|(index, _)| *index == 0).map(|(_, session)| session.as_str()).collect();
    assert_eq!(names, ours, "only deployment a's directories");
    for entry in &listed {
        assert_eq!(entry.user.as_ref().map(|user| user.as_str()), Some(user.as_str()));
        assert_eq!(entry.profile.as_ref(), Some(&profile_a.name));
        assert!(!entry.confirmed);
        assert!(chrono::DateTime::parse_from_rfc3339(&entry.modified).is_ok(), "{entry:?}");
    }
    // After a confirmed final sync the directory is listed as confirmed; a change clears that.
    let session = ours[0].to_owned();
    let sync = |final_sync: bool| Task {
        id: Uuid::now_v7(),
        agent: AgentKind::Workspace,
        action: "sync".into(),
        session: Some(session.clone()),
        thred: None,
        cause: None,
        args: json!({"user": user, "workspace": "w0", "final": final_sync}),
    };
    assert_eq!(agent_a.handle(&sync(true)).await.unwrap(), Outcome::Ack);
    let confirmed = |directories: Vec<DirectoryEntry>| directories.iter().find(|entry| entry.session == session).unwrap().confirmed;
    assert!(confirmed(agent_a.inventory().await.unwrap()));
    std::fs::write(profile_a.session_dir(&session).join("late.txt"), b"late").unwrap();
    assert!(!confirmed(agent_a.inventory().await.unwrap()));
    let (_, events_b, agent_b) = &agents[1];
    assert_eq!(agent_b.publish_inventory().await.unwrap(), 1);
    assert_eq!(events_b.events().iter().filter(|event| event.event_type == "workspace.inventory").count(), 1);
    // The loop publishes at once and then every interval.
    events_b.take();
    let (profile_b, _, _) = &agents[1];
    let looping = Arc::new(WorkspaceAgent::new(
        profile_b.clone(),
        backend.open(),
        events_b.clone(),
        AgentSettings { inventory_interval: Duration::from_secs(1), ..quick_settings() },
    ));
    let running = tokio::spawn({
        let looping = looping.clone();
        async move { looping.inventory_loop().await }
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    running.abort();
    let published = events_b.events().iter().filter(|event| event.event_type == "workspace.inventory").count();
    assert!((2..=4).contains(&published), "{published} inventories in 2.5 s at a 1 s interval");
    remove_scratch(&scratch);
    backend.cleanup().await;
}

/// An object store that refuses connections is an outage: a materialize is not answered as
/// failed but handed back to wait (`RetryUnavailable`), and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_waits_instead_of_failing() {
    let port = PrivateMoto::free_port();
    let backend = Backend {
        url: "s3://nowhere/tests".to_owned(),
        settings: StoreSettings::s3_compatible(&format!("http://127.0.0.1:{port}")),
        kind: BackendKind::File { directory: std::env::temp_dir().join(format!("berth-ws-none-{}", Uuid::new_v4())) },
    };
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    let outcome = harness.agent.handle_message(&harness.materialize_task().to_bytes()).await;
    assert_eq!(outcome, Outcome::RetryUnavailable);
    assert!(harness.events_of("workspace.failed").is_empty(), "{:?}", harness.event_types());
    let error = workspace::Error::Store(harness.store.store.head(&harness.key("x")).await.unwrap_err());
    assert!(error.is_unavailable(), "{error}");
    assert_eq!(workspace::error_policy(&error), Outcome::RetryUnavailable);
    let bad = workspace::Error::BadTask("nope".into());
    assert!(matches!(workspace::error_policy(&bad), Outcome::DeadLetter(_)));
    assert_eq!(workspace::error_policy(&workspace::Error::Unconfirmed("later".into())), Outcome::Retry);
    harness.cleanup();
}

macro_rules! on_both_backends {
    ($($suite:ident),* $(,)?) => {
        mod on_s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $suite() {
                    super::$suite(super::Backend::s3().await.expect("moto S3 server on 127.0.0.1:9000")).await;
                }
            )*
        }
        mod on_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $suite() {
                    super::$suite(super::Backend::file()).await;
                }
            )*
        }
    };
}

on_both_backends!(
    materializes_byte_for_byte_small_first,
    incremental_sync_uploads_exactly_the_changes,
    hostile_keys_are_refused_and_nothing_is_written,
    symlinks_are_stored_as_links_and_never_followed,
    two_sessions_editing_one_file_keep_both,
    an_outside_writer_is_never_overwritten,
    tree_metadata_round_trips,
    unsyncable_entries_are_preserved_on_remove,
    sync_after_an_interrupted_materialize_deletes_nothing,
    a_missing_directory_syncs_and_removes_as_nothing,
    materialize_saves_a_stranded_sibling_first,
    conditional_write_support,
    a_large_file_changed_outside_is_kept,
    a_failed_conflict_copy_upload_changes_nothing,
    hostile_or_broken_tree_metadata,
    remove_only_after_a_confirmed_final_sync,
    tasks_for_one_workspace_never_overlap,
    bad_tasks_get_clear_answers,
    large_files_go_up_in_parts_and_come_back_streamed,
    an_interrupted_materialize_resumes,
);

// ----- S3 only ---------------------------------------------------------------------------------------

/// A literal `..` key can't even be listed by `object_store`; the agent reports it as unsafe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_literal_dot_dot_key_is_refused() {
    let backend = Backend::s3().await.expect("moto");
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(3, 0)).await;
    let BackendKind::S3 { bucket, .. } = &backend.kind else { unreachable!() };
    let status = raw_http(MOTO, "PUT", &format!("/{bucket}/{}/../../escaped.txt", harness.prefix()), b"evil").await.unwrap();
    assert_eq!(status, 200);
    let listed: Vec<String> =
        harness.store.store.list(None).map_ok(|meta| meta.location.to_string()).try_collect().await.unwrap_or_default();
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    let failed = harness.last_of::<WorkspaceFailed>();
    assert_eq!(failed.stage, "validate", "{failed:?} (store listed {listed:?})");
    assert!(!harness.directory().exists());
    assert!(!harness.scratch.join("escaped.txt").exists());
    harness.cleanup();
    backend.cleanup().await;
}

/// A moto server of our own that we can stop and start.
struct PrivateMoto {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateMoto {
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    async fn start(port: u16) -> PrivateMoto {
        let child = std::process::Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto starts");
        let moto = PrivateMoto { port, child: Some(child) };
        for _ in 0..200 {
            if raw_http(&moto.address(), "GET", "/", b"").await.is_ok() {
                return moto;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto did not come up on port {port}");
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateMoto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The store is down when the final sync starts; it retries with backoff, nothing is removed in
/// the meantime, and once the store is back (empty: moto keeps objects in memory) every object is
/// written again and confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_sync_rides_out_a_store_outage() {
    let port = PrivateMoto::free_port();
    let mut moto = PrivateMoto::start(port).await;
    let backend = Backend::s3_at(&moto.address()).await.expect("bucket");
    let settings = AgentSettings {
        final_sync_attempts: 30,
        final_sync_backoff_start: Duration::from_millis(200),
        final_sync_backoff_max: Duration::from_secs(1),
        ..AgentSettings::standard()
    };
    let harness = Arc::new(Harness::new(&backend, CollectedEvents::new(), settings));
    let files = fixture(20, 1);
    harness.seed(&files).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    std::fs::write(harness.directory().join("pleadings/final words.txt"), b"saved at the last moment").unwrap();

    moto.stop();
    let syncing = {
        let harness = harness.clone();
        tokio::spawn(async move { harness.run(&harness.sync_task(true)).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!syncing.is_finished(), "the final sync is still retrying");
    assert!(harness.events_of("workspace.synced").is_empty() && harness.events_of("workspace.sync_failed").is_empty());
    assert!(harness.directory().join("pleadings/final words.txt").is_file(), "nothing removed while the store is down");

    let moto = PrivateMoto::start(port).await;
    let BackendKind::S3 { bucket, .. } = &backend.kind else { unreachable!() };
    assert_eq!(raw_http(&moto.address(), "PUT", &format!("/{bucket}"), b"").await.unwrap(), 200);
    assert_eq!(tokio::time::timeout(Duration::from_secs(60), syncing).await.expect("final sync ends").unwrap(), Outcome::Ack);
    let synced = harness.last_of::<WorkspaceSynced>();
    assert!(synced.final_sync, "{synced:?}");
    assert_eq!(harness.remote().await, local_files(&harness.directory()), "every object written again and confirmed");
    assert_eq!(harness.remote().await.len(), 21);

    assert_eq!(harness.run(&harness.task("remove", json!({}))).await, Outcome::Ack);
    assert!(!harness.directory().exists());
    let harness = Arc::try_unwrap(harness).ok().expect("only owner");
    harness.cleanup();
    backend.cleanup().await;
}

/// A final sync that never gets through says so, keeps the directory, and `remove` refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_final_sync_keeps_everything() {
    let port = PrivateMoto::free_port();
    let mut moto = PrivateMoto::start(port).await;
    let backend = Backend::s3_at(&moto.address()).await.expect("bucket");
    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(4, 0)).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    std::fs::write(harness.directory().join("unsaved.txt"), b"unsaved").unwrap();
    moto.stop();
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    let failed = harness.last_of::<WorkspaceSyncFailed>();
    assert!(failed.final_sync);
    assert!(!failed.error.is_empty());
    assert_eq!(harness.run(&harness.task("remove", json!({}))).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceSyncFailed>().action.as_deref(), Some("remove"));
    assert!(harness.directory().join("unsaved.txt").is_file());
    harness.cleanup();
}

// ----- through the real broker -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_tasks_from_the_broker() {
    let backend = Backend::file();
    let scratch = std::env::temp_dir().join(format!("berth-ws-test-{}", Uuid::new_v4()));
    let profile = test_profile(&backend.url, &scratch);
    let bus = protocol::Bus::connect(protocol::BusConfig::new(&profile.services.amqp_url, "workspace-tests")).await.expect("broker");
    bus.declare_topology().await.expect("topology");
    // A task queue of the test's own (fed directly, so the shared agent queue is untouched; named
    // as an isolated world's agent queue, which the workspace identity may consume) and a private
    // queue that sees every workspace event.
    let task_queue = format!("berth-test.{}.agent.workspace", Uuid::now_v7().simple());
    let temporary = protocol::bus::QueueSpec::classic(&task_queue, protocol::bus::Durability::Transient).deleted_when_unused();
    bus.declare_queue(&temporary).await.expect("task queue");
    let event_queue = bus.declare_private_queue(protocol::topology::EVENTS_EXCHANGE, &["workspace.*".to_owned()]).await.unwrap();
    // The agent connects as the workspace identity, as in a deployment.
    protocol::broker_admin::ensure_identities(&profile.services.amqp_url).await.expect("bus identities");
    let agent_config =
        protocol::BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Workspace, "workspace-tests-agent");
    let agent_bus = protocol::Bus::connect(agent_config.expect("the workspace identity's password")).await.expect("broker");
    let events = Arc::new(workspace::BusEvents { bus: agent_bus.clone(), host: "local".to_owned() });
    let agent = Arc::new(WorkspaceAgent::new(profile.clone(), backend.open(), events, quick_settings()));
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn({
        let bus = agent_bus.clone();
        let task_queue = task_queue.clone();
        async move {
            workspace::serve(agent, &bus, &task_queue, async {
                let _ = agent_stopped.await;
            })
            .await
        }
    });

    let harness = Harness::new(&backend, CollectedEvents::new(), quick_settings());
    harness.seed(&fixture(8, 1)).await;
    let session = harness.session.clone();
    let task = Task {
        id: Uuid::now_v7(),
        agent: AgentKind::Workspace,
        action: "materialize".into(),
        session: Some(session.clone()),
        thred: Some("thred-broker".into()),
        cause: None,
        args: json!({"user": harness.user, "workspace": harness.workspace}),
    };
    bus.publish("", &task_queue, &task.to_bytes(), protocol::Properties::bare()).await.expect("task published");

    let (seen, mut received) = tokio::sync::mpsc::unbounded_channel::<CloudEvent>();
    let (stop_events, events_stopped) = tokio::sync::oneshot::channel::<()>();
    let listening = tokio::spawn({
        let bus = bus.clone();
        let event_queue = event_queue.clone();
        async move {
            bus.consume(
                protocol::ConsumeSpec::new(&event_queue, 16),
                move |incoming| {
                    let seen = seen.clone();
                    async move {
                        if let Ok(event) = CloudEvent::parse(&incoming.body, 1 << 20) {
                            let _ = seen.send(event);
                        }
                        Outcome::Ack
                    }
                },
                async {
                    let _ = events_stopped.await;
                },
            )
            .await
        }
    });
    let mut types = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !types.iter().any(|t| t == "workspace.complete") {
        let event = tokio::time::timeout_at(deadline, received.recv()).await.expect("answers arrive").expect("channel open");
        if event.subject.as_deref() != Some(session.as_str()) {
            continue;
        }
        assert_eq!(event.extension("thredid"), Some("thred-broker"));
        assert_eq!(event.extension("taskid"), Some(task.id.to_string().as_str()));
        types.push(event.event_type);
    }
    assert_eq!(types.first().map(String::as_str), Some("workspace.materialized"), "{types:?}");
    let profile_dir = profile.session_dir(&session);
    assert_eq!(local_files(&profile_dir).len(), 8);

    let _ = stop_agent.send(());
    let _ = stop_events.send(());
    serving.await.unwrap().unwrap();
    listening.await.unwrap().unwrap();
    let _ = bus.delete_queue(&task_queue).await;
    let _ = bus.delete_queue(&event_queue).await;
    bus.close().await;
    remove_scratch(&scratch);
    harness.cleanup();
    backend.cleanup().await;
}

// ----- benchmark (run by hand: `cargo test -p workspace --release --test workspace -- --ignored --nocapture`)

async fn bench_on(backend: Backend) {
    let scratch = std::env::temp_dir().join(format!("berth-ws-test-{}", Uuid::new_v4()));
    let mut profile = test_profile(&backend.url, &scratch);
    profile.workspace.large_file_threshold_kib = 1024;
    let report = bench::workspace_io::run_with(profile, &backend.settings).await.expect("benchmark runs");
    println!("{} {}", backend.url, serde_json::to_string_pretty(&report).unwrap());
    assert!(report.materialize_mb_per_s > 0.0 && report.sync_one_change_ms_best > 0.0);
    remove_scratch(&scratch);
    backend.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: minutes of IO"]
async fn bench_workspace_on_s3() {
    bench_on(Backend::s3().await.expect("moto")).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: minutes of IO"]
async fn bench_workspace_on_file() {
    bench_on(Backend::file()).await;
}

// ----- the local workspace cache -----------------------------------------------------------------------

/// The cache's whole entries (dot-folders are entries being moved).
fn cache_entries(harness: &Harness) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(harness.profile.deployment_root().join(workspace::CACHE_DIR)) else { return Vec::new() };
    let mut found: Vec<PathBuf> =
        entries.flatten().filter(|entry| !entry.file_name().to_string_lossy().starts_with('.')).map(|entry| entry.path()).collect();
    found.sort();
    found
}

/// Final sync, then `remove {cache: true}`, as the session pattern closes a session.
async fn close_into_cache(harness: &Harness) {
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    assert!(harness.last_of::<WorkspaceSynced>().final_sync);
    assert_eq!(harness.run(&harness.task("remove", json!({"cache": true}))).await, Outcome::Ack);
    assert_eq!(harness.last_of::<WorkspaceRemoved>(), WorkspaceRemoved { preserved: Vec::new(), preserved_total: None });
    assert!(!harness.directory().exists(), "the session's directory is gone from where sessions live");
}

fn cached(mib: u64) -> impl FnOnce(&mut Profile) {
    move |profile| profile.workspace.cache_mib = mib
}

fn plain_directories(mib: u64) -> impl FnOnce(&mut Profile) {
    move |profile| {
        profile.workspace.cache_mib = mib;
        profile.workspace.filesystem = protocol::profile::WorkspaceFilesystem::Directory;
    }
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap_or_else(|error| panic!("{}: {error}", path.display())).ino()
}

/// Close, then a change, a deletion and a new file in the store, then reopen: only the changed
/// and the new file are downloaded (the other files keep their inodes), the deleted one is gone
/// locally, and the manifest's versions are the store's, so the next syncs are exact.
async fn reopen_from_the_cache_fetches_only_what_changed_in_the_store(backend: Backend) {
    let first = Harness::with_profile(&backend, CollectedEvents::new(), quick_settings(), cached(256));
    let files = fixture(60, 3);
    first.seed(&files).await;
    assert_eq!(first.run(&first.materialize_task()).await, Outcome::Ack);
    let paths: Vec<String> = files.keys().cloned().collect();
    let (changed, deleted, untouched) = (paths[10].clone(), paths[20].clone(), paths[30].clone());
    let untouched_inode = inode(&first.directory().join(&untouched));
    close_into_cache(&first).await;
    let entries = cache_entries(&first);
    assert_eq!(entries.len(), 1, "the closed workspace is cached");
    if nix_is_root() {
        assert!(entries[0].join("workspace.img").is_file(), "an image-backed workspace is cached as its image");
    }
    // The engine's reconciler never sees a cached workspace (it would take it for stranded work).
    let listed = first.agent.inventory().await.unwrap();
    assert!(listed.is_empty(), "the inventory lists no directory: {listed:?}");
    // A redelivered remove answers the same and leaves the entry alone.
    first.events.take();
    assert_eq!(first.run(&first.task("remove", json!({"cache": true}))).await, Outcome::Ack);
    assert_eq!(first.event_types(), vec!["workspace.removed"]);
    assert_eq!(cache_entries(&first).len(), 1);

    // Meanwhile, elsewhere: same size, other bytes (only the ETag tells); one deleted; one new.
    let replacement = vec![b'x'; files[&changed].len()];
    first.put(&changed, &replacement).await;
    first.store.store.delete(&first.key(&deleted)).await.unwrap();
    first.put("discovery/new elsewhere.txt", b"written by another host").await;

    let reopened = first.other_session();
    reopened.counting.gets.store(0, Ordering::SeqCst);
    assert_eq!(reopened.run(&reopened.materialize_task()).await, Outcome::Ack);
    let complete = reopened.last_of::<WorkspaceComplete>();
    let cache = complete.cache.clone().unwrap_or_else(|| panic!("served from the cache: {complete:?}"));
    assert_eq!((cache.kept_files, cache.removed), (58, 2), "{complete:?}");
    assert_eq!(complete.downloaded_files, 2, "the changed and the new file, nothing else: {complete:?}");
    // Two downloads and the sidecar's read.
    assert_eq!(reopened.counting.gets.load(Ordering::SeqCst), 3);
    assert!(cache_entries(&first).is_empty(), "the entry became the session's directory");

    let mut expected = files.clone();
    expected.insert(changed.clone(), replacement);
    expected.remove(&deleted);
    expected.insert("discovery/new elsewhere.txt".into(), b"written by another host".to_vec());
    assert_eq!(local_files(&reopened.directory()), expected, "the store's workspace, byte for byte");
    assert_eq!(inode(&reopened.directory().join(&untouched)), untouched_inode, "an unchanged file was not downloaded again");
    if nix_is_root() {
        let image = reopened.profile.deployment_root().join(workspace::IMAGES_DIR).join(format!("{}.img", reopened.session));
        assert!(image.is_file(), "the reopened session is image-backed again (its quota holds)");
        assert!(workspace::is_attached(&workspace::Volume::of(&reopened.profile.deployment_root(), &reopened.session)).unwrap());
    }
    for folder in ["pleadings", "motions", "discovery", "correspondence/outgoing"] {
        assert!(reopened.directory().join(folder).is_dir(), "skeleton folder {folder}");
    }

    // Nothing changed locally: nothing goes up. A local edit goes up as a plain, conditional
    // write on the version the listing gave (no conflict).
    assert_eq!(reopened.run(&reopened.sync_task(false)).await, Outcome::Ack);
    let synced = reopened.last_of::<WorkspaceSynced>();
    assert_eq!((synced.uploaded, synced.deleted), (0, 0), "{synced:?}");
    std::fs::write(reopened.directory().join(&untouched), b"edited after the reopen").unwrap();
    assert_eq!(reopened.run(&reopened.sync_task(false)).await, Outcome::Ack);
    let synced = reopened.last_of::<WorkspaceSynced>();
    assert_eq!(synced.uploaded, 1);
    assert_eq!(synced.conflicts, 0, "{synced:?}");
    assert_eq!(reopened.remote().await[&untouched], b"edited after the reopen");
    assert!(reopened.events_of("workspace.conflict").is_empty());
    reopened.cleanup();
    backend.cleanup().await;
}

/// The cache is keyed by user and workspace: another user's session of a workspace with the same
/// name, and the same user's other workspace, start cold and leave the entry alone.
async fn another_user_or_workspace_never_gets_the_cache(backend: Backend) {
    let alice = Harness::with_profile(&backend, CollectedEvents::new(), quick_settings(), cached(256));
    alice.seed(&BTreeMap::from([("secret.txt".to_owned(), b"alice's".to_vec())])).await;
    assert_eq!(alice.run(&alice.materialize_task()).await, Outcome::Ack);
    close_into_cache(&alice).await;

    let bob = Harness { user: format!("{}-bob", alice.user), ..alice.other_session() };
    assert_eq!(bob.run(&bob.materialize_task()).await, Outcome::Ack);
    let complete = bob.last_of::<WorkspaceComplete>();
    assert_eq!(complete.cache, None);
    assert!(!bob.directory().join("secret.txt").exists(), "bob never sees alice's files");
    let other_workspace = Harness { workspace: "case-2".into(), ..alice.other_session() };
    assert_eq!(other_workspace.run(&other_workspace.materialize_task()).await, Outcome::Ack);
    assert_eq!(other_workspace.last_of::<WorkspaceComplete>().cache, None);
    assert!(!other_workspace.directory().join("secret.txt").exists());
    assert_eq!(cache_entries(&alice).len(), 1, "alice's entry is still there");

    let alice_again = alice.other_session();
    assert_eq!(alice_again.run(&alice_again.materialize_task()).await, Outcome::Ack);
    assert_eq!(alice_again.last_of::<WorkspaceComplete>().cache.map(|cache| cache.kept_files), Some(1));
    assert_eq!(std::fs::read(alice_again.directory().join("secret.txt")).unwrap(), b"alice's");
    alice.cleanup();
    backend.cleanup().await;
}

/// Beyond the budget the least recently closed workspace goes; a reopen of it is cold and
/// still complete. Plain directories: an entry's size is its files' bytes.
async fn the_least_recently_closed_is_evicted_beyond_the_budget(backend: Backend) {
    let base = Harness::with_profile(&backend, CollectedEvents::new(), quick_settings(), plain_directories(1));
    let mut sessions = Vec::new();
    for name in ["case-a", "case-b", "case-c"] {
        let harness = Harness { workspace: name.into(), ..base.other_session() };
        harness.seed(&BTreeMap::from([("big.bin".to_owned(), content(7, 400 * 1024))])).await;
        assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
        close_into_cache(&harness).await;
        sessions.push(harness);
    }
    // 3 × 400 KiB against 1 MiB: the first closed is evicted.
    assert_eq!(cache_entries(&base).len(), 2);
    let reopen_a = Harness { workspace: "case-a".into(), ..base.other_session() };
    assert_eq!(reopen_a.run(&reopen_a.materialize_task()).await, Outcome::Ack);
    let complete = reopen_a.last_of::<WorkspaceComplete>();
    assert_eq!(complete.cache, None, "evicted: cold");
    assert_eq!(complete.downloaded_files, 1);
    assert_eq!(std::fs::read(reopen_a.directory().join("big.bin")).unwrap(), content(7, 400 * 1024));
    let reopen_c = Harness { workspace: "case-c".into(), ..base.other_session() };
    assert_eq!(reopen_c.run(&reopen_c.materialize_task()).await, Outcome::Ack);
    let complete = reopen_c.last_of::<WorkspaceComplete>();
    assert_eq!(complete.cache.as_ref().map(|cache| cache.kept_files), Some(1));
    assert_eq!(complete.downloaded_files, 0);

    // What an interrupted move into or out of the cache leaves is deleted at start; whole
    // entries within the budget stay.
    let cache_root = base.profile.deployment_root().join(workspace::CACHE_DIR);
    for leftover in [".incoming-s-1", ".adopting-s-2", ".evicting-3"] {
        std::fs::create_dir_all(cache_root.join(leftover).join("workspace")).unwrap();
        std::fs::write(cache_root.join(leftover).join("workspace/file.txt"), b"covered by a confirmed final sync").unwrap();
    }
    assert_eq!(base.agent.tend_cache_at_start().await.unwrap(), 3);
    assert_eq!(std::fs::read_dir(&cache_root).unwrap().count(), 1, "only case-b's entry is left");

    // A budget of 0 (a restarted agent with a new profile) empties the cache.
    let without_cache = WorkspaceAgent::new(
        Profile {
            workspace: protocol::profile::WorkspaceSettings { cache_mib: 0, ..base.profile.workspace.clone() },
            ..base.profile.clone()
        },
        base.store.clone(),
        base.events.clone(),
        quick_settings(),
    );
    assert_eq!(without_cache.tend_cache_at_start().await.unwrap(), 1, "case-b's entry");
    assert!(cache_entries(&base).is_empty());
    base.cleanup();
    backend.cleanup().await;
}

/// A listing that fails serves nothing from the cache (the entry stays for a later reopen that
/// can list); a cached directory that is not what its final sync left (a file the manifest does
/// not know) is never served: the reopen is cold, into a fresh directory, and the odd copy is
/// kept aside in the preserved area.
async fn the_cache_is_served_only_after_a_good_listing_and_a_clean_check(backend: Backend) {
    let first = Harness::with_profile(&backend, CollectedEvents::new(), quick_settings(), plain_directories(256));
    first.seed(&BTreeMap::from([("a.txt".to_owned(), b"one".to_vec()), ("b.txt".to_owned(), b"two".to_vec())])).await;
    assert_eq!(first.run(&first.materialize_task()).await, Outcome::Ack);
    close_into_cache(&first).await;

    first.counting.failing_lists.store(true, Ordering::SeqCst);
    let blind = first.other_session();
    assert_eq!(blind.run(&blind.materialize_task()).await, Outcome::Ack);
    assert!(blind.events_of("workspace.complete").is_empty(), "{:?}", blind.event_types());
    assert_eq!(blind.last_of::<WorkspaceFailed>().stage, "download");
    assert!(!blind.directory().join("a.txt").exists(), "nothing served without a listing");
    assert_eq!(cache_entries(&first).len(), 1, "the entry waits for a reopen that can list");
    first.counting.failing_lists.store(false, Ordering::SeqCst);

    // A file the cached manifest does not list (it can't happen after a confirmed final sync).
    let entry = cache_entries(&first).pop().unwrap();
    std::fs::write(entry.join("workspace").join("stray.txt"), b"not in the manifest").unwrap();
    first.put("b.txt", b"changed elsewhere").await;
    let reopened = first.other_session();
    assert_eq!(reopened.run(&reopened.materialize_task()).await, Outcome::Ack);
    let complete = reopened.last_of::<WorkspaceComplete>();
    assert_eq!(complete.cache, None, "not served: {complete:?}");
    assert_eq!(complete.downloaded_files, 2);
    assert_eq!(
        local_files(&reopened.directory()),
        BTreeMap::from([("a.txt".to_owned(), b"one".to_vec()), ("b.txt".to_owned(), b"changed elsewhere".to_vec())])
    );
    let preserved: Vec<_> = std::fs::read_dir(reopened.preserved()).unwrap().flatten().map(|entry| entry.path()).collect();
    assert_eq!(preserved.len(), 1, "{preserved:?}");
    assert_eq!(std::fs::read(preserved[0].join("workspace/stray.txt")).unwrap(), b"not in the manifest");
    assert!(cache_entries(&first).is_empty());
    first.cleanup();
    backend.cleanup().await;
}

/// A failed session (`remove {}`, as recovery and the failing path send it) and a budget of 0
/// delete as before: nothing is cached.
async fn without_the_cache_flag_or_budget_nothing_is_cached(backend: Backend) {
    let harness = Harness::with_profile(&backend, CollectedEvents::new(), quick_settings(), cached(256));
    harness.seed(&fixture(5, 0)).await;
    assert_eq!(harness.run(&harness.materialize_task()).await, Outcome::Ack);
    assert_eq!(harness.run(&harness.sync_task(true)).await, Outcome::Ack);
    assert_eq!(harness.run(&harness.task("remove", json!({}))).await, Outcome::Ack);
    assert!(!harness.directory().exists());
    assert!(cache_entries(&harness).is_empty());
    let no_budget = Harness::with_profile(&backend, CollectedEvents::new(), quick_settings(), cached(0));
    no_budget.seed(&fixture(5, 0)).await;
    assert_eq!(no_budget.run(&no_budget.materialize_task()).await, Outcome::Ack);
    close_into_cache(&no_budget).await;
    assert!(cache_entries(&no_budget).is_empty());
    harness.cleanup();
    no_budget.cleanup();
    backend.cleanup().await;
}

mod cache_on_s3 {
    macro_rules! on_s3 {
        ($($suite:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $suite() {
                    super::$suite(super::Backend::s3().await.expect("moto S3 server on 127.0.0.1:9000")).await;
                }
            )*
        };
    }
    on_s3!(
        reopen_from_the_cache_fetches_only_what_changed_in_the_store,
        another_user_or_workspace_never_gets_the_cache,
        the_least_recently_closed_is_evicted_beyond_the_budget,
        the_cache_is_served_only_after_a_good_listing_and_a_clean_check,
        without_the_cache_flag_or_budget_nothing_is_cached,
    );
}
