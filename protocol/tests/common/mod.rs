//! Helpers shared by the protocol crate's integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use protocol::bus::Acks;
use protocol::Bus;

pub fn amqp_url() -> String {
    std::env::var("BERTH_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A private queue bound to `exchange` with `routing_key`.
pub async fn private_queue_on(bus: &Bus, exchange: &str, routing_key: &str) -> String {
    bus.declare_private_queue(exchange, &[routing_key.to_owned()]).await.expect("queue declared")
}

/// Reads `count` messages (body and text headers) from `queue`, acking each, or panics after `timeout`.
pub async fn collect_messages(bus: &Bus, queue: &str, count: usize, timeout: Duration) -> Vec<(Vec<u8>, HashMap<String, String>)> {
    let mut subscription = bus.subscribe(queue, Acks::OnReceipt { prefetch: 100 }).await.expect("subscribe");
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while messages.len() < count {
        let next = tokio::time::timeout_at(deadline, subscription.next()).await;
        let Ok(Some(Ok(incoming))) = next else {
            panic!("got {} of {count} messages from {queue} before the timeout", messages.len());
        };
        messages.push((incoming.body, incoming.headers));
    }
    subscription.close().await;
    messages
}

/// Reads `count` message bodies from `queue`.
pub async fn collect_from(bus: &Bus, queue: &str, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
    collect_messages(bus, queue, count, timeout).await.into_iter().map(|(body, _)| body).collect()
}

/// Polls `condition` every 20 ms until it holds, or panics after `timeout`.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
