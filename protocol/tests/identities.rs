//! Bus identities against the real RabbitMQ: bootstrap's users and permissions, the broker's own
//! refusals (a client publishing anything but its session events, anyone but the session agent
//! binding user notifications), and the validated `user_id` every consumer sees, kept across a
//! retry and never taken from a header someone else wrote.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::amqp_url;
use protocol::bus::{Acks, AutoDelete, Binding, BusError, Durability, ExchangeKind, QueueSpec, RetryPolicy};
use protocol::{topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Identity, Incoming, Outcome, Properties, Sender};
use serde_json::json;

async fn connect_as(identity: Identity, name: &str) -> Bus {
    protocol::broker_admin::ensure_identities(&amqp_url()).await.expect("bus identities ensured");
    let config = BusConfig::for_identity(&amqp_url(), identity, name).expect("the identity's password");
    Bus::connect(config).await.unwrap_or_else(|error| panic!("{identity} connects: {error}"))
}

async fn admin() -> Bus {
    let bus = Bus::connect(BusConfig::new(&amqp_url(), "identities-admin")).await.expect("broker");
    bus.declare_topology().await.expect("topology");
    bus
}

#[tokio::test]
async fn ensuring_identities_is_idempotent_and_each_connects_as_its_own_user() {
    protocol::broker_admin::ensure_identities(&amqp_url()).await.expect("first run");
    protocol::broker_admin::ensure_identities(&amqp_url()).await.expect("second run");
    for identity in Identity::CREATED {
        let bus = connect_as(identity, "identities-each").await;
        assert_eq!(bus.identity(), identity);
        assert_eq!(Some(bus.user()), identity.username());
        // A component identity may not declare; the topology check is passive.
        bus.declare_topology().await.unwrap_or_else(|error| panic!("{identity} checks the topology: {error}"));
        bus.close().await;
    }
}

#[tokio::test]
async fn every_publish_carries_the_validated_user_id_as_a_typed_sender() {
    let admin = admin().await;
    let queue = admin.declare_private_queue(topology::EVENTS_EXCHANGE, &["session.stats".to_owned()]).await.expect("tap");
    let client = connect_as(Identity::Client, "identities-client").await;
    let event = CloudEvent::new("session.stats", "/test/identities", Some("s-identities"), json!({}));
    client.publish_event(&event).await.expect("a client may publish session.stats");
    let seen = first_with_id(&admin, &queue, &event.id).await;
    assert_eq!(seen.sender, Sender::Identity(Identity::Client));
    admin.delete_queue(&queue).await.ok();
    client.close().await;
    admin.close().await;
}

#[tokio::test]
async fn the_broker_refuses_a_client_publishing_anything_but_its_session_events() {
    let admin = admin().await;
    let queue = admin.declare_private_queue(topology::EVENTS_EXCHANGE, &["container.ready".to_owned()]).await.expect("tap");
    let client = connect_as(Identity::Client, "identities-forger").await;
    let forged = CloudEvent::new("container.ready", "/test/identities", Some("s-forged"), json!({"host": "203.0.113.9", "port": 1}));
    let refused = client.publish_event(&forged).await;
    assert!(matches!(refused, Err(BusError::Refused { .. })), "expected a refusal, got {refused:?}");
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("berth-client") && message.contains("ACCESS_REFUSED"), "{message}");
    // Not on the tasks or notify exchanges either.
    let task = client.publish(topology::TASKS_EXCHANGE, "container", b"{}", Properties::bare()).await;
    assert!(matches!(task, Err(BusError::Refused { .. })), "{task:?}");
    let notification = client.publish(topology::NOTIFY_EXCHANGE, "user.alice", b"{}", Properties::bare()).await;
    assert!(matches!(notification, Err(BusError::Refused { .. })), "{notification:?}");
    // The refusal cost the channel, not the bus: the client's own events still go out.
    let open = CloudEvent::new("session.stats", "/test/identities", Some("s-after"), json!({}));
    client.publish_event(&open).await.expect("the bus heals after a refusal");
    // And the forged event reached nobody.
    let ready = admin.ready_messages(&queue).await.expect("tap exists");
    assert_eq!(ready, 0, "the refused container.ready was not routed");
    admin.delete_queue(&queue).await.ok();
    client.close().await;
    admin.close().await;
}

#[tokio::test]
async fn only_the_session_identity_may_bind_user_notifications() {
    for identity in [Identity::Client, Identity::Workspace, Identity::Container, Identity::Engine, Identity::Persistence] {
        let bus = connect_as(identity, "identities-snoop").await;
        let bound = bus.declare_private_queue(topology::NOTIFY_EXCHANGE, &["user.#".to_owned()]).await;
        assert!(bound.is_err(), "{identity} must not read notifications, bound {bound:?}");
        bus.close().await;
    }
    let session = connect_as(Identity::Session, "identities-door").await;
    let queue = session
        .declare_private_queue(topology::NOTIFY_EXCHANGE, &[topology::user_routing_key("alice")])
        .await
        .expect("the session agent binds a user's notifications");
    // Even the door binds one user at a time: `user.#` is not a user's key.
    let everyone = session.set_binding(&queue, topology::NOTIFY_EXCHANGE, "user.#", protocol::bus::Binding::Bind).await;
    assert!(everyone.is_err(), "binding every user at once must be refused: {everyone:?}");
    session.delete_queue(&queue).await.ok();
    session.close().await;
}

#[tokio::test]
async fn a_retry_keeps_the_original_sender_and_a_forged_sender_header_is_ignored() {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let exchange = format!("berth-test.{tag}.events");
    let queue = format!("berth-test.{tag}.engine");
    let admin = admin().await;
    admin.declare_exchange(&exchange, ExchangeKind::Topic, Durability::Durable, AutoDelete::WhenUnused).await.expect("exchange");
    let spec = QueueSpec::classic(&queue, Durability::Durable).expiring_after(Duration::from_secs(600));
    admin.declare_queue(&spec).await.expect("queue");
    admin.set_binding(&queue, &exchange, "#", Binding::Bind).await.expect("bind");

    let container = connect_as(Identity::Container, "identities-container").await;
    let genuine = CloudEvent::new("container.ready", "/test/identities", Some("s-retry"), json!({}));
    container.publish_event_to(&exchange, &genuine).await.expect("container publishes");
    // A header claiming the engine sent it: the broker vouches for the container, not for this.
    let forged = CloudEvent::new("timer.fired", "/test/identities", Some("s-retry"), json!({}));
    let properties = Properties::bare().with_header(topology::SENDER_HEADER, "berth-engine");
    container.publish(&exchange, "timer.fired", &forged.to_bytes(), properties).await.expect("container publishes a header");

    let engine =
        connect_as(Identity::Engine, "identities-engine").await.with_retry_policy(RetryPolicy::new(&[Duration::from_millis(200)], 5, 5));
    let seen: Arc<Mutex<Vec<(String, Sender, u32)>>> = Arc::default();
    let recorded = seen.clone();
    let handler = move |incoming: Incoming| {
        let recorded = recorded.clone();
        async move {
            let attempts = incoming.attempts();
            recorded.lock().unwrap().push((incoming.routing_key.clone(), incoming.sender.clone(), attempts));
            // Each message once more through its delay queue, published there by the engine.
            if attempts == 0 {
                Outcome::Retry
            } else {
                Outcome::Ack
            }
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consuming = tokio::spawn({
        let engine = engine.clone();
        let spec = ConsumeSpec::new(&queue, 4);
        async move {
            engine
                .consume(spec, handler, async move {
                    let _ = stopped.await;
                })
                .await
        }
    });
    // Both retries back (a retry parked late shows up as another first attempt, never as a loss).
    let retried = |key: &str, seen: &[(String, Sender, u32)]| seen.iter().any(|(seen_key, _, attempts)| seen_key == key && *attempts == 1);
    common::wait_until(Duration::from_secs(20), || {
        let seen = seen.lock().unwrap();
        retried("container.ready", &seen) && retried("timer.fired", &seen)
    })
    .await;
    let _ = stop.send(());
    consuming.await.expect("consumer task").expect("consumer");
    let seen = seen.lock().unwrap().clone();
    for (routing_key, sender, attempts) in &seen {
        assert_eq!(*sender, Sender::Identity(Identity::Container), "{routing_key} (attempt {attempts}) keeps its real sender");
    }
    assert!(seen.iter().any(|(key, _, attempts)| key == "container.ready" && *attempts == 1), "{seen:?}");
    assert!(seen.iter().any(|(key, _, attempts)| key == "timer.fired" && *attempts == 1), "{seen:?}");

    engine.delete_retry_queues(&queue).await.ok();
    admin.delete_queue(&queue).await.ok();
    container.close().await;
    engine.close().await;
    admin.close().await;
}

/// The first delivery on `queue` whose event id is `id` (others are skipped).
async fn first_with_id(bus: &Bus, queue: &str, id: &str) -> Incoming {
    let mut subscription = bus.subscribe(queue, Acks::Automatic).await.expect("subscribe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let incoming =
            tokio::time::timeout_at(deadline, subscription.next()).await.expect("the event in time").expect("stream").expect("delivery");
        // `publish_event` names each message after its event.
        let event = CloudEvent::parse(&incoming.body, protocol::event::DEFAULT_MAX_EVENT_BYTES).expect("an event");
        if event.id == id {
            return incoming;
        }
    }
}

#[tokio::test]
async fn a_host_agent_declares_and_binds_its_own_host_queue_and_no_other_kinds() {
    let admin = admin().await;
    let host = format!("h-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let container = connect_as(Identity::Container, "identities-host").await;
    let queue = container
        .declare_host_queue(topology::TASKS_EXCHANGE, protocol::AgentKind::Container, &host)
        .await
        .expect("the container agent declares and binds its host queue");
    assert_eq!(queue, topology::host_agent_queue(protocol::AgentKind::Container, &host));
    let foreign = container.declare_host_queue(topology::TASKS_EXCHANGE, protocol::AgentKind::Workspace, &host).await;
    let refusal = foreign.expect_err("a container agent must not declare a workspace queue").to_string();
    assert!(refusal.contains("ACCESS_REFUSED"), "{refusal}");
    admin.delete_queue(&queue).await.ok();
    container.close().await;
    admin.close().await;
}
