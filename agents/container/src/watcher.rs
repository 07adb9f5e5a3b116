//! Docker's event stream turned into `container.exited`: a session container that exits, dies or
//! is OOM-killed without the agent asking for it is reported, so the session's pattern can react.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::system::EventsOptions;
use futures::StreamExt;
use protocol::events::ContainerExited;
use protocol::{backoff, CloudEvent};

use crate::agent::{Agent, EVENT_SOURCE};
use crate::error::docker_status;
use crate::spec;

const RECONNECT_START: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Watches Docker's events forever, reconnecting when the stream ends (a Docker restart).
///
/// Exits that happen while the stream is down are not replayed; instead, a fresh
/// `container.inventory` goes out after every reconnection, so the engine sees the exited
/// containers' states from Docker itself rather than from a guess.
pub async fn watch_docker_events(agent: Agent) {
    let mut delays = backoff::doubling(RECONNECT_START, RECONNECT_MAX);
    loop {
        let began = tokio::time::Instant::now();
        let outcome = watch_once(&agent).await;
        // A stream that ran for a while was healthy: its end starts the backoff again.
        if began.elapsed() > RECONNECT_MAX {
            delays = backoff::doubling(RECONNECT_START, RECONNECT_MAX);
        }
        let delay = backoff::next_delay(&mut delays, RECONNECT_MAX);
        match outcome {
            Ok(()) => tracing::warn!("docker event stream ended, reconnecting"),
            Err(error) => tracing::warn!(%error, retry_in = ?delay, "docker event stream failed, reconnecting"),
        }
        tokio::time::sleep(delay).await;
        if let Err(error) = agent.publish_inventory().await {
            tracing::warn!(%error, "could not publish the inventory after reconnecting to docker");
        }
    }
}

async fn watch_once(agent: &Agent) -> Result<(), bollard::errors::Error> {
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("event".to_owned(), vec!["die".to_owned(), "oom".to_owned()]),
        ("label".to_owned(), agent.label_filters()),
    ]);
    let options = EventsOptions::<String> { since: None, until: None, filters };
    let mut stream = agent.docker().events(Some(options));
    // Docker reports `oom` just before `die`; remember it for the exit that follows.
    let mut out_of_memory: HashSet<String> = HashSet::new();
    tracing::info!("watching docker events");
    while let Some(message) = stream.next().await {
        let message = message?;
        if let Some(event) = exit_event(agent, &message, &mut out_of_memory).await {
            if let Err(error) = agent.bus().publish_event(&event).await {
                tracing::error!(%error, session_id = ?event.subject, "could not publish container.exited");
            }
        }
    }
    Ok(())
}

async fn exit_event(agent: &Agent, message: &EventMessage, out_of_memory: &mut HashSet<String>) -> Option<CloudEvent> {
    if message.typ != Some(EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let actor = message.actor.as_ref()?;
    let container_id = actor.id.clone()?;
    let attributes = actor.attributes.clone().unwrap_or_default();
    // Docker filtered by this deployment's labels already (event attributes carry the labels);
    // another deployment's exits are its own agent's to report.
    if !spec::is_deployment_container(&attributes, agent.profile()) {
        return None;
    }
    match message.action.as_deref()? {
        "oom" => {
            out_of_memory.insert(container_id);
            None
        }
        "die" => {
            let oom_reported = out_of_memory.remove(&container_id);
            if agent.take_expected_exit(&container_id) {
                tracing::debug!(container_id = %container_id, "exit caused by the agent itself");
                return None;
            }
            let exit_code: i64 = attributes.get("exitCode").and_then(|code| code.parse().ok()).unwrap_or(-1);
            let oom_killed = oom_reported || inspected_oom_killed(agent, &container_id).await;
            // A claimed warm-pool container has no session or thred label: its claim names both.
            let claimant = attributes.get(spec::POOL_SLOT_LABEL).and_then(|slot| agent.pool_claimant(slot));
            let (session, thred) = match (attributes.get(spec::SESSION_LABEL), claimant) {
                (Some(session), _) => (Some(session.clone()), attributes.get(spec::THRED_LABEL).cloned()),
                (None, Some((session, thred))) => (Some(session), thred),
                (None, None) => (None, None),
            };
            tracing::info!(container_id = %container_id, session_id = ?session, exit_code, oom_killed, "session container exited");
            let mut event = CloudEvent::of(EVENT_SOURCE, session.as_deref(), &ContainerExited { container_id, exit_code, oom_killed });
            if let Some(thred) = thred {
                event = event.with_extension("thredid", thred);
            }
            // Its host: an exit on a host the session has left is not the session's.
            event = event.with_extension("host", agent.profile().host());
            Some(event)
        }
        _ => None,
    }
}

async fn inspected_oom_killed(agent: &Agent, container_id: &str) -> bool {
    match agent.docker().inspect_container(container_id, None).await {
        Ok(inspected) => inspected.state.and_then(|state| state.oom_killed).unwrap_or(false),
        Err(error) => {
            if docker_status(&error) != Some(404) {
                tracing::warn!(container_id, %error, "could not inspect the exited container");
            }
            false
        }
    }
}
