//! A broker restart (`rabbitmqctl stop_app` / `start_app`) in the middle of a stream of 1,000
//! confirmed events loses none: the publisher retries until confirmed and the consumer reconnects.
//!
//! This is its own test binary because it takes the broker away from everything else for a moment.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{amqp_url, wait_until};
use protocol::bus::{Binding, QueueSpec};
use protocol::event::DEFAULT_MAX_EVENT_BYTES;
use protocol::{topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Outcome};
use serde_json::json;

const EVENTS: usize = 1_000;

fn rabbitmqctl(action: &str) {
    let status = Command::new("rabbitmqctl").arg(action).status().expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {action} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_a_stream_loses_no_confirmed_event() {
    let bus = Bus::connect(BusConfig::new(&amqp_url(), "test-restart")).await.expect("broker reachable");
    bus.declare_topology().await.expect("topology");
    // A durable quorum queue: a queue that survives the restart, like every work queue of Berth.
    let event_type = format!("test.restart{}", uuid::Uuid::new_v4().simple());
    let queue = format!("test.restart.{}", uuid::Uuid::new_v4());
    bus.declare_queue(&QueueSpec::quorum(&queue)).await.expect("declare");
    bus.set_binding(&queue, topology::EVENTS_EXCHANGE, &event_type, Binding::Bind).await.expect("bind");

    let received = Arc::new(Mutex::new(HashSet::new()));
    let recorder = received.clone();
    let handler = move |incoming: protocol::Incoming| {
        let recorder = recorder.clone();
        async move {
            match CloudEvent::parse(&incoming.body, DEFAULT_MAX_EVENT_BYTES) {
                Ok(event) => {
                    recorder.lock().unwrap().insert(event.id);
                    Outcome::Ack
                }
                Err(error) => Outcome::DeadLetter(error.to_string()),
            }
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer_bus = Bus::connect(BusConfig::new(&amqp_url(), "test-restart-consumer")).await.expect("broker");
    // A private stream on the same connection, as the session agent's live events: its queue dies
    // with the broker and must be declared again, without tearing the shared connection down.
    let private_type = format!("test.private{}", uuid::Uuid::new_v4().simple());
    let private_seen = Arc::new(Mutex::new(0usize));
    let private_counter = private_seen.clone();
    let private_handler = move |_: protocol::Incoming| {
        let private_counter = private_counter.clone();
        async move {
            *private_counter.lock().unwrap() += 1;
            Outcome::Ack
        }
    };
    let (stop_private, private_stopped) = tokio::sync::oneshot::channel::<()>();
    let private_bus = consumer_bus.clone();
    let private_keys = vec![private_type.clone()];
    let private_consumer = tokio::spawn(async move {
        private_bus
            .consume_private(topology::EVENTS_EXCHANGE, &private_keys, 16, private_handler, async {
                private_stopped.await.ok();
            })
            .await
    });
    let publish_private_until_seen = |bus: Bus, private_type: String, seen: Arc<Mutex<usize>>| async move {
        let before = *seen.lock().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while *seen.lock().unwrap() == before {
            assert!(tokio::time::Instant::now() < deadline, "the private consumer never came back");
            bus.publish_event(&CloudEvent::new(&private_type, "/tests", None, json!({}))).await.expect("publish");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    publish_private_until_seen(bus.clone(), private_type.clone(), private_seen.clone()).await;
    let consumer_queue = queue.clone();
    let durable_bus = consumer_bus.clone();
    let consumer = tokio::spawn(async move {
        durable_bus
            .consume(ConsumeSpec::new(&consumer_queue, 50), handler, async {
                stopped.await.ok();
            })
            .await
    });

    let publisher_bus = bus.clone();
    let publisher_type = event_type.clone();
    let publisher = tokio::spawn(async move {
        let mut confirmed = Vec::with_capacity(EVENTS);
        for index in 0..EVENTS {
            let event = CloudEvent::new(&publisher_type, "/tests", None, json!({"index": index}));
            publisher_bus.publish_event(&event).await.expect("publish eventually confirmed");
            confirmed.push(event.id);
        }
        confirmed
    });

    // Restart the broker once a few hundred events are through.
    wait_until(Duration::from_secs(60), || received.lock().unwrap().len() >= 200).await;
    tokio::task::spawn_blocking(|| rabbitmqctl("stop_app")).await.expect("stop");
    // While the publisher reconnects (backing off), readiness is answered at once and says no.
    let outage_seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(1), bus.is_connected()).await;
            if !answer.expect("is_connected answers at once while a reconnect is under way") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(outage_seen.is_ok(), "the bus noticed the broker was gone");
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl("start_app")).await.expect("start");

    let confirmed = publisher.await.expect("publisher task");
    wait_until(Duration::from_secs(120), || received.lock().unwrap().len() >= EVENTS).await;
    publish_private_until_seen(bus.clone(), private_type.clone(), private_seen.clone()).await;
    assert!(consumer_bus.is_connected().await, "the shared connection is up again, whatever the private consumer went through");
    stop_private.send(()).ok();
    private_consumer.await.expect("private consumer").expect("clean end");
    stop.send(()).ok();
    consumer.await.expect("consumer").expect("clean end");
    let received = received.lock().unwrap().clone();
    let missing: Vec<&String> = confirmed.iter().filter(|id| !received.contains(*id)).collect();
    assert!(missing.is_empty(), "{} confirmed events lost, e.g. {:?}", missing.len(), missing.first());
    bus.delete_queue(&queue).await.ok();
    bus.close().await;
}
