//! Provisioning: a session's container created (or found again), started and waited for.
//!
//! Everything a container needs before it may run lives here: the session network (no
//! inter-container traffic, this deployment's) and its egress rules, the profile's OCI runtime, the
//! session directory, and the readiness wait (published port, then the profile's health check).
//! A container found under the session's name is adopted only after [`check_ownership`]; one that
//! fails to start or to become ready is removed again, so a retried `provision` starts from nothing.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::container::{CreateContainerOptions, StartContainerOptions};
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};
use bollard::network::{CreateNetworkOptions, InspectNetworkOptions};
use protocol::events::{ContainerFailed, ContainerReady, ReadyTimings};
use protocol::profile::HealthCheck;
use protocol::{CloudEvent, Profile, Task};

use super::{
    answer, container_labels, container_status, docker_message, elapsed_ms, pool, published_port, Agent, Failure, ReadyContainer, Refusal,
};
use crate::error::{docker_status, Error, Result};
use crate::spec::{self, SessionIdentity};
use crate::{egress, probe};

/// How often readiness is probed while a container starts.
const READINESS_POLL: Duration = Duration::from_millis(20);
/// How often the container's state is checked while its health check does not answer yet.
const STATE_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// What provisioning does with a container that exists but has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExitedContainer {
    /// A new session start replaces it: a dead container is no use to it.
    Replace,
    /// A wake from the dormant tier starts it again: it was stopped on purpose, with its directory.
    Restart,
}

impl Agent {
    pub(super) async fn provision_answer(&self, task: &Task, identity: &SessionIdentity, exited: ExitedContainer) -> Result<CloudEvent> {
        let action = task.action.as_str();
        match self.provision(identity, exited).await {
            Ok(ready) => Ok(answer(task, &self.ready_answer(identity, ready))),
            Err(Failure::Unanswered(error)) => Err(Error::from_docker(error)),
            Err(Failure::NotOurs(Refusal(reason))) => Ok(answer(task, &ContainerFailed { action: action.to_owned(), error: reason })),
            Err(Failure::Refused(Refusal(reason))) => {
                self.forget_container(&identity.session);
                tracing::warn!(session_id = %identity.session, %reason, "provision failed, removing the container");
                if let Err(error) = self.remove_failed_session_container(&identity.session).await {
                    tracing::warn!(session_id = %identity.session, %error, "could not remove the failed container");
                }
                Ok(answer(task, &ContainerFailed { action: action.to_owned(), error: reason }))
            }
        }
    }

    /// `container.ready`'s data for a container found ready, remembered as the session's.
    pub(super) fn ready_answer(&self, identity: &SessionIdentity, ready: ReadyContainer) -> ContainerReady {
        self.remember_container(&identity.session, &ready.container_id);
        tracing::info!(session_id = %identity.session, container_id = %ready.container_id, port = ready.port,
            adopted = ready.adopted, start_ms = ready.start_ms, ready_ms = ready.ready_ms, "container ready");
        ContainerReady {
            container_id: ready.container_id,
            host: ready.host,
            port: ready.port,
            network: ready.network,
            adopted: ready.adopted,
            timings_ms: ReadyTimings { create: ready.create_ms, start: ready.start_ms, ready: ready.ready_ms },
        }
    }

    /// A claimed warm-pool slot's container, if it runs and answers its health check within
    /// `patience`: what `provision` would find for it. `None` otherwise, and nothing is changed:
    /// `provision`, after the materialize, finds out why and does the rest (opening cold on the
    /// session directory if need be, which must wait until that directory is filled).
    pub(super) async fn ready_if_running(&self, identity: &SessionIdentity, slot: &str, patience: Duration) -> Option<ReadyContainer> {
        let began = Instant::now();
        let name = spec::pool_container_name(slot);
        let inspected = self.inner.docker.inspect_container(&name, None).await.ok()?;
        check_ownership(&inspected, identity, &self.inner.profile).ok()?;
        if container_status(&inspected) != ContainerStateStatusEnum::RUNNING {
            return None;
        }
        let ready = self.wait_until_answering(&name, Some(inspected), began + patience).await.ok()?;
        Some(ReadyContainer {
            container_id: ready.container_id,
            host: spec::publish_host().to_owned(),
            port: ready.port,
            network: ready.network,
            create_ms: 0,
            start_ms: 0,
            ready_ms: elapsed_ms(began),
            adopted: true,
        })
    }

    /// Creates (or finds again) the session's container, starts it and waits until it is ready.
    pub async fn provision_container(&self, identity: &SessionIdentity) -> Result<ReadyContainer, String> {
        self.provision(identity, ExitedContainer::Replace).await.map_err(|failure| match failure {
            Failure::Refused(Refusal(reason)) | Failure::NotOurs(Refusal(reason)) => reason,
            Failure::Unanswered(error) => error.to_string(),
        })
    }

    async fn provision(&self, identity: &SessionIdentity, exited: ExitedContainer) -> Result<ReadyContainer, Failure> {
        let began = Instant::now();
        let deadline = began + Duration::from_secs(self.inner.profile.container.ready_timeout_secs);
        self.ensure_network().await?;
        let session_dir = self.inner.profile.session_dir(&identity.session);
        ensure_session_dir(&session_dir).await?;
        let mut create_ms = 0;
        let mut adopted = true;
        // A few rounds at most: another replica may create or remove the container between our calls.
        for _round in 0..4 {
            // A claimed pool slot's container keeps its pool name. Asked again each round: once
            // that container is found gone or is replaced, the session's is `berth-<session>`.
            let claimed_slot = pool::claimed_slot(&self.inner.profile, &identity.session);
            let name = claimed_slot.as_deref().map_or_else(|| spec::container_name(&identity.session), spec::pool_container_name);
            let existing = match self.inner.docker.inspect_container(&name, None).await {
                Ok(existing) => Some(existing),
                Err(error) if docker_status(&error) == Some(404) => None,
                Err(error) => return Err(error.into()),
            };
            if let (None, Some(slot)) = (&existing, &claimed_slot) {
                // Removed meanwhile (reconciliation, or by hand): a cold open on the session directory.
                tracing::info!(session_id = %identity.session, slot, "the claimed pool container is gone; opening cold");
                pool::forget_claim_index(&self.inner.profile, &identity.session);
                continue;
            }
            let existing_id = existing.as_ref().and_then(|existing| existing.id.clone()).unwrap_or_default();
            // A claimed warm-pool container mounts its slot's directory, which the claim renamed
            // into the session's: started again, Docker would mount the old, empty path. A wake
            // replaces it with a container on the session directory instead.
            let mut mounts_session_dir = true;
            // A running or paused container (a warm claim's) has its port published already: this
            // inspection is what readiness needs, so nothing (or only the unpause) goes to Docker
            // before the health check.
            let mut known_inspection = None;
            let status = match existing {
                Some(existing) => {
                    check_ownership(&existing, identity, &self.inner.profile).map_err(Failure::NotOurs)?;
                    mounts_session_dir = !container_labels(&existing).contains_key(spec::POOL_SLOT_LABEL);
                    let status = existing.state.as_ref().and_then(|state| state.status).unwrap_or(ContainerStateStatusEnum::EMPTY);
                    if matches!(status, ContainerStateStatusEnum::PAUSED | ContainerStateStatusEnum::RUNNING) {
                        known_inspection = Some(existing);
                    }
                    status
                }
                None => {
                    let created_at = Instant::now();
                    let config = spec::container_config(&self.inner.profile, identity, &session_dir, &self.inner.settings.extra_labels);
                    let options = CreateContainerOptions { name: name.clone(), platform: None };
                    match self.inner.docker.create_container(Some(options), config).await {
                        // Ours and fresh: start it without asking Docker again.
                        Ok(_) => {
                            create_ms = elapsed_ms(created_at);
                            adopted = false;
                            ContainerStateStatusEnum::CREATED
                        }
                        // Someone else created it first: find it again on the next round.
                        Err(error) if docker_status(&error) == Some(409) => continue,
                        Err(error) if docker_status(&error) == Some(404) => {
                            return Err(Refusal(format!(
                                "image {} is not available on this Docker engine ({})",
                                self.inner.profile.container.image,
                                docker_message(&error)
                            ))
                            .into())
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
            };
            let started_at = Instant::now();
            // A dormant session's container was stopped on purpose, with its directory: a wake
            // starts that same container again, so only its memory was given up.
            let startable = status == ContainerStateStatusEnum::CREATED
                || (status == ContainerStateStatusEnum::EXITED && exited == ExitedContainer::Restart && mounts_session_dir);
            match status {
                ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING => {}
                ContainerStateStatusEnum::PAUSED => self.inner.docker.unpause_container(&name).await?,
                ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::EXITED if startable => {
                    match self.inner.docker.start_container(&name, None::<StartContainerOptions<String>>).await {
                        Ok(()) => {}
                        // 304: already started by a concurrent task.
                        Err(error) if docker_status(&error) == Some(304) => {}
                        Err(error) => return Err(Refusal(format!("start failed: {}", docker_message(&error))).into()),
                    }
                }
                ContainerStateStatusEnum::CREATED
                | ContainerStateStatusEnum::EXITED
                | ContainerStateStatusEnum::DEAD
                | ContainerStateStatusEnum::REMOVING
                | ContainerStateStatusEnum::EMPTY => {
                    // A dead container is no use to a new session start: replace it.
                    match &claimed_slot {
                        Some(slot) => self.retire_claimed_pool_container(&identity.session, slot, &existing_id).await?,
                        None => self.remove_by_name(&name).await?,
                    }
                    continue;
                }
            }
            let start_ms = elapsed_ms(started_at);
            let ready_began = Instant::now();
            let ready = self.wait_until_answering(&name, known_inspection, deadline).await?;
            return Ok(ReadyContainer {
                container_id: ready.container_id,
                host: spec::publish_host().to_owned(),
                port: ready.port,
                network: ready.network,
                create_ms,
                start_ms,
                ready_ms: elapsed_ms(ready_began),
                adopted,
            });
        }
        Err(Refusal(format!("the container of session {} kept changing under us; giving up", identity.session)).into())
    }

    /// Makes sure the session network exists with inter-container traffic disabled. Checked once
    /// per process, and by one task at a time: Docker's duplicate check is racy, and two networks
    /// with one name would make the name ambiguous.
    pub(super) async fn ensure_network(&self) -> Result<(), Failure> {
        self.inner.network_checked.get_or_try_init(|| self.check_or_create_network()).await?;
        Ok(())
    }

    /// Re-applies the session network's egress rules when something removed them (a flushed
    /// firewall, a rebooted host with the network still there). Nothing to do before the first
    /// provision made the network.
    pub async fn reensure_egress(&self) -> Result<(), String> {
        let Some(plan) = self.inner.network_checked.get().cloned() else { return Ok(()) };
        let changed = tokio::task::spawn_blocking(move || egress::apply_blocking(&plan)).await.map_err(|error| error.to_string())??;
        if changed {
            tracing::warn!(network = %spec::network_name(&self.inner.profile), "egress rules were missing or changed, restored them");
        }
        Ok(())
    }

    /// Removes the egress chains of networks that no longer exist (a network removed by hand, by
    /// a test, or by an agent that died first), whichever deployment made them: a chain without
    /// its network protects nothing. The chains are listed before the networks, so a network
    /// created meanwhile is always seen and its fresh chains are kept.
    pub async fn remove_stale_egress_rules(&self) -> Result<usize> {
        let chain_ids = tokio::task::spawn_blocking(egress::chain_network_ids_blocking).await.unwrap_or_default();
        if chain_ids.is_empty() {
            return Ok(0);
        }
        let networks = self.inner.docker.list_networks::<String>(None).await.map_err(Error::from_docker)?;
        let network_ids: Vec<String> = networks.into_iter().filter_map(|network| network.id).collect();
        let unknown: Vec<String> =
            chain_ids.into_iter().filter(|id| !network_ids.iter().any(|network| network.starts_with(id.as_str()))).collect();
        // Another Docker engine on this machine (another host id) may own the network.
        let stale = tokio::task::spawn_blocking(move || {
            unknown.into_iter().filter(|id| !egress::chain_bridge_exists_blocking(id)).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let removed = stale.len();
        for id in stale {
            tokio::task::spawn_blocking(move || egress::remove_for_network_blocking(&id)).await.ok();
        }
        if removed > 0 {
            tracing::info!(removed, "removed the egress rules of networks that are gone");
        }
        Ok(removed)
    }

    /// The egress rules of the session network, once it has been checked (tests read counters).
    pub fn egress_plan(&self) -> Option<egress::EgressPlan> {
        self.inner.network_checked.get().cloned()
    }

    /// Removes the session network and its egress rules (the rules first go with the network:
    /// nothing else of Berth's stays behind in the firewall). Containers still on it make Docker refuse.
    pub async fn remove_network(&self) -> Result<()> {
        let name = spec::network_name(&self.inner.profile);
        let network = match self.inner.docker.inspect_network(&name, None::<InspectNetworkOptions<String>>).await {
            Ok(network) => network,
            Err(error) if docker_status(&error) == Some(404) => return Ok(()),
            Err(error) => return Err(Error::from_docker(error)),
        };
        self.inner.docker.remove_network(&name).await.map_err(Error::from_docker)?;
        if let Some(id) = network.id {
            tokio::task::spawn_blocking(move || egress::remove_for_network_blocking(&id)).await.ok();
        }
        Ok(())
    }

    async fn check_or_create_network(&self) -> Result<egress::EgressPlan, Failure> {
        self.check_runtime().await?;
        self.create_or_check_network().await?;
        let network_name = spec::network_name(&self.inner.profile);
        let network = self.inner.docker.inspect_network(&network_name, None::<InspectNetworkOptions<String>>).await?;
        if network.enable_ipv6 == Some(true) {
            return Err(Refusal(format!("network {network_name} has IPv6 enabled: session egress rules are IPv4 only")).into());
        }
        let network_id = network.id.clone().unwrap_or_default();
        let bridge = network
            .options
            .as_ref()
            .and_then(|options| options.get("com.docker.network.bridge.name").cloned())
            .unwrap_or_else(|| format!("br-{}", network_id.chars().take(12).collect::<String>()));
        let plan = egress::EgressPlan::new(&network_name, &network_id, &bridge, &self.inner.profile.container.egress_allow);
        let applied = plan.clone();
        let changed = tokio::task::spawn_blocking(move || egress::apply_blocking(&applied))
            .await
            .map_err(|error| Refusal(format!("egress rules: {error}")))?
            .map_err(|error| {
                Refusal(format!("egress rules for network {network_name} could not be installed, no session starts without them: {error}"))
            })?;
        tracing::info!(network = %network_name, bridge = %bridge, changed, "egress rules in place");
        if let Err(error) = self.remove_stale_egress_rules().await {
            tracing::warn!(%error, "could not look for stale egress rules");
        }
        Ok(plan)
    }

    /// The profile's OCI runtime must be registered with dockerd (`runsc` is not by default).
    async fn check_runtime(&self) -> Result<(), Failure> {
        let runtime = self.inner.profile.container.runtime.docker_name();
        let info = self.inner.docker.info().await?;
        let known = info.runtimes.as_ref().is_some_and(|runtimes| runtimes.contains_key(runtime));
        if !known {
            let names: Vec<String> = info.runtimes.unwrap_or_default().into_keys().collect();
            return Err(Refusal(format!(
                "container.runtime {runtime:?} is not registered with the Docker engine (it knows {names:?}; scripts/services.sh registers runsc)"
            ))
            .into());
        }
        Ok(())
    }

    async fn create_or_check_network(&self) -> Result<(), Failure> {
        let network_name = spec::network_name(&self.inner.profile);
        let deployment = self.inner.profile.deployment();
        let docker = &self.inner.docker;
        let network = match docker.inspect_network(&network_name, None::<InspectNetworkOptions<String>>).await {
            Ok(network) => Some(network),
            Err(error) if docker_status(&error) == Some(404) => None,
            Err(error) => return Err(error.into()),
        };
        match network {
            Some(network) => {
                let icc = network.options.as_ref().and_then(|options| options.get(spec::ICC_OPTION)).map(String::as_str);
                if icc != Some("false") {
                    return Err(Refusal(format!(
                        "network {network_name} exists without {}=false: session containers could reach each other",
                        spec::ICC_OPTION
                    ))
                    .into());
                }
                let owner = network.labels.as_ref().and_then(|labels| labels.get(spec::DEPLOYMENT_LABEL));
                if owner.is_some_and(|owner| *owner != deployment) {
                    return Err(Refusal(format!(
                        "network {network_name} belongs to deployment {}, not {deployment}",
                        owner.map(String::as_str).unwrap_or_default()
                    ))
                    .into());
                }
            }
            None => {
                let mut labels: HashMap<String, String> =
                    self.inner.settings.extra_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                labels.insert(spec::MANAGED_LABEL.to_owned(), "true".to_owned());
                labels.insert(spec::PROFILE_LABEL.to_owned(), self.inner.profile.name.clone());
                labels.insert(spec::DEPLOYMENT_LABEL.to_owned(), deployment.clone());
                let options = CreateNetworkOptions {
                    name: network_name.clone(),
                    check_duplicate: true,
                    driver: "bridge".to_owned(),
                    options: HashMap::from([(spec::ICC_OPTION.to_owned(), "false".to_owned())]),
                    labels,
                    ..Default::default()
                };
                match docker.create_network(options).await {
                    Ok(_) => tracing::info!(network = %network_name, "created the session network"),
                    Err(error) if docker_status(&error) == Some(409) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(())
    }

    /// Polls until the container answers its health check; returns its id and host port.
    pub(super) async fn wait_until_ready(&self, name: &str, deadline: Instant) -> Result<(String, u16), Failure> {
        let ready = self.wait_until_answering(name, None, deadline).await?;
        Ok((ready.container_id, ready.port))
    }

    /// [`Agent::wait_until_ready`], with the container's address on the session network.
    /// `known`: an inspection taken just before (of a container that was running or paused, so its
    /// port and address stand), used instead of asking Docker again; not for Docker's own health
    /// check, whose status it may show from before a pause.
    async fn wait_until_answering(
        &self,
        name: &str,
        known: Option<ContainerInspectResponse>,
        deadline: Instant,
    ) -> Result<Answering, Failure> {
        let settings = &self.inner.profile.container;
        let port_key = spec::service_port_key(settings);
        let mut inspected = match known.filter(|_| settings.health != HealthCheck::Docker) {
            Some(inspected) => inspected,
            None => self.inner.docker.inspect_container(name, None).await?,
        };
        let container_id = inspected.id.clone().unwrap_or_default();
        let port = loop {
            if let Some(port) = published_port(&inspected, &port_key) {
                break port;
            }
            check_still_running(&inspected)?;
            if Instant::now() >= deadline {
                return Err(Refusal(format!("port {port_key} was never published")).into());
            }
            tokio::time::sleep(READINESS_POLL).await;
            inspected = self.inner.docker.inspect_container(name, None).await?;
        };
        let mut last_inspection = Instant::now();
        loop {
            let answered = match &settings.health {
                HealthCheck::Http(path) => probe::http_ready(spec::publish_host(), port, path).await,
                HealthCheck::Tcp => probe::tcp_ready(spec::publish_host(), port).await,
                HealthCheck::Docker => docker_health(&inspected)?,
            };
            if answered {
                let network =
                    network_address(&inspected, &spec::network_name(&self.inner.profile), settings.service_port, &self.inner.profile);
                return Ok(Answering { container_id, port, network });
            }
            // Asking Docker every round would load it while many sessions start at once; a dead
            // container is noticed within the interval anyway.
            if last_inspection.elapsed() >= STATE_CHECK_INTERVAL || settings.health == HealthCheck::Docker {
                inspected = self.inner.docker.inspect_container(name, None).await?;
                last_inspection = Instant::now();
                check_still_running(&inspected)?;
            }
            if Instant::now() >= deadline {
                return Err(Refusal(format!(
                    "not ready within {} s (health check {:?} never answered)",
                    settings.ready_timeout_secs, settings.health
                ))
                .into());
            }
            tokio::time::sleep(READINESS_POLL).await;
        }
    }
}

async fn ensure_session_dir(session_dir: &Path) -> Result<(), Refusal> {
    if tokio::fs::metadata(session_dir).await.is_ok_and(|metadata| metadata.is_dir()) {
        return Ok(());
    }
    tokio::fs::create_dir_all(session_dir)
        .await
        .map_err(|error| Refusal(format!("cannot create workspace directory {}: {error}", session_dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(session_dir, std::fs::Permissions::from_mode(0o755))
            .await
            .map_err(|error| Refusal(format!("cannot set permissions on {}: {error}", session_dir.display())))?;
    }
    Ok(())
}

/// A container named like ours must also be labelled as ours, for this very session; a claimed
/// warm-pool container (no session label) must have been claimed for this session and user.
fn check_ownership(inspected: &ContainerInspectResponse, identity: &SessionIdentity, profile: &Profile) -> Result<(), Refusal> {
    let labels = container_labels(inspected);
    if let Some(slot) = labels.get(spec::POOL_SLOT_LABEL).filter(|_| spec::is_deployment_container(&labels, profile)) {
        return pool::check_claim(profile, slot, identity).map_err(Refusal);
    }
    let ours = spec::is_deployment_container(&labels, profile) && labels.get(spec::SESSION_LABEL) == Some(&identity.session);
    if !ours {
        return Err(Refusal(format!(
            "a container named {} exists but is not this session's Berth container in deployment {}",
            spec::container_name(&identity.session),
            profile.deployment()
        )));
    }
    if labels.get(spec::USER_LABEL) != Some(&identity.user) {
        return Err(Refusal(format!("the container of session {} belongs to another user", identity.session)));
    }
    Ok(())
}

/// A container that answers its health check.
struct Answering {
    container_id: String,
    port: u16,
    network: Option<protocol::host::NetworkAddress>,
}

/// The container's address on `network` (its IP there and the service port), on this machine.
fn network_address(
    inspected: &ContainerInspectResponse,
    network: &str,
    service_port: u16,
    profile: &Profile,
) -> Option<protocol::host::NetworkAddress> {
    let endpoint = inspected.network_settings.as_ref()?.networks.as_ref()?.get(network)?;
    let ip = endpoint.ip_address.as_deref()?.parse().ok()?;
    Some(protocol::host::NetworkAddress {
        ip,
        port: service_port,
        host: profile.host(),
        boot_id: protocol::host::boot_id().unwrap_or_default().to_owned(),
    })
}

fn check_still_running(inspected: &ContainerInspectResponse) -> Result<(), Refusal> {
    let Some(state) = &inspected.state else { return Ok(()) };
    match state.status {
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => Err(Refusal(format!(
            "container exited before it was ready (exit code {}, oom_killed {}{})",
            state.exit_code.unwrap_or(-1),
            state.oom_killed.unwrap_or(false),
            state.error.as_deref().filter(|text| !text.is_empty()).map(|text| format!(", {text}")).unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

fn docker_health(inspected: &ContainerInspectResponse) -> Result<bool, Refusal> {
    let health = inspected.state.as_ref().and_then(|state| state.health.as_ref()).and_then(|health| health.status);
    match health {
        Some(HealthStatusEnum::HEALTHY) => Ok(true),
        Some(HealthStatusEnum::UNHEALTHY) => Err(Refusal("docker reports the container unhealthy".to_owned())),
        Some(HealthStatusEnum::STARTING) => Ok(false),
        Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) | None => {
            Err(Refusal("the profile asks for Docker's health check but the image has no HEALTHCHECK".to_owned()))
        }
    }
}
