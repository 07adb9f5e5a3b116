//! The warm pool on this host: slot containers made ahead of demand, and their claim by a session.
//!
//! A slot is a container `berth-pool-<slot>` labelled `berth.pool.slot` (and no session, user or
//! workspace: labels are fixed at creation), an empty directory `Profile::pool_slot_dir` bind-mounted
//! as its workspace, and an identity folder `Profile::pool_identity_dir` mounted read-only at
//! `POOL_IDENTITY_MOUNT`. It is made ready (its health check answers) and left running.
//!
//! The engine decides which session gets which slot, atomically with the session's thred, and says
//! so in the `claim` (or `provision`) task. The claim here changes nothing in Docker: it writes the
//! session's identity into the slot's identity folder (the container reads it there; its
//! environment was fixed before the session existed), then the session's entry in the claim index
//! (`.berth-pool/.sessions/<session>`, naming the slot), then checks the container as `provision`
//! would (one inspection and its health check): one that runs and answers is in the claim's
//! answer, and the session runs once its files are in, with no `provision` round after the
//! materialize (one that does not is left to that round). The container keeps its pool name and
//! keeps running: every later task of the session finds it through the index
//! ([`Agent::session_container_name`]), and the inventory and the exit watcher name its session
//! from its identity file. The workspace agent renames the slot directory into the session
//! directory: the container's mount follows the rename. A rename and an unpause at claim time are
//! what this avoids: dockerd serialises renames (0.8 s at p50 with 50 claims at once on the
//! development machine) and 50 unpauses at once took 90-290 ms each.
//!
//! The identity file is the host-side record of the claim: a pool container is a session's only if
//! its identity file names the session and its user. The index is only the way to it, checked
//! against the identity file on every read, so a stale entry (a crash between the two writes, or
//! one left after the slot's folders went) is never followed. Both live on the host's disk: an
//! agent started again finds every claim as it was, with nothing to rebuild.

use std::path::{Path, PathBuf};

use bollard::container::{CreateContainerOptions, StartContainerOptions};
use bollard::models::ContainerStateStatusEnum;
use protocol::events::{PoolSlotFailed, PoolSlotReady, PoolSlotRemoved};
use protocol::{CloudEvent, Profile, Task};
use serde::{Deserialize, Serialize};

use super::{answer, container_labels, container_status, docker_message, elapsed_ms, failed, Agent, Failure, Refusal};
use crate::error::{docker_status, Error, Result};
use crate::spec::{self, SessionIdentity};

/// How long a claim waits for the slot's running container to answer its health check before it
/// leaves that to `provision` (it answered when the slot was made, so normally at once).
const CLAIM_READY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// What a claimed slot's identity file says (`/run/berth/session.json` inside the container).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Claim {
    pub session: String,
    pub user: String,
    pub workspace: String,
    pub profile: String,
    pub slot: String,
    /// The session's thred (what a session container carries as a label), for its exit events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thred: Option<String>,
}

fn identity_file(profile: &Profile, slot: &str) -> PathBuf {
    profile.pool_identity_dir(slot).join(protocol::profile::POOL_IDENTITY_FILE)
}

/// The claim index: one file per session that claimed a slot on this host, holding the slot's id.
/// A dot folder: no slot id (a validated session id) can start with a dot.
fn claim_index_dir(profile: &Profile) -> PathBuf {
    profile.deployment_root().join(protocol::profile::POOL_DIR).join(".sessions")
}

fn claim_index_file(profile: &Profile, session: &str) -> PathBuf {
    claim_index_dir(profile).join(session)
}

/// The claim recorded for `slot` on this host, if any.
pub(super) fn read_claim(profile: &Profile, slot: &str) -> Option<Claim> {
    let text = std::fs::read(identity_file(profile, slot)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The slot `session` claimed on this host, if its claim stands: the index names the slot and the
/// slot's identity file names the session. Two reads of small local files (microseconds), so it is
/// done in place rather than on a blocking thread.
pub(super) fn claimed_slot(profile: &Profile, session: &str) -> Option<String> {
    let slot = std::fs::read_to_string(claim_index_file(profile, session)).ok()?;
    let slot = slot.trim();
    if spec::validate_session_id(slot).is_err() {
        return None;
    }
    read_claim(profile, slot).filter(|claim| claim.session == session).map(|claim| claim.slot)
}

/// A pool container found for `identity`'s session must have been claimed by it.
pub(super) fn check_claim(profile: &Profile, slot: &str, identity: &SessionIdentity) -> Result<(), String> {
    match read_claim(profile, slot) {
        Some(claim) if claim.session == identity.session && claim.user == identity.user => Ok(()),
        Some(_) => Err(format!("the pool container of slot {slot} was claimed by another session")),
        None => Err(format!("the pool container of slot {slot} was found for a session but carries no claim")),
    }
}

/// Writes the claim: the identity file, then the index entry, each atomically (a reader sees the
/// old file or the whole new one). The identity file first: it is the record, the index only the
/// way to it.
fn write_claim(profile: &Profile, claim: &Claim) -> std::io::Result<()> {
    let folder = profile.pool_identity_dir(&claim.slot);
    std::fs::create_dir_all(&folder)?;
    let bytes = serde_json::to_vec_pretty(claim).map_err(std::io::Error::other)?;
    write_atomically(&folder, protocol::profile::POOL_IDENTITY_FILE, &bytes, 0o644)?;
    let index = claim_index_dir(profile);
    std::fs::create_dir_all(&index)?;
    write_atomically(&index, &claim.session, claim.slot.as_bytes(), 0o600)
}

fn write_atomically(folder: &Path, name: &str, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let staged = folder.join(format!(".{name}.tmp"));
    std::fs::write(&staged, bytes)?;
    set_mode(&staged, mode)?;
    std::fs::rename(&staged, folder.join(name))
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn remove_file_if_present(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(file = %path.display(), %error, "could not remove a pool claim's index entry"),
    }
}

/// Drops `session`'s index entry (its pool container is gone: its tasks find `berth-<session>`).
pub(super) fn forget_claim_index(profile: &Profile, session: &str) {
    remove_file_if_present(&claim_index_file(profile, session));
}

/// Removes what a slot has on the host outside its container: the slot directory (which never
/// holds user data: a claim renames it away before anything is materialized), the identity
/// folder, and its session's index entry if claimed. Gone already is fine.
pub(super) fn remove_slot_folders(profile: &Profile, slot: &str) {
    if let Some(claim) = read_claim(profile, slot) {
        if claimed_slot(profile, &claim.session).as_deref() == Some(slot) {
            forget_claim_index(profile, &claim.session);
        }
    }
    for folder in [profile.pool_slot_dir(slot), profile.pool_identity_dir(slot)] {
        match std::fs::remove_dir_all(&folder) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(slot, folder = %folder.display(), %error, "could not remove a pool slot's folder"),
        }
    }
}

impl Agent {
    /// The Docker name of `session`'s container on this host: its claimed pool slot's container
    /// (which keeps its pool name), else `berth-<session>`.
    pub(super) fn session_container_name(&self, session: &str) -> String {
        match claimed_slot(&self.inner.profile, session) {
            Some(slot) => spec::pool_container_name(&slot),
            None => spec::container_name(session),
        }
    }

    /// The session and thred that claimed `slot` on this host, if any (the exit watcher's: a pool
    /// container carries neither as a label).
    pub(crate) fn pool_claimant(&self, slot: &str) -> Option<(String, Option<String>)> {
        read_claim(&self.inner.profile, slot).map(|claim| (claim.session, claim.thred))
    }

    /// `pool_create`: answered `container.pool_slot_ready` once the slot's container answers its
    /// health check (it is left running), or `container.pool_slot_failed` (everything of the slot
    /// removed again).
    pub(super) async fn pool_create_answer(&self, task: &Task, slot: &str) -> Result<CloudEvent> {
        let began = std::time::Instant::now();
        if read_claim(&self.inner.profile, slot).is_some() {
            // A redelivered `pool_create` of a slot claimed since: its container (under the pool's
            // name) and folders are its session's now, so nothing of it is made or removed.
            let error = format!("slot {slot} was claimed already; a claimed slot is never made again");
            tracing::warn!(slot, "pool_create of a claimed slot; left to its session");
            return Ok(answer(task, &PoolSlotFailed { slot: slot.to_owned(), error }));
        }
        match self.pool_create(slot).await {
            Ok((container_id, port)) => {
                tracing::info!(slot, container_id = %container_id, ms = elapsed_ms(began), "pool slot ready");
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
                // Made paused by an agent of before (a claim's provision unpauses it).
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
        // Left running: a claim then needs nothing of Docker, and its readiness check is one
        // inspection and a probe.
        self.wait_until_ready(&name, deadline).await
    }

    /// `pool_remove`: the slot's container and folders go unless a claim is recorded for it: then
    /// the container is that session's (it may hold its work), and the session's own exit (or
    /// reconciliation, if the session is gone) removes it after a final sync. Answered
    /// `container.pool_slot_removed`.
    pub(super) async fn pool_remove_answer(&self, task: &Task, slot: &str) -> Result<CloudEvent> {
        let claimed = read_claim(&self.inner.profile, slot).is_some();
        if claimed {
            tracing::info!(slot, "pool slot claimed: its container is its session's and stays");
            return Ok(answer(task, &PoolSlotRemoved { slot: slot.to_owned(), claimed }));
        }
        if let Err(error) = self.remove_pool_container(slot).await {
            if super::is_docker_answer(&error) {
                return Ok(failed(task, "pool_remove", docker_message(&error)));
            }
            return Err(Error::from_docker(error));
        }
        remove_slot_folders(&self.inner.profile, slot);
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

    /// A claimed pool container that can't serve its session any more (exited: started again,
    /// Docker would mount the slot's old, empty path, which the claim renamed into the session
    /// directory) goes with its slot's folders and index entry, so the session's next container
    /// is an ordinary `berth-<session>` on the session directory.
    pub(super) async fn retire_claimed_pool_container(
        &self,
        session: &str,
        slot: &str,
        container_id: &str,
    ) -> Result<(), bollard::errors::Error> {
        self.force_remove(container_id).await?;
        self.forget_container(session);
        remove_slot_folders(&self.inner.profile, slot);
        forget_claim_index(&self.inner.profile, session);
        Ok(())
    }

    /// Removes `session`'s container after a failed provision: a claimed pool container as
    /// [`Agent::retire_claimed_pool_container`] does, any other by its name.
    pub(super) async fn remove_failed_session_container(&self, session: &str) -> Result<(), bollard::errors::Error> {
        let Some(slot) = claimed_slot(&self.inner.profile, session) else {
            return self.remove_by_name(&spec::container_name(session)).await;
        };
        let name = spec::pool_container_name(&slot);
        let inspected = match self.inner.docker.inspect_container(&name, None).await {
            Ok(inspected) => inspected,
            Err(error) if docker_status(&error) == Some(404) => {
                forget_claim_index(&self.inner.profile, session);
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        let labels = container_labels(&inspected);
        if !spec::is_deployment_container(&labels, &self.inner.profile) || labels.get(spec::POOL_SLOT_LABEL) != Some(&slot) {
            tracing::warn!(container = %name, "not removing a container that is not this slot's");
            return Ok(());
        }
        self.retire_claimed_pool_container(session, &slot, &inspected.id.unwrap_or_default()).await
    }

    /// `claim`: the claim of `slot` for `identity`'s session on its own, while the workspace agent
    /// materializes into the slot's directory. Answered `container.claimed` (the claim is
    /// recorded: `provision` finds the slot's container through it, or opens cold on the session
    /// directory if that container is gone), or `container.failed` with `action: "claim"` when the
    /// slot is another session's.
    pub(super) async fn claim_answer(&self, task: &Task, identity: &SessionIdentity, slot: &str) -> Result<CloudEvent> {
        if let Some(refused) = self.claim_pool_container(task, identity, slot).await? {
            return Ok(refused);
        }
        // The slot's container runs and answered when it was made: checked again now, the session
        // can run as soon as its files are in, with no `provision` round after the materialize.
        let ready = self.ready_if_running(identity, slot, CLAIM_READY_PATIENCE).await.map(|ready| self.ready_answer(identity, ready));
        Ok(answer(task, &protocol::events::ContainerClaimed { slot: slot.to_owned(), ready }))
    }

    /// The claim of `slot` for `identity`'s session, before `provision` looks for its container.
    /// `Ok(None)`: go on provisioning (claimed now or earlier); `Some(event)`: refused. No Docker
    /// call: whether the slot's container exists and is this slot's is `provision`'s inspection
    /// to find (its labels and this claim are checked before it is used).
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
            thred: identity.thred.clone(),
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
        tracing::info!(session_id = %identity.session, slot, "pool slot claimed");
        Ok(None)
    }
}
