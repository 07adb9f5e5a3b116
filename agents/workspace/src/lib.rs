//! The workspace agent: materializes workspaces from object storage into a session's host
//! directory and syncs them back, verified, so that no file is ever lost.
//!
//! `berth agent workspace` consumes `berth.agent.workspace` ([`run`]); [`WorkspaceAgent`] is the
//! handler (tests and `berth bench workspace` call it directly).
//!
//! Where things live: everything of a deployment is under `Profile::deployment_root()`. The
//! workspace is `Profile::session_dir(session)` (bind-mounted into the container); its manifest is
//! `<deployment_root>/.berth-manifests/<session>.json`, downloads are staged in
//! `<deployment_root>/.berth-staging/<session>/` and what can't be stored is kept at `remove` in
//! `<deployment_root>/.berth-preserved/<session>/`, all outside what the container sees. Closed
//! workspaces the host keeps for a reopen are in `<deployment_root>/.berth-cache/` (`cache.rs`).

mod agent;
mod cache;
mod conditional;
mod error;
mod events;
mod fsops;
mod inventory;
mod keys;
mod manifest;
mod plan;
mod store;
mod tree;
mod volume;

use std::future::Future;
use std::sync::Arc;

use protocol::{topology, AgentKind, Bus, BusConfig, ConsumeSpec, Profile};

pub use agent::{
    conflict_copy_path, error_policy, locate, read_manifest, session_directory, AgentSettings, ConflictRecord, Location, SyncKind,
    SyncReport, WorkspaceAgent,
};
pub use cache::CACHE_DIR;
pub use error::{Error, Result};
pub use events::{BusEvents, CollectedEvents, EventSink, Reply, EVENT_SOURCE};
pub use fsops::{
    read_and_hash, scan, scan_within, Confined, FolderEntry, Ownership, Placed, Placement, Removal, Scan, ScanLimits, StagedFile,
};
pub use keys::WorkspacePath;
pub use manifest::{FileEntry, FinalSync, Manifest, Phase, MANIFESTS_DIR, PRESERVED_DIR, STAGING_DIR};
pub use store::{open as open_store, OpenedStore, StoreSettings};
pub use tree::{Mode, Tree, SIDECAR_PATH};
pub use volume::{image_bytes, is_attached, unmount_all_under, Volume, IMAGES_DIR};

/// Makes (if needed) and mounts one session's file system, as `materialize` does (tools, figures).
pub fn attach_volume(volume: &Volume, quota_bytes: u64, owner: Option<Ownership>) -> Result<bool> {
    volume::attach(volume, quota_bytes, owner, true)
}

/// Unmounts and deletes one session's file system, as `remove` does (tools, figures).
pub fn release_volume(volume: &Volume) -> Result<()> {
    volume::release(volume)
}

/// Deletes every entry of this deployment's workspace cache, so the next open of each workspace
/// is cold (benchmarks; an operator freeing the disk). Only between tasks: an entry being taken
/// at this moment would be lost to that materialize (it then downloads everything). Blocking.
pub fn clear_cache(profile: &Profile) -> Result<usize> {
    let root = profile.deployment_root();
    let mut cleared = 0;
    for entry in cache::list(&root)? {
        cache::discard(&entry.folder)?;
        cleared += 1;
    }
    Ok(cleared)
}

/// The (user, workspace) of every entry of this deployment's workspace cache. Blocking.
pub fn cached_workspaces(profile: &Profile) -> Result<Vec<(String, String)>> {
    Ok(cache::list(&profile.deployment_root())?
        .into_iter()
        .filter_map(|entry| entry.record)
        .map(|record| (record.user, record.workspace))
        .collect())
}

/// Consumes `queue` with `agent` until `shutdown` completes.
pub async fn serve(agent: Arc<WorkspaceAgent>, bus: &Bus, queue: &str, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let prefetch = u16::try_from(agent.profile().workspace.parallelism.clamp(1, 64)).unwrap_or(8);
    let spec = ConsumeSpec::new(queue, prefetch);
    bus.consume(
        spec,
        move |incoming| {
            let agent = agent.clone();
            async move {
                if let Err(reason) = protocol::identity::check_task_sender(protocol::AgentKind::Workspace, &incoming.sender) {
                    return protocol::Outcome::DeadLetter(reason);
                }
                agent.handle_message(&incoming.body).await
            }
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
    let bus =
        Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Workspace, "berth-agent-workspace")?).await?;
    bus.declare_topology().await?;
    let exporter = protocol::metrics::Exporter::start(&profile, bus.metrics_registry("berth_workspace")).await?;
    tracing::info!(store = %store.url, root = %profile.services.workspace_root.display(), "workspace agent starting");
    let events = Arc::new(BusEvents { bus: bus.clone(), host: profile.host() });
    let mut settings = AgentSettings::standard();
    if let Some(interval) = protocol::profile::seconds_from_env(protocol::profile::INVENTORY_INTERVAL_ENV).map_err(anyhow::Error::msg)? {
        settings.inventory_interval = interval;
    }
    let agent = Arc::new(WorkspaceAgent::new(profile, store, events, settings));
    // After a reboot or a restart the images are there but not mounted: mount them before
    // anything looks at a workspace (the first inventory, the first task).
    let attached = agent.attach_images().await?;
    tracing::info!(attached, "workspace images mounted");
    let tended = agent.tend_cache_at_start().await?;
    tracing::info!(tended, cache_mib = agent.profile().workspace.cache_mib, "workspace cache tidied");
    let report_interval = protocol::host::report_interval_from_env().map_err(anyhow::Error::msg)?;
    let host = agent.profile().host();
    let host_queue = bus.declare_host_queue(topology::TASKS_EXCHANGE, AgentKind::Workspace, &host).await?;
    tracing::info!(host = %host, queue = %host_queue, "workspace agent serving its host's queue and the shared one");
    let mut background = protocol::supervise::Background::new();
    background.spawn("inventory", {
        let agent = agent.clone();
        async move { agent.inventory_loop().await }
    });
    background.spawn("quota watch", {
        let agent = agent.clone();
        async move { agent.quota_loop().await }
    });
    background.spawn("host reporter", report_host_periodically(agent.clone(), bus.clone(), report_interval));
    let shared_queue = topology::agent_queue(AgentKind::Workspace);
    let serve_both = |stop: protocol::supervise::Stop| async {
        let (served, served_host) = tokio::join!(
            serve(agent.clone(), &bus, &shared_queue, stop.clone().stopped()),
            serve(agent.clone(), &bus, &host_queue, stop.stopped())
        );
        served.and(served_host)
    };
    let served = background.supervise(shutdown, serve_both).await.map_err(anyhow::Error::new).and_then(|served| served);
    if let Some(exporter) = exporter {
        exporter.stop().await?;
    }
    bus.close().await;
    served
}

/// Publishes this host's `workspace.host_report` with the workspaces it holds a copy of
/// (`user/workspace` of every directory it lists and every entry of its workspace cache) now and
/// every `interval`: the engine places a session on a host that has its workspace first.
async fn report_host_periodically(agent: Arc<WorkspaceAgent>, bus: Bus, interval: std::time::Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let directories = match agent.inventory().await {
            Ok(directories) => directories,
            Err(error) => {
                tracing::warn!(%error, "could not list the workspaces for the host report");
                continue;
            }
        };
        let mut workspaces: Vec<String> =
            directories.iter().filter_map(|entry| Some(format!("{}/{}", entry.user.as_ref()?, entry.workspace.as_ref()?))).collect();
        // And the closed workspaces the host's cache keeps for a reopen (this profile's).
        let root = agent.profile().deployment_root();
        let profile_name = agent.profile().name.clone();
        let cached = tokio::task::spawn_blocking(move || cache::list(&root)).await;
        match cached {
            Ok(Ok(listed)) => workspaces.extend(
                listed
                    .into_iter()
                    .filter_map(|entry| entry.record)
                    .filter(|record| record.profile == profile_name)
                    .map(|record| format!("{}/{}", record.user, record.workspace)),
            ),
            Ok(Err(error)) => tracing::warn!(%error, "could not list the workspace cache for the host report"),
            Err(error) => tracing::warn!(%error, "could not list the workspace cache for the host report"),
        }
        workspaces.sort();
        workspaces.dedup();
        let profile = agent.profile();
        let report = protocol::host::HostReport {
            host: profile.host(),
            deployment: profile.deployment(),
            agent: AgentKind::Workspace,
            interval_secs: interval.as_secs().max(1),
            capacity: None,
            workspaces: Some(workspaces),
        };
        if let Err(error) = bus.publish_event(&report.to_event(EVENT_SOURCE)).await {
            tracing::warn!(%error, "could not publish the host report");
        }
    }
}
