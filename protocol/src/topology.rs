//! Every exchange, queue and header name on the broker, in one place.

use std::time::Duration;

use crate::message::AgentKind;

/// Topic exchange for all events; routing key = event type.
pub const EVENTS_EXCHANGE: &str = "berth.events";
/// Direct exchange for tasks; routing key = agent kind.
pub const TASKS_EXCHANGE: &str = "berth.tasks";
/// Topic exchange for user notifications; routing key = `user.<id>`.
pub const NOTIFY_EXCHANGE: &str = "berth.notify";
/// Fanout exchange for dead letters.
pub const DEAD_EXCHANGE: &str = "berth.dead";
/// The queue every dead letter ends up in, each carrying [`REASON_HEADER`].
pub const DEAD_LETTER_QUEUE: &str = "berth.dead-letter";
/// The engine's queue, bound to every event type.
pub const ENGINE_QUEUE: &str = "berth.engine";
/// Header naming why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-berth-reason";
/// Header naming the queue a dead letter came from.
pub const ORIGIN_HEADER: &str = "x-berth-origin-queue";
/// Deliveries after which a quorum queue dead-letters a message that keeps failing. Handlers that
/// return go through the retry ladder instead (each retry is a fresh message), so this only catches
/// messages whose handler crashes the process mid-delivery.
pub const DELIVERY_LIMIT: i64 = 5;
/// Header counting the `Outcome::Retry` failures a message has been through.
pub const ATTEMPTS_HEADER: &str = "x-berth-attempts";
/// Header counting the `Outcome::RetryUnavailable` outages a message has waited through.
pub const OUTAGES_HEADER: &str = "x-berth-outages";
/// Header naming the original sender (its `user_id`) of a retry copy or a dead letter: both are
/// published by the consumer's own identity. Trusted only on a message whose validated `user_id`
/// is the consuming identity's own.
pub const SENDER_HEADER: &str = "x-berth-sender";
/// Header keeping a retried message's original routing key (it comes back from its delay queue
/// through the default exchange, routed by queue name).
pub const ROUTING_KEY_HEADER: &str = "x-berth-routing-key";

/// The retry ladder: the wait before the first, second, third … retry of a message; the last rung
/// repeats. A retry waits in the delay queue [`retry_queue`]`(queue, delay)` until its queue-level
/// TTL sends it back to its work queue.
pub const RETRY_DELAYS: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)];
/// `Outcome::Retry` failures after which a message is dead-lettered (this many handler runs).
pub const MAX_RETRY_ATTEMPTS: u32 = 8;
/// `Outcome::RetryUnavailable` outages after which a message is dead-lettered anyway: a sanity cap,
/// about an hour of waiting with [`RETRY_DELAYS`] (1 s + 5 s + 118 × 30 s ≈ 59 min).
pub const MAX_OUTAGE_RETRIES: u32 = 120;
/// Delay queues of queues outside the standard topology (tests, benchmarks, isolated engines) are
/// deleted after this long without being declared, so a crashed test leaves nothing behind.
pub const TEMPORARY_RETRY_QUEUE_EXPIRY: Duration = Duration::from_secs(30 * 60);

/// The quorum queue of one agent kind.
pub fn agent_queue(kind: AgentKind) -> String {
    format!("berth.agent.{}", kind.as_str())
}

/// The host id of a deployment that names none (`services.host`, `BERTH_HOST`): one machine runs
/// as one host, and its agents take the shared queues' tasks and their host's alike.
pub const DEFAULT_HOST: &str = "local";
/// The event types of a host's heartbeat (capacity and sessions from its container agent, cached
/// workspaces from its workspace agent): each in its agent's family, so the broker-validated
/// sender of a report is the agent it claims to be.
pub const HOST_REPORTS: [&str; 2] = ["container.host_report", "workspace.host_report"];

/// The heartbeat's event type for a host-affine agent kind (see [`HOST_REPORTS`]).
pub fn host_report_type(kind: AgentKind) -> String {
    format!("{}.host_report", kind.as_str())
}

/// How often each host-affine agent publishes its host report (`BERTH_HOST_REPORT_INTERVAL_SECS`).
pub const HOST_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// A host whose container agent has not reported for this many intervals is gone: the engine
/// keeps each report in Redis with a TTL of this many intervals, and its expiry is the verdict.
pub const HOST_GONE_AFTER_REPORTS: u32 = 3;

/// Whether an agent kind's tasks act on one host (its Docker engine, its directories): those go
/// to the host a session was placed on, on [`host_routing_key`].
pub fn is_host_affine(kind: AgentKind) -> bool {
    matches!(kind, AgentKind::Container | AgentKind::Workspace)
}

/// The routing key on [`TASKS_EXCHANGE`] of one host's tasks for `kind`: `container.<host>`.
pub fn host_routing_key(kind: AgentKind, host: &str) -> String {
    format!("{}.{host}", kind.as_str())
}

/// The quorum queue of one host's tasks for `kind`: `berth.agent.container.<host>`, declared by
/// the host's agent itself (a host's queue outlives the host: tasks wait there until it is back).
pub fn host_agent_queue(kind: AgentKind, host: &str) -> String {
    format!("berth.agent.{}.{host}", kind.as_str())
}

/// The work queues of the standard topology: the engine's and one per agent kind. Their delay
/// queues are permanent; every other queue's expire after [`TEMPORARY_RETRY_QUEUE_EXPIRY`].
pub fn standard_work_queues() -> Vec<String> {
    let mut queues = vec![ENGINE_QUEUE.to_owned()];
    queues.extend(AgentKind::ALL.into_iter().map(agent_queue));
    queues
}

/// The delay queue holding `queue`'s retries that wait `delay`: `<queue>.retry.<delay>`, e.g.
/// `berth.engine.retry.5s` (server-named `amq.*` queues get `berth.` in front: that prefix is the
/// broker's).
pub fn retry_queue(queue: &str, delay: Duration) -> String {
    let millis = delay.as_millis();
    let delay = if millis.is_multiple_of(1000) { format!("{}s", millis / 1000) } else { format!("{millis}ms") };
    if queue.starts_with("amq.") {
        format!("berth.{queue}.retry.{delay}")
    } else {
        format!("{queue}.retry.{delay}")
    }
}

/// Routing key for notifications to one user on [`NOTIFY_EXCHANGE`].
pub fn user_routing_key(user: &str) -> String {
    format!("user.{user}")
}
