//! Inventory: what this agent's Docker engine holds for the deployment, told to the engine.
//!
//! `container.inventory` lists every labelled session container (the engine adopts the living and
//! has orphans removed), and `container.host_report` turns the same list into this host's capacity and
//! session count for placement. Both are read back from Docker each time: nothing is kept in memory.

use std::collections::HashMap;
use std::time::Duration;

use bollard::container::ListContainersOptions;
use protocol::events::{label, ContainerInventory};
use protocol::CloudEvent;

use super::{pool, Agent, InventoryEntry, EVENT_SOURCE};
use crate::error::{Error, Result};
use crate::spec;

impl Agent {
    /// Docker label filters selecting this agent's containers (profile and deployment, plus the
    /// extra labels). Docker ANDs them.
    pub(crate) fn label_filters(&self) -> Vec<String> {
        let mut filters = vec![
            format!("{}=true", spec::MANAGED_LABEL),
            format!("{}={}", spec::PROFILE_LABEL, self.inner.profile.name),
            format!("{}={}", spec::DEPLOYMENT_LABEL, self.inner.profile.deployment()),
        ];
        filters.extend(self.inner.settings.extra_labels.iter().map(|(name, value)| format!("{name}={value}")));
        filters
    }

    /// Every labelled session container of this profile and deployment, whatever its state.
    pub async fn inventory(&self) -> Result<Vec<InventoryEntry>> {
        let options =
            ListContainersOptions { all: true, filters: HashMap::from([("label".to_owned(), self.label_filters())]), ..Default::default() };
        let containers = self.inner.docker.list_containers(Some(options)).await.map_err(Error::from_docker)?;
        let service_port = self.inner.profile.container.service_port;
        let mut entries: Vec<InventoryEntry> = containers
            .into_iter()
            // Docker filtered by label already; checking again costs nothing and keeps another
            // deployment's containers out even if a filter were ever dropped.
            .filter(|summary| summary.labels.as_ref().is_some_and(|labels| spec::is_deployment_container(labels, &self.inner.profile)))
            .map(|summary| {
                let labels = summary.labels.unwrap_or_default();
                let host_port = summary
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .find(|port| port.private_port == service_port && port.public_port.is_some())
                    .and_then(|port| port.public_port);
                let pool_slot = labels.get(spec::POOL_SLOT_LABEL).cloned();
                // A claimed pool container carries no session labels: its identity file names the
                // session, its user and workspace (so reconciliation can save it like any other).
                let claim = pool_slot.as_deref().and_then(|slot| pool::read_claim(&self.inner.profile, slot));
                let (session, user, workspace) = match claim {
                    Some(claim) => (claim.session, claim.user, claim.workspace),
                    None => (
                        labels.get(spec::SESSION_LABEL).cloned().unwrap_or_default(),
                        labels.get(spec::USER_LABEL).cloned().unwrap_or_default(),
                        labels.get(spec::WORKSPACE_LABEL).cloned().unwrap_or_default(),
                    ),
                };
                InventoryEntry {
                    session: label::parse(&session),
                    user: label::parse(&user),
                    workspace: label::parse(&workspace),
                    container_id: summary.id.unwrap_or_default(),
                    state: summary.state.unwrap_or_default(),
                    host_port,
                    created: summary
                        .created
                        .and_then(|seconds| chrono::DateTime::from_timestamp(seconds, 0))
                        .map(|time| time.to_rfc3339())
                        .unwrap_or_default(),
                    pool_slot,
                }
            })
            .collect();
        entries.sort_by(|left, right| left.session.cmp(&right.session));
        Ok(entries)
    }

    /// Publishes `container.inventory` (no subject: it is about every session), naming the
    /// deployment so an engine of another deployment on the same broker ignores it.
    pub async fn publish_inventory(&self) -> Result<CloudEvent> {
        let entries = self.inventory().await?;
        let containers = entries.len();
        let data = ContainerInventory { deployment: self.inner.profile.deployment(), host: self.inner.profile.host(), containers: entries };
        let event = CloudEvent::of(EVENT_SOURCE, None, &data);
        self.inner.bus.publish_event(&event).await?;
        tracing::debug!(containers, "inventory published");
        Ok(event)
    }

    /// Publishes this host's `host.report`: its budget, and what its session containers (every
    /// container of the deployment that is not exited) hold by the profile's per-session limits.
    pub async fn publish_host_report(&self, interval: Duration) -> Result<CloudEvent> {
        let profile = &self.inner.profile;
        let entries = self.inventory().await?;
        let sessions = entries.iter().filter(|entry| !matches!(entry.state.as_str(), "exited" | "dead")).count() as u64;
        let report = protocol::host::HostReport {
            host: profile.host(),
            deployment: profile.deployment(),
            agent: protocol::AgentKind::Container,
            interval_secs: interval.as_secs().max(1),
            capacity: Some(protocol::host::HostCapacity::of(profile, sessions)),
            workspaces: None,
        };
        let event = report.to_event(EVENT_SOURCE);
        self.inner.bus.publish_event(&event).await?;
        tracing::debug!(host = %report.host, sessions, "host report published");
        Ok(event)
    }
}
