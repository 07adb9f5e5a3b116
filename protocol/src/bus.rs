//! The AMQP bus on lapin: connect with backoff, reconnect after broker restarts, declare the
//! topology idempotently, publish with confirms, consume with manual acks, dead-letter with a reason,
//! request/reply, and graceful shutdown.
//!
//! Retries wait. A handler's [`Outcome::Retry`] or [`Outcome::RetryUnavailable`] does not requeue
//! the message (it would come straight back and burn the quorum queue's delivery limit within
//! seconds of an outage): the consumer publishes a copy, confirmed, to one of the work queue's delay
//! queues ([`topology::retry_queue`]) with the counts in [`topology::ATTEMPTS_HEADER`] and
//! [`topology::OUTAGES_HEADER`], then acks the original. A delay queue has a queue-level TTL (every
//! message in it waits the same, so expiry at the head is exact) and dead-letters through the
//! default exchange back to its work queue. [`RetryPolicy`] holds the ladder and the limits.
//!
//! Only this module touches lapin; components see [`Bus`], [`Incoming`] and [`Outcome`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{oneshot, Mutex, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::backoff;
use crate::event::{CloudEvent, CONTENT_TYPE};
use crate::identity::{Identity, IdentityError, Sender};
use crate::message::{AgentKind, Notification, Task};
use crate::metrics::BusMetrics;
use crate::topology;

/// How long publishing keeps retrying through broker outages before it gives up.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(60);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// An error of the AMQP client library, kept opaque: no lapin type is part of this crate's API.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct AmqpError(lapin::Error);

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A message that does not serialize is never published as an empty body.
    #[error("cannot encode the {what}: {source}")]
    Encode { what: &'static str, source: serde_json::Error },
    #[error("broker unreachable at {url}: {source}")]
    Unreachable { url: String, source: AmqpError },
    #[error("amqp error: {0}")]
    Amqp(AmqpError),
    #[error("broker refused (nacked) the message published to {exchange}/{routing_key}")]
    Nacked { exchange: String, routing_key: String },
    #[error("no reply to the request on {routing_key} within {timeout:?}")]
    ReplyTimeout { routing_key: String, timeout: Duration },
    #[error("gave up publishing to {exchange}/{routing_key} after {attempts} attempts: {last_error}")]
    PublishFailed { exchange: String, routing_key: String, attempts: u32, last_error: String },
    #[error("the broker could not route the message published to {exchange}/{routing_key} (queue missing?)")]
    Unroutable { exchange: String, routing_key: String },
    /// The broker refused the operation for this connection's user (ACCESS_REFUSED, or a
    /// `user_id` that is not the connection's): never retried.
    #[error("the broker refused {operation} for user `{user}`: {reason}")]
    Refused { operation: String, user: String, reason: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the topology is not declared ({missing}): run `berth bootstrap` first ({source})")]
    TopologyMissing { missing: String, source: AmqpError },
}

impl From<lapin::Error> for BusError {
    fn from(error: lapin::Error) -> BusError {
        BusError::Amqp(AmqpError(error))
    }
}

/// The broker's reason when `error` is a refusal of this user's rights (403 ACCESS_REFUSED) or of
/// a `user_id` that is not the connection's (406 PRECONDITION_FAILED).
fn refusal(error: &lapin::Error) -> Option<String> {
    match error {
        lapin::Error::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 406) => Some(amqp.to_string()),
        _ => None,
    }
}

pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// Connection settings for the bus.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub url: String,
    /// Name shown in the broker's management UI.
    pub connection_name: String,
    /// How long [`Bus::connect`] keeps retrying before it fails.
    pub connect_timeout: Duration,
    /// The broker user of `url`: every publish carries it as `user_id`, which the broker checks.
    pub user: String,
    /// The identity `user` stands for ([`Identity::Admin`] for any user that is not a created one).
    pub identity: Identity,
}

impl BusConfig {
    /// As the user `url` names (tests and tools that act as the admin).
    pub fn new(url: &str, connection_name: &str) -> BusConfig {
        let user = crate::identity::AmqpUrl::parse(url).map_or_else(|_| "guest".to_owned(), |parsed| parsed.user);
        let identity = Identity::of_username(&user).unwrap_or(Identity::Admin);
        BusConfig {
            url: url.to_owned(),
            connection_name: connection_name.to_owned(),
            connect_timeout: Duration::from_secs(60),
            user,
            identity,
        }
    }

    /// As `identity` on the broker and vhost of `amqp_url`, with the identity's password from
    /// [`crate::identity::secrets_dir`] (the admin uses `amqp_url` as it is).
    pub fn for_identity(amqp_url: &str, identity: Identity, connection_name: &str) -> Result<BusConfig, IdentityError> {
        let url = crate::identity::url_for(amqp_url, identity)?;
        Ok(BusConfig::new(&url, connection_name))
    }
}

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub body: Vec<u8>,
    /// The key it was first published with (kept across retries).
    pub routing_key: String,
    /// Who published it, from the broker-validated `user_id` (kept across retries: a retry copy is
    /// published by the consumer's own identity and names the original sender in
    /// [`topology::SENDER_HEADER`], trusted only on messages the consumer's own identity sent).
    pub sender: Sender,
    /// A handler may have seen this message before: the broker redelivered it, or it is a retry.
    pub redelivered: bool,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub headers: HashMap<String, String>,
}

/// What a handler decided about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or nothing to do): acknowledge.
    Ack,
    /// A failure that may pass (a conflict, a transient error of this message's own): retried after
    /// the ladder's delay (1 s, 5 s, then 30 s); the [`topology::MAX_RETRY_ATTEMPTS`]-th is
    /// dead-lettered with a reason naming the attempts.
    Retry,
    /// A dependency is unavailable (Redis, Docker, the object store, the store, the broker):
    /// retried after the ladder's delay like [`Outcome::Retry`], but never counting against the
    /// attempt limit; only the sanity cap [`topology::MAX_OUTAGE_RETRIES`] (about an hour of
    /// waiting) dead-letters it.
    RetryUnavailable,
    /// The message can never succeed: move it to the dead-letter queue with this reason.
    DeadLetter(String),
}

impl Outcome {
    /// The outcome's name in metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Retry => "retry",
            Outcome::RetryUnavailable => "retry_unavailable",
            Outcome::DeadLetter(_) => "dead_letter",
        }
    }
}

/// How a consumer retries: the delay ladder and the limits. [`RetryPolicy::standard`] is
/// production's ([`topology::RETRY_DELAYS`], [`topology::MAX_RETRY_ATTEMPTS`],
/// [`topology::MAX_OUTAGE_RETRIES`]); tests use short delays through [`Bus::with_retry_policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    delays: Vec<Duration>,
    max_attempts: u32,
    max_outages: u32,
}

impl RetryPolicy {
    /// The production ladder and limits.
    pub fn standard() -> RetryPolicy {
        RetryPolicy::new(&topology::RETRY_DELAYS, topology::MAX_RETRY_ATTEMPTS, topology::MAX_OUTAGE_RETRIES)
    }

    /// `delays[n]` is the wait before the retry that follows `n` earlier retries (the last repeats);
    /// the `max_attempts`-th [`Outcome::Retry`] and the `max_outages`-th
    /// [`Outcome::RetryUnavailable`] of a message dead-letter it.
    ///
    /// # Panics
    /// When `delays` is empty, a delay is under 1 ms or over a day, or a limit is 0: these are
    /// constants in code, not input.
    pub fn new(delays: &[Duration], max_attempts: u32, max_outages: u32) -> RetryPolicy {
        assert!(!delays.is_empty(), "a retry ladder needs at least one delay");
        assert!(
            delays.iter().all(|delay| *delay >= Duration::from_millis(1) && *delay <= Duration::from_secs(86_400)),
            "retry delays must be between 1 ms and a day: {delays:?}"
        );
        assert!(max_attempts > 0 && max_outages > 0, "retry limits must be at least 1");
        RetryPolicy { delays: delays.to_vec(), max_attempts, max_outages }
    }

    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    pub fn max_outages(&self) -> u32 {
        self.max_outages
    }

    /// The wait before the next retry of a message that has been retried `earlier_retries` times.
    pub fn delay_after(&self, earlier_retries: u32) -> Duration {
        let rung = usize::try_from(earlier_retries).unwrap_or(usize::MAX).min(self.delays.len() - 1);
        self.delays[rung]
    }
}

/// What a consumer reads and how.
#[derive(Debug, Clone)]
pub struct ConsumeSpec {
    pub queue: String,
    /// Unacknowledged deliveries the broker may hand out at once.
    pub prefetch: u16,
    /// Messages handled at the same time (at most `prefetch`).
    pub concurrency: usize,
}

impl ConsumeSpec {
    pub fn new(queue: &str, prefetch: u16) -> ConsumeSpec {
        ConsumeSpec { queue: queue.to_owned(), prefetch, concurrency: usize::from(prefetch.max(1)) }
    }
}

/// What a published message carries besides its body and routing: the few AMQP properties
/// Berth sets. Every publish is persistent and carries the bus's user as `user_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Properties {
    content_type: Option<String>,
    message_id: Option<String>,
    headers: Vec<(String, String)>,
    /// Published `mandatory`: one no queue takes is an error, not dropped.
    must_be_routed: bool,
}

impl Properties {
    /// No content type, no id, no headers.
    pub fn bare() -> Properties {
        Properties { content_type: None, message_id: None, headers: Vec::new(), must_be_routed: false }
    }

    /// A JSON body (tasks, notifications, store operations).
    pub fn json() -> Properties {
        Properties { content_type: Some("application/json".to_owned()), ..Properties::bare() }
    }

    /// A CloudEvent body ([`CONTENT_TYPE`]).
    pub fn cloud_event() -> Properties {
        Properties { content_type: Some(CONTENT_TYPE.to_owned()), ..Properties::bare() }
    }

    /// Names the message (the broker and consumers see it as `message_id`).
    pub fn with_message_id(mut self, message_id: &str) -> Properties {
        self.message_id = Some(message_id.to_owned());
        self
    }

    /// The message must reach a queue: publishing it where no queue is bound (a host queue not
    /// declared yet, or deleted) fails with [`BusError::Unroutable`] instead of the broker
    /// dropping it without a word. Not retried: the caller decides (the engine retries the event,
    /// its outbox kept).
    pub fn must_be_routed(mut self) -> Properties {
        self.must_be_routed = true;
        self
    }

    /// Adds a text header (consumers read it in [`Incoming::headers`]).
    pub fn with_header(mut self, name: &str, value: &str) -> Properties {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn to_amqp(&self) -> BasicProperties {
        let mut properties = BasicProperties::default();
        if let Some(content_type) = &self.content_type {
            properties = properties.with_content_type(content_type.clone().into());
        }
        if let Some(message_id) = &self.message_id {
            properties = properties.with_message_id(message_id.clone().into());
        }
        if !self.headers.is_empty() {
            let mut headers = FieldTable::default();
            for (name, value) in &self.headers {
                headers.insert(name.clone().into(), AMQPValue::LongString(LongString::from(value.clone())));
            }
            properties = properties.with_headers(headers);
        }
        properties
    }
}

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Topic,
    Direct,
    Fanout,
}

impl ExchangeKind {
    fn amqp(self) -> lapin::ExchangeKind {
        match self {
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        }
    }
}

/// Whether an exchange or queue survives a broker restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Durable,
    Transient,
}

/// Whether the broker deletes an exchange once its last binding goes, or a queue once its last
/// consumer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoDelete {
    /// It stays until deleted (or, transient, until the broker restarts).
    Never,
    WhenUnused,
}

/// A queue to declare with [`Bus::declare_queue`]: a classic queue unless [`QueueSpec::quorum`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    name: String,
    durability: Durability,
    auto_delete: AutoDelete,
    quorum: bool,
    delivery_limit: Option<i64>,
    expires_after: Option<Duration>,
}

impl QueueSpec {
    /// A classic queue that stays until deleted.
    pub fn classic(name: &str, durability: Durability) -> QueueSpec {
        QueueSpec {
            name: name.to_owned(),
            durability,
            auto_delete: AutoDelete::Never,
            quorum: false,
            delivery_limit: None,
            expires_after: None,
        }
    }

    /// A quorum queue (always durable), like every work queue of Berth.
    pub fn quorum(name: &str) -> QueueSpec {
        QueueSpec { quorum: true, ..QueueSpec::classic(name, Durability::Durable) }
    }

    /// The broker deletes the queue once its last consumer is gone.
    pub fn deleted_when_unused(mut self) -> QueueSpec {
        self.auto_delete = AutoDelete::WhenUnused;
        self
    }

    /// A message delivered this many times is dead-lettered (quorum queues, `x-delivery-limit`).
    pub fn with_delivery_limit(mut self, limit: i64) -> QueueSpec {
        self.delivery_limit = Some(limit);
        self
    }

    /// The broker deletes the queue once it has been unused (no consumer, no declaration) this
    /// long (`x-expires`): what a test or benchmark that dies before its teardown leaves goes away.
    pub fn expiring_after(mut self, unused: Duration) -> QueueSpec {
        self.expires_after = Some(unused);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.quorum {
            arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        if let Some(limit) = self.delivery_limit {
            arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        }
        if let Some(unused) = self.expires_after {
            // A 32-bit integer when it fits, as every declaration of these queues has sent so far.
            let value = i32::try_from(millis(unused)).map_or_else(|_| AMQPValue::LongLongInt(millis(unused)), AMQPValue::LongInt);
            arguments.insert("x-expires".into(), value);
        }
        arguments
    }
}

/// How a [`Subscription`] settles what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// The broker forgets each message as it hands it out (fire-and-forget streams, test taps).
    Automatic,
    /// Each message is acknowledged as it is received, with at most `prefetch` unacknowledged at
    /// once; what was delivered but not yet received goes back to the queue when the subscription
    /// closes.
    OnReceipt { prefetch: u16 },
}

/// The only consumer of one queue, read message by message with [`Subscription::next`]: for
/// streams that need no handler and no retries (the session agent's notifications, test taps,
/// benchmarks). [`Bus::consume`] is the consumer for work.
pub struct Subscription {
    queue: String,
    channel: Channel,
    consumer: lapin::Consumer,
    consumer_tag: String,
    acks: Acks,
    own_user: String,
}

impl Subscription {
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next message; `None` once the broker ended the subscription (its queue or connection is
    /// gone). With [`Acks::Automatic`] it is cancel-safe.
    pub async fn next(&mut self) -> Option<Result<Incoming>> {
        let mut delivery = match self.consumer.next().await? {
            Ok(delivery) => delivery,
            Err(error) => return Some(Err(error.into())),
        };
        if let Acks::OnReceipt { .. } = self.acks {
            if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                return Some(Err(error.into()));
            }
        }
        // The body moves instead of being copied: benchmarks read the broker's own rate this way.
        let body = std::mem::take(&mut delivery.data);
        let mut incoming = Incoming::received(&delivery, Some(&self.own_user));
        incoming.body = body;
        Some(Ok(incoming))
    }

    /// The messages as a stream, ending with the subscription.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Incoming>> + Send {
        futures::stream::unfold(self, |mut subscription| async move { subscription.next().await.map(|next| (next, subscription)) })
    }

    /// Cancels the consumer and closes its channel.
    pub async fn close(self) {
        let _ = self.channel.basic_cancel(&self.consumer_tag, BasicCancelOptions::default()).await;
        let _ = self.channel.close(200, "subscription closed").await;
    }
}

struct Link {
    connection: Connection,
    publisher: Channel,
}

type PendingReplies = Arc<std::sync::Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// A cheaply cloneable handle on one broker connection that heals itself.
#[derive(Clone)]
pub struct Bus {
    config: Arc<BusConfig>,
    link: Arc<Mutex<Option<Link>>>,
    /// Held by the one caller reconnecting at a time.
    reconnecting: Arc<Mutex<()>>,
    replies: Arc<Mutex<Option<(Channel, PendingReplies)>>>,
    retry: Arc<RetryPolicy>,
    dead_exchange: Arc<str>,
    metrics: BusMetrics,
}

impl Bus {
    /// Connects, retrying with exponential backoff until `config.connect_timeout`.
    pub async fn connect(config: BusConfig) -> Result<Bus> {
        let bus = Bus {
            config: Arc::new(config),
            link: Arc::new(Mutex::new(None)),
            reconnecting: Arc::new(Mutex::new(())),
            replies: Arc::new(Mutex::new(None)),
            retry: Arc::new(RetryPolicy::standard()),
            dead_exchange: Arc::from(topology::DEAD_EXCHANGE),
            metrics: BusMetrics::new(),
        };
        bus.publisher().await?;
        Ok(bus)
    }

    /// This bus (same connection) with another retry policy for the consumers it runs and the delay
    /// queues it declares; tests use short ladders this way.
    pub fn with_retry_policy(&self, policy: RetryPolicy) -> Bus {
        Bus { retry: Arc::new(policy), ..self.clone() }
    }

    /// This bus (same connection) dead-lettering through another fanout exchange: its consumers'
    /// dead letters and [`Bus::dead_letter`] go there instead of [`topology::DEAD_EXCHANGE`]
    /// (tests isolate themselves this way).
    pub fn with_dead_exchange(&self, dead_exchange: &str) -> Bus {
        Bus { dead_exchange: Arc::from(dead_exchange), ..self.clone() }
    }

    /// Registers this bus's counters (messages handled per queue and outcome with their handling
    /// time, publishes per exchange, connections opened) under `bus_` in `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry.sub_registry_with_prefix("bus"));
    }

    /// A registry for a component whose metrics are its bus's: `<prefix>_bus_…`.
    pub fn metrics_registry(&self, prefix: &str) -> prometheus_client::registry::Registry {
        let mut registry = prometheus_client::registry::Registry::with_prefix(prefix);
        self.register_metrics(&mut registry);
        registry
    }

    /// The retry policy of the consumers this bus runs.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// The identity this bus connects as.
    pub fn identity(&self) -> Identity {
        self.config.identity
    }

    /// The broker user this bus connects as (the `user_id` of everything it publishes).
    pub fn user(&self) -> &str {
        &self.config.user
    }

    fn stamped(&self, properties: BasicProperties) -> BasicProperties {
        properties.with_user_id(self.config.user.clone().into())
    }

    /// Is the broker reachable right now?
    pub async fn is_connected(&self) -> bool {
        matches!(&*self.link.lock().await, Some(link) if link.connection.status().connected())
    }

    async fn open_connection(&self) -> Result<Connection> {
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        let mut delays = backoff::doubling(BACKOFF_START, BACKOFF_MAX);
        loop {
            let properties = ConnectionProperties::default()
                .with_connection_name(self.config.connection_name.clone().into())
                .with_executor(tokio_executor_trait::Tokio::current())
                .with_reactor(tokio_reactor_trait::Tokio);
            match Connection::connect(&self.config.url, properties).await {
                Ok(connection) => {
                    self.metrics.connected();
                    return Ok(connection);
                }
                Err(source) if tokio::time::Instant::now() >= deadline => {
                    return Err(BusError::Unreachable { url: redact(&self.config.url), source: AmqpError(source) })
                }
                Err(error) => {
                    let delay = backoff::next_delay(&mut delays, BACKOFF_MAX);
                    tracing::warn!(url = %redact(&self.config.url), %error, retry_in = ?delay, "broker not reachable");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The shared publishing channel (confirm mode), reconnecting when the connection is gone.
    /// The link's lock is held only to read or swap it, never across a reconnect (which backs off
    /// for as long as the broker is away), so readiness and other callers are answered at once;
    /// reconnects themselves take turns.
    async fn publisher(&self) -> Result<Channel> {
        if let Some(publisher) = self.live_publisher().await {
            return Ok(publisher);
        }
        let _turn = self.reconnecting.lock().await;
        if let Some(publisher) = self.live_publisher().await {
            return Ok(publisher);
        }
        let kept = self.link.lock().await.take().map(|link| link.connection).filter(|connection| connection.status().connected());
        let connection = match kept {
            Some(connection) => connection,
            None => self.open_connection().await?,
        };
        let publisher = connection.create_channel().await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
        *self.link.lock().await = Some(Link { connection, publisher: publisher.clone() });
        Ok(publisher)
    }

    async fn live_publisher(&self) -> Option<Channel> {
        let link = self.link.lock().await;
        let link = link.as_ref()?;
        (link.connection.status().connected() && link.publisher.status().connected()).then(|| link.publisher.clone())
    }

    /// A fresh channel on the shared connection (for consumers and declarations).
    async fn channel(&self) -> Result<Channel> {
        self.publisher().await?;
        let link = self.link.lock().await;
        match link.as_ref() {
            Some(link) => Ok(link.connection.create_channel().await?),
            None => Err(BusError::from(lapin::Error::InvalidConnectionState(lapin::ConnectionState::Closed))),
        }
    }

    async fn forget_link(&self) {
        self.link.lock().await.take();
    }

    /// Drops the link only when its connection is gone: a consumer that failed on a channel-level
    /// error (a deleted queue) must not tear down the connection every other user shares.
    async fn forget_link_if_broken(&self) {
        let mut link = self.link.lock().await;
        if !matches!(&*link, Some(current) if current.connection.status().connected()) {
            link.take();
        }
    }

    /// Publishes one persistent message and waits for the broker's confirm, retrying through
    /// connection loss until [`PUBLISH_DEADLINE`].
    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8], properties: Properties) -> Result<()> {
        let options = BasicPublishOptions { mandatory: properties.must_be_routed, ..BasicPublishOptions::default() };
        self.publish_amqp(exchange, routing_key, body, properties.to_amqp(), options).await
    }

    async fn publish_amqp(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        options: BasicPublishOptions,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + PUBLISH_DEADLINE;
        let mut delays = backoff::doubling(BACKOFF_START, BACKOFF_MAX);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match self.publish_once(exchange, routing_key, body, properties.clone(), options).await {
                Ok(()) => {
                    self.metrics.published(exchange);
                    return Ok(());
                }
                Err(error @ BusError::Unroutable { .. }) => {
                    self.metrics.publish_failed(exchange);
                    return Err(error);
                }
                Err(error @ BusError::Nacked { .. }) => error,
                Err(BusError::Amqp(AmqpError(error))) if refusal(&error).is_some() => {
                    return Err(BusError::Refused {
                        operation: format!("publishing to {exchange}/{routing_key}"),
                        user: self.config.user.clone(),
                        reason: refusal(&error).unwrap_or_default(),
                    });
                }
                Err(error) => {
                    self.forget_link().await;
                    error
                }
            };
            if tokio::time::Instant::now() >= deadline {
                self.metrics.publish_failed(exchange);
                return Err(BusError::PublishFailed {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                    attempts,
                    last_error: error.to_string(),
                });
            }
            let delay = backoff::next_delay(&mut delays, BACKOFF_MAX);
            tracing::warn!(exchange, routing_key, %error, retry_in = ?delay, "publish failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        options: BasicPublishOptions,
    ) -> Result<()> {
        let channel = self.publisher().await?;
        let properties = self.stamped(properties).with_delivery_mode(2);
        // A refused publish closes the channel; the broker's reason comes back as the error.
        let confirmation = channel.basic_publish(exchange, routing_key, options, body, properties).await?.await?;
        match confirmation {
            // Returned (only a mandatory publish is): no queue took it.
            Confirmation::Ack(Some(_returned)) if options.mandatory => {
                Err(BusError::Unroutable { exchange: exchange.to_owned(), routing_key: routing_key.to_owned() })
            }
            Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
            Confirmation::Nack(_) => Err(BusError::Nacked { exchange: exchange.to_owned(), routing_key: routing_key.to_owned() }),
        }
    }

    /// Publishes an event on `berth.events` with its type as routing key.
    pub async fn publish_event(&self, event: &CloudEvent) -> Result<()> {
        self.publish_event_to(topology::EVENTS_EXCHANGE, event).await
    }

    /// Publishes an event on another topic exchange (tests isolate themselves this way).
    pub async fn publish_event_to(&self, exchange: &str, event: &CloudEvent) -> Result<()> {
        let properties = Properties::cloud_event().with_message_id(&event.id);
        let body = event.encode().map_err(|source| BusError::Encode { what: "event", source })?;
        self.publish(exchange, &event.event_type, &body, properties).await
    }

    /// Publishes a task on `berth.tasks` to its agent's queue.
    pub async fn publish_task(&self, task: &Task) -> Result<()> {
        let properties = Properties::json().with_message_id(&task.id.to_string());
        let body = task.encode().map_err(|source| BusError::Encode { what: "task", source })?;
        self.publish(topology::TASKS_EXCHANGE, task.agent.as_str(), &body, properties).await
    }

    /// Publishes a notification on `berth.notify` for its user.
    pub async fn publish_notification(&self, notification: &Notification) -> Result<()> {
        let properties = Properties::json().with_message_id(&notification.id.to_string());
        let body = notification.encode().map_err(|source| BusError::Encode { what: "notification", source })?;
        self.publish(topology::NOTIFY_EXCHANGE, &notification.routing_key(), &body, properties).await
    }

    /// Moves a message to the dead-letter queue with the reason it can never succeed (through
    /// [`topology::DEAD_EXCHANGE`] unless [`Bus::with_dead_exchange`] chose another).
    pub async fn dead_letter(&self, origin_queue: &str, message: &Incoming, reason: &str) -> Result<()> {
        self.dead_letter_to(&self.dead_exchange, origin_queue, message, reason).await
    }

    /// [`Bus::dead_letter`] through another dead-letter exchange (tests isolate themselves this way).
    pub async fn dead_letter_to(&self, dead_exchange: &str, origin_queue: &str, message: &Incoming, reason: &str) -> Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(topology::REASON_HEADER.into(), AMQPValue::LongString(LongString::from(reason.to_owned())));
        headers.insert(topology::ORIGIN_HEADER.into(), AMQPValue::LongString(LongString::from(origin_queue.to_owned())));
        headers.insert(
            topology::SENDER_HEADER.into(),
            AMQPValue::LongString(LongString::from(message.sender.user_id().unwrap_or_default().to_owned())),
        );
        for (name, value) in &message.headers {
            if name != topology::REASON_HEADER && name != topology::ORIGIN_HEADER && name != topology::SENDER_HEADER {
                headers.insert(name.clone().into(), AMQPValue::LongString(LongString::from(value.clone())));
            }
        }
        let properties = BasicProperties::default().with_headers(headers);
        self.publish_amqp(dead_exchange, &message.routing_key, &message.body, properties, BasicPublishOptions::default()).await
    }

    /// Answers a request received with `reply_to` and `correlation_id`.
    pub async fn reply(&self, request: &Incoming, body: &[u8]) -> Result<()> {
        let Some(reply_to) = &request.reply_to else { return Ok(()) };
        let mut properties = self.stamped(BasicProperties::default().with_content_type("application/json".into()));
        if let Some(correlation_id) = &request.correlation_id {
            properties = properties.with_correlation_id(correlation_id.clone().into());
        }
        // Replies are transient: the requester is waiting now or never.
        let channel = self.publisher().await?;
        channel.basic_publish("", reply_to, BasicPublishOptions::default(), body, properties).await?.await?;
        Ok(())
    }

    /// Sends a request to `exchange`/`routing_key` and waits for the reply (RabbitMQ direct reply-to).
    pub async fn request(&self, exchange: &str, routing_key: &str, body: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let (channel, pending) = self.reply_channel().await?;
        let correlation_id = Uuid::now_v7().to_string();
        let (sender, receiver) = oneshot::channel();
        lock_pending(&pending).insert(correlation_id.clone(), sender);
        let properties = self
            .stamped(BasicProperties::default())
            .with_content_type("application/json".into())
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(correlation_id.clone().into())
            // Nobody waits for the answer after the timeout: don't let the request outlive it.
            .with_expiration(timeout.as_millis().to_string().into());
        let published = async {
            channel.basic_publish(exchange, routing_key, BasicPublishOptions::default(), body, properties).await?.await?;
            Ok::<_, BusError>(())
        }
        .await;
        if let Err(error) = published {
            lock_pending(&pending).remove(&correlation_id);
            self.replies.lock().await.take();
            return Err(error);
        }
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => {
                lock_pending(&pending).remove(&correlation_id);
                Err(BusError::ReplyTimeout { routing_key: routing_key.to_owned(), timeout })
            }
        }
    }

    async fn reply_channel(&self) -> Result<(Channel, PendingReplies)> {
        let mut replies = self.replies.lock().await;
        if let Some((channel, pending)) = replies.as_ref() {
            if channel.status().connected() {
                return Ok((channel.clone(), pending.clone()));
            }
        }
        let channel = self.channel().await?;
        let mut consumer = channel
            .basic_consume(DIRECT_REPLY_TO, "", BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await?;
        let pending: PendingReplies = Arc::default();
        let routed = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(correlation_id) = delivery.properties.correlation_id().as_ref().map(|id| id.to_string()) else { continue };
                if let Some(sender) = lock_pending(&routed).remove(&correlation_id) {
                    let _ = sender.send(delivery.data);
                }
            }
        });
        *replies = Some((channel.clone(), pending.clone()));
        Ok((channel, pending))
    }

    /// Declares Berth's whole topology as the admin (bootstrap). Idempotent: every component calls
    /// it at start; a component identity has no right to declare, so for it this only checks
    /// (passively) that bootstrap declared everything.
    pub async fn declare_topology(&self) -> Result<()> {
        if self.config.identity != Identity::Admin {
            return self.check_topology().await;
        }
        let channel = self.channel().await?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for (name, kind) in [
            (topology::EVENTS_EXCHANGE, ExchangeKind::Topic),
            (topology::TASKS_EXCHANGE, ExchangeKind::Direct),
            (topology::NOTIFY_EXCHANGE, ExchangeKind::Topic),
            (topology::DEAD_EXCHANGE, ExchangeKind::Fanout),
        ] {
            channel.exchange_declare(name, kind.amqp(), durable, FieldTable::default()).await?;
        }
        let mut dead_letter_arguments = FieldTable::default();
        dead_letter_arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        declare_queue(&channel, topology::DEAD_LETTER_QUEUE, dead_letter_arguments).await?;
        channel
            .queue_bind(topology::DEAD_LETTER_QUEUE, topology::DEAD_EXCHANGE, "", QueueBindOptions::default(), FieldTable::default())
            .await?;
        declare_queue(&channel, topology::ENGINE_QUEUE, work_queue_arguments()).await?;
        channel
            .queue_bind(topology::ENGINE_QUEUE, topology::EVENTS_EXCHANGE, "#", QueueBindOptions::default(), FieldTable::default())
            .await?;
        for kind in AgentKind::ALL {
            let queue = topology::agent_queue(kind);
            declare_queue(&channel, &queue, work_queue_arguments()).await?;
            channel.queue_bind(&queue, topology::TASKS_EXCHANGE, kind.as_str(), QueueBindOptions::default(), FieldTable::default()).await?;
        }
        // The production ladder, whatever this bus's policy: a test's short ladder must not leave
        // permanent queues behind (its consumers declare their own).
        let standard = RetryPolicy::standard();
        for queue in topology::standard_work_queues() {
            declare_retry_queues_on(&channel, &queue, &standard).await?;
        }
        let _ = channel.close(200, "topology declared").await;
        Ok(())
    }

    /// Declares one host's queue for `kind` ([`topology::host_agent_queue`]) on `tasks_exchange`,
    /// bound by [`topology::host_routing_key`], and returns its name. Each host-affine agent
    /// declares its own at start: the topology does not know which hosts exist.
    pub async fn declare_host_queue(&self, tasks_exchange: &str, kind: AgentKind, host: &str) -> Result<String> {
        let channel = self.channel().await?;
        let queue = topology::host_agent_queue(kind, host);
        declare_queue(&channel, &queue, work_queue_arguments()).await?;
        channel
            .queue_bind(&queue, tasks_exchange, &topology::host_routing_key(kind, host), QueueBindOptions::default(), FieldTable::default())
            .await?;
        let _ = channel.close(200, "host queue declared").await;
        Ok(queue)
    }

    /// Checks passively (no rights needed) that the standard exchanges and work queues exist.
    async fn check_topology(&self) -> Result<()> {
        let passive_exchange = ExchangeDeclareOptions { passive: true, durable: true, ..Default::default() };
        let passive_queue = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
        let exchanges = [
            (topology::EVENTS_EXCHANGE, ExchangeKind::Topic),
            (topology::TASKS_EXCHANGE, ExchangeKind::Direct),
            (topology::NOTIFY_EXCHANGE, ExchangeKind::Topic),
            (topology::DEAD_EXCHANGE, ExchangeKind::Fanout),
        ];
        for (name, kind) in exchanges {
            // A failed passive declaration closes the channel: one channel per check.
            let channel = self.channel().await?;
            if let Err(source) = channel.exchange_declare(name, kind.amqp(), passive_exchange, FieldTable::default()).await {
                return Err(BusError::TopologyMissing { missing: format!("exchange {name}"), source: AmqpError(source) });
            }
            let _ = channel.close(200, "checked").await;
        }
        let mut queues = topology::standard_work_queues();
        queues.push(topology::DEAD_LETTER_QUEUE.to_owned());
        let channel = self.channel().await?;
        for queue in queues {
            if let Err(source) = channel.queue_declare(&queue, passive_queue, FieldTable::default()).await {
                return Err(BusError::TopologyMissing { missing: format!("queue {queue}"), source: AmqpError(source) });
            }
        }
        let _ = channel.close(200, "checked").await;
        Ok(())
    }

    /// Declares the delay queues that hold `queue`'s retries under this bus's [`RetryPolicy`], one
    /// per distinct delay ([`topology::retry_queue`]). Idempotent; [`Bus::consume`] calls it when a
    /// retry finds them missing, so calling it is optional (it moves the work to start-up and shows a
    /// permissions problem early). Delay queues of queues
    /// outside [`topology::standard_work_queues`] expire after
    /// [`topology::TEMPORARY_RETRY_QUEUE_EXPIRY`] without a declaration.
    pub async fn declare_retry_queues(&self, queue: &str) -> Result<()> {
        let channel = self.channel().await?;
        let declared = declare_retry_queues_on(&channel, queue, &self.retry).await;
        let _ = channel.close(200, "retry queues declared").await;
        declared
    }

    /// Deletes the delay queues of `queue` under this bus's [`RetryPolicy`] (test clean-up).
    pub async fn delete_retry_queues(&self, queue: &str) -> Result<()> {
        let channel = self.channel().await?;
        for delay in distinct_delays(&self.retry) {
            channel.queue_delete(&topology::retry_queue(queue, delay), QueueDeleteOptions::default()).await?;
        }
        let _ = channel.close(200, "retry queues deleted").await;
        Ok(())
    }

    /// Declares a private, self-deleting queue bound to `exchange` with the given keys; used by
    /// session-agent instances and by `berth tail`. Returns its server-assigned name.
    pub async fn declare_private_queue(&self, exchange: &str, binding_keys: &[String]) -> Result<String> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions { exclusive: false, auto_delete: true, durable: false, ..Default::default() };
        let mut arguments = FieldTable::default();
        // Expire the queue a while after its consumer is gone, even if it is never deleted.
        arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        let queue = channel.queue_declare("", options, arguments).await?;
        let name = queue.name().to_string();
        for key in binding_keys {
            channel.queue_bind(&name, exchange, key, QueueBindOptions::default(), FieldTable::default()).await?;
        }
        let _ = channel.close(200, "queue declared").await;
        Ok(name)
    }

    /// Binds or unbinds one routing key of a queue at run time.
    pub async fn set_binding(&self, queue: &str, exchange: &str, routing_key: &str, bound: Binding) -> Result<()> {
        let channel = self.channel().await?;
        match bound {
            Binding::Bind => channel.queue_bind(queue, exchange, routing_key, QueueBindOptions::default(), FieldTable::default()).await?,
            Binding::Unbind => channel.queue_unbind(queue, exchange, routing_key, FieldTable::default()).await?,
        }
        let _ = channel.close(200, "binding changed").await;
        Ok(())
    }

    /// Deletes a queue (tests and private queues).
    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        let channel = self.channel().await?;
        channel.queue_delete(queue, QueueDeleteOptions::default()).await?;
        let _ = channel.close(200, "queue deleted").await;
        Ok(())
    }

    /// Declares an exchange (idempotent while its kind and settings are the same).
    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind, durability: Durability, auto_delete: AutoDelete) -> Result<()> {
        let channel = self.channel().await?;
        let options = ExchangeDeclareOptions {
            durable: durability == Durability::Durable,
            auto_delete: auto_delete == AutoDelete::WhenUnused,
            ..Default::default()
        };
        channel.exchange_declare(name, kind.amqp(), options, FieldTable::default()).await?;
        let _ = channel.close(200, "exchange declared").await;
        Ok(())
    }

    /// Deletes an exchange (tests' and benchmarks' isolated ones).
    pub async fn delete_exchange(&self, name: &str) -> Result<()> {
        let channel = self.channel().await?;
        channel.exchange_delete(name, ExchangeDeleteOptions::default()).await?;
        let _ = channel.close(200, "exchange deleted").await;
        Ok(())
    }

    /// Declares a queue (idempotent while its settings are the same); bind it with
    /// [`Bus::set_binding`].
    pub async fn declare_queue(&self, spec: &QueueSpec) -> Result<()> {
        let channel = self.channel().await?;
        let options = QueueDeclareOptions {
            durable: spec.durability == Durability::Durable,
            auto_delete: spec.auto_delete == AutoDelete::WhenUnused,
            ..Default::default()
        };
        channel.queue_declare(&spec.name, options, spec.arguments()).await?;
        let _ = channel.close(200, "queue declared").await;
        Ok(())
    }

    /// The messages ready in `queue` (a passive declaration: no rights needed); an error when the
    /// queue does not exist.
    pub async fn ready_messages(&self, queue: &str) -> Result<u32> {
        let channel = self.channel().await?;
        let declared =
            channel.queue_declare(queue, QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await;
        let _ = channel.close(200, "counted").await;
        Ok(declared?.message_count())
    }

    /// Subscribes to `queue` as its only consumer; see [`Subscription`].
    pub async fn subscribe(&self, queue: &str, acks: Acks) -> Result<Subscription> {
        let channel = self.channel().await?;
        let no_ack = match acks {
            Acks::Automatic => true,
            Acks::OnReceipt { prefetch } => {
                channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
                false
            }
        };
        let consumer_tag = format!("berth-{}", Uuid::now_v7());
        let options = BasicConsumeOptions { no_ack, exclusive: true, ..Default::default() };
        let consumer = channel.basic_consume(queue, &consumer_tag, options, FieldTable::default()).await?;
        Ok(Subscription { queue: queue.to_owned(), channel, consumer, consumer_tag, acks, own_user: self.config.user.clone() })
    }

    /// Up to `limit` messages from the head of `queue`, left in it (read unacknowledged on a channel
    /// that then closes, so the broker puts them back; they count as redelivered).
    pub async fn peek_messages(&self, queue: &str, limit: usize) -> Result<Vec<Incoming>> {
        let channel = self.channel().await?;
        let mut messages = Vec::new();
        while messages.len() < limit {
            let Some(message) = channel.basic_get(queue, BasicGetOptions { no_ack: false }).await? else { break };
            messages.push(Incoming::received(&message.delivery, None));
        }
        let _ = channel.close(200, "peeked").await;
        Ok(messages)
    }

    /// Removes from `queue` up to `count` messages that `selected` picks and puts every other one
    /// back (a test tidying the shared dead-letter queue of its own messages); returns how many it
    /// removed.
    pub async fn remove_messages(&self, queue: &str, count: usize, selected: impl Fn(&Incoming) -> bool) -> Result<usize> {
        let channel = self.channel().await?;
        let mut others = Vec::new();
        let mut removed = 0;
        // Messages read and not yet settled are not handed out again: the loop ends with the queue.
        while removed < count {
            let Some(message) = channel.basic_get(queue, BasicGetOptions { no_ack: false }).await? else { break };
            if selected(&Incoming::received(&message.delivery, None)) {
                message.delivery.acker.ack(BasicAckOptions::default()).await?;
                removed += 1;
            } else {
                others.push(message.delivery.acker);
            }
        }
        for acker in others {
            acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
        }
        let _ = channel.close(200, "messages removed").await;
        Ok(removed)
    }

    /// Consumes `spec.queue` until `shutdown` completes, handing each message to `handler`.
    ///
    /// A message is acked only after its handler returned; [`Outcome::DeadLetter`] republishes it to
    /// the dead-letter exchange with the reason before acking; [`Outcome::Retry`] and
    /// [`Outcome::RetryUnavailable`] republish a copy to the queue's delay queue for its rung of the
    /// ladder before acking (nack-requeue only if that fails), and dead-letter it once the
    /// [`RetryPolicy`]'s limit is reached. Delay queues missing when a retry needs them are declared
    /// then (a consumer that never retries creates none). When the broker
    /// goes away the consumer reconnects with backoff and resumes. On shutdown it cancels the
    /// consumer, lets in-flight handlers finish and settles their messages, then returns.
    pub async fn consume<H, F>(&self, spec: ConsumeSpec, handler: H, shutdown: impl Future<Output = ()>) -> Result<()>
    where
        H: Fn(Incoming) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Outcome> + Send + 'static,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut delays = backoff::doubling(BACKOFF_START, BACKOFF_MAX);
        let retries = Arc::new(RetryQueues::new(&spec.queue, self.retry.clone()));
        loop {
            let session = self.consume_session(&spec, &retries, handler.clone(), shutdown.as_mut()).await;
            let delay = backoff::next_delay(&mut delays, BACKOFF_MAX);
            match session {
                Ok(ConsumerEnd::Shutdown) => return Ok(()),
                Ok(ConsumerEnd::Interrupted) => tracing::warn!(queue = %spec.queue, "consumer interrupted, reconnecting"),
                Err(error) => tracing::warn!(queue = %spec.queue, %error, retry_in = ?delay, "consumer failed, reconnecting"),
            }
            self.forget_link_if_broken().await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.as_mut() => return Ok(()),
            }
        }
    }

    /// Consumes a private, self-deleting queue bound to `exchange` with `binding_keys` until
    /// `shutdown` completes. The broker deletes such a queue with the connection that declared it,
    /// so after every interruption a fresh queue is declared and bound before consuming again.
    /// For fire-and-forget streams (live progress, stats): what is published while no queue
    /// exists is not seen.
    pub async fn consume_private<H, F>(
        &self,
        exchange: &str,
        binding_keys: &[String],
        prefetch: u16,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()>
    where
        H: Fn(Incoming) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Outcome> + Send + 'static,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut delays = backoff::doubling(BACKOFF_START, BACKOFF_MAX);
        loop {
            let queue = tokio::select! {
                declared = self.declare_private_queue(exchange, binding_keys) => declared,
                () = shutdown.as_mut() => return Ok(()),
            };
            let ended = match queue {
                Ok(queue) => {
                    let spec = ConsumeSpec::new(&queue, prefetch);
                    let retries = Arc::new(RetryQueues::new(&spec.queue, self.retry.clone()));
                    let session = self.consume_session(&spec, &retries, handler.clone(), shutdown.as_mut()).await;
                    let _ = self.delete_queue(&queue).await;
                    match session {
                        Ok(ConsumerEnd::Shutdown) => return Ok(()),
                        Ok(ConsumerEnd::Interrupted) => "interrupted".to_owned(),
                        Err(error) => error.to_string(),
                    }
                }
                Err(error) => error.to_string(),
            };
            let delay = backoff::next_delay(&mut delays, BACKOFF_MAX);
            tracing::warn!(exchange, reason = %ended, retry_in = ?delay, "private consumer lost its queue; declaring a new one");
            self.forget_link_if_broken().await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.as_mut() => return Ok(()),
            }
        }
    }

    async fn consume_session<H, F>(
        &self,
        spec: &ConsumeSpec,
        retries: &Arc<RetryQueues>,
        handler: H,
        mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<ConsumerEnd>
    where
        H: Fn(Incoming) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Outcome> + Send + 'static,
    {
        let channel = self.channel().await?;
        channel.basic_qos(spec.prefetch, BasicQosOptions::default()).await?;
        let consumer_tag = format!("berth-{}", Uuid::now_v7());
        let mut consumer = channel.basic_consume(&spec.queue, &consumer_tag, BasicConsumeOptions::default(), FieldTable::default()).await?;
        tracing::info!(queue = %spec.queue, prefetch = spec.prefetch, "consuming");
        let slots = Arc::new(Semaphore::new(spec.concurrency.max(1)));
        let mut in_flight = JoinSet::new();
        let end = loop {
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.map_err(|_| BusError::from(lapin::Error::ChannelsLimitReached))?,
                () = shutdown.as_mut() => break ConsumerEnd::Shutdown,
            };
            let delivery = tokio::select! {
                next = consumer.next() => next,
                () = shutdown.as_mut() => break ConsumerEnd::Shutdown,
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    tracing::warn!(queue = %spec.queue, %error, "delivery error");
                    break ConsumerEnd::Interrupted;
                }
                None => break ConsumerEnd::Interrupted,
            };
            let incoming = Incoming::received(&delivery, Some(&self.config.user));
            let handler = handler.clone();
            let bus = self.clone();
            let retries = retries.clone();
            in_flight.spawn(async move {
                let started = std::time::Instant::now();
                // A panicking handler must not leave its delivery unacked until the channel
                // closes: it counts as a failed attempt (dead-lettered after the limit).
                let outcome = match std::panic::AssertUnwindSafe(handler(incoming.clone())).catch_unwind().await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        tracing::error!(queue = %retries.queue, "handler panicked; the message is retried");
                        Outcome::Retry
                    }
                };
                bus.metrics.handled(&retries.queue, outcome.label(), started.elapsed());
                settle(&bus, &retries, &delivery, &incoming, outcome).await;
                drop(permit);
            });
            while in_flight.try_join_next().is_some() {}
        };
        if end == ConsumerEnd::Shutdown {
            let _ = channel.basic_cancel(&consumer_tag, BasicCancelOptions::default()).await;
        }
        while in_flight.join_next().await.is_some() {}
        if end == ConsumerEnd::Shutdown {
            let _ = channel.close(200, "shutting down").await;
        }
        Ok(end)
    }

    /// Closes the connection (after consumers returned).
    pub async fn close(&self) {
        if let Some(link) = self.link.lock().await.take() {
            let _ = link.connection.close(200, "bye").await;
        }
    }
}

/// Whether [`Bus::set_binding`] adds or removes a binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    Bind,
    Unbind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConsumerEnd {
    Shutdown,
    Interrupted,
}

async fn settle(bus: &Bus, retries: &RetryQueues, delivery: &Delivery, incoming: &Incoming, outcome: Outcome) {
    let queue = retries.queue.as_str();
    let acker = &delivery.acker;
    let policy = &retries.policy;
    let settled = match &outcome {
        Outcome::Ack => acker.ack(BasicAckOptions::default()).await,
        Outcome::Retry => {
            let (attempts, outages) = (incoming.attempts() + 1, incoming.outages());
            if attempts >= policy.max_attempts() {
                let reason = format!("gave up after {attempts} failed attempts (retry limit {})", policy.max_attempts());
                dead_letter_and_ack(bus, queue, acker, &with_counts(incoming, attempts, outages), &reason).await
            } else {
                retry_later(bus, retries, delivery, incoming, attempts, outages).await
            }
        }
        Outcome::RetryUnavailable => {
            let (attempts, outages) = (incoming.attempts(), incoming.outages() + 1);
            if outages >= policy.max_outages() {
                let reason = format!(
                    "gave up after {outages} retries while a dependency was unavailable (outage limit {}, about {:?} of waiting)",
                    policy.max_outages(),
                    (0..outages - 1).map(|earlier| policy.delay_after(earlier)).sum::<Duration>(),
                );
                dead_letter_and_ack(bus, queue, acker, &with_counts(incoming, attempts, outages), &reason).await
            } else {
                retry_later(bus, retries, delivery, incoming, attempts, outages).await
            }
        }
        Outcome::DeadLetter(reason) => dead_letter_and_ack(bus, queue, acker, incoming, reason).await,
    };
    if let Err(error) = settled {
        // The channel is gone; the broker redelivers the message to the next consumer.
        tracing::warn!(queue, %error, ?outcome, "could not settle message; it will be redelivered");
    }
}

async fn dead_letter_and_ack(bus: &Bus, queue: &str, acker: &lapin::acker::Acker, incoming: &Incoming, reason: &str) -> lapin::Result<()> {
    tracing::warn!(queue, reason = %reason, "dead-lettering message");
    match bus.dead_letter(queue, incoming, reason).await {
        Ok(()) => acker.ack(BasicAckOptions::default()).await,
        // Could not park it: leave it to the broker's redelivery and delivery limit.
        Err(error) => {
            tracing::error!(queue, %error, "could not dead-letter message; requeueing");
            acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
        }
    }
}

/// Parks a copy in the delay queue of the message's rung, then acks the original; requeues it at
/// once only if the copy could not be parked.
async fn retry_later(
    bus: &Bus,
    retries: &RetryQueues,
    delivery: &Delivery,
    incoming: &Incoming,
    attempts: u32,
    outages: u32,
) -> lapin::Result<()> {
    let queue = retries.queue.as_str();
    let delay = retries.policy.delay_after(incoming.attempts() + incoming.outages());
    let delay_queue = topology::retry_queue(queue, delay);
    let properties = retry_copy_properties(&delivery.properties, incoming, bus.user(), attempts, outages);
    match retries.park(bus, &delay_queue, &delivery.data, properties).await {
        Ok(()) => {
            tracing::debug!(queue, attempts, outages, retry_in = ?delay, "message parked for a retry");
            delivery.acker.ack(BasicAckOptions::default()).await
        }
        Err(error) => {
            tracing::warn!(queue, %error, "could not park the message for a delayed retry; requeueing it now");
            delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
        }
    }
}

/// The original's properties, persistent, with the new counts, the original routing key and the
/// original sender ([`topology::SENDER_HEADER`]: the copy's `user_id` is the consumer's own, as the
/// broker demands); the broker's dead-letter bookkeeping of earlier rounds is dropped.
fn retry_copy_properties(original: &BasicProperties, incoming: &Incoming, own_user: &str, attempts: u32, outages: u32) -> BasicProperties {
    let routing_key = incoming.routing_key.as_str();
    const BROKER_HEADERS: [&str; 8] = [
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
        "x-delivery-count",
    ];
    let mut headers = FieldTable::default();
    if let Some(existing) = original.headers() {
        for (name, value) in existing.inner() {
            if !BROKER_HEADERS.contains(&name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    headers.insert(topology::ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(i64::from(attempts)));
    headers.insert(topology::OUTAGES_HEADER.into(), AMQPValue::LongLongInt(i64::from(outages)));
    headers.insert(topology::ROUTING_KEY_HEADER.into(), AMQPValue::LongString(LongString::from(routing_key.to_owned())));
    let sender = incoming.sender.user_id().unwrap_or_default().to_owned();
    headers.insert(topology::SENDER_HEADER.into(), AMQPValue::LongString(LongString::from(sender)));
    original.clone().with_headers(headers).with_user_id(own_user.into()).with_delivery_mode(2)
}

fn with_counts(incoming: &Incoming, attempts: u32, outages: u32) -> Incoming {
    let mut counted = incoming.clone();
    counted.headers.insert(topology::ATTEMPTS_HEADER.to_owned(), attempts.to_string());
    counted.headers.insert(topology::OUTAGES_HEADER.to_owned(), outages.to_string());
    counted
}

/// The delay queues of one consumer's work queue, declared when the first retry needs them.
/// Temporary ones expire when not declared for a while, so they are declared again before that could
/// happen under a waiting message.
struct RetryQueues {
    queue: String,
    policy: Arc<RetryPolicy>,
    permanent: bool,
    declared_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl RetryQueues {
    fn new(queue: &str, policy: Arc<RetryPolicy>) -> RetryQueues {
        let permanent = topology::standard_work_queues().iter().any(|standard| standard == queue);
        RetryQueues { queue: queue.to_owned(), policy, permanent, declared_at: std::sync::Mutex::new(None) }
    }

    /// Declares the delay queues; a failure is logged, not fatal: parking the retry then fails and
    /// the message is requeued.
    async fn declare(&self, bus: &Bus) {
        let channel = match bus.channel().await {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(queue = %self.queue, %error, "could not declare the retry queues");
                return;
            }
        };
        match declare_retry_queues_on(&channel, &self.queue, &self.policy).await {
            Ok(()) => *self.declared_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokio::time::Instant::now()),
            Err(error) => tracing::warn!(queue = %self.queue, %error, "could not declare the retry queues"),
        }
        let _ = channel.close(200, "retry queues declared").await;
    }

    fn may_expire_soon(&self) -> bool {
        if self.permanent {
            return false;
        }
        let declared_at = *self.declared_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        declared_at.is_none_or(|at| at.elapsed() > topology::TEMPORARY_RETRY_QUEUE_EXPIRY / 2)
    }

    /// Publishes the copy to `delay_queue` (mandatory, confirmed); a missing delay queue is
    /// declared and the publish tried once more. A quorum queue declared a moment ago nacks
    /// publishes until its replicas have elected a leader (seen here within milliseconds), so a
    /// nack is tried again a few times, backing off, before the message is requeued.
    async fn park(&self, bus: &Bus, delay_queue: &str, body: &[u8], properties: BasicProperties) -> Result<()> {
        if self.may_expire_soon() {
            self.declare(bus).await;
        }
        let mut declared_again = false;
        let mut after_nack = crate::backoff::doubling_times(Duration::from_millis(10), Duration::from_millis(200), 5);
        loop {
            let channel = bus.publisher().await?;
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            let confirmation = channel.basic_publish("", delay_queue, options, body, properties.clone()).await?.await?;
            match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => return Ok(()),
                Confirmation::Ack(Some(_returned)) if !declared_again => {
                    declared_again = true;
                    self.declare(bus).await;
                }
                Confirmation::Ack(Some(_returned)) => {
                    return Err(BusError::Unroutable { exchange: String::new(), routing_key: delay_queue.to_owned() })
                }
                Confirmation::Nack(_) => match after_nack.next() {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => return Err(BusError::Nacked { exchange: String::new(), routing_key: delay_queue.to_owned() }),
                },
            }
        }
    }
}

impl Incoming {
    /// The message of a delivery consumed by a bus connected as `own_user`: a retry copy that user
    /// published keeps naming the original sender ([`topology::SENDER_HEADER`]); on anyone else's
    /// message that header means nothing. Without `own_user` the sender is the `user_id` as it is.
    fn received(delivery: &lapin::message::Delivery, own_user: Option<&str>) -> Incoming {
        let properties = &delivery.properties;
        let headers: HashMap<String, String> = properties
            .headers()
            .as_ref()
            .map(|table| {
                table.inner().iter().filter_map(|(name, value)| amqp_value_text(value).map(|text| (name.to_string(), text))).collect()
            })
            .unwrap_or_default();
        let user_id = properties.user_id().as_ref().map(ShortString::to_string);
        let sender = match (&user_id, own_user, headers.get(topology::SENDER_HEADER)) {
            (Some(user_id), Some(own_user), Some(original)) if user_id == own_user => Sender::of_user_id(Some(original)),
            _ => Sender::of_user_id(user_id.as_deref()),
        };
        let mut incoming = Incoming {
            body: delivery.data.clone(),
            routing_key: delivery.routing_key.to_string(),
            sender,
            redelivered: delivery.redelivered,
            reply_to: properties.reply_to().as_ref().map(ShortString::to_string),
            correlation_id: properties.correlation_id().as_ref().map(ShortString::to_string),
            headers,
        };
        // A retry comes back from its delay queue routed by queue name.
        if let Some(original) = incoming.headers.get(topology::ROUTING_KEY_HEADER) {
            incoming.routing_key = original.clone();
        }
        incoming.redelivered |= incoming.attempts() + incoming.outages() > 0;
        incoming
    }

    /// The [`Outcome::Retry`] failures this message has been through (0 on its first delivery).
    pub fn attempts(&self) -> u32 {
        self.count_header(topology::ATTEMPTS_HEADER)
    }

    /// The [`Outcome::RetryUnavailable`] outages this message has waited through.
    pub fn outages(&self) -> u32 {
        self.count_header(topology::OUTAGES_HEADER)
    }

    fn count_header(&self, name: &str) -> u32 {
        self.headers.get(name).and_then(|count| count.parse().ok()).unwrap_or(0)
    }
}

fn amqp_value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        AMQPValue::LongInt(number) => Some(number.to_string()),
        AMQPValue::LongLongInt(number) => Some(number.to_string()),
        AMQPValue::LongUInt(number) => Some(number.to_string()),
        AMQPValue::ShortInt(number) => Some(number.to_string()),
        AMQPValue::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn work_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(topology::DEAD_EXCHANGE.into()));
    arguments.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(topology::DELIVERY_LIMIT));
    arguments
}

/// Each delay queue is a quorum queue (its messages survive a broker restart) whose queue-level TTL
/// dead-letters them, at least once, through the default exchange back to `queue`.
async fn declare_retry_queues_on(channel: &Channel, queue: &str, policy: &RetryPolicy) -> Result<()> {
    let permanent = topology::standard_work_queues().iter().any(|standard| standard == queue);
    for delay in distinct_delays(policy) {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(millis(delay)));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(queue.into()));
        arguments.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        // At-least-once dead-lettering requires it; nothing bounds these queues, so it never acts.
        arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        if !permanent {
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis(topology::TEMPORARY_RETRY_QUEUE_EXPIRY)));
        }
        declare_queue(channel, &topology::retry_queue(queue, delay), arguments).await?;
    }
    Ok(())
}

fn distinct_delays(policy: &RetryPolicy) -> Vec<Duration> {
    let mut delays = policy.delays().to_vec();
    delays.sort();
    delays.dedup();
    delays
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

async fn declare_queue(channel: &Channel, name: &str, arguments: FieldTable) -> Result<()> {
    channel.queue_declare(name, QueueDeclareOptions { durable: true, ..Default::default() }, arguments).await?;
    Ok(())
}

fn lock_pending(pending: &PendingReplies) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Vec<u8>>>> {
    pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::RetryPolicy;
    use crate::topology;

    #[track_caller]
    fn check_delay(policy: &RetryPolicy, earlier_retries: u32, expected: Duration) {
        assert_eq!(policy.delay_after(earlier_retries), expected, "after {earlier_retries} retries");
    }

    #[test]
    fn the_standard_ladder_climbs_then_repeats_its_last_rung() {
        let policy = RetryPolicy::standard();
        check_delay(&policy, 0, Duration::from_secs(1));
        check_delay(&policy, 1, Duration::from_secs(5));
        check_delay(&policy, 2, Duration::from_secs(30));
        check_delay(&policy, 3, Duration::from_secs(30));
        check_delay(&policy, u32::MAX, Duration::from_secs(30));
    }

    #[test]
    fn the_outage_cap_is_about_an_hour_of_waiting() {
        let policy = RetryPolicy::standard();
        let waited: Duration = (0..policy.max_outages() - 1).map(|earlier| policy.delay_after(earlier)).sum();
        assert!(waited > Duration::from_secs(55 * 60) && waited < Duration::from_secs(65 * 60), "{waited:?}");
    }

    #[test]
    fn delay_queues_are_named_after_their_work_queue_and_delay() {
        assert_eq!(topology::retry_queue("berth.engine", Duration::from_secs(5)), "berth.engine.retry.5s");
        assert_eq!(topology::retry_queue("t.work", Duration::from_millis(250)), "t.work.retry.250ms");
        assert_eq!(topology::retry_queue("amq.gen-abc", Duration::from_secs(1)), "berth.amq.gen-abc.retry.1s");
    }

    #[test]
    #[should_panic(expected = "at least one delay")]
    fn a_ladder_without_rungs_is_refused() {
        RetryPolicy::new(&[], 3, 3);
    }

    #[test]
    fn queue_specs_become_the_broker_arguments_they_name() {
        use lapin::types::AMQPValue;
        let plain = super::QueueSpec::classic("q", super::Durability::Transient).arguments();
        assert!(plain.inner().is_empty(), "{plain:?}");
        let work = super::QueueSpec::quorum("q").with_delivery_limit(topology::DELIVERY_LIMIT).expiring_after(Duration::from_secs(600));
        let arguments = work.arguments();
        let arguments = arguments.inner();
        assert_eq!(arguments.get("x-queue-type"), Some(&AMQPValue::LongString("quorum".into())));
        assert_eq!(arguments.get("x-delivery-limit"), Some(&AMQPValue::LongLongInt(topology::DELIVERY_LIMIT)));
        assert_eq!(arguments.get("x-expires"), Some(&AMQPValue::LongInt(600_000)), "a 32-bit expiry, as declared before");
        let long = super::QueueSpec::classic("q", super::Durability::Durable).expiring_after(Duration::from_secs(30 * 86_400)).arguments();
        assert_eq!(long.inner().get("x-expires"), Some(&AMQPValue::LongLongInt(30 * 86_400_000)));
    }

    #[test]
    fn properties_carry_what_they_name_and_nothing_else() {
        let bare = super::Properties::bare().to_amqp();
        assert_eq!((bare.content_type(), bare.message_id(), bare.headers()), (&None, &None, &None));
        let event = super::Properties::cloud_event().with_message_id("e-1").with_header("x-test", "yes").to_amqp();
        assert_eq!(event.content_type().as_ref().map(|text| text.as_str()), Some(crate::event::CONTENT_TYPE));
        assert_eq!(event.message_id().as_ref().map(|text| text.as_str()), Some("e-1"));
        let headers = event.headers().clone().unwrap_or_default();
        assert_eq!(headers.inner().get("x-test"), Some(&lapin::types::AMQPValue::LongString("yes".into())));
        let json = super::Properties::json().to_amqp();
        assert_eq!(json.content_type().as_ref().map(|text| text.as_str()), Some("application/json"));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(super::redact("amqp://host"), "amqp://host");
    }
}
