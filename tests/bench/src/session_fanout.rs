//! `berth bench session`: notification fan-out latency (engine publish → socket receipt) with
//! 1,000 connected sockets, against a baseline taken in the same run (the same notification
//! consumed straight from the broker, no session agent), and connections held per GiB.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use protocol::bus::Acks;
use protocol::{Bus, BusConfig, ConsumeSpec, Notification, Outcome, Profile};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use session::auth::KeyMaterial;
use session::config::{SessionConfig, StoreRoute};

use crate::stats::{milliseconds, percentile};

const USERS: usize = 100;
const SOCKETS_PER_USER: usize = 10;
const SEQUENTIAL_ROUNDS: usize = 300;
const BURST_ROUNDS: usize = 5;
const CONNECT_CONCURRENCY: usize = 50;
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

type SentAt = Arc<Mutex<HashMap<u64, Instant>>>;

/// `berth bench session`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "berth-bench-session")).await?;
    bus.declare_topology().await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();

    // The snapshot on connect asks the store; answer with an empty list so only the agent is measured.
    let store_queue = bus.declare_private_queue(protocol::topology::TASKS_EXCHANGE, &[]).await?;
    let (stop_store, store_stopped) = tokio::sync::oneshot::channel::<()>();
    let responder_bus = bus.clone();
    let responder_queue = store_queue.clone();
    let responder = tokio::spawn(async move {
        let replying_bus = responder_bus.clone();
        let handler = move |incoming: protocol::Incoming| {
            let bus = replying_bus.clone();
            async move {
                let _ = bus.reply(&incoming, br#"{"ok":true,"result":[]}"#).await;
                Outcome::Ack
            }
        };
        let stopped = async move {
            let _ = store_stopped.await;
        };
        let _ = responder_bus.consume(ConsumeSpec::new(&responder_queue, 64), handler, stopped).await;
    });

    let secret = format!("bench-{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let mut config = SessionConfig::with_key(&profile, &KeyMaterial::inline(&secret))?;
    config.store = StoreRoute { exchange: String::new(), routing_key: store_queue.clone(), timeout: Duration::from_secs(10) };
    config.max_connections_per_user = config.max_connections_per_user.max(SOCKETS_PER_USER);
    let authority = config.authority.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop_instance, instance_stopped) = tokio::sync::oneshot::channel::<()>();
    let (_handle, running) = session::server::start(config, bus.clone(), listener, async move {
        let _ = instance_stopped.await;
    })
    .await?;
    let instance = tokio::spawn(running);

    println!("session bench: {USERS} users x {SOCKETS_PER_USER} sockets on {address}");
    let baseline = baseline_latencies(&bus, &run_id).await?;

    let resident_before = resident_bytes();
    let sent_at: SentAt = Arc::default();
    let (receipts_sender, mut receipts) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let users: Vec<String> = (0..USERS).map(|index| format!("bench-{run_id}-{index}")).collect();
    let connect_started = Instant::now();
    let mut readers = Vec::new();
    for chunk in
        users.iter().flat_map(|user| std::iter::repeat_n(user.clone(), SOCKETS_PER_USER)).collect::<Vec<_>>().chunks(CONNECT_CONCURRENCY)
    {
        let connecting = chunk.iter().map(|user| {
            let token = authority.mint(user, &[], Duration::from_secs(3600));
            async move {
                let token = token?;
                let mut request = format!("ws://{address}/ws").into_client_request()?;
                request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
                // Small client buffers, so that the memory figure is dominated by the server side.
                let client_config = WebSocketConfig::default().read_buffer_size(4096);
                let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(client_config), true).await?;
                // The snapshot proves the socket is registered and its user's key bound.
                let first = tokio::time::timeout(RECEIPT_TIMEOUT, socket.next()).await.context("no snapshot")?;
                anyhow::ensure!(matches!(first, Some(Ok(Message::Text(_)))), "expected a snapshot, got {first:?}");
                Ok::<_, anyhow::Error>(socket)
            }
        });
        for socket in futures::future::join_all(connecting).await {
            let mut socket = socket?;
            let sent_at = sent_at.clone();
            let receipts = receipts_sender.clone();
            readers.push(tokio::spawn(async move {
                while let Some(Ok(message)) = socket.next().await {
                    let Message::Text(text) = message else { continue };
                    let received = Instant::now();
                    let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    let Some(sequence) = frame.pointer("/detail/sequence").and_then(Value::as_u64) else { continue };
                    let sent = sent_at.lock().ok().and_then(|sent_at| sent_at.get(&sequence).copied());
                    if let Some(sent) = sent {
                        let _ = receipts.send(received.duration_since(sent));
                    }
                }
                let _ = socket.close(None).await;
            }));
        }
    }
    let connect_elapsed = connect_started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resident_after = resident_bytes();
    let sockets = USERS * SOCKETS_PER_USER;
    println!("connected {sockets} sockets in {:.2}s", connect_elapsed.as_secs_f64());

    let mut sequence = 0u64;
    let mut publish = |user: &str| {
        sequence += 1;
        let notification = Notification {
            id: uuid::Uuid::now_v7(),
            user: user.to_owned(),
            session: Some(format!("bench-session-{user}")),
            state: "running".to_owned(),
            detail: json!({"sequence": sequence}),
            cause: None,
        };
        if let Ok(mut sent_at) = sent_at.lock() {
            sent_at.insert(sequence, Instant::now());
        }
        let bus = bus.clone();
        async move { bus.publish_notification(&notification).await }
    };

    // One notification at a time: each reaches its user's sockets.
    let mut sequential = Vec::with_capacity(SEQUENTIAL_ROUNDS * SOCKETS_PER_USER);
    for round in 0..SEQUENTIAL_ROUNDS {
        publish(&users[round % USERS]).await?;
        for _ in 0..SOCKETS_PER_USER {
            let latency = tokio::time::timeout(RECEIPT_TIMEOUT, receipts.recv()).await.context("a socket missed a notification")?;
            sequential.push(latency.context("readers ended")?);
        }
    }
    // Every user at once: 1,000 socket receipts per burst.
    let mut burst = Vec::with_capacity(BURST_ROUNDS * sockets);
    for _ in 0..BURST_ROUNDS {
        let publishing: Vec<_> = users.iter().map(|user| publish(user)).collect();
        for published in futures::future::join_all(publishing).await {
            published?;
        }
        for _ in 0..sockets {
            let latency = tokio::time::timeout(RECEIPT_TIMEOUT, receipts.recv()).await.context("a socket missed a notification")?;
            burst.push(latency.context("readers ended")?);
        }
    }

    println!("{:<44} {:>10} {:>10} {:>8}", "fan-out latency (publish -> receipt)", "p50 ms", "p99 ms", "samples");
    print_row("baseline: broker only, one consumer", &baseline);
    print_row(&format!("one notification -> {SOCKETS_PER_USER} sockets"), &sequential);
    print_row(&format!("{USERS} notifications at once -> {sockets} sockets"), &burst);
    match (resident_before, resident_after) {
        (Some(before), Some(after)) if after > before => {
            let per_connection = (after - before) as f64 / sockets as f64;
            println!(
                "memory: {:.1} KiB per connection (server and client ends, one process) -> at least {:.0} connections per GiB",
                per_connection / 1024.0,
                (1u64 << 30) as f64 / per_connection
            );
        }
        _ => println!("memory: resident size unavailable on this platform"),
    }

    let _ = stop_instance.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), instance).await;
    for reader in readers {
        reader.abort();
    }
    let _ = stop_store.send(());
    let _ = responder.await;
    let _ = bus.delete_queue(&store_queue).await;
    bus.close().await;
    Ok(())
}

/// The same publish consumed straight from a private queue: what the broker alone costs.
async fn baseline_latencies(bus: &Bus, run_id: &str) -> anyhow::Result<Vec<Duration>> {
    let user = format!("bench-baseline-{run_id}");
    let queue = bus.declare_private_queue(protocol::topology::NOTIFY_EXCHANGE, &[protocol::topology::user_routing_key(&user)]).await?;
    let mut subscription = bus.subscribe(&queue, Acks::Automatic).await?;
    let mut latencies = Vec::with_capacity(SEQUENTIAL_ROUNDS);
    for _ in 0..SEQUENTIAL_ROUNDS {
        let notification = Notification {
            id: uuid::Uuid::now_v7(),
            user: user.clone(),
            session: None,
            state: "running".to_owned(),
            detail: json!({}),
            cause: None,
        };
        let sent = Instant::now();
        bus.publish_notification(&notification).await?;
        let delivery = tokio::time::timeout(RECEIPT_TIMEOUT, subscription.next()).await.context("baseline consumer got nothing")?;
        anyhow::ensure!(matches!(delivery, Some(Ok(_))), "baseline consumer ended");
        latencies.push(sent.elapsed());
    }
    subscription.close().await;
    let _ = bus.delete_queue(&queue).await;
    Ok(latencies)
}

fn print_row(label: &str, samples: &[Duration]) {
    println!(
        "{label:<44} {:>10.2} {:>10.2} {:>8}",
        milliseconds(percentile(samples, 0.5)),
        milliseconds(percentile(samples, 0.99)),
        samples.len()
    );
}

/// This process's resident memory (Linux `/proc/self/status`).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
