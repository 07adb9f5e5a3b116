//! `berth engine`: the service around the pure core.
//!
//! For each event: parse and validate it, bind it to a thred (by `thredid`, else by subject, else
//! start one), step the pattern, then commit the new thred, the dedupe marker, the timers and the
//! outbox of messages in ONE Redis script (optimistic version check, so replicas never interleave
//! one thred's transitions), publish the outbox with confirms, delete it, and only then ack.
//! A crash after the commit leaves the outbox, which start-up (or the event's redelivery) publishes.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use protocol::bus::{AutoDelete, BusError, Durability, ExchangeKind, QueueSpec};
use protocol::event::DEFAULT_MAX_EVENT_BYTES;
use protocol::host::HostReport;
use protocol::{topology, AgentKind, Bus, BusConfig, CloudEvent, ConsumeSpec, Identity, Incoming, Outcome, Profile};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::admission::{self, Capacity, Committed, Counts, Limit, Verdict};
use crate::core::{self, Disposition, EventInput, Step, StepError, Thred};
use crate::metrics::Metrics;
use crate::pattern::Pattern;
use crate::placement::{self, HostView};
use crate::timers;
use crate::usage::{self, Budget, Charge, Metered, Rates, Spent};
use crate::{Error, Result};
use binding::Binding;
pub use outbox::OutboxMessage;
use outbox::{delete_published_outboxes, notification_message, notification_to_owner, task_message, task_message_on};
use store::{connect_redis, CommitResult, BIND_READ_SCRIPT, COMMIT_SCRIPT};

mod binding;
mod clock;
mod failover;
mod keys;
mod outbox;
mod pool;
mod reconcile;
mod store;
pub use clock::{Clock, ManualClock, SystemClock};
pub use keys::Keys;
pub use pool::{clear_pool, free_pool_slots};
use reconcile::{created_time, Inventory};
pub use reconcile::{CONTAINER_INVENTORY, SESSION_RECOVER, WORKSPACE_INVENTORY};

/// What the engine sends a session whose user has spent a budget: the pattern stops it, saved first.
pub const BUDGET_EXCEEDED: &str = protocol::events::kind::SESSION_BUDGET_EXCEEDED;
/// What the engine sends each session on a drained host (`berth host drain`): the pattern moves it.
pub const SESSION_MOVE: &str = protocol::events::kind::SESSION_MOVE;
/// How long an ended thred stays readable, so late answers are recognised as late.
pub const ENDED_THRED_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// Optimistic-commit attempts before the event is requeued.
const COMMIT_ATTEMPTS: usize = 50;
/// An isolated queue left behind by a crashed test disappears after this long unused.
const ISOLATED_QUEUE_EXPIRY: Duration = Duration::from_secs(15 * 60);
/// Per-key locks inside one engine (striped: no map to grow or clean).
const LOCK_STRIPES: usize = 1024;
/// Published outboxes waiting for their batched deletion (about two batches of the flusher).
const OUTBOX_DELETIONS_BUFFER: usize = 1024;

/// Where the engine reads and writes. `standard()` is production; `isolated()` gives unique names
/// so tests and the bench never touch the real queues or keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub queue: String,
    pub events_exchange: String,
    pub tasks_exchange: String,
    pub notify_exchange: String,
    pub dead_exchange: String,
    /// Every Redis key starts with this.
    pub redis_prefix: String,
    pub prefetch: u16,
    /// Containers younger than this are never reconciled away (their session may be starting).
    pub orphan_grace_secs: u64,
    /// The deadline index is swept at start-up, at the earliest deadline and at least this often,
    /// for timers whose notification was missed or comes late. 0 = at start-up only (tests).
    pub sweep_interval_ms: u64,
    /// A fired timer whose `timer.fired` has not been committed this long after is fired again.
    pub refire_after_ms: u64,
    /// Live sessions are metered (usage, budgets) this often.
    pub meter_interval_ms: u64,
    /// Fault injection for the crash test: after committing, stop before publishing and wait
    /// forever (the test then kills the process). Only with the `crash-hook` feature, which no
    /// product build turns on.
    #[cfg(feature = "crash-hook")]
    #[serde(default)]
    pub halt_after_commit: bool,
}

impl EngineConfig {
    /// The production names: `berth.engine`, `berth.events`, … and keys under `berth:engine`.
    pub fn standard() -> EngineConfig {
        EngineConfig {
            queue: topology::ENGINE_QUEUE.to_owned(),
            events_exchange: topology::EVENTS_EXCHANGE.to_owned(),
            tasks_exchange: topology::TASKS_EXCHANGE.to_owned(),
            notify_exchange: topology::NOTIFY_EXCHANGE.to_owned(),
            dead_exchange: topology::DEAD_EXCHANGE.to_owned(),
            redis_prefix: "berth:engine".to_owned(),
            prefetch: 256,
            orphan_grace_secs: 60,
            sweep_interval_ms: 1000,
            refire_after_ms: timers::REFIRE_AFTER.as_millis() as u64,
            meter_interval_ms: 60_000,
            #[cfg(feature = "crash-hook")]
            halt_after_commit: false,
        }
    }

    /// Private exchanges, queue and key prefix named after `tag`.
    pub fn isolated(tag: &str) -> EngineConfig {
        EngineConfig {
            queue: format!("berth-test.{tag}.engine"),
            events_exchange: format!("berth-test.{tag}.events"),
            tasks_exchange: format!("berth-test.{tag}.tasks"),
            notify_exchange: format!("berth-test.{tag}.notify"),
            dead_exchange: format!("berth-test.{tag}.dead"),
            redis_prefix: format!("berth-test:{tag}"),
            ..EngineConfig::standard()
        }
    }

    fn is_standard(&self) -> bool {
        self.queue == topology::ENGINE_QUEUE
    }
}

/// Declares what the engine needs: the standard topology, or the isolated exchanges and queue.
pub async fn declare(bus: &Bus, config: &EngineConfig) -> Result<()> {
    if config.is_standard() {
        bus.declare_topology().await?;
        return Ok(());
    }
    // Isolated names belong to tests and benchmarks: if one dies before `teardown`, the queue
    // expires once unused and the exchanges go with their last binding.
    for (name, kind) in [
        (&config.events_exchange, ExchangeKind::Topic),
        (&config.tasks_exchange, ExchangeKind::Direct),
        (&config.notify_exchange, ExchangeKind::Topic),
        (&config.dead_exchange, ExchangeKind::Fanout),
    ] {
        bus.declare_exchange(name, kind, Durability::Durable, AutoDelete::WhenUnused).await?;
    }
    bus.declare_queue(&QueueSpec::classic(&config.queue, Durability::Durable).expiring_after(ISOLATED_QUEUE_EXPIRY)).await?;
    bus.set_binding(&config.queue, &config.events_exchange, "#", protocol::bus::Binding::Bind).await?;
    Ok(())
}

/// Deletes the isolated exchanges and queue and every Redis key under the prefix.
pub async fn teardown(bus: &Bus, redis_url: &str, config: &EngineConfig) -> Result<()> {
    if config.is_standard() {
        return Ok(());
    }
    bus.delete_queue(&config.queue).await?;
    for exchange in [&config.events_exchange, &config.tasks_exchange, &config.notify_exchange, &config.dead_exchange] {
        bus.delete_exchange(exchange).await?;
    }
    let client = redis::Client::open(redis_url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = connection.keys(format!("{}:*", config.redis_prefix)).await?;
    for chunk in keys.chunks(500) {
        let _: () = connection.del(chunk).await?;
    }
    Ok(())
}

/// Where placement put a thred about to take capacity.
enum Placed {
    Here(HostView),
    /// Not placed: it takes no capacity now, or no host reports (the one-host budget applies).
    Unplaced,
    /// Hosts report and none has room.
    NoRoom,
}

/// `user/workspace` of a session thred, as workspace agents report the copies they hold.
fn thred_workspace(thred: &Thred) -> Option<String> {
    let text = |field: &str| thred.context.get(field).and_then(Value::as_str).filter(|value| !value.is_empty());
    Some(format!("{}/{}", text("user")?, text("workspace")?))
}

struct Inner {
    profile: Profile,
    patterns: Vec<Pattern>,
    config: EngineConfig,
    /// Consumes (and dead-letters).
    bus: Bus,
    /// Publishes outboxes and timers on a connection of its own: lapin drives each connection
    /// from one I/O thread, and an event's several publishes and confirms would otherwise queue
    /// behind the deliveries and acks.
    publisher: Bus,
    redis: ConnectionManager,
    redis_client: redis::Client,
    keys: Keys,
    metrics: Arc<Metrics>,
    locks: Vec<tokio::sync::Mutex<()>>,
    commit: redis::Script,
    bind_read: redis::Script,
    /// Outboxes published and waiting to be deleted, in batches, by the flusher.
    published_outboxes: tokio::sync::mpsc::Sender<String>,
    published_outboxes_receiver: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<String>>>,
    /// Wakes the timer sweeper after a commit started a timer.
    timer_wake: Arc<tokio::sync::Notify>,
    /// What admitted threds hold and what the host commits (from the profile's `[limits]`).
    capacity: Capacity,
    /// Wakes the admitter after a commit freed capacity or queued a thred.
    admission_wake: Arc<tokio::sync::Notify>,
    /// Prices, held resources and budgets (from the profile's `[limits]`).
    rates: Rates,
    /// Every wall-clock reading of the service (a test may set and step it).
    clock: Arc<dyn Clock>,
}

/// A running engine (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Runs an engine until `shutdown` completes.
pub async fn run_engine(
    profile: Profile,
    patterns: Vec<Pattern>,
    config: EngineConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let engine = Engine::connect(profile, patterns, config).await?;
    engine.serve(shutdown).await
}

impl Engine {
    /// Connects to the broker and Redis and declares the topology; does not consume yet.
    pub async fn connect(profile: Profile, patterns: Vec<Pattern>, config: EngineConfig) -> Result<Engine> {
        Engine::connect_with_clock(profile, patterns, config, Arc::new(SystemClock)).await
    }

    /// [`Engine::connect`] with the clock the engine reads the time from.
    pub async fn connect_with_clock(
        profile: Profile,
        patterns: Vec<Pattern>,
        config: EngineConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine> {
        let amqp_url = &profile.services.amqp_url;
        let bus = Bus::connect(BusConfig::for_identity(amqp_url, Identity::Engine, "berth-engine").map_err(BusError::from)?).await?;
        let publisher =
            Bus::connect(BusConfig::for_identity(amqp_url, Identity::Engine, "berth-engine-publisher").map_err(BusError::from)?).await?;
        declare(&bus, &config).await?;
        let redis_client = redis::Client::open(profile.services.redis_url.as_str())?;
        let redis = connect_redis(&redis_client).await?;
        let persistence = crate::RedisPersistence::of(&mut redis.clone()).await?;
        if persistence != crate::RedisPersistence::AppendOnly {
            // Files are still safe (host directories outlive it and are recovered), but live
            // sessions end and timers restart when Redis loses its data.
            tracing::warn!(
                ?persistence,
                "redis persistence is not append-only: a Redis restart loses thred state; set appendonly yes, appendfsync everysec"
            );
        }
        let keys = Keys::new(&config.redis_prefix);
        let capacity = Capacity::of(&profile);
        let profile_for_rates = profile.clone();
        tracing::info!(
            budget_memory_mib = capacity.budget_memory_mib,
            budget_cpu_millis = capacity.budget_cpu_millis,
            "host capacity for sessions"
        );
        // Bounded: should the deletions fall behind (Redis slow), events wait for them rather
        // than the keys piling up in memory.
        let (published_outboxes, published_outboxes_receiver) = tokio::sync::mpsc::channel(OUTBOX_DELETIONS_BUFFER);
        tracing::info!(patterns = ?patterns.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), queue = %config.queue, "engine connected");
        Ok(Engine {
            inner: Arc::new(Inner {
                profile,
                patterns,
                config,
                bus,
                publisher,
                redis,
                redis_client,
                keys,
                metrics: Arc::new(Metrics::default()),
                locks: (0..LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
                commit: redis::Script::new(COMMIT_SCRIPT),
                bind_read: redis::Script::new(BIND_READ_SCRIPT),
                published_outboxes,
                published_outboxes_receiver: std::sync::Mutex::new(Some(published_outboxes_receiver)),
                timer_wake: Arc::new(tokio::sync::Notify::new()),
                capacity,
                admission_wake: Arc::new(tokio::sync::Notify::new()),
                rates: Rates::of(&profile_for_rates),
                clock,
            }),
        })
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// Registers the counters of the engine's two bus connections (consuming, publishing).
    pub fn register_bus_metrics(&self, registry: &mut protocol::metrics::prometheus_client::registry::Registry) {
        self.inner.bus.register_metrics(registry.sub_registry_with_prefix("consumer"));
        self.inner.publisher.register_metrics(registry.sub_registry_with_prefix("publisher"));
    }

    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Whether Redis keeps thred state across its own restart (read now, for readiness reports).
    pub async fn redis_persistence(&self) -> Result<crate::RedisPersistence> {
        crate::RedisPersistence::of(&mut self.inner.redis.clone()).await
    }

    /// Replays leftover outboxes, starts the timer listener and sweeper, and consumes until
    /// `shutdown` completes.
    pub async fn serve(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let inner = &self.inner;
        let replayed = self.replay_outboxes().await?;
        if replayed > 0 {
            tracing::warn!(outboxes = replayed, "published outboxes left by an earlier crash");
        }
        let timer_service = timers::TimerService::new(
            inner.redis_client.clone(),
            inner.redis.clone(),
            inner.publisher.clone(),
            inner.keys.clone(),
            inner.config.events_exchange.clone(),
            inner.metrics.clone(),
            inner.timer_wake.clone(),
        )
        .refiring_after(Duration::from_millis(inner.config.refire_after_ms));
        timer_service.enable_notifications().await?;
        let (stop_sender, stop_receiver) = tokio::sync::watch::channel(false);
        // Each runs until the engine stops; one that ends sooner (or panics) stops the engine with
        // an error rather than leaving it silently degraded (timers never firing, a queue never
        // admitted), so the supervisor restarts it.
        let mut background = protocol::supervise::Background::new();
        background.spawn("timer listener", timer_service.clone().listen(stop_receiver.clone()));
        background.spawn(
            "timer sweeper",
            timer_service.sweep_forever(Duration::from_millis(inner.config.sweep_interval_ms), stop_receiver.clone()),
        );
        background.spawn("metrics reporter", report_metrics(inner.metrics.clone(), stop_receiver.clone()));
        background.spawn("admitter", self.clone().admit_forever(stop_receiver.clone()));
        background.spawn("pool keeper", self.clone().keep_pool_forever(stop_receiver.clone()));
        let receiver = inner.published_outboxes_receiver.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(receiver) = receiver {
            background.spawn("outbox flusher", delete_published_outboxes(inner.redis.clone(), inner.keys.clone(), receiver, stop_receiver));
        }
        let engine = self.clone();
        let handler = move |incoming: Incoming| {
            let engine = engine.clone();
            async move { engine.handle(incoming).await }
        };
        let spec = ConsumeSpec::new(&inner.config.queue, inner.config.prefetch);
        let mut ended_early = None;
        let stop_consuming = async {
            tokio::select! {
                () = shutdown => {}
                ended = background.first_ended() => ended_early = Some(ended),
            }
        };
        let consumed = inner.bus.consume(spec, handler, stop_consuming).await;
        let _ = stop_sender.send(true);
        background.join_all().await;
        inner.publisher.close().await;
        tracing::info!(metrics = ?inner.metrics.snapshot(), "engine stopped");
        consumed?;
        match ended_early {
            None => Ok(()),
            Some(ended) => {
                tracing::error!(task = ended.task, panicked = ended.panicked, "a background task of the engine ended; stopping the engine");
                Err(Error::Stopped(ended))
            }
        }
    }

    /// Handles one delivery and decides its fate.
    pub async fn handle(&self, incoming: Incoming) -> Outcome {
        let metrics = &self.inner.metrics;
        let event = match CloudEvent::parse(&incoming.body, DEFAULT_MAX_EVENT_BYTES) {
            Ok(event) => event,
            Err(error) => return self.dead_letter(&incoming, &format!("invalid event: {error}")).await,
        };
        // Invariant 8: an event counts only as far as the identity that sent it may send it.
        if let Err(reason) = protocol::identity::check_sender(&event.event_type, &incoming.sender) {
            return self.dead_letter(&incoming, &reason).await;
        }
        // Ids become routing keys, paths and names downstream: refused here, at the edge.
        if let Err(error) = protocol::ids::check_event(&event) {
            return self.dead_letter(&incoming, &format!("invalid event: {error}")).await;
        }
        Metrics::count(&metrics.events_handled);
        if let Some(time) = event.time {
            metrics.observe_lag((self.inner.clock.now() - time).num_milliseconds());
        }
        let outcome = if topology::HOST_REPORTS.contains(&event.event_type.as_str()) {
            self.record_host_report(&event).await
        } else if let Some(inventory) = Inventory::of(&event.event_type) {
            self.reconcile(inventory, &event).await
        } else if let Some(pool_event) = pool::PoolEvent::of(&event.event_type) {
            self.pool_event(pool_event, &event).await
        } else if !self.inner.patterns.iter().any(|pattern| pattern.knows(&event.event_type)) {
            return self.dead_letter(&incoming, &format!("unknown event type `{}`: no pattern handles it", event.event_type)).await;
        } else {
            self.handle_event(&event).await
        };
        match outcome {
            Ok(EventFate::Done) => Outcome::Ack,
            Ok(EventFate::Refused(reason)) => self.dead_letter(&incoming, &reason).await,
            Err(error) => {
                let outcome = error.outcome();
                tracing::warn!(event_id = %event.id, event_type = %event.event_type, %error, ?outcome, attempts = incoming.attempts(), "event failed");
                match outcome {
                    Outcome::DeadLetter(reason) => self.dead_letter(&incoming, &reason).await,
                    retry => retry,
                }
            }
        }
    }

    async fn dead_letter(&self, incoming: &Incoming, reason: &str) -> Outcome {
        Metrics::count(&self.inner.metrics.dead_lettered);
        tracing::warn!(routing_key = %incoming.routing_key, reason, "dead-lettering event");
        let config = &self.inner.config;
        match self.inner.bus.dead_letter_to(&config.dead_exchange, &config.queue, incoming, reason).await {
            Ok(()) => Outcome::Ack,
            Err(error) => {
                tracing::error!(%error, "could not dead-letter an event; requeueing it");
                Outcome::Retry
            }
        }
    }

    fn lock_for(&self, key: &str) -> &tokio::sync::Mutex<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        &self.inner.locks[(hasher.finish() as usize) % LOCK_STRIPES]
    }

    async fn handle_event(&self, event: &CloudEvent) -> Result<EventFate> {
        let lock_key = event.subject.clone().or_else(|| event.extension("thredid").map(str::to_owned)).unwrap_or_default();
        let _guard = self.lock_for(&lock_key).lock().await;
        if event.event_type == failover::WORKSPACE_RECOVERED {
            self.after_recovered(event).await?;
        }
        let input = event_input(event);
        let keys = &self.inner.keys;
        // What the commit script found the admission read had missed: the user reached the limit,
        // or the capacity was taken.
        let mut overruled: Option<Verdict> = None;
        // Warm-pool slots another thred claimed while this one tried: the next attempt picks another.
        let mut taken_slots: Vec<String> = Vec::new();
        for _ in 0..COMMIT_ATTEMPTS {
            let Some(read) = self.read_for_binding(event).await? else {
                return self.finish_duplicate(event).await;
            };
            let now_ms = self.inner.clock.now_ms();
            // The hosts admission read in this attempt, for placement to reuse.
            let mut hosts_read: Option<Vec<HostView>> = None;
            let binding = binding::bind(&self.inner.patterns, &event.event_type, read);
            let (pattern, previous, stepped) = match binding {
                Binding::Orphan => {
                    Metrics::count(&self.inner.metrics.orphans);
                    tracing::info!(event_id = %event.id, event_type = %event.event_type, subject = ?event.subject, "orphan event: no thred and starts none");
                    self.forget_fired_timer(event).await?;
                    return Ok(EventFate::Done);
                }
                Binding::Existing(_, thred) if failover::is_stale_answer(event, &thred) => {
                    tracing::info!(event_id = %event.id, event_type = %event.event_type, session = %thred.key, from = ?event.extension("host"),
                        placed = ?thred.host, "stale answer from a host the session left; dropped");
                    return Ok(EventFate::Done);
                }
                Binding::Existing(pattern, thred) => {
                    let stepped = core::step(pattern, &thred, &input, now_ms);
                    (pattern, Some(*thred), stepped)
                }
                Binding::Start(pattern) => {
                    let thred_id = Uuid::now_v7().to_string();
                    match core::start(pattern, &thred_id, self.seed_context(event), &input, now_ms) {
                        // What the new thred would own exclusively already has a live owner:
                        // the event joins the owner instead.
                        Ok(step) => match self.exclusive_owner(pattern, &step.thred).await? {
                            Some(owner) => {
                                Metrics::count(&self.inner.metrics.joins);
                                let stepped = core::step(pattern, &owner, &input, now_ms);
                                (pattern, Some(owner), stepped)
                            }
                            // A new thred: admitted, queued or refused by the profile's limits.
                            None if pattern.start.admission.is_some() => {
                                let verdict = match overruled.take() {
                                    Some(verdict) => verdict,
                                    None => {
                                        let (verdict, hosts) = self.admission_verdict(pattern, event, &step.thred).await?;
                                        hosts_read = Some(hosts);
                                        verdict
                                    }
                                };
                                let mut seed = self.seed_context(event);
                                seed.insert("admission".to_owned(), verdict.to_value());
                                if let Some(spec) = &pattern.start.pool {
                                    // Only the engine names a slot: an opener's own value is dropped.
                                    seed.remove(&spec.context);
                                    if verdict == Verdict::Admit {
                                        if let Some(slot) = self.free_pool_slot(&taken_slots).await? {
                                            seed.insert(spec.context.clone(), Value::String(slot));
                                        }
                                    }
                                }
                                (pattern, None, core::start(pattern, &thred_id, seed, &input, now_ms))
                            }
                            None => (pattern, None, Ok(step)),
                        },
                        Err(error) => (pattern, None, Err(error)),
                    }
                }
            };
            let step = match stepped {
                Ok(step) => step,
                Err(error @ (StepError::InvalidStart { .. } | StepError::Expression { .. } | StepError::UnknownState { .. })) => {
                    return Ok(EventFate::Refused(error.to_string()))
                }
            };
            let mut step = step;
            let placed = match self.place(pattern, previous.as_ref(), event, &mut step.thred, hosts_read.take()).await? {
                Placed::Here(host) => Some(host),
                Placed::Unplaced => None,
                // Hosts report, and none has room: a new thred waits in the queue; a waiting one
                // told to go keeps waiting (the admitter tells it again when capacity frees).
                Placed::NoRoom if previous.is_none() => {
                    let queued = self.queue_length(pattern).await?;
                    overruled = Some(Verdict::Queue { position: queued + 1 });
                    continue;
                }
                Placed::NoRoom => {
                    tracing::debug!(event_id = %event.id, "no host has room; still queued");
                    return Ok(EventFate::Done);
                }
            };
            let changed = previous.as_ref() != Some(&step.thred);
            if !changed && step.effects.is_empty() {
                self.log_disposition(event, &step, pattern);
                self.forget_fired_timer(event).await?;
                return Ok(EventFate::Done);
            }
            let messages = self.outbox_messages(event, &step)?;
            match self.commit(previous.as_ref(), &step, pattern, event, &messages, placed.as_ref()).await? {
                CommitResult::Conflict => {
                    Metrics::count(&self.inner.metrics.conflicts);
                    tokio::task::yield_now().await;
                    continue;
                }
                CommitResult::Duplicate => return self.finish_duplicate(event).await,
                CommitResult::UserLimit => {
                    overruled =
                        Some(Verdict::Refuse { limit: Limit::SessionsPerUser, max: self.inner.capacity.max_sessions_per_user as f64 });
                    continue;
                }
                CommitResult::Full if previous.is_none() => {
                    let queued = self.queue_length(pattern).await?;
                    overruled = Some(Verdict::Queue { position: queued + 1 });
                    continue;
                }
                // A waiting thred told it may go, but the capacity went to someone else first: it
                // keeps waiting, and the admitter tells it again when capacity frees.
                CommitResult::Full => {
                    tracing::debug!(event_id = %event.id, "admission came too late: capacity taken; still queued");
                    return Ok(EventFate::Done);
                }
                CommitResult::SlotTaken => {
                    taken_slots.extend(pool::claimed_slot(pattern, previous.as_ref(), &step.thred));
                    overruled = Some(Verdict::Admit);
                    continue;
                }
                CommitResult::Committed => {}
            }
            if let Some(spec) = &pattern.start.admission {
                let held_before = previous.as_ref().is_some_and(|thred| admission::holds_capacity(spec, thred));
                if held_before != admission::holds_capacity(spec, &step.thred) || admission::is_queued(spec, &step.thred) {
                    self.inner.admission_wake.notify_one();
                }
            }
            // Logged (and counted) once it holds: a conflict above steps the event again.
            self.log_disposition(event, &step, pattern);
            if let Disposition::Transitioned { .. } = step.disposition {
                Metrics::count(&self.inner.metrics.transitions);
            }
            #[cfg(feature = "crash-hook")]
            if self.inner.config.halt_after_commit {
                tracing::warn!(event_id = %event.id, "halting after commit (fault injection)");
                println!("halted-after-commit {}", event.id);
                std::future::pending::<()>().await;
            }
            if !messages.is_empty() {
                self.publish_messages(&messages).await?;
                let tasks = messages.iter().filter(|message| message.exchange == self.inner.config.tasks_exchange).count();
                self.inner.metrics.tasks_published.fetch_add(tasks as u64, std::sync::atomic::Ordering::Relaxed);
                // Deleted in batches: should the engine die first, start-up publishes the same
                // messages again, which agents absorb by task id.
                let _ = self.inner.published_outboxes.send(keys.outbox(&event.id)).await;
            }
            return Ok(EventFate::Done);
        }
        Err(Error::Conflict { thred: lock_key })
    }

    /// The verdict for a new thred of an admitted pattern, from one read of the counts. Opens are
    /// counted over the last 60 s (a sliding window, not the clock's minute); recording this one is
    /// idempotent by event id, so a redelivery counts once.
    /// Also returns the hosts it read, which placement reuses in the same attempt.
    async fn admission_verdict(&self, pattern: &Pattern, event: &CloudEvent, candidate: &Thred) -> Result<(Verdict, Vec<HostView>)> {
        let keys = &self.inner.keys;
        let user = candidate.context.get("user").and_then(Value::as_str).unwrap_or_default();
        let now_ms = self.inner.clock.now_ms();
        let opens = keys.user_opens(&pattern.name, user);
        let mut redis = self.inner.redis.clone();
        let (opens_this_minute, user_live, memory, cpu, queued): (u64, u64, Option<u64>, Option<u64>, u64) = redis::pipe()
            .cmd("ZADD")
            .arg(&opens)
            .arg("NX")
            .arg(now_ms)
            .arg(&event.id)
            .ignore()
            .zrembyscore(&opens, "-inf", now_ms - 60_000)
            .ignore()
            .expire(&opens, 120)
            .ignore()
            .zcard(&opens)
            .scard(keys.user_live(&pattern.name, user))
            .hget(keys.capacity(), "memory")
            .hget(keys.capacity(), "cpu")
            .zcard(keys.queue(&pattern.name))
            .query_async(&mut redis)
            .await?;
        let mut committed = Committed { memory_mib: memory.unwrap_or(0), cpu_millis: cpu.unwrap_or(0) };
        let mut capacity = self.inner.capacity;
        // Hosts report: the session fits if one of them has room (the one placement would pick).
        let hosts = self.live_hosts(candidate).await?;
        if !hosts.is_empty() {
            match placement::place(self.need(), &hosts) {
                Some(host) => {
                    capacity = capacity.with_budget(host.budget_memory_mib, host.budget_cpu_millis);
                    committed = host.committed;
                }
                None => committed = Committed { memory_mib: u64::MAX / 2, cpu_millis: u64::MAX / 2 },
            }
        }
        let mut verdict = admission::decide(&capacity, Counts { opens_this_minute, user_live, queued, committed });
        if !matches!(verdict, Verdict::Refuse { .. }) && self.inner.rates.has_budgets() {
            let now = self.inner.clock.now();
            let (day, month): (Option<f64>, Option<f64>) = redis::pipe()
                .hget(keys.usage(user, &Budget::Daily.period(now)), "cost")
                .hget(keys.usage(user, &Budget::Monthly.period(now)), "cost")
                .query_async(&mut redis)
                .await?;
            let spent = Spent { day: day.unwrap_or(0.0), month: month.unwrap_or(0.0) };
            if let Some(budget) = self.inner.rates.exhausted(spent) {
                let (limit, _) = self.inner.rates.of_budget(budget, spent);
                verdict = Verdict::Refuse { limit: Limit::Budget(budget), max: limit };
            }
        }
        if verdict != Verdict::Admit {
            tracing::info!(user, ?verdict, "open not admitted at once");
        }
        Ok((verdict, hosts))
    }

    /// Lets waiting threds go when capacity frees, oldest first, and tells each waiting user their
    /// position whenever it changes. Runs every second and whenever a commit freed capacity or
    /// queued a thred; what it sends is idempotent (the admitted event's id is derived from the
    /// thred's version), so two replicas doing it at once do no harm.
    async fn admit_forever(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut told_positions: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        let meter_interval = Duration::from_millis(self.inner.config.meter_interval_ms.max(100));
        let mut last_metered = tokio::time::Instant::now();
        loop {
            let meter_now = last_metered.elapsed() >= meter_interval;
            if let Err(error) = self.notice_gone_hosts().await {
                tracing::warn!(%error, "could not check for gone hosts");
            }
            if let Err(error) = self.move_off_draining_hosts().await {
                tracing::warn!(%error, "could not move the sessions of drained hosts");
            }
            if let Err(error) = self.fail_over_gone_hosts().await {
                tracing::warn!(%error, "could not fail over the sessions of gone hosts");
            }
            for pattern in self.inner.patterns.iter().filter(|pattern| pattern.start.admission.is_some()) {
                if let Err(error) = self.admit_waiting(pattern, &mut told_positions).await {
                    tracing::warn!(%error, pattern = %pattern.name, "admission round failed; retrying");
                }
                if meter_now {
                    if let Err(error) = self.meter(pattern, meter_interval).await {
                        tracing::warn!(%error, pattern = %pattern.name, "metering failed; the next round charges the time");
                    }
                }
            }
            if meter_now {
                last_metered = tokio::time::Instant::now();
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1).min(meter_interval)) => {}
                () = self.inner.admission_wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Charges every user of `pattern` for the time their live threds held capacity or idled since
    /// they were last metered, records the totals (Redis for admission, the store for the API), and
    /// acts on budgets: 80 % spent warns the user's sessions once per period, 100 % stops them.
    async fn meter(&self, pattern: &Pattern, interval: Duration) -> Result<()> {
        let Some(spec) = &pattern.start.admission else { return Ok(()) };
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let user_prefix = keys.user_live(&pattern.name, "");
        let mut user_keys: Vec<String> = Vec::new();
        {
            let mut scan: redis::AsyncIter<String> = redis.scan_match(format!("{user_prefix}*")).await?;
            while let Some(key) = futures::StreamExt::next(&mut scan).await {
                user_keys.push(key);
            }
        }
        let now = self.inner.clock.now();
        let now_ms = now.timestamp_millis();
        for user_key in user_keys {
            let Some(user) = user_key.strip_prefix(&user_prefix).map(str::to_owned) else { continue };
            let ids: Vec<String> = redis.smembers(&user_key).await?;
            let threds = self.load_threds(&ids).await?;
            let mut charge = Charge::default();
            let mut holding = Vec::new();
            for thred in threds.into_iter().filter(|thred| admission::holds_capacity(spec, thred)) {
                let metered = if spec.idle_states.contains(&thred.state) { Metered::Idle } else { Metered::Holding };
                let last: Option<i64> = redis.get(keys.metered(&thred.id)).await?;
                let since = last.unwrap_or_else(|| thred.updated_ms.max(now_ms - interval.as_millis() as i64));
                let _: () = redis.set_ex(keys.metered(&thred.id), now_ms, 24 * 3600).await?;
                let seconds = (now_ms - since).max(0) as f64 / 1000.0;
                let part = self.inner.rates.charge(metered, seconds);
                charge = charge.plus(part);
                holding.push(thred);
            }
            if holding.is_empty() {
                continue;
            }
            let mut spent = Spent::default();
            for budget in Budget::ALL {
                let period = budget.period(now);
                let usage_key = keys.usage(&user, &period);
                let mut pipeline = redis::pipe();
                for (field, value) in charge.fields() {
                    pipeline.cmd("HINCRBYFLOAT").arg(&usage_key).arg(field).arg(value).ignore();
                }
                let retention_days: i64 = if budget == Budget::Daily { 40 } else { 400 };
                pipeline.expire(&usage_key, retention_days * 24 * 3600).ignore();
                pipeline.hgetall(&usage_key);
                let (totals,): (Vec<(String, f64)>,) = pipeline.query_async(&mut redis).await?;
                let cost = totals.iter().find(|(field, _)| field == "cost").map_or(0.0, |(_, value)| *value);
                match budget {
                    Budget::Daily => spent.day = cost,
                    Budget::Monthly => spent.month = cost,
                }
                self.record_usage(&user, &period, &totals, now_ms).await?;
            }
            self.enforce_budgets(&user, spent, &holding, now).await?;
        }
        Ok(())
    }

    /// Writes a user's totals for one period to the store (`usage`, id `<user>/<period>`).
    async fn record_usage(&self, user: &str, period: &str, totals: &[(String, f64)], now_ms: i64) -> Result<()> {
        let document = usage::usage_document(user, &self.inner.profile.name, period, totals);
        let operation = protocol::store::Operation::Upsert(protocol::store::UpsertArgs {
            collection: protocol::store::collections::USAGE.to_owned(),
            id: format!("{user}/{period}"),
            doc: document.as_object().cloned().unwrap_or_default(),
        });
        let task = operation.to_task(Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-usage/{user}/{period}/{now_ms}").as_bytes()));
        self.publish_messages(&[task_message(&self.inner.config, &task)?]).await
    }

    /// Stops a user's sessions once a budget is spent (the pattern saves them first) and warns
    /// them once per period at 80 %.
    async fn enforce_budgets(&self, user: &str, spent: Spent, holding: &[Thred], now: chrono::DateTime<chrono::Utc>) -> Result<()> {
        let rates = &self.inner.rates;
        if let Some(budget) = rates.exhausted(spent) {
            let (limit, used) = rates.of_budget(budget, spent);
            for thred in holding {
                tracing::info!(user, session = %thred.key, budget = budget.as_str(), used, limit, "budget spent; stopping the session");
                let data = protocol::events::SessionBudgetExceeded { budget: budget.as_str().to_owned(), spent: used, limit };
                let mut exceeded =
                    CloudEvent::of("/berth/engine/usage", Some(&thred.key), &data).with_extension("thredid", thred.id.clone());
                exceeded.id =
                    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-budget/{}/{}", thred.id, budget.period(now)).as_bytes()).to_string();
                self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &exceeded).await?;
            }
            return Ok(());
        }
        let Some(budget) = rates.nearly_exhausted(spent) else { return Ok(()) };
        let mut redis = self.inner.redis.clone();
        let first_warning: bool = redis::cmd("SET")
            .arg(self.inner.keys.budget_warned(user, &budget.period(now)))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(400 * 24 * 3600)
            .query_async::<Option<String>>(&mut redis)
            .await?
            .is_some();
        if !first_warning {
            return Ok(());
        }
        let (limit, used) = rates.of_budget(budget, spent);
        let messages = holding
            .iter()
            .filter_map(|thred| {
                let detail = json!({"budget_warning": {"budget": budget.as_str(), "spent": used, "limit": limit}});
                let notification = notification_to_owner(
                    thred,
                    &thred.state,
                    detail,
                    &format!("berth-budget-warning/{}/{}", thred.id, budget.period(now)),
                )?;
                Some(notification_message(&self.inner.config, &notification))
            })
            .collect::<Result<Vec<OutboxMessage>>>()?;
        self.publish_messages(&messages).await
    }

    async fn admit_waiting(&self, pattern: &Pattern, told_positions: &mut std::collections::HashMap<String, u64>) -> Result<()> {
        let Some(spec) = &pattern.start.admission else { return Ok(()) };
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let waiting: Vec<String> = redis.zrange(keys.queue(&pattern.name), 0, -1).await?;
        told_positions.retain(|thred_id, _| waiting.contains(thred_id));
        if waiting.is_empty() {
            return Ok(());
        }
        let (memory, cpu): (Option<u64>, Option<u64>) =
            redis::pipe().hget(keys.capacity(), "memory").hget(keys.capacity(), "cpu").query_async(&mut redis).await?;
        let committed = Committed { memory_mib: memory.unwrap_or(0), cpu_millis: cpu.unwrap_or(0) };
        let threds = self.load_threds(&waiting).await?;
        for (index, thred_id) in waiting.iter().enumerate() {
            let Some(thred) = threds.iter().find(|thred| &thred.id == thred_id) else { continue };
            if index == 0 && self.has_room(thred, committed).await? {
                // The pattern names the type; the data is session.admitted's.
                let data = protocol::events::to_data(&protocol::events::SessionAdmitted {});
                let mut admitted = CloudEvent::new(&spec.admitted_event, "/berth/engine/admission", Some(&thred.key), data)
                    .with_extension("thredid", thred.id.clone());
                admitted.id =
                    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-admitted/{}/{}", thred.id, thred.version).as_bytes()).to_string();
                self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &admitted).await?;
                continue;
            }
            let position = index as u64 + 1;
            if told_positions.get(thred_id) == Some(&position) {
                continue;
            }
            let detail = json!({"queued": true, "position": position});
            let Some(notification) =
                notification_to_owner(thred, &spec.queue_state, detail, &format!("berth-position/{}/{position}", thred.id))
            else {
                continue;
            };
            self.publish_messages(&[notification_message(&self.inner.config, &notification)?]).await?;
            told_positions.insert(thred_id.clone(), position);
        }
        Ok(())
    }

    /// The live thred that owns what `candidate` would own exclusively, if another one does.
    async fn exclusive_owner(&self, pattern: &Pattern, candidate: &Thred) -> Result<Option<Thred>> {
        let Some(exclusive) = &candidate.exclusive else { return Ok(None) };
        let mut redis = self.inner.redis.clone();
        let owner: Option<String> = redis.get(self.inner.keys.exclusive(&pattern.name, exclusive)).await?;
        let Some(owner_id) = owner.filter(|owner_id| owner_id != &candidate.id) else { return Ok(None) };
        Ok(self.load_thred(&owner_id).await?.filter(|owner| !owner.ended))
    }

    /// Keeps a host's report (`container.host_report`, `workspace.host_report`) for
    /// [`topology::HOST_GONE_AFTER_REPORTS`] of its intervals: the host is gone when it expires. A
    /// report older than that (redelivered late) is dropped, so it cannot bring a gone host back.
    async fn record_host_report(&self, event: &CloudEvent) -> Result<EventFate> {
        let report = match HostReport::from_event(event) {
            Ok(report) => report,
            Err(reason) => return Ok(EventFate::Refused(reason)),
        };
        if report.deployment != self.inner.profile.deployment() {
            tracing::debug!(deployment = %report.deployment, "host report of another deployment ignored");
            return Ok(EventFate::Done);
        }
        let now_ms = self.inner.clock.now_ms();
        let age_ms = event.time.map_or(0, |time| now_ms - time.timestamp_millis()).max(0) as u64;
        if age_ms >= report.gone_after_ms() {
            tracing::debug!(host = %report.host, age_ms, "stale host report dropped");
            return Ok(EventFate::Done);
        }
        let text = serde_json::to_string(&report).map_err(|source| Error::Encode { what: "host report", source })?;
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(keys.host_report(&report.host, report.agent))
            .arg(text)
            .arg("PX")
            .arg(report.gone_after_ms() - age_ms)
            .ignore()
            .zadd(keys.hosts(), &report.host, now_ms)
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(EventFate::Done)
    }

    /// The hosts that are not gone, each with what this engine's threds hold there and whether it
    /// reported `thred`'s workspace; empty while no host reports (one-host deployments placed on
    /// no host, as before hosts existed).
    async fn live_hosts(&self, thred: &Thred) -> Result<Vec<HostView>> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let (reporting, draining): (Vec<String>, Vec<String>) =
            redis::pipe().zrange(keys.hosts(), 0, -1).zrange(keys.draining(), 0, -1).query_async(&mut redis).await?;
        if reporting.is_empty() {
            return Ok(Vec::new());
        }
        // A drained host reports on, but takes no session.
        let ids: Vec<String> = reporting.into_iter().filter(|id| !draining.contains(id)).collect();
        if ids.is_empty() {
            // Every reporting host is drained: that is no room anywhere, not "no host reports".
            return Ok(vec![HostView {
                id: String::new(),
                budget_memory_mib: 0,
                budget_cpu_millis: 0,
                committed: Committed::default(),
                sessions: 0,
                has_workspace: false,
            }]);
        }
        let mut pipeline = redis::pipe();
        for id in &ids {
            let capacity = keys.capacity_of(Some(id));
            pipeline
                .get(keys.host_report(id, AgentKind::Container))
                .get(keys.host_report(id, AgentKind::Workspace))
                .hget(&capacity, "memory")
                .hget(&capacity, "cpu");
        }
        let replies: Vec<redis::Value> = pipeline.query_async(&mut redis).await?;
        let workspace = thred_workspace(thred);
        let mut hosts = Vec::new();
        for (id, reply) in ids.iter().zip(replies.chunks(4)) {
            let [container, workspace_report, memory, cpu] = reply else { continue };
            let Some(container) = redis::from_redis_value::<Option<String>>(container).ok().flatten() else { continue };
            let Ok(container) = serde_json::from_str::<HostReport>(&container) else { continue };
            let Some(capacity) = container.capacity else { continue };
            let cached: Vec<String> = redis::from_redis_value::<Option<String>>(workspace_report)
                .ok()
                .flatten()
                .and_then(|text| serde_json::from_str::<HostReport>(&text).ok())
                .and_then(|report| report.workspaces)
                .unwrap_or_default();
            let committed = Committed {
                memory_mib: redis::from_redis_value::<Option<u64>>(memory).ok().flatten().unwrap_or(0),
                cpu_millis: redis::from_redis_value::<Option<u64>>(cpu).ok().flatten().unwrap_or(0),
            };
            hosts.push(HostView {
                id: id.clone(),
                budget_memory_mib: capacity.memory_mib,
                budget_cpu_millis: capacity.cpu_millis,
                committed,
                sessions: capacity.sessions,
                has_workspace: workspace.as_ref().is_some_and(|workspace| cached.contains(workspace)),
            });
        }
        Ok(hosts)
    }

    /// The host placement would pick now for a new session of `user`'s `workspace`, with the same
    /// reads and decision as a real open, committing nothing (benchmarks and tools). `None` when no
    /// host reports or none has room.
    pub async fn placement_decision(&self, user: &str, workspace: &str) -> Result<Option<String>> {
        let mut context = Map::new();
        context.insert("user".to_owned(), json!(user));
        context.insert("workspace".to_owned(), json!(workspace));
        let probe = Thred {
            id: String::new(),
            pattern: String::new(),
            key: String::new(),
            exclusive: None,
            state: String::new(),
            context,
            timers: BTreeMap::new(),
            last_timer_generation: 0,
            version: 0,
            created_ms: 0,
            updated_ms: 0,
            ended: false,
            host: None,
        };
        let hosts = self.live_hosts(&probe).await?;
        Ok(placement::place(self.need(), &hosts).map(|host| host.id.clone()))
    }

    /// What one session of an admitted pattern holds.
    fn need(&self) -> Committed {
        Committed { memory_mib: self.inner.capacity.need_memory_mib, cpu_millis: self.inner.capacity.need_cpu_millis }
    }

    /// Whether the next waiting thred would fit now: on a host that reports, or (no host reports)
    /// in the profile's one-host budget next to `committed`.
    async fn has_room(&self, thred: &Thred, committed: Committed) -> Result<bool> {
        let hosts = self.live_hosts(thred).await?;
        if hosts.is_empty() {
            return Ok(self.inner.capacity.fits(committed));
        }
        Ok(placement::place(self.need(), &hosts).is_some())
    }

    /// Places a thred that is about to take capacity (a new session admitted, or a waiting one let
    /// go) on a host and records it on the thred; its tasks for host-affine agents follow it there.
    /// A thred of a pattern without admission takes the host its starting event names (the
    /// reconciler's `session.recover` names the host whose inventory found the directory).
    /// `hosts_read`: the hosts admission just read for this thred, if it did. Reusing them saves a
    /// round trip per open; the commit checks the chosen host's capacity again, atomically, so a
    /// view that went stale meanwhile costs a retry, never an overcommitted host.
    async fn place(
        &self,
        pattern: &Pattern,
        previous: Option<&Thred>,
        event: &CloudEvent,
        thred: &mut Thred,
        hosts_read: Option<Vec<HostView>>,
    ) -> Result<Placed> {
        let Some(spec) = &pattern.start.admission else {
            if previous.is_none() {
                thred.host = event
                    .data
                    .get("host")
                    .and_then(Value::as_str)
                    .filter(|host| protocol::profile::is_deployment_id(host))
                    .map(str::to_owned);
            }
            return Ok(Placed::Unplaced);
        };
        let acquires =
            admission::holds_capacity(spec, thred) && !previous.is_some_and(|previous| admission::holds_capacity(spec, previous));
        if !acquires {
            return Ok(Placed::Unplaced);
        }
        let began = std::time::Instant::now();
        let hosts = match hosts_read {
            Some(hosts) => hosts,
            None => self.live_hosts(thred).await?,
        };
        if hosts.is_empty() {
            thred.host = None;
            return Ok(Placed::Unplaced);
        }
        let Some(host) = placement::place(self.need(), &hosts) else { return Ok(Placed::NoRoom) };
        tracing::info!(thred = %thred.id, session = %thred.key, host = %host.id, cached = host.has_workspace,
            free_memory_mib = host.budget_memory_mib.saturating_sub(host.committed.memory_mib), hosts = hosts.len(),
            placement_us = began.elapsed().as_micros() as u64, "placed");
        thred.host = Some(host.id.clone());
        Ok(Placed::Here(host.clone()))
    }

    /// Sends `session.move` to every live thred placed on a drained host that is not moving yet:
    /// the pattern freezes, final-syncs and removes it there, and it is placed again elsewhere
    /// (placement skips drained hosts). The event's id is derived from the thred's version, so each
    /// replica and each round sends it once per version; a thred in a state that does not move
    /// (starting, stopping) gets it again once its version changed.
    async fn move_off_draining_hosts(&self) -> Result<()> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let draining: Vec<String> = redis.zrange(keys.draining(), 0, -1).await?;
        if draining.is_empty() {
            return Ok(());
        }
        for pattern in self.inner.patterns.iter().filter(|pattern| pattern.start.admission.is_some() && pattern.knows(SESSION_MOVE)) {
            for thred in self.live_threds_of(pattern).await? {
                let on_drained = thred.host.as_ref().is_some_and(|host| draining.contains(host));
                let moving = thred.context.get("moving").and_then(Value::as_bool).unwrap_or(false);
                if thred.ended || !on_drained || moving {
                    continue;
                }
                let data = protocol::events::SessionMove { from: thred.host.clone() };
                let mut event = CloudEvent::of("/berth/engine/drain", Some(&thred.key), &data).with_extension("thredid", thred.id.clone());
                event.id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("berth-move/{}/{}", thred.id, thred.version).as_bytes()).to_string();
                tracing::info!(session = %thred.key, host = ?thred.host, state = %thred.state, "host drained; moving the session");
                self.inner.publisher.publish_event_to(&self.inner.config.events_exchange, &event).await?;
            }
        }
        Ok(())
    }

    /// Forgets hosts whose container report expired (they are gone: placement no longer sees
    /// them), logging each once. Tasks already on a gone host's queue wait there for it.
    async fn notice_gone_hosts(&self) -> Result<()> {
        let keys = &self.inner.keys;
        let mut redis = self.inner.redis.clone();
        let ids: Vec<(String, i64)> = redis.zrange_withscores(keys.hosts(), 0, -1).await?;
        for (id, last_ms) in ids {
            let reporting: bool = redis.exists(keys.host_report(&id, AgentKind::Container)).await?;
            if reporting {
                continue;
            }
            // Noted first (idempotent), so failover counts from here whichever replica logs it.
            self.note_gone(&id).await?;
            // Only the replica whose ZREM takes it out logs it.
            let removed: u64 = redis::cmd("ZREM").arg(keys.hosts()).arg(&id).query_async(&mut redis).await?;
            if removed > 0 {
                let silent_ms = self.inner.clock.now_ms() - last_ms;
                tracing::warn!(host = %id, silent_ms, "host gone: no report within its gone interval; no session is placed on it");
            }
        }
        Ok(())
    }

    fn log_disposition(&self, event: &CloudEvent, step: &Step, pattern: &Pattern) {
        let thred = &step.thred;
        match &step.disposition {
            Disposition::Transitioned { from, to } => {
                tracing::info!(thred = %thred.id, key = %thred.key, pattern = %pattern.name, event_type = %event.event_type, from = %from, to = %to, "transition")
            }
            Disposition::Stayed => tracing::debug!(thred = %thred.id, event_type = %event.event_type, state = %thred.state, "handled"),
            Disposition::Ignored => tracing::debug!(thred = %thred.id, event_type = %event.event_type, state = %thred.state, "ignored"),
            Disposition::StaleTimer => {
                Metrics::count(&self.inner.metrics.stale_timers);
                tracing::debug!(thred = %thred.id, data = %event.data, "stale timer dropped")
            }
            Disposition::Rejected(reason) => {
                Metrics::count(&self.inner.metrics.rejected);
                tracing::info!(thred = %thred.id, event_id = %event.id, event_type = %event.event_type, reason = %reason, "event rejected")
            }
        }
    }

    /// The context a new thred starts with: the event's data, the session, user, workspace and
    /// profile, and the profile's timers (seconds), from which the pattern computes durations.
    fn seed_context(&self, event: &CloudEvent) -> Map<String, Value> {
        let mut context = match &event.data {
            Value::Object(data) => data.clone(),
            _ => Map::new(),
        };
        if let Some(subject) = &event.subject {
            context.insert("session".to_owned(), json!(subject));
        }
        if let Some(user) = event.extension("userid") {
            context.insert("user".to_owned(), json!(user));
        }
        let profile = &self.inner.profile;
        context.insert("profile".to_owned(), json!(profile.name));
        context.insert(
            "timers".to_owned(),
            json!({
                "idle_after_secs": profile.timers.idle_after_secs,
                "stop_after_idle_secs": profile.timers.stop_after_idle_secs,
                "max_age_secs": profile.timers.max_age_secs,
                "autosave_secs": profile.timers.autosave_secs,
                "dormant_after_idle_secs": profile.timers.dormant_after_idle_secs,
                "idle_cpu_percent": profile.timers.idle_cpu_percent,
                "idle_warning_secs": profile.timers.idle_warning_secs,
                "max_keepalives": profile.timers.max_keepalives,
                "ready_timeout_secs": profile.container.ready_timeout_secs,
                "queue_timeout_secs": profile.limits.queue_timeout_secs,
            }),
        );
        context
    }
}

/// What became of an event the engine could read.
enum EventFate {
    Done,
    /// The event can never succeed: dead-letter it with this reason.
    Refused(String),
}

/// The core's view of a CloudEvent.
pub fn event_input(event: &CloudEvent) -> EventInput {
    EventInput {
        id: event.id.clone(),
        event_type: event.event_type.clone(),
        source: event.source.clone(),
        subject: event.subject.clone(),
        data: event.data.clone(),
        extensions: event.extensions.iter().map(|(name, value)| (name.clone(), value.clone())).collect::<BTreeMap<_, _>>(),
    }
}

async fn report_metrics(metrics: Arc<Metrics>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_secs(60));
    interval.tick().await;
    loop {
        tokio::select! {
            _ = interval.tick() => tracing::info!(metrics = ?metrics.snapshot(), "engine metrics"),
            _ = stop.changed() => return,
        }
    }
}
