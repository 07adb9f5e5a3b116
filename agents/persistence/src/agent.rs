//! The agent around a [`Store`]: consumes persistence tasks, answers requests that carry
//! `reply_to`, and maps failures of fire-and-forget tasks to retry or dead-letter.
//!
//! Handler contract: [`Agent::handle`] executes one task; [`error_policy`] decides what a failure
//! means for the message. Writes are idempotent by task id (the store keeps the first answer).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use protocol::store::{ErrorKind, Operation, Reply, MAX_DOCUMENT_BYTES};
use protocol::{backoff, topology, AgentKind, Bus, BusConfig, ConsumeSpec, Incoming, Outcome, Profile, Task};
use serde_json::Value;

use crate::{open_store, Error, Result, Store, APPLIED_TASK_RETENTION};

/// Room for the task envelope around the largest document.
const MAX_TASK_BYTES: usize = MAX_DOCUMENT_BYTES + 64 * 1024;
/// Unacknowledged deliveries: keeps the pipe from the broker full.
const PREFETCH: u16 = 64;
/// Tasks are applied one at a time, in queue order: the engine publishes a session's record
/// upserts in transition order, and applying two of them concurrently could leave the older state
/// as the "current" one. Writes are serialised by the store anyway.
const CONCURRENCY: usize = 1;
/// A pause before a passing failure is requeued, so that a redelivery does not spin.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How long a fire-and-forget task waits in place for a store that is down before it goes to the
/// bus's retry ladder. Waiting in place keeps queue order (a retried message would let later
/// ones pass, and a session's record could go back in time); the bound lets shutdown finish.
const WAIT_IN_PLACE_FOR: Duration = Duration::from_secs(60);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The persistence agent: a store and the bus it answers on.
#[derive(Clone)]
pub struct Agent {
    store: Arc<dyn Store>,
    bus: Bus,
}

impl Agent {
    pub fn new(store: Arc<dyn Store>, bus: Bus) -> Agent {
        Agent { store, bus }
    }

    /// Executes one task.
    pub async fn handle(&self, task: &Task) -> Result<Value> {
        if task.agent != AgentKind::Persistence {
            return Err(Error::BadRequest(format!("a task for the {} agent reached the persistence agent", task.agent)));
        }
        let operation = Operation::from_task(task).map_err(Error::BadRequest)?;
        self.store.execute(Some(task.id), operation).await
    }

    /// Handles one delivery: a request gets a reply (success or error) and is acked; a
    /// fire-and-forget task is acked, retried or dead-lettered by [`error_policy`].
    pub async fn handle_delivery(&self, incoming: Incoming) -> Outcome {
        let mut outcome = self.decode_and_handle(&incoming).await;
        if incoming.reply_to.is_none() {
            let waiting_since = std::time::Instant::now();
            let cap = Duration::from_secs(5);
            let mut pauses = backoff::doubling(Duration::from_millis(100), cap);
            while outcome.as_ref().is_err_and(|error| error.kind() == ErrorKind::Unavailable) && waiting_since.elapsed() < WAIT_IN_PLACE_FOR
            {
                tokio::time::sleep(backoff::next_delay(&mut pauses, cap)).await;
                outcome = self.decode_and_handle(&incoming).await;
            }
        }
        if incoming.reply_to.is_some() {
            let reply = match &outcome {
                Ok(result) => Reply::Ok(result.clone()),
                Err(error) => Reply::error(error.kind(), error.to_string()),
            };
            // A result that does not encode is answered as an error, never as an empty reply.
            let body = reply.encode().or_else(|error| {
                tracing::error!(%error, "a reply did not encode; answering with the error");
                Reply::error(ErrorKind::Unavailable, format!("the result could not be encoded: {error}")).encode()
            });
            let body = match body {
                Ok(body) => body,
                Err(error) => return Outcome::DeadLetter(format!("no reply could be encoded: {error}")),
            };
            return match self.bus.reply(&incoming, &body).await {
                Ok(()) => Outcome::Ack,
                Err(error) => {
                    // Applied writes are deduplicated: the redelivery answers from the record.
                    tracing::warn!(%error, "could not send a reply; requeueing the request");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    Outcome::Retry
                }
            };
        }
        match outcome {
            Ok(_) => Outcome::Ack,
            Err(error) => error_policy(&error),
        }
    }

    async fn decode_and_handle(&self, incoming: &Incoming) -> Result<Value> {
        if incoming.body.len() > MAX_TASK_BYTES {
            return Err(Error::BadRequest(format!(
                "a task of {} bytes is larger than the {MAX_TASK_BYTES}-byte limit",
                incoming.body.len()
            )));
        }
        let task = Task::decode(&incoming.body).map_err(|error| Error::BadRequest(format!("not a task: {error}")))?;
        let started = std::time::Instant::now();
        let outcome = self.handle(&task).await;
        match &outcome {
            Ok(_) => tracing::debug!(task_id = %task.id, action = %task.action, elapsed = ?started.elapsed(), "task applied"),
            Err(error) => tracing::warn!(task_id = %task.id, action = %task.action, kind = %error.kind(), %error, "task failed"),
        }
        outcome
    }

    /// Consumes `queue` until `shutdown` completes.
    pub async fn consume(&self, queue: &str, shutdown: impl Future<Output = ()>) -> Result<()> {
        let agent = self.clone();
        let handler = move |incoming: Incoming| {
            let agent = agent.clone();
            async move {
                // Tasks come from the engine, store requests also from the session agent.
                if let Err(reason) = protocol::identity::check_task_sender(protocol::AgentKind::Persistence, &incoming.sender) {
                    return Outcome::DeadLetter(reason);
                }
                agent.handle_delivery(incoming).await
            }
        };
        let spec = ConsumeSpec { queue: queue.to_owned(), prefetch: PREFETCH, concurrency: CONCURRENCY };
        self.bus.consume(spec, handler, shutdown).await?;
        Ok(())
    }
}

/// What a failed fire-and-forget task becomes: a store that is still down after waiting in place
/// goes to the retry ladder without using up its attempts; anything else can never succeed and is
/// dead-lettered with the reason.
pub fn error_policy(error: &Error) -> Outcome {
    match error.kind() {
        ErrorKind::Unavailable => Outcome::RetryUnavailable,
        ErrorKind::BadRequest | ErrorKind::NotFound | ErrorKind::Conflict => Outcome::DeadLetter(format!("{}: {error}", error.kind())),
    }
}

/// `berth agent persistence`: open the store, create indexes, consume until shutdown.
pub async fn run(profile: &Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::from(open_store(&profile.services.store_url).await?);
    store.ensure_indexes().await?;
    let bus =
        Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Persistence, "berth-agent-persistence")?)
            .await?;
    bus.declare_topology().await?;
    let exporter = protocol::metrics::Exporter::start(profile, bus.metrics_registry("berth_persistence")).await?;
    let mut background = protocol::supervise::Background::new();
    background.spawn("task record pruning", prune_periodically(store.clone()));
    tracing::info!(store = %protocol::bus::redact(&profile.services.store_url), backend = ?store.backend(), "persistence agent started");
    let agent = Agent::new(store, bus.clone());
    let queue = topology::agent_queue(AgentKind::Persistence);
    let consumed = background.supervise(shutdown, |stop| agent.consume(&queue, stop.stopped())).await.map_err(anyhow::Error::new)?;
    if let Some(exporter) = exporter {
        exporter.stop().await?;
    }
    bus.close().await;
    consumed?;
    tracing::info!("persistence agent stopped");
    Ok(())
}

async fn prune_periodically(store: Arc<dyn Store>) {
    loop {
        match store.prune_applied_tasks(APPLIED_TASK_RETENTION).await {
            Ok(forgotten) => tracing::debug!(forgotten, "pruned old task records"),
            Err(error) => tracing::warn!(%error, "could not prune old task records"),
        }
        tokio::time::sleep(PRUNE_EVERY).await;
    }
}
