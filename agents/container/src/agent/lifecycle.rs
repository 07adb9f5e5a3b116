//! Lifecycle: the answers to `pause`, `resume`, `stop`, `remove`, `stats` and `probe` on a
//! session's existing container, and the removals provisioning and the pool share.
//!
//! None of these creates a container. Each finds it by the session's name, or by its claimed pool
//! slot's ([`Agent::session_container_name`]: a claimed pool container keeps its pool name), and
//! acts only on one labelled as this deployment's ([`Agent::inspect_owned`]); a missing container
//! is an answer (`pause` says `missing`, `stop` and `remove` say done), never a retry.

use std::time::Duration;

use bollard::container::{RemoveContainerOptions, StatsOptions, StopContainerOptions, TopOptions};
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use futures::StreamExt;
use protocol::events::{ContainerPaused, ContainerProbed, ContainerRemoved, ContainerResumed, ContainerStopped};
use protocol::{CloudEvent, Task};

use super::{answer, container_labels, container_status, docker_message, failed, pool, Agent};
use crate::error::{docker_status, is_docker_answer, Error, Result};
use crate::{spec, stats, work};

impl Agent {
    /// Freezes the session's container. The engine pauses before every final sync, so this never
    /// fails for a container that has nothing left to freeze: already paused, exited (or never
    /// started), or gone are all answered `container.paused` with that `state`.
    pub(super) async fn pause_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        if let Some(id) = self.known_container(session) {
            if self.inner.docker.pause_container(&id).await.is_ok() {
                return Ok(paused(task, Some(&id), FrozenState::Paused));
            }
        }
        let name = self.session_container_name(session);
        let Some(inspected) = self.inspect_owned(session, &name).await? else {
            return Ok(paused(task, None, FrozenState::Missing));
        };
        let id = inspected.id.clone().unwrap_or_default();
        let pause_error = match frozen_state(container_status(&inspected)) {
            Some(state) => return Ok(paused(task, Some(&id), state)),
            None => match self.inner.docker.pause_container(&id).await {
                Ok(()) => return Ok(paused(task, Some(&id), FrozenState::Paused)),
                Err(error) => error,
            },
        };
        if !is_docker_answer(&pause_error) {
            return Err(Error::from_docker(pause_error));
        }
        // Docker refused: the container may have exited or gone in between. Look once more.
        let Some(inspected) = self.inspect_owned(session, &name).await? else {
            return Ok(paused(task, None, FrozenState::Missing));
        };
        match frozen_state(container_status(&inspected)) {
            Some(state) => Ok(paused(task, Some(&id), state)),
            None => self.docker_failure(task, "pause", pause_error),
        }
    }

    pub(super) async fn resume_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        // Waking is on the user's critical path: skip the inspect when the container is known.
        if let Some(id) = self.known_container(session) {
            if self.inner.docker.unpause_container(&id).await.is_ok() {
                return Ok(answer(task, &ContainerResumed { container_id: Some(id) }));
            }
        }
        let name = self.session_container_name(session);
        let Some(inspected) = self.inspect_owned(session, &name).await? else {
            return Ok(failed(task, "resume", format!("no container for session {session}")));
        };
        let id = inspected.id.clone().unwrap_or_default();
        match container_status(&inspected) {
            ContainerStateStatusEnum::RUNNING => {}
            ContainerStateStatusEnum::PAUSED => {
                if let Err(error) = self.inner.docker.unpause_container(&name).await {
                    return self.docker_failure(task, "resume", error);
                }
            }
            other => return Ok(failed(task, "resume", format!("container is {other}, only a paused container can be resumed"))),
        }
        Ok(answer(task, &ContainerResumed { container_id: Some(id) }))
    }

    pub(super) async fn stop_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        let name = self.session_container_name(session);
        let Some(inspected) = self.inspect_owned(session, &name).await? else {
            // Nothing left to stop is what `stop` wants.
            return Ok(answer(task, &ContainerStopped { container_id: None }));
        };
        let id = inspected.id.clone().unwrap_or_default();
        self.expect_exit(&id);
        // A frozen process cannot act on SIGTERM: thaw a paused (idle) container first so its
        // programs stop gracefully, flushing what they hold into the workspace, instead of being
        // killed when the timeout runs out.
        if container_status(&inspected) == ContainerStateStatusEnum::PAUSED {
            if let Err(error) = self.inner.docker.unpause_container(&name).await {
                tracing::debug!(session_id = %session, %error, "could not unpause before stopping; stopping anyway");
            }
        }
        let options = StopContainerOptions { t: self.inner.settings.stop_timeout_secs };
        match self.inner.docker.stop_container(&name, Some(options)).await {
            Ok(()) => {}
            Err(error) if matches!(docker_status(&error), Some(304) | Some(404)) => {}
            Err(error) => return self.docker_failure(task, "stop", error),
        }
        Ok(answer(task, &ContainerStopped { container_id: Some(id) }))
    }

    pub(super) async fn remove_answer(&self, task: &Task, session: &str, container_id: Option<&str>) -> Result<CloudEvent> {
        let target = container_id.map_or_else(|| self.session_container_name(session), str::to_owned);
        let inspected = match self.inner.docker.inspect_container(&target, None).await {
            Ok(inspected) => inspected,
            Err(error) if docker_status(&error) == Some(404) => {
                self.forget_container(session);
                return Ok(answer(task, &ContainerRemoved { container_id: container_id.map(str::to_owned) }));
            }
            Err(error) if is_docker_answer(&error) => return self.docker_failure(task, "remove", error),
            Err(error) => return Err(Error::from_docker(error)),
        };
        let labels = container_labels(&inspected);
        let id = inspected.id.clone().unwrap_or_default();
        if !spec::is_deployment_container(&labels, &self.inner.profile) {
            let profile = &self.inner.profile;
            let refusal = format!(
                "container {target} is not a session container of profile {} in deployment {} (it is labelled deployment {:?}); left alone",
                profile.name,
                profile.deployment(),
                labels.get(spec::DEPLOYMENT_LABEL).map(String::as_str).unwrap_or("none")
            );
            if container_id.is_some() {
                return Ok(failed(task, "remove", refusal));
            }
            // Docker names are unique: another deployment's container under this name means this
            // deployment's does not exist, and that is what `remove` wants.
            tracing::warn!(session_id = %session, %refusal, "remove by name found a foreign container");
            self.forget_container(session);
            return Ok(answer(task, &ContainerRemoved { container_id: None }));
        }
        let pool_claimant =
            labels.get(spec::POOL_SLOT_LABEL).and_then(|slot| pool::read_claim(&self.inner.profile, slot)).map(|claim| claim.session);
        if labels.get(spec::SESSION_LABEL).or(pool_claimant.as_ref()).is_some_and(|owner| owner != session) {
            return Ok(failed(task, "remove", format!("container {target} belongs to another session, not {session}")));
        }
        if container_id.is_some() {
            let age = container_age(&inspected);
            if age.is_some_and(|age| age < self.inner.settings.orphan_grace) {
                return Ok(failed(
                    task,
                    "remove",
                    format!("kept container {id}: created {:?} ago, within the orphan grace period", age.unwrap_or_default()),
                ));
            }
        }
        self.expect_exit(&id);
        self.forget_container(session);
        match self.inner.docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await {
            Ok(()) => {}
            Err(error) if docker_status(&error) == Some(404) => {}
            Err(error) => return self.docker_failure(task, "remove", error),
        }
        tracing::info!(container_id = %id, session_id = %session, "container removed");
        if let Some(slot) = labels.get(spec::POOL_SLOT_LABEL) {
            pool::remove_slot_folders(&self.inner.profile, slot);
        }
        Ok(answer(task, &ContainerRemoved { container_id: Some(id) }))
    }

    pub(super) async fn stats_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        let name = self.session_container_name(session);
        if self.inspect_owned(session, &name).await?.is_none() {
            return Ok(failed(task, "stats", format!("no container for session {session}")));
        }
        let options = StatsOptions { stream: false, one_shot: false };
        let sample = self.inner.docker.stats(&name, Some(options)).next().await;
        match sample {
            Some(Ok(sample)) => Ok(answer(task, &stats::compute(&sample))),
            Some(Err(error)) if is_docker_answer(&error) => self.docker_failure(task, "stats", error),
            Some(Err(error)) => Err(Error::from_docker(error)),
            None => Ok(failed(task, "stats", "docker returned no statistics".to_owned())),
        }
    }

    /// The idle rule's work probe (see [`work`]): cumulative CPU, the age of the newest change in
    /// the workspace directory, and the commands running under terminal shells.
    pub(super) async fn probe_answer(&self, task: &Task, session: &str) -> Result<CloudEvent> {
        let name = self.session_container_name(session);
        let Some(inspected) = self.inspect_owned(session, &name).await? else {
            return Ok(failed(task, "probe", format!("no container for session {session}")));
        };
        let options = StatsOptions { stream: false, one_shot: true };
        let cpu_ns = match self.inner.docker.stats(&name, Some(options)).next().await {
            Some(Ok(sample)) => sample.cpu_stats.cpu_usage.total_usage,
            Some(Err(error)) if is_docker_answer(&error) => return self.docker_failure(task, "probe", error),
            Some(Err(error)) => return Err(Error::from_docker(error)),
            None => return Ok(failed(task, "probe", "docker returned no statistics".to_owned())),
        };
        let mut shell_pids = Vec::new();
        for exec_id in inspected.exec_ids.clone().unwrap_or_default() {
            // An exec may end between the container's inspection and its own: it is no terminal.
            let Ok(exec) = self.inner.docker.inspect_exec(&exec_id).await else { continue };
            let tty = exec.process_config.as_ref().and_then(|config| config.tty).unwrap_or(false);
            if exec.running == Some(true) && tty {
                shell_pids.extend(exec.pid);
            }
        }
        let terminal_commands = if shell_pids.is_empty() {
            0
        } else {
            let options = TopOptions { ps_args: "-eo pid,ppid" };
            match self.inner.docker.top_processes(&name, Some(options)).await {
                Ok(top) => work::terminal_commands(&shell_pids, &top.processes.unwrap_or_default()),
                Err(error) => return self.docker_failure(task, "probe", error),
            }
        };
        let directory = self.inner.profile.session_dir(session);
        // Stat-ing every entry is blocking work; a panic in it is answered, not retried.
        let scan = match tokio::task::spawn_blocking(move || work::scan_writes(&directory, work::SCAN_LIMIT)).await {
            Ok(scan) => scan,
            Err(error) => return Ok(failed(task, "probe", format!("workspace scan failed: {error}"))),
        };
        let probe = ContainerProbed {
            cpu_ns,
            write_age_ms: u64::try_from(scan.newest_change_age.as_millis()).unwrap_or(u64::MAX),
            terminal_commands,
            terminals: shell_pids.len() as u64,
            scanned: scan.scanned,
            truncated: scan.truncated,
        };
        tracing::debug!(session_id = %session, ?probe, "work probe");
        Ok(answer(task, &probe))
    }

    /// Inspects `session`'s container under `name` (what [`Agent::session_container_name`] gave);
    /// `None` when it does not exist. A container that carries the name but not this deployment's
    /// labels counts as missing, and is never acted on.
    async fn inspect_owned(&self, session: &str, name: &str) -> Result<Option<ContainerInspectResponse>> {
        match self.inner.docker.inspect_container(name, None).await {
            Ok(inspected) => {
                let labels = container_labels(&inspected);
                if !spec::is_deployment_container(&labels, &self.inner.profile) {
                    // Someone else's container under the session's name: ours does not exist.
                    return Ok(None);
                }
                if let Some(id) = inspected.id.as_ref() {
                    self.remember_container(session, id);
                }
                Ok(Some(inspected))
            }
            Err(error) if docker_status(&error) == Some(404) => {
                self.forget_container(session);
                Ok(None)
            }
            Err(error) if is_docker_answer(&error) => Ok(None),
            Err(error) => Err(Error::from_docker(error)),
        }
    }

    fn docker_failure(&self, task: &Task, action: &str, error: bollard::errors::Error) -> Result<CloudEvent> {
        if is_docker_answer(&error) {
            Ok(failed(task, action, docker_message(&error)))
        } else {
            Err(Error::from_docker(error))
        }
    }

    /// Removes the container `id` (its exit expected, so no `container.exited` is reported); gone
    /// already is done.
    pub(super) async fn force_remove(&self, id: &str) -> Result<(), bollard::errors::Error> {
        self.expect_exit(id);
        match self.inner.docker.remove_container(id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await {
            Ok(()) => Ok(()),
            Err(error) if docker_status(&error) == Some(404) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Force-removes this deployment's container of that name; gone already is fine, and a
    /// container that is not this deployment's is left alone.
    pub(super) async fn remove_by_name(&self, name: &str) -> Result<(), bollard::errors::Error> {
        let inspected = match self.inner.docker.inspect_container(name, None).await {
            Ok(inspected) => inspected,
            Err(error) if docker_status(&error) == Some(404) => return Ok(()),
            Err(error) => return Err(error),
        };
        if !spec::is_deployment_container(&container_labels(&inspected), &self.inner.profile) {
            tracing::warn!(container = name, "not removing a container that is not this deployment's");
            return Ok(());
        }
        self.force_remove(&inspected.id.unwrap_or_default()).await
    }
}

/// What `pause` found: frozen now, or nothing left running to freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrozenState {
    Paused,
    Exited,
    Missing,
}

impl FrozenState {
    fn as_str(self) -> &'static str {
        match self {
            FrozenState::Paused => "paused",
            FrozenState::Exited => "exited",
            FrozenState::Missing => "missing",
        }
    }
}

/// `None` while the container runs (it has to be paused); otherwise what it already is.
fn frozen_state(status: ContainerStateStatusEnum) -> Option<FrozenState> {
    match status {
        ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING => None,
        ContainerStateStatusEnum::PAUSED => Some(FrozenState::Paused),
        // Never started, stopped, dead or being removed: no process can change the workspace.
        ContainerStateStatusEnum::CREATED
        | ContainerStateStatusEnum::EXITED
        | ContainerStateStatusEnum::DEAD
        | ContainerStateStatusEnum::REMOVING
        | ContainerStateStatusEnum::EMPTY => Some(FrozenState::Exited),
    }
}

fn paused(task: &Task, container_id: Option<&str>, state: FrozenState) -> CloudEvent {
    answer(task, &ContainerPaused { container_id: container_id.map(str::to_owned), state: state.as_str().to_owned() })
}

fn container_age(inspected: &ContainerInspectResponse) -> Option<Duration> {
    let created = chrono::DateTime::parse_from_rfc3339(inspected.created.as_deref()?).ok()?;
    (chrono::Utc::now() - created.with_timezone(&chrono::Utc)).to_std().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_never_fails_for_a_container_with_nothing_to_freeze() {
        assert_eq!(frozen_state(ContainerStateStatusEnum::RUNNING), None);
        assert_eq!(frozen_state(ContainerStateStatusEnum::PAUSED), Some(FrozenState::Paused));
        for status in [ContainerStateStatusEnum::EXITED, ContainerStateStatusEnum::CREATED, ContainerStateStatusEnum::DEAD] {
            assert_eq!(frozen_state(status), Some(FrozenState::Exited), "{status}");
        }
    }
}
