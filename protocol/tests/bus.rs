//! The AMQP bus against the real RabbitMQ: confirmed round trips, dead-lettering with a reason while
//! good messages keep flowing, request/reply, and graceful shutdown.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{amqp_url, collect_from, private_queue_on, wait_until};
use protocol::event::DEFAULT_MAX_EVENT_BYTES;
use protocol::{topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Outcome};
use serde_json::json;

async fn bus(name: &str) -> Bus {
    let bus = Bus::connect(BusConfig::new(&amqp_url(), name)).await.expect("broker reachable");
    bus.declare_topology().await.expect("topology declared");
    bus
}

#[tokio::test]
async fn topology_declaration_is_idempotent() {
    let bus = bus("test-topology").await;
    bus.declare_topology().await.expect("second declaration succeeds");
    bus.declare_topology().await.expect("third declaration succeeds");
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

#[tokio::test]
async fn malformed_messages_are_dead_lettered_with_reason_while_good_ones_flow() {
    let bus = bus("test-dead-letter").await;
    let event_type = format!("test.poison{}", uuid::Uuid::new_v4().simple());
    let work_queue = private_queue_on(&bus, topology::EVENTS_EXCHANGE, &event_type).await;
    // A private copy of everything dead-lettered, so this test never competes for berth.dead-letter.
    let dead_copy = private_queue_on(&bus, topology::DEAD_EXCHANGE, "").await;

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
        bus.publish(topology::EVENTS_EXCHANGE, &event_type, body, Default::default()).await.expect("confirmed");
    }

    let handled = Arc::new(Mutex::new(Vec::new()));
    let recorder = handled.clone();
    let handler = move |incoming: protocol::Incoming| {
        let recorder = recorder.clone();
        async move {
            match CloudEvent::parse(&incoming.body, DEFAULT_MAX_EVENT_BYTES) {
                Ok(event) => {
                    recorder.lock().unwrap().push(event.id);
                    Outcome::Ack
                }
                Err(error) => Outcome::DeadLetter(format!("invalid event: {error}")),
            }
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer_bus = bus.clone();
    let spec = ConsumeSpec::new(&work_queue, 10);
    let consumer = tokio::spawn(async move {
        consumer_bus.consume(spec, handler, async { stopped.await.ok(); }).await
    });
    wait_until(Duration::from_secs(20), || handled.lock().unwrap().len() == 3).await;
    let dead = common::collect_messages(&bus, &dead_copy, 2, Duration::from_secs(20)).await;
    stop.send(()).ok();
    consumer.await.expect("consumer task").expect("consumer ends cleanly");

    assert_eq!(*handled.lock().unwrap(), good_ids, "good messages keep flowing, in order");
    let reasons: Vec<&str> = dead.iter().map(|(_, headers)| headers[topology::REASON_HEADER].as_str()).collect();
    assert_eq!(
        reasons,
        [
            "invalid event: attribute `id` is invalid: must be a UUID, got \"not-a-uuid\"",
            "invalid event: event is not valid JSON: expected ident at line 1 column 2",
        ]
    );
    assert_eq!(dead[0].0, poison.as_bytes(), "the dead letter keeps the original body");
    assert!(dead.iter().all(|(_, headers)| headers[topology::ORIGIN_HEADER] == work_queue));
    for queue in [&work_queue, &dead_copy] {
        bus.delete_queue(queue).await.ok();
    }
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
        responder_bus.consume(spec, handler, async { stopped.await.ok(); }).await
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
        consumer_bus.consume(ConsumeSpec::new(&queue, 2), handler, async { stopped.await.ok(); }).await
    });
    wait_until(Duration::from_secs(10), || !started.lock().unwrap().is_empty()).await;
    stop.send(()).ok();
    consumer.await.expect("consumer").expect("clean end");
    let (started, finished) = (started.lock().unwrap().clone(), finished.lock().unwrap().clone());
    assert_eq!(started, finished, "every message whose handler started was finished before consume returned");
    assert!(finished.len() < 5, "consuming stopped before the queue was drained");
    bus.close().await;
}
