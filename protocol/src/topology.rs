//! Every exchange, queue and header name on the broker, in one place.

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
/// Deliveries after which a quorum queue dead-letters a message that keeps failing.
pub const DELIVERY_LIMIT: i64 = 5;

/// The quorum queue of one agent kind.
pub fn agent_queue(kind: AgentKind) -> String {
    format!("berth.agent.{}", kind.as_str())
}

/// Routing key for notifications to one user on [`NOTIFY_EXCHANGE`].
pub fn user_routing_key(user: &str) -> String {
    format!("user.{user}")
}
