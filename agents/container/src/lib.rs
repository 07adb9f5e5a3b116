//! The container agent: hardened, limited workspace containers through Docker.
//!
//! `berth agent container` consumes `berth.agent.container` ([`run`]); each task goes to
//! [`Agent::handle`], which answers with events on `berth.events`. Alongside, the agent watches
//! Docker's event stream (exits and OOM kills become `container.exited`) and publishes
//! `container.inventory` at start and periodically, so the engine can adopt the living and have
//! orphans removed. Nothing is kept in memory that a restart would need: containers are found again
//! by name and label, and their ports are read back from Docker.

mod agent;
pub mod egress;
pub mod error;
pub mod probe;
pub mod spec;
pub mod stats;
mod watcher;
pub mod work;

use std::future::Future;

use protocol::{AgentKind, Bus, BusConfig, ConsumeSpec, Profile};

pub use agent::{connect_docker, Agent, AgentSettings, InventoryEntry, ReadyContainer, EVENT_SOURCE};
pub use error::{Error, Result};
pub use spec::SessionIdentity;

/// Runs `berth agent container` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    spec::check_container_hardening(&profile)?;
    spec::check_publish_address().map_err(anyhow::Error::msg)?;
    let docker = connect_docker().await?;
    let bus =
        Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Container, "berth-agent-container")?).await?;
    bus.declare_topology().await?;
    let exporter = protocol::metrics::Exporter::start(&profile, bus.metrics_registry("berth_container")).await?;
    let mut settings = AgentSettings::production();
    if let Some(interval) = protocol::profile::seconds_from_env(protocol::profile::INVENTORY_INTERVAL_ENV).map_err(anyhow::Error::msg)? {
        settings.inventory_interval = interval.max(std::time::Duration::from_secs(1));
    }
    if let Some(grace) = protocol::profile::seconds_from_env(protocol::profile::ORPHAN_GRACE_ENV).map_err(anyhow::Error::msg)? {
        settings.orphan_grace = grace;
    }
    let report_interval = protocol::host::report_interval_from_env().map_err(anyhow::Error::msg)?;
    let host = profile.host();
    let host_queue = bus.declare_host_queue(protocol::topology::TASKS_EXCHANGE, AgentKind::Container, &host).await?;
    let agent = Agent::with_settings(profile, bus.clone(), docker, settings)?;
    tracing::info!(host = %host, queue = %host_queue, "container agent serving its host's queue and the shared one");
    let reporter = tokio::spawn(report_host_periodically(agent.clone(), report_interval));
    let queues = [protocol::topology::agent_queue(AgentKind::Container), host_queue];
    let served = agent.serve_queues(&queues, shutdown).await;
    reporter.abort();
    if let Some(exporter) = exporter {
        exporter.stop().await?;
    }
    served?;
    bus.close().await;
    Ok(())
}

/// Publishes this host's `host.report` (capacity and session count) now and every `interval`:
/// the engine places sessions by it, and a host whose reports stop is gone.
async fn report_host_periodically(agent: Agent, interval: std::time::Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(error) = agent.publish_host_report(interval).await {
            tracing::warn!(%error, "could not publish the host report");
        }
    }
}

impl Agent {
    /// Consumes tasks from `queue` until `shutdown`, with the Docker-event watcher and the periodic
    /// inventory running alongside. In-flight tasks finish before it returns.
    pub async fn serve(&self, queue: &str, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        self.serve_queues(&[queue.to_owned()], shutdown).await
    }

    /// [`Agent::serve`] on several queues at once (the shared one and this host's).
    pub async fn serve_queues(&self, queues: &[String], shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut background = protocol::supervise::Background::new();
        background.spawn("Docker event watcher", watcher::watch_docker_events(self.clone()));
        background.spawn("inventory", publish_inventory_periodically(self.clone()));
        let consume_all = |stop: protocol::supervise::Stop| {
            let consumers = queues.iter().map(|queue| {
                let mut spec = ConsumeSpec::new(queue, self.settings().concurrency);
                spec.concurrency = usize::from(self.settings().concurrency.max(1));
                let handler_agent = self.clone();
                self.bus().consume(
                    spec,
                    move |incoming| {
                        let agent = handler_agent.clone();
                        async move {
                            if let Err(reason) = protocol::identity::check_task_sender(protocol::AgentKind::Container, &incoming.sender) {
                                return protocol::Outcome::DeadLetter(reason);
                            }
                            agent.handle_delivery(&incoming.body).await
                        }
                    },
                    stop.clone().stopped(),
                )
            });
            futures::future::join_all(consumers)
        };
        let consumed = background.supervise(shutdown, consume_all).await.map_err(Error::Stopped)?;
        for result in consumed {
            result?;
        }
        Ok(())
    }
}

async fn publish_inventory_periodically(agent: Agent) {
    let mut ticker = tokio::time::interval(agent.settings().inventory_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(error) = agent.publish_inventory().await {
            tracing::warn!(%error, "could not publish the container inventory");
        }
        if let Err(error) = agent.reensure_egress().await {
            tracing::error!(%error, "the session network's egress rules are missing and could not be restored");
        }
        if let Err(error) = agent.remove_stale_egress_rules().await {
            tracing::warn!(%error, "could not look for stale egress rules");
        }
    }
}
