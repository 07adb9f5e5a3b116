//! Consumes this instance's private queue on `berth.notify` and hands each notification to the
//! hub. When the broker connection is lost the queue goes with it, so the loop declares a fresh
//! queue, rebinds every connected user and consumes again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::bus::{Acks, Subscription};
use protocol::{backoff, Bus};
use tokio::sync::watch;

use crate::error::Result;
use crate::hub::Hub;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A consumer whose queue is declared, bound and consuming.
pub struct NotificationConsumer {
    subscription: Subscription,
}

/// Whether the notification consumer is currently consuming (for `/readyz`).
pub type ConsumerReady = Arc<AtomicBool>;

impl NotificationConsumer {
    /// Declares a private queue, binds the users the hub needs, and starts consuming.
    pub async fn start(bus: &Bus, hub: &Hub) -> Result<NotificationConsumer> {
        let queue = bus.declare_private_queue(hub.notify_exchange(), &[]).await?;
        hub.install_queue(&queue).await?;
        // Notifications are fire-and-forget: a socket that misses one resyncs from the store on
        // reconnect, so there is nothing to gain from acknowledging them one by one.
        let subscription = bus.subscribe(&queue, Acks::Automatic).await?;
        tracing::info!(queue = %queue, "consuming notifications");
        Ok(NotificationConsumer { subscription })
    }

    pub fn queue(&self) -> &str {
        self.subscription.queue()
    }

    /// Runs until `stop` turns true, restarting on a fresh queue whenever the broker drops it.
    pub async fn run(self, bus: Bus, hub: Arc<Hub>, ready: ConsumerReady, mut stop: watch::Receiver<bool>) {
        let mut current = Some(self);
        let mut delays = backoff::doubling(BACKOFF_START, BACKOFF_MAX);
        loop {
            if let Some(mut consumer) = current.take() {
                ready.store(true, Ordering::Relaxed);
                // A consumer that ran starts the backoff again.
                delays = backoff::doubling(BACKOFF_START, BACKOFF_MAX);
                let stopped = consumer.pump(&hub, &mut stop).await;
                ready.store(false, Ordering::Relaxed);
                if stopped {
                    let queue = consumer.queue().to_owned();
                    consumer.subscription.close().await;
                    let _ = bus.delete_queue(&queue).await;
                    return;
                }
                tracing::warn!(queue = %consumer.queue(), "notification consumer interrupted; starting a new queue");
                hub.forget_queue().await;
            }
            let delay = backoff::next_delay(&mut delays, BACKOFF_MAX);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
            match NotificationConsumer::start(&bus, &hub).await {
                Ok(consumer) => current = Some(consumer),
                Err(error) => {
                    tracing::warn!(%error, waited = ?delay, "cannot restart the notification consumer; retrying with a longer wait")
                }
            }
        }
    }

    /// Delivers until the stream ends (false) or `stop` turns true (true).
    async fn pump(&mut self, hub: &Hub, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            // Cancel-safe: with automatic acks a message is either handed out or still queued.
            let next = tokio::select! {
                next = self.subscription.next() => next,
                _ = stop.wait_for(|stopped| *stopped) => return true,
            };
            match next {
                Some(Ok(notification)) => {
                    hub.deliver(&notification.routing_key, &notification.body);
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "notification delivery error");
                    return false;
                }
                None => return false,
            }
        }
    }
}
