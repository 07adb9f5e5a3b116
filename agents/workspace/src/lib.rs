//! The workspace agent: materializes workspaces from object storage into a session's host
//! directory and syncs them back, verified, so that no file is ever lost.
//!
//! `berth agent workspace` consumes `berth.agent.workspace` ([`run`]); [`WorkspaceAgent`] is the
//! handler (tests call it directly); [`bench`] is `berth bench workspace`.
//!
//! Where things live: everything of a deployment is under `Profile::deployment_root()`. The
//! workspace is `Profile::session_dir(session)` (bind-mounted into the container); its manifest is
//! `<deployment_root>/.berth-manifests/<session>.json`, downloads are staged in
//! `<deployment_root>/.berth-staging/<session>/` and what can't be stored is kept at `remove` in
//! `<deployment_root>/.berth-preserved/<session>/`, all outside what the container sees.

mod agent;
mod bench;
mod conditional;
pub mod fixture;
mod error;
mod events;
mod fsops;
mod inventory;
mod keys;
mod manifest;
mod store;
mod tree;
mod volume;

use std::future::Future;
use std::sync::Arc;

use protocol::{topology, AgentKind, Bus, BusConfig, ConsumeSpec, Profile};

pub use agent::{conflict_copy_path, error_policy, locate, read_manifest, session_directory, Location, AgentSettings, ConflictRecord, SyncKind, SyncReport, WorkspaceAgent};
pub use bench::{run_with as bench_with_settings, BenchReport};
pub use error::{Error, Result};
pub use events::{BusEvents, CollectedEvents, EventSink, Reply, EVENT_SOURCE};
pub use fsops::{read_and_hash, scan, scan_within, Confined, ScanLimits, FolderEntry, Ownership, Placed, Placement, Removal, Scan, StagedFile};
pub use keys::WorkspacePath;
pub use manifest::{FileEntry, FinalSync, Manifest, Phase, MANIFESTS_DIR, PRESERVED_DIR, STAGING_DIR};
pub use tree::{Mode, Tree, SIDECAR_PATH};
pub use volume::{image_bytes, is_attached, unmount_all_under, Volume, IMAGES_DIR};
pub use store::{open as open_store, OpenedStore, StoreSettings};

/// Makes (if needed) and mounts one session's file system, as `materialize` does (tools, figures).
pub fn attach_volume(volume: &Volume, quota_bytes: u64, owner: Option<Ownership>) -> Result<bool> {
    volume::attach(volume, quota_bytes, owner, true)
}

/// Unmounts and deletes one session's file system, as `remove` does (tools, figures).
pub fn release_volume(volume: &Volume) -> Result<()> {
    volume::release(volume)
}

/// Consumes `queue` with `agent` until `shutdown` completes.
pub async fn serve(agent: Arc<WorkspaceAgent>, bus: &Bus, queue: &str, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let prefetch = u16::try_from(agent.profile().workspace.parallelism.clamp(1, 64)).unwrap_or(8);
    let spec = ConsumeSpec::new(queue, prefetch);
    bus.consume(
        spec,
        move |incoming| {
            let agent = agent.clone();
            async move { agent.handle_message(&incoming.body).await }
        },
        shutdown,
    )
    .await?;
    Ok(())
}

/// Runs `berth agent workspace` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    if profile.workspace.filesystem == protocol::profile::WorkspaceFilesystem::Image && !rustix::process::geteuid().is_root() {
        anyhow::bail!(
            "workspace.filesystem = \"image\" mounts an ext4 image per session, which needs root (CAP_SYS_ADMIN and /dev/loop*); \
             this agent runs as uid {}: run it as root, or set workspace.filesystem = \"directory\" (the quota is then checked at sync only)",
            rustix::process::geteuid().as_raw()
        );
    }
    let store = store::open(&profile.services.object_store_url, &StoreSettings::from_env())?;
    tokio::fs::create_dir_all(profile.deployment_root()).await?;
    let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "berth-agent-workspace")).await?;
    bus.declare_topology().await?;
    tracing::info!(store = %store.url, root = %profile.services.workspace_root.display(), "workspace agent starting");
    let events = Arc::new(BusEvents { bus: bus.clone() });
    let mut settings = AgentSettings::standard();
    if let Some(interval) = protocol::profile::seconds_from_env(protocol::profile::INVENTORY_INTERVAL_ENV).map_err(anyhow::Error::msg)? {
        settings.inventory_interval = interval;
    }
    let agent = Arc::new(WorkspaceAgent::new(profile, store, events, settings));
    // After a reboot or a restart the images are there but not mounted: mount them before
    // anything looks at a workspace (the first inventory, the first task).
    let attached = agent.attach_images().await?;
    tracing::info!(attached, "workspace images mounted");
    let inventory = tokio::spawn({
        let agent = agent.clone();
        async move { agent.inventory_loop().await }
    });
    let quotas = tokio::spawn({
        let agent = agent.clone();
        async move { agent.quota_loop().await }
    });
    let served = serve(agent, &bus, &topology::agent_queue(AgentKind::Workspace), shutdown).await;
    inventory.abort();
    quotas.abort();
    bus.close().await;
    served
}

/// `berth bench workspace`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    bench::run(profile).await
}
