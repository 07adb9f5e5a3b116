//! Image-backed workspaces (`workspace.filesystem = "image"`): a hard quota written into from a
//! real container, mounts that survive an unmount (a reboot), refusals instead of syncing an
//! empty mount point, the agent's caps, and the set-up/tear-down figures. Needs root, Docker and
//! the `berth-test/busybox` image (`scripts/test-images.sh`); the object store is a local folder.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::stats::{milliseconds, Latencies};
use object_store::path::Path as ObjectPath;
use object_store::PutPayload;
use protocol::events::{EventData, WorkspaceQuotaExceeded, WorkspaceRemoved, WorkspaceSyncFailed, WorkspaceSynced};
use protocol::profile::WorkspaceFilesystem;
use protocol::{AgentKind, CloudEvent, Outcome, Profile, Task};
use serde_json::{json, Value};
use uuid::Uuid;
use workspace::{AgentSettings, CollectedEvents, OpenedStore, StoreSettings, Volume, WorkspaceAgent};

const BUSYBOX: &str = "berth-test/busybox:latest";

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(error) = workspace::unmount_all_under(&self.0) {
            eprintln!("unmounting under {}: {error}", self.0.display());
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Setup {
    profile: Profile,
    store: OpenedStore,
    events: Arc<CollectedEvents>,
    agent: Arc<WorkspaceAgent>,
    user: String,
    _scratch: Scratch,
}

fn settings() -> AgentSettings {
    AgentSettings { final_sync_attempts: 2, final_sync_backoff_start: Duration::from_millis(50), ..AgentSettings::standard() }
}

fn setup(quota_mib: u64, filesystem: WorkspaceFilesystem, settings: AgentSettings) -> Setup {
    let scratch = std::env::temp_dir().join(format!("berth-img-test-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&scratch).unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../run-profiles/dev/profile.toml")).unwrap();
    let mut profile = Profile::parse(&text, Path::new("dev/profile.toml")).unwrap();
    profile.services.object_store_url = format!("file://{}", scratch.join("objects").display());
    std::fs::create_dir_all(scratch.join("objects")).unwrap();
    profile.services.workspace_root = scratch.join("workspaces");
    profile.workspace.quota_mib = quota_mib;
    profile.workspace.filesystem = filesystem;
    profile.workspace.skeleton = vec!["src".into()];
    profile.container.user = Some("1000:1000".into());
    let store = workspace::open_store(&profile.services.object_store_url, &StoreSettings::default()).unwrap();
    let events = Arc::new(CollectedEvents::new());
    let agent = Arc::new(WorkspaceAgent::new(profile.clone(), store.clone(), events.clone(), settings));
    let user = format!("u-{}", &Uuid::new_v4().simple().to_string()[..8]);
    Setup { profile, store, events, agent, user, _scratch: Scratch(scratch) }
}

impl Setup {
    fn task(&self, session: &str, action: &str, args: Value) -> Task {
        Task {
            id: Uuid::now_v7(),
            agent: AgentKind::Workspace,
            action: action.to_owned(),
            session: Some(session.to_owned()),
            thred: None,
            cause: None,
            args,
        }
    }

    async fn run(&self, session: &str, action: &str, workspace: &str, final_sync: bool) -> Outcome {
        let args = match action {
            "materialize" => json!({"user": self.user, "workspace": workspace}),
            "sync" => json!({"user": self.user, "workspace": workspace, "final": final_sync}),
            _ => json!({}),
        };
        self.agent.handle(&self.task(session, action, args)).await.expect("answered")
    }

    /// The data of `session`'s last event of `T`'s type.
    fn last<T: EventData>(&self, session: &str) -> T {
        let event = self.last_event(session, T::KIND);
        event.data_as().unwrap_or_else(|error| panic!("{error}: {}", event.data))
    }

    fn last_event(&self, session: &str, event_type: &str) -> CloudEvent {
        let events = self.events.events();
        let types: Vec<_> = events.iter().map(|event| event.event_type.clone()).collect();
        events
            .into_iter()
            .rev()
            .find(|event| event.event_type == event_type && event.subject.as_deref() == Some(session))
            .unwrap_or_else(|| panic!("no {event_type} for {session} among {types:?}"))
    }

    async fn put(&self, workspace: &str, relative: &str, content: &[u8]) {
        let prefix = ObjectPath::parse(self.profile.workspace_prefix(&self.user, workspace)).unwrap();
        let key: ObjectPath = self.store.root.parts().chain(prefix.parts()).chain(ObjectPath::parse(relative).unwrap().parts()).collect();
        self.store.store.put(&key, PutPayload::from(content.to_vec())).await.unwrap();
    }

    fn volume(&self, session: &str) -> Volume {
        Volume::of(&self.profile.deployment_root(), session)
    }
}

fn mounted(path: &Path) -> bool {
    let wanted = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|line| line.split(' ').nth(4) == Some(wanted.to_str().unwrap()))
}

fn free_bytes(path: &Path) -> u64 {
    let stats = rustix::fs::statvfs(path).unwrap();
    stats.f_bavail * stats.f_frsize
}

fn umount(path: &Path) {
    assert!(std::process::Command::new("umount").arg(path).status().unwrap().success(), "umount {}", path.display());
}

/// `dd` past the quota inside a real container: ENOSPC there, a `workspace.quota_exceeded`,
/// another session unaffected, the host's free space down by no more than the image, and the
/// full workspace still saved and removed like any other.
#[tokio::test(flavor = "multi_thread")]
async fn dd_past_the_quota_gets_enospc_and_nothing_else() {
    let setup = setup(32, WorkspaceFilesystem::Image, settings());
    setup.put("case", "notes.txt", b"before").await;
    let (full, other) = (format!("s-{}", Uuid::now_v7()), format!("s-{}", Uuid::now_v7()));
    assert_eq!(setup.run(&full, "materialize", "case", false).await, Outcome::Ack);
    assert_eq!(setup.run(&other, "materialize", "other", false).await, Outcome::Ack);
    let directory = setup.profile.session_dir(&full);
    assert!(mounted(&directory) && mounted(&setup.volume(&full).mount_point), "the session directory is its image's bind mount");
    assert_eq!(std::fs::read(directory.join("notes.txt")).unwrap(), b"before");
    let free_before = free_bytes(&setup.profile.deployment_root());

    let output = std::process::Command::new("docker")
        .args(["run", "--rm", "--user", "1000:1000", "--network", "none", "-v"])
        .arg(format!("{}:/workspace", directory.display()))
        .args([BUSYBOX, "dd", "if=/dev/zero", "of=/workspace/big", "bs=1M", "count=64"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "dd past the quota must fail: {stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let written = std::fs::metadata(directory.join("big")).unwrap().len();
    assert!((32 * 1024 * 1024..64 * 1024 * 1024).contains(&written), "{written} bytes: the quota and a little ext4 headroom");

    let host_used = free_before.saturating_sub(free_bytes(&setup.profile.deployment_root()));
    assert!(host_used <= workspace::image_bytes(32 * 1024 * 1024), "the host lost {host_used} bytes, more than the image");
    let other_directory = setup.profile.session_dir(&other);
    std::fs::write(other_directory.join("mine.txt"), vec![7u8; 4 * 1024 * 1024]).expect("another session writes as before");

    assert_eq!(setup.agent.check_quotas().await.unwrap(), vec![full.clone()]);
    let exceeded: WorkspaceQuotaExceeded = setup.last(&full);
    assert_eq!(exceeded.quota_mib, 32);
    assert!(exceeded.used_mib >= 32, "{exceeded:?}");
    assert!(setup.agent.check_quotas().await.unwrap().is_empty(), "once per filling");

    assert_eq!(setup.run(&full, "sync", "case", true).await, Outcome::Ack);
    let synced: WorkspaceSynced = setup.last(&full);
    assert_eq!((synced.final_sync, synced.uploaded), (true, 1), "{synced:?}");
    assert_eq!(setup.run(&full, "remove", "case", false).await, Outcome::Ack);
    setup.last::<WorkspaceRemoved>(&full);
    let volume = setup.volume(&full);
    assert!(!volume.image.exists() && !volume.mount_point.exists() && !directory.exists(), "image, mount point and directory gone");
    assert!(!mounted(&directory));
    // Room again after removal: the next filling is reported again (the other session is not full).
    assert!(setup.agent.check_quotas().await.unwrap().is_empty());
}

/// After a reboot (nothing mounted) the agent mounts the image again before it looks: a sync
/// finds every file, deletes nothing. An image that is gone is refused, never synced as empty.
#[tokio::test(flavor = "multi_thread")]
async fn an_unmounted_workspace_is_mounted_again_or_refused() {
    let setup = setup(16, WorkspaceFilesystem::Image, settings());
    for index in 0..5 {
        setup.put("case", &format!("src/file-{index}.txt"), format!("content {index}").as_bytes()).await;
    }
    let session = format!("s-{}", Uuid::now_v7());
    assert_eq!(setup.run(&session, "materialize", "case", false).await, Outcome::Ack);
    let volume = setup.volume(&session);
    umount(&volume.session_dir);
    umount(&volume.mount_point);
    assert!(std::fs::read_dir(&volume.session_dir).unwrap().next().is_none(), "an unmounted mount point is an empty folder");

    assert_eq!(setup.agent.attach_images().await.unwrap(), 1, "mounted again at start");
    assert!(mounted(&volume.session_dir));
    umount(&volume.session_dir);
    umount(&volume.mount_point);
    assert_eq!(setup.run(&session, "sync", "case", false).await, Outcome::Ack);
    let synced: WorkspaceSynced = setup.last(&session);
    assert_eq!((synced.deleted, synced.unchanged), (0, 5), "{synced:?}");

    umount(&volume.session_dir);
    umount(&volume.mount_point);
    let aside = volume.image.with_extension("aside");
    std::fs::rename(&volume.image, &aside).unwrap();
    assert_eq!(setup.run(&session, "sync", "case", true).await, Outcome::Ack);
    let failed: WorkspaceSyncFailed = setup.last(&session);
    assert!(failed.error.contains("image"), "{failed:?}");
    assert_eq!(setup.run(&session, "remove", "case", false).await, Outcome::Ack);
    assert!(setup.events.events().iter().all(|event| event.event_type != "workspace.removed"), "nothing removed without its image");
    let listed = setup.agent.inventory().await.unwrap();
    assert!(listed.iter().any(|entry| entry.session == session), "still listed: {listed:?}");

    std::fs::rename(&aside, &volume.image).unwrap();
    assert_eq!(setup.run(&session, "sync", "case", true).await, Outcome::Ack);
    let synced: WorkspaceSynced = setup.last(&session);
    assert_eq!((synced.final_sync, synced.deleted), (true, 0), "{synced:?}");
    assert_eq!(setup.run(&session, "remove", "case", false).await, Outcome::Ack);
    setup.last::<WorkspaceRemoved>(&session);
}

/// Over the cap on entries a sync is refused by name; folders past the depth cap are kept and
/// skipped; a file that grows while it is read is read to the size it had.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_is_bounded_too() {
    let setup = setup(64, WorkspaceFilesystem::Directory, AgentSettings { max_files: 50, max_path_depth: 4, ..settings() });
    let session = format!("s-{}", Uuid::now_v7());
    assert_eq!(setup.run(&session, "materialize", "case", false).await, Outcome::Ack);
    let directory = setup.profile.session_dir(&session);
    assert!(!mounted(&directory), "a plain directory with filesystem = directory");
    std::fs::create_dir_all(directory.join("a/b/c/d/e")).unwrap();
    std::fs::write(directory.join("a/b/c/shallow.txt"), b"kept").unwrap();
    std::fs::write(directory.join("a/b/c/d/e/deep.txt"), b"too deep").unwrap();
    assert_eq!(setup.run(&session, "sync", "case", false).await, Outcome::Ack);
    let synced: WorkspaceSynced = setup.last(&session);
    let skipped: Vec<_> = synced.skipped.iter().map(|entry| entry.path.clone()).collect();
    assert_eq!(skipped, vec!["a/b/c/d".to_owned()], "{synced:?}");
    assert_eq!(synced.uploaded, 1);

    for index in 0..60 {
        std::fs::write(directory.join(format!("many-{index}")), b"x").unwrap();
    }
    assert_eq!(setup.run(&session, "sync", "case", false).await, Outcome::Ack);
    let failed: WorkspaceSyncFailed = setup.last(&session);
    assert!(failed.error.contains("more than 50 entries"), "{failed:?}");

    let grown = directory.join("growing.log");
    std::fs::write(&grown, vec![1u8; 1000]).unwrap();
    let file = std::fs::File::open(&grown).unwrap();
    let size = file.metadata().unwrap().len();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&grown)
        .and_then(|mut appended| std::io::Write::write_all(&mut appended, &[2u8; 5000]))
        .unwrap();
    let (content, _) = workspace::read_and_hash(file, size).unwrap();
    assert_eq!(content.len(), 1000, "read to the size seen, not to wherever the file has grown");
}

/// Figures: making and mounting a session's file system, and unmounting and deleting it, for the
/// dev profile's 512 MiB quota; and a materialize of 500 files / 5 MB with and without it.
/// `cargo test -p workspace --release --test image figures -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "figures: a minute of mkfs and mounts"]
async fn figures() {
    let rounds = 40;
    let setup = setup(512, WorkspaceFilesystem::Image, settings());
    let root = setup.profile.deployment_root();
    let (mut made, mut released) = (Latencies::new(), Latencies::new());
    for _ in 0..rounds {
        let volume = Volume::of(&root, &format!("s-{}", Uuid::now_v7()));
        let started = Instant::now();
        workspace::attach_volume(&volume, 512 * 1024 * 1024, None).unwrap();
        made.record(started.elapsed());
        let started = Instant::now();
        workspace::release_volume(&volume).unwrap();
        released.record(started.elapsed());
    }
    println!(
        "image 512 MiB, {rounds} rounds: set-up (sparse file + mkfs.ext4 + 2 mounts) p50 {:.1} ms p99 {:.1} ms; tear-down (2 umounts + delete) p50 {:.1} ms p99 {:.1} ms",
        milliseconds(made.percentile(0.5)),
        milliseconds(made.percentile(0.99)),
        milliseconds(released.percentile(0.5)),
        milliseconds(released.percentile(0.99))
    );
    for filesystem in [WorkspaceFilesystem::Directory, WorkspaceFilesystem::Image] {
        let setup = setup_with_fixture(filesystem).await;
        let mut times = Latencies::new();
        for _ in 0..10 {
            let session = format!("s-{}", Uuid::now_v7());
            let started = Instant::now();
            assert_eq!(setup.run(&session, "materialize", "case", false).await, Outcome::Ack);
            times.record(started.elapsed());
            assert_eq!(setup.run(&session, "sync", "case", true).await, Outcome::Ack);
            assert_eq!(setup.run(&session, "remove", "case", false).await, Outcome::Ack);
        }
        println!(
            "materialize 500 files / 5 MB, {filesystem:?}: p50 {:.1} ms p99 {:.1} ms",
            milliseconds(times.percentile(0.5)),
            milliseconds(times.percentile(0.99))
        );
    }
}

async fn setup_with_fixture(filesystem: WorkspaceFilesystem) -> Setup {
    let setup = setup(512, filesystem, settings());
    for index in 0..500 {
        setup.put("case", &format!("src/{}/file-{index}.txt", index % 10), &vec![b'a' + (index % 26) as u8; 10_000]).await;
    }
    setup
}
