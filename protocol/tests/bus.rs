//! The AMQP bus against the real RabbitMQ: confirmed round trips, dead-lettering with a reason while
//! good messages keep flowing, retries that wait in delay queues (outages never use up the attempts,
//! failures are dead-lettered after the limit), request/reply, and graceful shutdown.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{amqp_url, collect_from, private_queue_on, wait_until};
use protocol::bus::{AutoDelete, Durability, ExchangeKind, QueueSpec, RetryPolicy};
use protocol::event::DEFAULT_MAX_EVENT_BYTES;
use protocol::{topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Incoming, Outcome, Properties};
use serde_json::json;

async fn bus(name: &str) -> Bus {
    let bus = Bus::connect(BusConfig::new(&amqp_url(), name)).await.expect("broker reachable");
    bus.declare_topology().await.expect("topology declared");
    bus
}

/// A fanout dead-letter exchange of one test's own with a queue bound to it, so the test sees only
/// its own dead letters.
struct DeadLetters {
    exchange: String,
    queue: String,
}

impl DeadLetters {
    async fn new(bus: &Bus) -> DeadLetters {
        let exchange = format!("berth-test.bus.{}.dead", uuid::Uuid::new_v4().simple());
        bus.declare_exchange(&exchange, ExchangeKind::Fanout, Durability::Transient, AutoDelete::WhenUnused).await.expect("exchange");
        let queue = private_queue_on(bus, &exchange, "").await;
        DeadLetters { exchange, queue }
    }

    async fn delete(&self, bus: &Bus) {
        bus.delete_queue(&self.queue).await.ok();
        let _ = bus.delete_exchange(&self.exchange).await;
    }
}

/// A quorum work queue like production's (delivery limit included) bound to `amq.direct` with its
/// own routing key; it expires if the test dies before deleting it.
async fn work_queue(bus: &Bus) -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (queue, routing_key) = (format!("berth-test.bus.{id}.work"), format!("rk-{id}"));
    let spec = QueueSpec::quorum(&queue).with_delivery_limit(topology::DELIVERY_LIMIT).expiring_after(Duration::from_secs(600));
    bus.declare_queue(&spec).await.expect("queue");
    bus.set_binding(&queue, "amq.direct", &routing_key, protocol::bus::Binding::Bind).await.expect("bound");
    (queue, routing_key)
}

/// Ready messages in a queue (passive declare); `None` when it does not exist.
async fn ready_messages(bus: &Bus, queue: &str) -> Option<u32> {
    bus.ready_messages(queue).await.ok()
}

/// Ready and unacknowledged messages of a queue, as the broker counts them.
fn broker_counts(queue: &str) -> (u64, u64) {
    let output = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged"])
        .output()
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&output.stdout);
    let line = listing.lines().find(|line| line.split('\t').next() == Some(queue)).expect("queue listed");
    let counts: Vec<u64> = line.split('\t').skip(1).map(|count| count.trim().parse().expect("a count")).collect();
    (counts[0], counts[1])
}

/// A queue's arguments as the broker lists them.
fn broker_arguments(queue: &str) -> String {
    let output = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "arguments"])
        .output()
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&output.stdout);
    let line = listing.lines().find(|line| line.split('\t').next() == Some(queue)).expect("queue listed");
    line.to_owned()
}

/// What a handler saw of one delivery.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    attempts: u32,
    outages: u32,
    routing_key: String,
    redelivered: bool,
    body: Vec<u8>,
}

fn recording_handler(
    seen: Arc<Mutex<Vec<Seen>>>,
    decide: impl Fn(usize) -> Outcome + Clone + Send + Sync + 'static,
) -> impl Fn(Incoming) -> futures::future::Ready<Outcome> + Clone + Send + Sync + 'static {
    move |incoming: Incoming| {
        let mut seen = seen.lock().expect("seen");
        seen.push(Seen {
            at: Instant::now(),
            attempts: incoming.attempts(),
            outages: incoming.outages(),
            routing_key: incoming.routing_key.clone(),
            redelivered: incoming.redelivered,
            body: incoming.body.clone(),
        });
        futures::future::ready(decide(seen.len()))
    }
}

#[tokio::test]
async fn outages_wait_longer_each_time_and_never_use_up_the_attempts() {
    let policy = RetryPolicy::new(&[Duration::from_millis(100), Duration::from_millis(300), Duration::from_millis(600)], 3, 50);
    let dead = DeadLetters::new(&bus("test-outage").await).await;
    let bus = bus("test-outage").await.with_retry_policy(policy.clone()).with_dead_exchange(&dead.exchange);
    let (queue, routing_key) = work_queue(&bus).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Twelve outages: more than the attempt limit (3) and the queue's delivery limit (5) together.
    let handler = recording_handler(seen.clone(), |delivery| if delivery <= 12 { Outcome::RetryUnavailable } else { Outcome::Ack });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer_bus = bus.clone();
    let spec = ConsumeSpec::new(&queue, 4);
    let consumer = tokio::spawn(async move {
        consumer_bus
            .consume(spec, handler, async {
                stopped.await.ok();
            })
            .await
    });
    bus.publish("amq.direct", &routing_key, b"outage", Properties::bare()).await.expect("confirmed");

    wait_until(Duration::from_secs(60), || seen.lock().unwrap().len() == 13).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).ok();
    consumer.await.expect("consumer task").expect("consumer ends cleanly");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 13, "acked on the 13th delivery, and not delivered again");
    assert_eq!(seen.iter().map(|seen| seen.outages).collect::<Vec<_>>(), (0..=12).collect::<Vec<u32>>());
    assert!(seen.iter().all(|seen| seen.attempts == 0), "outages are not failed attempts");
    assert!(seen.iter().all(|seen| seen.routing_key == routing_key && seen.body == b"outage"), "{seen:?}");
    assert!(!seen[0].redelivered && seen[1..].iter().all(|seen| seen.redelivered));
    for (earlier_retries, pair) in seen.windows(2).enumerate() {
        let gap = pair[1].at - pair[0].at;
        let delay = policy.delay_after(u32::try_from(earlier_retries).unwrap());
        // The broker's message TTL counts in whole milliseconds on its own clock: a retry seen
        // 599.8 ms after the last one waited its 600 ms there (a fresh-clone run failed so).
        let tolerance = Duration::from_millis(5);
        assert!(gap + tolerance >= delay, "retry {earlier_retries} came after {gap:?}, before its delay {delay:?}");
    }
    assert_eq!(ready_messages(&bus, &dead.queue).await, Some(0), "nothing was dead-lettered");
    assert_eq!(ready_messages(&bus, &queue).await, Some(0));
    for delay in policy.delays() {
        assert_eq!(ready_messages(&bus, &topology::retry_queue(&queue, *delay)).await, Some(0), "delay queues are empty");
    }
    bus.delete_retry_queues(&queue).await.expect("delay queues deleted");
    bus.delete_queue(&queue).await.ok();
    dead.delete(&bus).await;
    bus.close().await;
}

#[tokio::test]
async fn failures_wait_outside_the_work_queue_and_are_dead_lettered_after_the_attempt_limit() {
    // The second rung is long enough to look at the queues while a retry waits in it.
    let policy = RetryPolicy::new(&[Duration::from_millis(100), Duration::from_secs(3)], 4, 50);
    let dead = DeadLetters::new(&bus("test-attempts").await).await;
    let bus = bus("test-attempts").await.with_retry_policy(policy.clone()).with_dead_exchange(&dead.exchange);
    let (queue, routing_key) = work_queue(&bus).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = recording_handler(seen.clone(), |_| Outcome::Retry);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer_bus = bus.clone();
    let spec = ConsumeSpec::new(&queue, 4);
    let consumer = tokio::spawn(async move {
        consumer_bus
            .consume(spec, handler, async {
                stopped.await.ok();
            })
            .await
    });
    bus.publish("amq.direct", &routing_key, b"failing", Properties::bare()).await.expect("confirmed");

    // Look while retries wait in the 3 s delay queue (after the 2nd and 3rd deliveries); a look is
    // conclusive only if no delivery happened meanwhile.
    let delay_queue = topology::retry_queue(&queue, Duration::from_secs(3));
    let mut conclusive_looks = 0;
    for deliveries in [2, 3] {
        wait_until(Duration::from_secs(30), || seen.lock().unwrap().len() >= deliveries).await;
        let parked = tokio::time::timeout(Duration::from_secs(2), async {
            while ready_messages(&bus, &delay_queue).await != Some(1) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let work_queue_counts = {
            let queue = queue.clone();
            tokio::task::spawn_blocking(move || broker_counts(&queue)).await.expect("rabbitmqctl")
        };
        if parked.is_ok() && seen.lock().unwrap().len() == deliveries {
            assert_eq!(work_queue_counts, (0, 0), "the work queue holds nothing, unacked or ready, while a retry waits");
            conclusive_looks += 1;
        }
    }
    assert!(conclusive_looks > 0, "the work queue could be looked at while a retry waited");

    let dead_letters = common::collect_messages(&bus, &dead.queue, 1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(()).ok();
    consumer.await.expect("consumer task").expect("consumer ends cleanly");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|seen| seen.attempts).collect::<Vec<_>>(), [0, 1, 2, 3], "exactly 4 attempts");
    assert!(seen.windows(2).all(|pair| pair[1].at - pair[0].at >= Duration::from_millis(100)));
    let (body, headers) = &dead_letters[0];
    assert_eq!(body, b"failing");
    assert_eq!(headers[topology::REASON_HEADER], "gave up after 4 failed attempts (retry limit 4)");
    assert_eq!(headers[topology::ORIGIN_HEADER], queue);
    assert_eq!(headers[topology::ATTEMPTS_HEADER], "4");
    assert_eq!(ready_messages(&bus, &queue).await, Some(0));
    bus.delete_retry_queues(&queue).await.expect("delay queues deleted");
    bus.delete_queue(&queue).await.ok();
    dead.delete(&bus).await;
    bus.close().await;
}

#[tokio::test]
async fn a_panicking_handler_is_a_failed_attempt_and_the_consumer_keeps_going() {
    let policy = RetryPolicy::new(&[Duration::from_millis(100)], 2, 50);
    let dead = DeadLetters::new(&bus("test-panic").await).await;
    let bus = bus("test-panic").await.with_retry_policy(policy).with_dead_exchange(&dead.exchange);
    let (queue, routing_key) = work_queue(&bus).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    let recorder = acked.clone();
    let handler = move |incoming: Incoming| {
        let recorder = recorder.clone();
        async move {
            if incoming.body == b"poison" {
                panic!("a handler bug");
            }
            recorder.lock().unwrap().push(incoming.body.clone());
            Outcome::Ack
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer_bus = bus.clone();
    let spec = ConsumeSpec::new(&queue, 4);
    let consumer = tokio::spawn(async move {
        consumer_bus
            .consume(spec, handler, async {
                stopped.await.ok();
            })
            .await
    });
    for body in [&b"poison"[..], b"good"] {
        bus.publish("amq.direct", &routing_key, body, Properties::bare()).await.expect("confirmed");
    }

    let dead_letters = common::collect_messages(&bus, &dead.queue, 1, Duration::from_secs(30)).await;
    wait_until(Duration::from_secs(10), || acked.lock().unwrap().len() == 1).await;
    stop.send(()).ok();
    consumer.await.expect("consumer task").expect("consumer ends cleanly");
    let (body, headers) = &dead_letters[0];
    assert_eq!(body, b"poison");
    assert_eq!(headers[topology::REASON_HEADER], "gave up after 2 failed attempts (retry limit 2)");
    assert_eq!(*acked.lock().unwrap(), [b"good".to_vec()], "other messages flow while one panics");
    assert_eq!(ready_messages(&bus, &queue).await, Some(0), "nothing left unacked or waiting");
    bus.delete_retry_queues(&queue).await.expect("delay queues deleted");
    bus.delete_queue(&queue).await.ok();
    dead.delete(&bus).await;
    bus.close().await;
}

#[tokio::test]
async fn delay_queues_are_declared_when_a_retry_finds_them_missing() {
    let policy = RetryPolicy::new(&[Duration::from_millis(100)], 3, 3);
    let bus = bus("test-missing-delay").await.with_retry_policy(policy.clone());
    let (queue, routing_key) = work_queue(&bus).await;
    let delay_queue = topology::retry_queue(&queue, Duration::from_millis(100));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = recording_handler(seen.clone(), |delivery| if delivery % 2 == 1 { Outcome::RetryUnavailable } else { Outcome::Ack });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer_bus = bus.clone();
    let spec = ConsumeSpec::new(&queue, 4);
    let consumer = tokio::spawn(async move {
        consumer_bus
            .consume(spec, handler, async {
                stopped.await.ok();
            })
            .await
    });

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ready_messages(&bus, &delay_queue).await, None, "a consumer that has not retried declares no delay queue");
    bus.publish("amq.direct", &routing_key, b"first", Properties::bare()).await.expect("confirmed");
    wait_until(Duration::from_secs(20), || seen.lock().unwrap().len() == 2).await;
    assert_eq!(ready_messages(&bus, &delay_queue).await, Some(0), "the first retry declared its delay queue");
    let arguments = {
        let delay_queue = delay_queue.clone();
        tokio::task::spawn_blocking(move || broker_arguments(&delay_queue)).await.expect("rabbitmqctl")
    };
    assert!(arguments.contains("x-expires"), "a test queue's delay queue expires: {arguments}");
    // Gone under a running consumer (deleted, or expired): the next retry declares it again.
    bus.delete_retry_queues(&queue).await.expect("deleted");
    bus.publish("amq.direct", &routing_key, b"second", Properties::bare()).await.expect("confirmed");
    wait_until(Duration::from_secs(20), || seen.lock().unwrap().len() == 4).await;
    stop.send(()).ok();
    consumer.await.expect("consumer task").expect("consumer ends cleanly");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|seen| seen.outages).collect::<Vec<_>>(), [0, 1, 0, 1], "both went through the delay queue");
    assert_eq!(seen.iter().map(|seen| seen.body.as_slice()).collect::<Vec<_>>(), [&b"first"[..], b"first", b"second", b"second"]);
    bus.delete_retry_queues(&queue).await.expect("deleted");
    bus.delete_queue(&queue).await.ok();
    bus.close().await;
}

#[tokio::test]
async fn topology_declaration_is_idempotent() {
    let bus = bus("test-topology").await;
    bus.declare_topology().await.expect("second declaration succeeds");
    bus.declare_topology().await.expect("third declaration succeeds");
    for delay in topology::RETRY_DELAYS {
        let delay_queue = topology::retry_queue(topology::ENGINE_QUEUE, delay);
        assert_eq!(delay_queue, format!("berth.engine.retry.{}s", delay.as_secs()));
        let arguments = tokio::task::spawn_blocking(move || broker_arguments(&delay_queue)).await.expect("rabbitmqctl");
        assert!(!arguments.contains("x-expires"), "production delay queues are permanent: {arguments}");
        assert!(arguments.contains("\"x-dead-letter-routing-key\",\"berth.engine\""), "{arguments}");
    }
    bus.close().await;
}

#[tokio::test]
async fn published_events_round_trip_with_confirms() {
    let bus = bus("test-round-trip").await;
    let event_type = format!("test.roundtrip{}", uuid::Uuid::new_v4().simple());
    let queue = private_queue_on(&bus, topology::EVENTS_EXCHANGE, &event_type).await;
    let mut sent = Vec::new();
    for index in 0..20 {
        let event = CloudEvent::new(&event_type, "/tests", Some("s-1"), json!({"index": index}));
        bus.publish_event(&event).await.expect("confirmed");
        sent.push(event);
    }
    let received = collect_from(&bus, &queue, sent.len(), Duration::from_secs(20)).await;
    let received: Vec<CloudEvent> =
        received.iter().map(|body| CloudEvent::parse(body, DEFAULT_MAX_EVENT_BYTES).expect("valid event")).collect();
    assert_eq!(received, sent, "every event arrives once, intact and in order");
    bus.delete_queue(&queue).await.ok();
    bus.close().await;
}

/// A message that must be routed fails loudly where no queue takes it (a host queue not declared
/// yet, or deleted) instead of being dropped; bound, it arrives; a plain publish to nowhere is
/// still confirmed (notifications nobody listens to).
#[tokio::test]
async fn a_message_that_must_be_routed_fails_where_no_queue_takes_it() {
    let bus = bus("test-must-be-routed").await;
    let routing_key = format!("test.must-be-routed.{}", uuid::Uuid::new_v4().simple());
    let body = b"{}";
    let unrouted = bus.publish("amq.direct", &routing_key, body, Properties::json().must_be_routed()).await;
    assert!(
        matches!(&unrouted, Err(protocol::bus::BusError::Unroutable { routing_key: key, .. }) if key == &routing_key),
        "no queue bound: {unrouted:?}"
    );
    bus.publish("amq.direct", &routing_key, body, Properties::json()).await.expect("a plain publish to nowhere is confirmed");
    let queue = private_queue_on(&bus, "amq.direct", &routing_key).await;
    bus.publish("amq.direct", &routing_key, body, Properties::json().must_be_routed()).await.expect("routed once a queue is bound");
    let received = collect_from(&bus, &queue, 1, Duration::from_secs(20)).await;
    assert_eq!(received, vec![body.to_vec()], "the routed message arrives");
    // The publishing channel survives a returned message: the bus keeps publishing.
    bus.publish("amq.direct", &routing_key, body, Properties::json()).await.expect("publishing goes on");
    bus.delete_queue(&queue).await.ok();
    bus.close().await;
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_with_reason_while_good_ones_flow() {
    let dead = DeadLetters::new(&bus("test-dead-letter").await).await;
    // Its own dead-letter exchange, so this test sees no other test's dead letters.
    let bus = bus("test-dead-letter").await.with_dead_exchange(&dead.exchange);
    let event_type = format!("test.poison{}", uuid::Uuid::new_v4().simple());
    let work_queue = private_queue_on(&bus, topology::EVENTS_EXCHANGE, &event_type).await;
    let dead_copy = dead.queue.clone();

    let good_ids: Vec<String> = (0..3).map(|_| CloudEvent::new(&event_type, "/t", None, json!({})).id).collect();
    let poison = format!("{{\"specversion\":\"1.0\",\"type\":\"{event_type}\",\"source\":\"/t\",\"id\":\"not-a-uuid\"}}");
    let bodies = [
        CloudEvent { id: good_ids[0].clone(), ..CloudEvent::new(&event_type, "/t", None, json!({})) }.to_bytes(),
        poison.clone().into_bytes(),
        CloudEvent { id: good_ids[1].clone(), ..CloudEvent::new(&event_type, "/t", None, json!({})) }.to_bytes(),
        b"not json at all".to_vec(),
        CloudEvent { id: good_ids[2].clone(), ..CloudEvent::new(&event_type, "/t", None, json!({})) }.to_bytes(),
    ];
    for body in &bodies {
        bus.publish(topology::EVENTS_EXCHANGE, &event_type, body, Properties::bare()).await.expect("confirmed");
    }

    let handled = Arc::new(Mutex::new(Vec::new()));
    let rejected = Arc::new(Mutex::new(0));
    let (recorder, rejections) = (handled.clone(), rejected.clone());
    let handler = move |incoming: protocol::Incoming| {
        let (recorder, rejections) = (recorder.clone(), rejections.clone());
        async move {
            match CloudEvent::parse(&incoming.body, DEFAULT_MAX_EVENT_BYTES) {
                Ok(event) => {
                    recorder.lock().unwrap().push(event.id);
                    Outcome::Ack
                }
                Err(error) => {
                    *rejections.lock().unwrap() += 1;
                    Outcome::DeadLetter(format!("invalid event: {error}"))
                }
            }
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer_bus = bus.clone();
    let spec = ConsumeSpec::new(&work_queue, 10);
    let consumer = tokio::spawn(async move {
        consumer_bus
            .consume(spec, handler, async {
                stopped.await.ok();
            })
            .await
    });
    wait_until(Duration::from_secs(20), || handled.lock().unwrap().len() == 3).await;
    let dead_letters = common::collect_messages(&bus, &dead_copy, 2, Duration::from_secs(20)).await;
    stop.send(()).ok();
    consumer.await.expect("consumer task").expect("consumer ends cleanly");

    assert_eq!(*handled.lock().unwrap(), good_ids, "good messages keep flowing, in order");
    assert_eq!(*rejected.lock().unwrap(), 2, "a dead letter is handled once, never retried");
    let reasons: Vec<&str> = dead_letters.iter().map(|(_, headers)| headers[topology::REASON_HEADER].as_str()).collect();
    assert_eq!(
        reasons,
        [
            "invalid event: attribute `id` is invalid: must be a UUID, got \"not-a-uuid\"",
            "invalid event: event is not valid JSON: expected ident at line 1 column 2",
        ]
    );
    assert_eq!(dead_letters[0].0, poison.as_bytes(), "the dead letter keeps the original body");
    assert!(dead_letters.iter().all(|(_, headers)| headers[topology::ORIGIN_HEADER] == work_queue));
    assert!(dead_letters.iter().all(|(_, headers)| !headers.contains_key(topology::ATTEMPTS_HEADER)));
    // The bus counted what it did, as its /metrics shows.
    let metrics = protocol::metrics::encode(&bus.metrics_registry("berth_test"));
    for (outcome, count) in [("ack", 3), ("dead_letter", 2)] {
        let line = format!("berth_test_bus_handled_total{{queue=\"{work_queue}\",outcome=\"{outcome}\"}} {count}");
        assert!(metrics.lines().any(|metric| metric == line), "no `{line}` in {metrics}");
    }
    let published = format!("berth_test_bus_published_total{{exchange=\"{}\"}} 5", topology::EVENTS_EXCHANGE);
    assert!(metrics.lines().any(|metric| metric == published), "no `{published}` in {metrics}");
    assert!(metrics.contains(&format!("berth_test_bus_handle_seconds_count{{queue=\"{work_queue}\"}} 5")), "{metrics}");
    bus.delete_queue(&work_queue).await.ok();
    dead.delete(&bus).await;
    bus.close().await;
}

#[tokio::test]
async fn request_reply_answers_each_caller() {
    let bus = bus("test-request-reply").await;
    let routing_key = format!("rr-{}", uuid::Uuid::new_v4());
    let queue = private_queue_on(&bus, "amq.direct", &routing_key).await;
    let responder_bus = bus.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let spec = ConsumeSpec::new(&queue, 10);
    let responder = tokio::spawn(async move {
        let replier = responder_bus.clone();
        let handler = move |incoming: protocol::Incoming| {
            let replier = replier.clone();
            async move {
                let mut answer = incoming.body.clone();
                answer.reverse();
                match replier.reply(&incoming, &answer).await {
                    Ok(()) => Outcome::Ack,
                    Err(_) => Outcome::Retry,
                }
            }
        };
        responder_bus
            .consume(spec, handler, async {
                stopped.await.ok();
            })
            .await
    });
    let requests = (0..10).map(|index| {
        let bus = bus.clone();
        let routing_key = routing_key.clone();
        async move { bus.request("amq.direct", &routing_key, format!("req{index}").as_bytes(), Duration::from_secs(10)).await }
    });
    let replies = futures::future::join_all(requests).await;
    for (index, reply) in replies.into_iter().enumerate() {
        let expected: String = format!("req{index}").chars().rev().collect();
        assert_eq!(reply.expect("reply arrives"), expected.as_bytes());
    }
    let unanswered = bus.request("amq.direct", "nobody-listens-here", b"x", Duration::from_millis(500)).await;
    assert!(matches!(unanswered, Err(protocol::bus::BusError::ReplyTimeout { .. })));
    stop.send(()).ok();
    responder.await.expect("responder").expect("clean end");
    bus.delete_queue(&queue).await.ok();
    bus.close().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_before_returning() {
    let bus = bus("test-shutdown").await;
    let event_type = format!("test.shutdown{}", uuid::Uuid::new_v4().simple());
    let queue = private_queue_on(&bus, topology::EVENTS_EXCHANGE, &event_type).await;
    for _ in 0..5 {
        bus.publish_event(&CloudEvent::new(&event_type, "/t", None, json!({}))).await.expect("confirmed");
    }
    let started = Arc::new(Mutex::new(HashSet::new()));
    let finished = Arc::new(Mutex::new(HashSet::new()));
    let (started_in, finished_in) = (started.clone(), finished.clone());
    let handler = move |incoming: protocol::Incoming| {
        let (started, finished) = (started_in.clone(), finished_in.clone());
        async move {
            started.lock().unwrap().insert(incoming.body.clone());
            tokio::time::sleep(Duration::from_millis(500)).await;
            finished.lock().unwrap().insert(incoming.body);
            Outcome::Ack
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer_bus = bus.clone();
    let consumer = tokio::spawn(async move {
        consumer_bus
            .consume(ConsumeSpec::new(&queue, 2), handler, async {
                stopped.await.ok();
            })
            .await
    });
    wait_until(Duration::from_secs(10), || !started.lock().unwrap().is_empty()).await;
    stop.send(()).ok();
    consumer.await.expect("consumer").expect("clean end");
    let (started, finished) = (started.lock().unwrap().clone(), finished.lock().unwrap().clone());
    assert_eq!(started, finished, "every message whose handler started was finished before consume returned");
    assert!(finished.len() < 5, "consuming stopped before the queue was drained");
    bus.close().await;
}
