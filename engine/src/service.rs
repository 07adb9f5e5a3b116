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
use protocol::{topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Identity, Incoming, Outcome, Profile};
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::admission::{holds_capacity, is_queued, Capacity, Limit, Verdict};
use crate::core::{self, Disposition, EventInput, Step, StepError};
use crate::metrics::Metrics;
use crate::pattern::Pattern;
use crate::timers;
use crate::usage::Rates;
use crate::{Error, Result};
use binding::Binding;
use hosts::Placed;
pub use outbox::OutboxMessage;
use outbox::{delete_published_outboxes, notification_message, notification_to_owner, task_message, task_message_on};
use store::{connect_redis, CommitResult, COMMIT_SCRIPT};

mod admission;
mod binding;
mod clock;
mod failover;
mod hosts;
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
/// Where a new thred of a pattern with admission finds its verdict (`ctx.admission`).
const ADMISSION_CONTEXT: &str = "admission";
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
    hosts_read: redis::Script,
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
    /// `ctx.timers` of every new thred (the profile's timers, seconds), built once.
    timers_seed: Value,
    /// Warm-pool slots an event in flight on this engine is about to claim: the other opens skip
    /// them, so racing opens of one replica pick different slots (the commit script still decides
    /// between replicas).
    slots_in_flight: pool::SlotsInFlight,
}

/// A running engine (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// An engine serving in a task of its own until [`Serving::stop`] (tests, benchmarks).
pub struct Serving {
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<()>>,
}

impl Serving {
    pub fn start(engine: &Engine) -> Serving {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = engine.clone();
        let served = tokio::spawn(async move {
            serving
                .serve(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Serving { stop, served }
    }

    /// Stops serving and returns how serving ended; a panic in it is raised again here.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        match self.served.await {
            Ok(served) => served,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
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
                bind_read: redis::Script::new(&store::bind_read_script()),
                hosts_read: redis::Script::new(&hosts::hosts_read_script()),
                published_outboxes,
                published_outboxes_receiver: std::sync::Mutex::new(Some(published_outboxes_receiver)),
                timer_wake: Arc::new(tokio::sync::Notify::new()),
                capacity,
                admission_wake: Arc::new(tokio::sync::Notify::new()),
                rates: Rates::of(&profile_for_rates),
                clock,
                timers_seed: timers_seed(&profile_for_rates),
                slots_in_flight: pool::SlotsInFlight::default(),
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
        // The slot this attempt tries, kept from the other opens until the attempt is over.
        let mut trying_slot: Option<pool::TryingSlot> = None;
        // The pattern this event starts a thred of, if it starts one (binding may pick another
        // when the first cannot start on this subject: the next attempt reads for that one).
        let mut starting: Option<&Pattern> = self.inner.patterns.iter().find(|pattern| pattern.start.events.contains(&event.event_type));
        for _ in 0..COMMIT_ATTEMPTS {
            let now_ms = self.inner.clock.now_ms();
            // The thred the event would start is created (not yet stepped) before the read, so the
            // same round trip reads what it needs: its exclusive owner, admission's counts, the hosts.
            let candidate = starting.map(|pattern| {
                let mut seed = self.seed_context(event);
                // Only the engine decides these (after the read): an opener's own values are dropped.
                if pattern.start.admission.is_some() {
                    seed.remove(ADMISSION_CONTEXT);
                }
                if let Some(spec) = &pattern.start.pool {
                    seed.remove(&spec.context);
                }
                (pattern, core::new_thred(pattern, &Uuid::now_v7().to_string(), seed, &input, now_ms))
            });
            let read_for = candidate.as_ref().and_then(|(pattern, created)| created.as_ref().ok().map(|thred| (*pattern, thred)));
            let Some((read, start_read)) = self.read_for_binding(event, read_for).await? else {
                return self.finish_duplicate(event).await;
            };
            // The hosts admission read in this attempt, for placement to reuse.
            let mut hosts_read: Option<hosts::LiveHosts> = None;
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
                    let Some((_, created)) = candidate.filter(|(read_for, _)| read_for.name == pattern.name) else {
                        starting = Some(pattern);
                        continue;
                    };
                    match created {
                        // What the new thred would own exclusively already has a live owner:
                        // the event joins the owner instead.
                        Ok(thred) => match start_read.owner {
                            Some(owner) => {
                                Metrics::count(&self.inner.metrics.joins);
                                let stepped = core::step(pattern, &owner, &input, now_ms);
                                (pattern, Some(owner), stepped)
                            }
                            // A new thred: admitted, queued or refused by the profile's limits,
                            // which the pattern reads in `ctx.admission` as the event is applied.
                            None if pattern.start.admission.is_some() => {
                                let Some(admission_read) = start_read.admission else {
                                    return Err(Error::Corrupt {
                                        key: keys.queue(&pattern.name),
                                        reason: "the bind read returned no admission counts".to_owned(),
                                    });
                                };
                                let verdict = match overruled.take() {
                                    Some(verdict) => verdict,
                                    None => {
                                        let user = thred.context.get("user").and_then(Value::as_str).unwrap_or_default();
                                        self.admission_verdict(user, &admission_read)
                                    }
                                };
                                hosts_read = Some(admission_read.hosts);
                                let mut thred = thred;
                                thred.context.insert(ADMISSION_CONTEXT.to_owned(), verdict.to_value());
                                if let Some(spec) = &pattern.start.pool {
                                    if verdict == Verdict::Admit {
                                        trying_slot = None;
                                        if let Some(slot) = self.free_pool_slot(&taken_slots).await? {
                                            thred.context.insert(spec.context.clone(), Value::String(slot.name().to_owned()));
                                            trying_slot = Some(slot);
                                        }
                                    }
                                }
                                (pattern, None, core::step(pattern, &thred, &input, now_ms))
                            }
                            None => (pattern, None, core::step(pattern, &thred, &input, now_ms)),
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
                CommitResult::RateLimit => {
                    overruled =
                        Some(Verdict::Refuse { limit: Limit::OpensPerMinute, max: self.inner.capacity.max_opens_per_minute as f64 });
                    continue;
                }
                CommitResult::SlotTaken => {
                    taken_slots.extend(pool::claimed_slot(pattern, previous.as_ref(), &step.thred));
                    overruled = Some(Verdict::Admit);
                    continue;
                }
                CommitResult::Committed => {}
            }
            // Claimed (out of the free set) or never tried: the other opens need not skip it now.
            drop(trying_slot.take());
            if let Some(spec) = &pattern.start.admission {
                let held_before = previous.as_ref().is_some_and(|thred| holds_capacity(spec, thred));
                if held_before != holds_capacity(spec, &step.thred) || is_queued(spec, &step.thred) {
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
        context.insert("profile".to_owned(), json!(self.inner.profile.name));
        context.insert("timers".to_owned(), self.inner.timers_seed.clone());
        context
    }
}

/// The profile's timers (seconds), from which a pattern computes durations (`ctx.timers`).
fn timers_seed(profile: &Profile) -> Value {
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
    })
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
