//! A host that comes back after its sessions failed over: the fence that keeps its old tasks off
//! the moved session's files, and `recover`, which saves its copy of such a session apart.
//!
//! **The fence.** A session reopened on another host after a failover materializes with
//! `fence: true`: before listing the store it writes `<prefix>/.berth/owner.json` (`{session,
//! host, at}`). Every sync reads it first; a sync of that same session from another host (a task
//! that waited on the gone host's queue and ran when it returned) is refused
//! ([`Error::Superseded`], answered `workspace.sync_failed {superseded: true}`), so nothing the
//! old host holds is written over the moved session's work. Another session of the workspace (a
//! later open) is not this session and syncs as usual. A sync that finds no fence costs one GET.
//!
//! **`recover {user, workspace, host, prefix}`.** The engine sends it to the returning host for a
//! directory of a session it moved off that host. The directory is synced, as a final sync, to
//! `recovered/<host>/<session>/` (the only prefix accepted, under the store's root, so it
//! replaces nothing of any workspace), confirmed by listing it back, then removed through the
//! ordinary `remove` (refused unless that confirmed sync covers everything; what can't be stored
//! is preserved), and answered `workspace.recovered {host, user, workspace, prefix, files, bytes,
//! preserved}`; only then does the engine remove the container there and tell the user.

use protocol::events::{WorkspaceRecovered, WorkspaceSyncFailed};
use protocol::tasks::WorkspaceRecover;
use serde::{Deserialize, Serialize};

use super::{Create, Keep, WorkspaceAgent};
use crate::error::{Error, Result};
use crate::events::Reply;
use crate::manifest::{self, Durability, Manifest, Phase};
use object_store::path::Path as ObjectPath;
use object_store::PutPayload;

/// The fence's key under a workspace's prefix (reserved: `.berth/` is never a workspace file).
pub const FENCE_PATH: &str = ".berth/owner.json";

/// Who writes a workspace now, as the moved session's materialize recorded it.
#[derive(Debug, Serialize, Deserialize)]
struct Fence {
    session: String,
    host: String,
    at: chrono::DateTime<chrono::Utc>,
}

/// How often a recover syncs again when the directory changed under it (its container may still
/// run): the engine sends `recover` again with the next inventory.
const RECOVER_ROUNDS: usize = 3;

fn fence_key(prefix: &ObjectPath) -> ObjectPath {
    prefix.parts().chain(ObjectPath::from(FENCE_PATH).parts()).collect()
}

impl WorkspaceAgent {
    /// Records that `session` on this host writes the workspace at `prefix` from now on.
    pub(super) async fn write_fence(&self, session: &str, prefix: &ObjectPath) -> Result<()> {
        let fence = Fence { session: session.to_owned(), host: self.profile.host(), at: chrono::Utc::now() };
        let body = serde_json::to_vec(&fence).map_err(|error| Error::BadTask(format!("fence: {error}")))?;
        self.store.store.put(&fence_key(prefix), PutPayload::from(body)).await?;
        tracing::info!(session, host = %fence.host, "fence written: this host writes the moved session's workspace from now on");
        Ok(())
    }

    /// Refuses a sync of `session` when the workspace's fence says that session lives on another
    /// host now.
    pub(super) async fn check_fence(&self, session: &str, prefix: &ObjectPath) -> Result<()> {
        let result = match self.store.store.get(&fence_key(prefix)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        let bytes = result.bytes().await?;
        let Ok(fence) = serde_json::from_slice::<Fence>(&bytes) else {
            tracing::warn!(session, "unreadable fence in the store; ignored");
            return Ok(());
        };
        let here = self.profile.host();
        if fence.session == session && fence.host != here {
            return Err(Error::Superseded(format!(
                "session {session} moved to host {} at {}; this host's copy is saved apart when the engine asks, never over its work",
                fence.host, fence.at
            )));
        }
        Ok(())
    }

    pub(super) async fn recover(&self, session: &str, args: WorkspaceRecover, reply: &Reply) -> Result<()> {
        let here = self.profile.host();
        if args.host != here {
            return Err(Error::BadTask(format!("recover for host {} sent to host {here}", args.host)));
        }
        let expected = format!("recovered/{here}/{session}");
        if args.prefix != expected {
            return Err(Error::BadTask(format!("recover prefix {:?}: only {expected:?} is accepted", args.prefix)));
        }
        let base = self.target(session, args.user.as_str(), args.workspace.as_str())?;
        let _guards = self.lock_workspace(&base).await;
        let relative = ObjectPath::parse(&expected).map_err(|error| Error::BadTask(format!("prefix {expected:?}: {error}")))?;
        let mut target = base.clone();
        target.prefix = self.store.root.parts().chain(relative.parts()).collect();
        self.prepare(&target, Create::No).await?;
        let exists = tokio::fs::symlink_metadata(&target.directory).await.is_ok();
        let loaded = self.load_manifest(&target).await?;
        let answer = |files: usize, bytes: u64, preserved: Vec<String>| {
            reply.event(&WorkspaceRecovered {
                host: here.clone(),
                user: args.user.clone(),
                workspace: args.workspace.clone(),
                prefix: expected.clone(),
                files: files as u64,
                bytes,
                preserved,
            })
        };
        if !exists {
            // Removed already (a redelivery after the answer was lost): the same answer again.
            let preserved = loaded.map(|manifest| manifest.preserved).unwrap_or_default();
            return self.events.emit(answer(0, 0, preserved)).await;
        }
        let resuming = loaded.as_ref().is_some_and(|manifest| manifest.phase == Phase::Removing);
        if !resuming {
            // The directory's bond to the workspace's own prefix is over: what it holds is saved as a
            // new copy, every file uploaded afresh (an object a cut-short attempt already stored
            // identically is adopted). The manifest keeps the workspace's prefix text, so removing
            // the directory clears its sibling marker.
            let mut fresh = Manifest::new(session, args.user.as_str(), args.workspace.as_str(), &self.profile.name, &base.prefix_text);
            fresh.phase = Phase::Complete;
            manifest::save(target.manifest_path.clone(), fresh, Durability::Flushed).await?;
        }
        let mut last_refusal = None;
        for round in 0..RECOVER_ROUNDS {
            if !resuming {
                self.final_sync(&target, uuid::Uuid::new_v4()).await?;
            }
            let saved = self.load_manifest(&target).await?;
            let (files, bytes) = saved.map(|manifest| (manifest.files.len(), manifest.total_bytes())).unwrap_or_default();
            match self.remove(session, Keep::Delete).await {
                Ok(preserved) => {
                    tracing::info!(session, prefix = %expected, round, preserved = preserved.len(),
                        "a moved session's copy on this host is saved apart and its directory removed");
                    return self.events.emit(answer(files, bytes, preserved)).await;
                }
                Err(Error::RemoveRefused(reason)) if !resuming => {
                    tracing::info!(session, %reason, "the directory changed while it was saved apart; saving again");
                    last_refusal = Some(reason);
                }
                Err(error) => return Err(error),
            }
        }
        let reason = last_refusal.unwrap_or_default();
        let data = WorkspaceSyncFailed {
            final_sync: true,
            error: format!("still changing after {RECOVER_ROUNDS} rounds: {reason}"),
            action: Some("recover".to_owned()),
        };
        self.events.emit(reply.event(&data)).await
    }
}
