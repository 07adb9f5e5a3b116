//! The warm pool on this host: slot containers made ahead of demand, and their claim by a session.
//!
//! A slot is a container `berth-pool-<slot>` labelled `berth.pool.slot` (and no session, user or
//! workspace: labels are fixed at creation), an empty directory `Profile::pool_slot_dir` bind-mounted
//! as its workspace, and an identity folder `Profile::pool_identity_dir` mounted read-only at
//! `POOL_IDENTITY_MOUNT`. It is made ready (its health check answers) and then paused.
//!
//! The engine decides which session gets which slot, atomically with the session's thred, and says
//! so in the `provision` task. The claim here: write the session's identity into the identity
//! folder (the container reads it there once unpaused; its environment was fixed before the session
//! existed), rename the container `berth-<session>` (so every later task finds it by name as if it
//! had been made for the session), then unpause and check readiness as `provision` does for any
//! paused container. The workspace agent has already renamed the slot directory into the session
//! directory: the container's mount follows the rename.
//!
//! The identity file is also the host-side record of the claim: a pool container under a
//! session's name is that session's only if its identity file names the session and its user.

use std::path::Path;

use bollard::container::{CreateContainerOptions, RenameContainerOptions, StartContainerOptions};
use bollard::models::ContainerStateStatusEnum;
use protocol::events::{PoolSlotFailed, PoolSlotReady, PoolSlotRemoved};
use protocol::{CloudEvent, Profile, Task};
use serde::{Deserialize, Serialize};

use super::{answer, container_labels, container_status, docker_message, elapsed_ms, failed, Agent, Failure, Refusal};
use crate::error::{docker_status, Error, Result};
use crate::spec::{self, SessionIdentity};

/// What a claimed slot's identity file says (`/run/berth/session.json` inside the container).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Claim {
    pub session: String,
    pub user: String,
    pub workspace: String,
    pub profile: String,
    pub slot: String,
}

fn identity_file(profile: &Profile, slot: &str) -> std::path::PathBuf {
    profile.pool_identity_dir(slot).join(protocol::profile::POOL_IDENTITY_FILE)
}

/// The claim recorded for `slot` on this host, if any.
pub(super) fn read_claim(profile: &Profile, slot: &str) -> Option<Claim> {
    let text = std::fs::read(identity_file(profile, slot)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// A pool container found under `identity`'s session name must have been claimed by it.
pub(super) fn check_claim(profile: &Profile, slot: &str, identity: &SessionIdentity) -> Result<(), String> {
    match read_claim(profile, slot) {
        Some(claim) if claim.session == identity.session && claim.user == identity.user => Ok(()),
        Some(_) => Err(format!("the pool container of slot {slot} was claimed by another session")),
        None => Err(format!("the pool container of slot {slot} carries a session's name but no claim")),
    }
}

/// Writes the claim atomically (a reader sees the old file or the whole new one).
fn write_claim(profile: &Profile, claim: &Claim) -> std::io::Result<()> {
    let folder = profile.pool_identity_dir(&claim.slot);
    std::fs::create_dir_all(&folder)?;
    let staged = folder.join(format!(".{}.tmp", protocol::profile::POOL_IDENTITY_FILE));
    let bytes = serde_json::to_vec_pretty(claim).map_err(std::io::Error::other)?;
    std::fs::write(&staged, bytes)?;
    set_mode(&staged, 0o644)?;
    std::fs::rename(&staged, identity_file(profile, &claim.slot))
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Removes what a slot has on the host outside its container: the slot directory (which never
/// holds user data: a claim renames it away before anything is materialized) and the identity
/// folder. Gone already is fine.
pub(super) fn remove_slot_folders(profile: &Profile, slot: &str) {
    for folder in [profile.pool_slot_dir(slot), profile.pool_identity_dir(slot)] {
        match std::fs::remove_dir_all(&folder) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(slot, folder = %folder.display(), %error, "could not remove a pool slot's folder"),
        }
    }
}

impl Agent {
    /// `pool_create`: answered `container.pool_slot_ready` once the slot's container answers its health
    /// check and is paused, or `container.pool_slot_failed` (everything of the slot removed again).
    pub(super) async fn pool_create_answer(&self, task: &Task, slot: &str) -> Result<CloudEvent> {
        let began = std::time::Instant::now();
        match self.pool_create(slot).await {
            Ok((container_id, port)) => {
                tracing::info!(slot, container_id = %container_id, ms = elapsed_ms(began), "pool slot ready (paused)");
                Ok(answer(task, &PoolSlotReady { slot: slot.to_owned(), container_id, port }))
            }
            Err(Failure::Unanswered(error)) => Err(Error::from_docker(error)),
            Err(Failure::Refused(Refusal(reason)) | Failure::NotOurs(Refusal(reason))) => {
                tracing::warn!(slot, %reason, "pool slot not made; removing what there is of it");
                if let Err(error) = self.remove_pool_container(slot).await {
                    tracing::warn!(slot, %error, "could not remove the failed pool container");
                }
                remove_slot_folders(&self.inner.profile, slot);
                Ok(answer(task, &PoolSlotFailed { slot: slot.to_owned(), error: reason }))
            }
        }
    }

    async fn pool_create(&self, slot: &str) -> Result<(String, u16), Failure> {
        let profile = &self.inner.profile;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(profile.container.ready_timeout_secs);
        self.ensure_network().await?;
        if read_claim(profile, slot).is_some() {
            return Err(Refusal(format!("slot {slot} was claimed already; a claimed slot is never made again")).into());
        }
        for folder in [profile.pool_slot_dir(slot), profile.pool_identity_dir(slot)] {
            std::fs::create_dir_all(&folder)
                .and_then(|()| set_mode(&folder, 0o755))
                .map_err(|error| Refusal(format!("cannot create {}: {error}", folder.display())))?;
        }
        let name = spec::pool_container_name(slot);
        let config = spec::pool_container_config(profile, slot, &self.inner.settings.extra_labels);
        let options = CreateContainerOptions { name: name.clone(), platform: None };
        match self.inner.docker.create_container(Some(options), config).await {
            Ok(_) => {}
            // A redelivered task: the container exists. Only this slot's may be used.
            Err(error) if docker_status(&error) == Some(409) => {
                let inspected = self.inner.docker.inspect_container(&name, None).await?;
                let labels = container_labels(&inspected);
                if !spec::is_deployment_container(&labels, profile) || labels.get(spec::POOL_SLOT_LABEL).map(String::as_str) != Some(slot) {
                    return Err(Failure::NotOurs(Refusal(format!("a container named {name} exists but is not slot {slot}'s"))));
                }
                if container_status(&inspected) == ContainerStateStatusEnum::PAUSED {
                    let port = super::published_port(&inspected, &spec::service_port_key(&profile.container)).unwrap_or(0);
                    return Ok((inspected.id.unwrap_or_default(), port));
                }
            }
            Err(error) if docker_status(&error) == Some(404) => {
                return Err(Refusal(format!(
                    "image {} is not available on this Docker engine ({})",
                    profile.container.image,
                    docker_message(&error)
                ))
                .into())
            }
            Err(error) => return Err(error.into()),
        }
        match self.inner.docker.start_container(&name, None::<StartContainerOptions<String>>).await {
            Ok(()) => {}
            Err(error) if docker_status(&error) == Some(304) => {}
            Err(error) => return Err(Refusal(format!("start failed: {}", docker_message(&error))).into()),
        }
        let (container_id, port) = self.wait_until_ready(&name, deadline).await?;
        // Paused, it holds its memory and no CPU; a claim unpauses it in milliseconds.
        match self.inner.docker.pause_container(&container_id).await {
            Ok(()) => {}
            Err(error) if docker_status(&error) == Some(409) => {}
            Err(error) => return Err(error.into()),
        }
        Ok((container_id, port))
    }

    /// `pool_remove`: the slot's container goes if it is still under its pool name (unclaimed),
    /// and so do the slot's folders unless a claim was recorded (then they are the session's, and
    /// its own exit removes them). Answered `container.pool_slot_removed`.
    pub(super) async fn pool_remove_answer(&self, task: &Task, slot: &str) -> Result<CloudEvent> {
        if let Err(error) = self.remove_pool_container(slot).await {
            if super::is_docker_answer(&error) {
                return Ok(failed(task, "pool_remove", docker_message(&error)));
            }
            return Err(Error::from_docker(error));
        }
        let claimed = read_claim(&self.inner.profile, slot).is_some();
        if !claimed {
            remove_slot_folders(&self.inner.profile, slot);
        }
        Ok(answer(task, &PoolSlotRemoved { slot: slot.to_owned(), claimed }))
    }

    async fn remove_pool_container(&self, slot: &str) -> Result<(), bollard::errors::Error> {
        let name = spec::pool_container_name(slot);
        let inspected = match self.inner.docker.inspect_container(&name, None).await {
            Ok(inspected) => inspected,
            Err(error) if docker_status(&error) == Some(404) => return Ok(()),
            Err(error) => return Err(error),
        };
        let labels = container_labels(&inspected);
        if !spec::is_deployment_container(&labels, &self.inner.profile)
            || labels.get(spec::POOL_SLOT_LABEL).map(String::as_str) != Some(slot)
        {
            tracing::warn!(container = %name, "not removing a container that is not this slot's");
            return Ok(());
        }
        self.force_remove(&inspected.id.unwrap_or_default()).await
    }

    /// `claim`: the claim of `slot` for `identity`'s session on its own, while the workspace agent
    /// materializes into the slot's directory (the container stays paused: nothing runs before
    /// the files are in place). Answered `container.claimed` (the container is under the
    /// session's name, or gone: `provision` then opens cold on the session directory), or
    /// `container.failed` with `action: "claim"` when the slot is another session's.
    pub(super) async fn claim_answer(&self, task: &Task, identity: &SessionIdentity, slot: &str) -> Result<CloudEvent> {
        if let Some(refused) = self.claim_pool_container(task, identity, slot).await? {
            return Ok(refused);
        }
        Ok(answer(task, &protocol::events::ContainerClaimed { slot: slot.to_owned() }))
    }

    /// The claim of `slot` for `identity`'s session, before `provision` finds the container by the
    /// session's name. `Ok(None)`: go on provisioning (claimed now or earlier, or the slot's
    /// container is gone and the open goes cold on the session directory); `Some(event)`: refused.
    /// Two Docker calls at most: the rename answers whether the slot's container exists (404) or
    /// the session's does already (409), and `provision`'s own inspection checks the labels and
    /// the claim before anything is unpaused.
    pub(super) async fn claim_pool_container(&self, task: &Task, identity: &SessionIdentity, slot: &str) -> Result<Option<CloudEvent>> {
        let profile = &self.inner.profile;
        if let Some(other) = read_claim(profile, slot).filter(|claim| claim.session != identity.session) {
            return Ok(Some(failed(task, &task.action, format!("slot {slot} is claimed by session {} already", other.session))));
        }
        let claim = Claim {
            session: identity.session.clone(),
            user: identity.user.clone(),
            workspace: identity.workspace.clone(),
            profile: profile.name.clone(),
            slot: slot.to_owned(),
        };
        let written = {
            let (profile, claim) = (profile.clone(), claim.clone());
            tokio::task::spawn_blocking(move || write_claim(&profile, &claim)).await
        };
        let refusal = |error: String| Ok(Some(failed(task, &task.action, format!("cannot write the slot's identity file: {error}"))));
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return refusal(error.to_string()),
            Err(error) => return refusal(error.to_string()),
        }
        let (pool_name, session_name) = (spec::pool_container_name(slot), spec::container_name(&identity.session));
        match self.inner.docker.rename_container(&pool_name, RenameContainerOptions { name: session_name }).await {
            Ok(()) => tracing::info!(session_id = %identity.session, slot, "pool container claimed"),
            // Renamed by an earlier attempt (provision finds it under the session's name), or gone
            // (provision makes a container on the session directory: a cold open).
            Err(error) if docker_status(&error) == Some(404) => {
                tracing::info!(session_id = %identity.session, slot, "no container under the slot's name: claimed before, or gone");
            }
            // The session's container exists already (a redelivery): provision checks whose it is.
            Err(error) if docker_status(&error) == Some(409) => {}
            Err(error) => return Err(Error::from_docker(error)),
        }
        Ok(None)
    }
}
