//! Which sockets are connected to this instance, and routing of notifications to them.
//!
//! Each instance owns one private queue on `berth.notify`. A user's key `user.<id>` is bound while
//! at least one of their sockets is connected here (or an admin here watches one of their
//! sessions), and unbound when the last one leaves, so an instance receives only what its own
//! sockets need. Binding changes are serialized so a bind and an unbind for the same user never
//! cross on the broker.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use protocol::bus::Binding;
use protocol::{Bus, Notification};
use tokio::sync::{mpsc, oneshot};

use crate::error::Result;
use crate::frames::{ServerFrame, SessionStatus};
use crate::metrics::{bump, Metrics};

/// Frames a socket may have queued before it counts as fallen behind and is closed.
const OUTBOUND_QUEUE: usize = 256;

pub type ConnectionId = u64;

/// The user already holds the maximum number of connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimitReached {
    pub limit: usize,
}

/// A reserved connection slot for one user; the slot is given back when this is dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    hub: Arc<Hub>,
    user: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut routes = self.hub.routes();
        if let Some(count) = routes.slots_per_user.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                routes.slots_per_user.remove(&self.user);
            }
        }
    }
}

struct ConnectionEntry {
    user: String,
    /// `None` once the socket fell behind: dropping the only sender tells the socket to close.
    sender: Option<mpsc::Sender<Utf8Bytes>>,
    /// Sessions of other users this (admin) connection watches, with their owners.
    watched: Vec<(String, String)>,
}

#[derive(Default)]
struct Routes {
    next_id: ConnectionId,
    connections: HashMap<ConnectionId, ConnectionEntry>,
    by_user: HashMap<String, HashSet<ConnectionId>>,
    watchers_by_session: HashMap<String, HashSet<ConnectionId>>,
    slots_per_user: HashMap<String, usize>,
}

#[derive(Default)]
struct Bindings {
    /// The current private queue; `None` while the consumer (re)starts.
    queue: Option<String>,
    /// Users whose routing key must be bound, with how many connections or watches need it.
    needed: HashMap<String, usize>,
}

/// An `open` waiting for the engine's first notification caused by its `session.open`.
struct CauseWaiter {
    user: String,
    answer: oneshot::Sender<Notification>,
}

/// The registry of this instance's sockets.
pub struct Hub {
    bus: Bus,
    /// `berth.notify` in a deployment; tests may run against an engine on its own exchange.
    notify_exchange: String,
    metrics: Arc<Metrics>,
    max_connections_per_user: usize,
    routes: Mutex<Routes>,
    bindings: tokio::sync::Mutex<Bindings>,
    /// By the id of the event the waiter published.
    cause_waiters: Mutex<HashMap<String, CauseWaiter>>,
    /// Shown every notification this instance receives (the proxy's view of sessions).
    observers: Mutex<Vec<NotificationObserver>>,
}

/// Something that wants to see every notification that reaches this instance.
pub type NotificationObserver = Arc<dyn Fn(&Notification) + Send + Sync>;

/// The engine's first notification about an event this instance published, once it comes.
/// Dropping it (timeout, socket gone) forgets the wait.
#[derive(Debug)]
pub struct AwaitedNotification {
    hub: Arc<Hub>,
    cause: String,
    answer: oneshot::Receiver<Notification>,
}

impl AwaitedNotification {
    /// The notification, or `None` if none came within `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> Option<Notification> {
        tokio::time::timeout(timeout, &mut self.answer).await.ok().and_then(Result::ok)
    }
}

impl Drop for AwaitedNotification {
    fn drop(&mut self) {
        self.hub.cause_waiters.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.cause);
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Hub").field("max_connections_per_user", &self.max_connections_per_user).finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub for `berth.notify`.
    pub fn new(bus: Bus, metrics: Arc<Metrics>, max_connections_per_user: usize) -> Arc<Hub> {
        Hub::on_exchange(bus, protocol::topology::NOTIFY_EXCHANGE, metrics, max_connections_per_user)
    }

    /// A hub whose users are bound on `notify_exchange`.
    pub fn on_exchange(bus: Bus, notify_exchange: &str, metrics: Arc<Metrics>, max_connections_per_user: usize) -> Arc<Hub> {
        Arc::new(Hub {
            bus,
            notify_exchange: notify_exchange.to_owned(),
            metrics,
            max_connections_per_user,
            routes: Mutex::new(Routes::default()),
            bindings: tokio::sync::Mutex::new(Bindings::default()),
            cause_waiters: Mutex::new(HashMap::new()),
            observers: Mutex::new(Vec::new()),
        })
    }

    /// Shows `observer` every notification this instance receives from now on.
    pub fn observe(&self, observer: NotificationObserver) {
        self.observers.lock().unwrap_or_else(PoisonError::into_inner).push(observer);
    }

    /// Keeps `user`'s notifications coming to this instance without a socket of theirs (the
    /// proxy watching their sessions); give it back with [`Hub::release_user`].
    pub async fn hold_user(&self, user: &str) -> Result<()> {
        self.need_binding(user).await
    }

    /// Gives back one [`Hub::hold_user`].
    pub async fn release_user(&self, user: &str) {
        self.release_binding(user).await;
    }

    /// Waits for the first notification to `user` whose `cause` is `cause` (the id of an event
    /// about to be published). Register before publishing, so a fast answer cannot be missed; the
    /// user's key must be bound here (a socket of theirs is attached).
    pub fn await_notification(self: &Arc<Self>, user: &str, cause: &str) -> AwaitedNotification {
        let (sender, answer) = oneshot::channel();
        let waiter = CauseWaiter { user: user.to_owned(), answer: sender };
        self.cause_waiters.lock().unwrap_or_else(PoisonError::into_inner).insert(cause.to_owned(), waiter);
        AwaitedNotification { hub: self.clone(), cause: cause.to_owned(), answer }
    }

    /// Hands a notification to the request waiting for its cause, if any. Only the user the
    /// notification is for can be waiting for it.
    fn answer_waiter(&self, notification: &Notification) {
        let Some(cause) = &notification.cause else { return };
        let mut waiters = self.cause_waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if waiters.get(cause).is_some_and(|waiter| waiter.user == notification.user) {
            if let Some(waiter) = waiters.remove(cause) {
                let _ = waiter.answer.send(notification.clone());
            }
        }
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves one of the user's connection slots before the upgrade, so a refusal is a clean
    /// HTTP 429 rather than a socket that opens and closes.
    pub fn reserve_slot(self: &Arc<Self>, user: &str) -> Result<ConnectionSlot, ConnectionLimitReached> {
        let mut routes = self.routes();
        let count = routes.slots_per_user.entry(user.to_owned()).or_insert(0);
        if *count >= self.max_connections_per_user {
            return Err(ConnectionLimitReached { limit: self.max_connections_per_user });
        }
        *count += 1;
        Ok(ConnectionSlot { hub: self.clone(), user: user.to_owned() })
    }

    /// Registers a socket and makes sure its user's notifications reach this instance. Returns
    /// the connection id and the queue of frames to send.
    pub async fn attach(&self, user: &str) -> Result<(ConnectionId, mpsc::Receiver<Utf8Bytes>)> {
        self.need_binding(user).await?;
        let (sender, receiver) = mpsc::channel(OUTBOUND_QUEUE);
        let mut routes = self.routes();
        routes.next_id += 1;
        let connection_id = routes.next_id;
        routes.connections.insert(connection_id, ConnectionEntry { user: user.to_owned(), sender: Some(sender), watched: Vec::new() });
        routes.by_user.entry(user.to_owned()).or_default().insert(connection_id);
        Ok((connection_id, receiver))
    }

    /// Removes a socket and gives back the bindings it needed.
    pub async fn detach(&self, connection_id: ConnectionId) {
        let entry = {
            let mut routes = self.routes();
            let Some(entry) = routes.connections.remove(&connection_id) else { return };
            remove_from_index(&mut routes.by_user, &entry.user, connection_id);
            for (session, _) in &entry.watched {
                remove_from_index(&mut routes.watchers_by_session, session, connection_id);
            }
            entry
        };
        self.release_binding(&entry.user).await;
        for (_, owner) in &entry.watched {
            self.release_binding(owner).await;
        }
    }

    /// Lets a connection (an admin's) receive the status of another user's session.
    pub async fn watch(&self, connection_id: ConnectionId, session: &str, owner: &str) -> Result<()> {
        {
            let routes = self.routes();
            let Some(entry) = routes.connections.get(&connection_id) else { return Ok(()) };
            if entry.user == owner || entry.watched.iter().any(|(watched, _)| watched == session) {
                return Ok(());
            }
        }
        self.need_binding(owner).await?;
        let registered = {
            let mut routes = self.routes();
            match routes.connections.get_mut(&connection_id) {
                Some(entry) => {
                    entry.watched.push((session.to_owned(), owner.to_owned()));
                    routes.watchers_by_session.entry(session.to_owned()).or_default().insert(connection_id);
                    true
                }
                None => false,
            }
        };
        if !registered {
            // The socket left meanwhile; give the binding back.
            self.release_binding(owner).await;
        }
        Ok(())
    }

    /// Routes one notification from the queue to the sockets that may see it: the owner's, and
    /// admins watching the session. Returns how many sockets it was queued for.
    pub fn deliver(&self, routing_key: &str, body: &[u8]) -> usize {
        bump(&self.metrics.notifications_received);
        let notification = match Notification::decode(body) {
            Ok(notification) => notification,
            Err(error) => {
                tracing::warn!(routing_key, %error, "dropping an unreadable notification");
                return 0;
            }
        };
        // The routing key decided who this instance received it for; a body naming someone else
        // would be a bug upstream, and delivering it could leak one user's session to another.
        if notification.routing_key() != routing_key {
            tracing::warn!(routing_key, user = %notification.user, "dropping a notification whose user does not match its routing key");
            return 0;
        }
        // Before the status is queued: an `open` waiting for this answers ahead of the push.
        self.answer_waiter(&notification);
        let observers = self.observers.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for observer in observers {
            observer(&notification);
        }
        let Some(status) = SessionStatus::from_notification(&notification) else {
            tracing::debug!(user = %notification.user, "notification without a session; nothing to show");
            return 0;
        };
        let text = Utf8Bytes::from(ServerFrame::Status(status).to_text());
        let mut routes = self.routes();
        let mut targets: HashSet<ConnectionId> = routes.by_user.get(&notification.user).cloned().unwrap_or_default();
        if let Some(session) = &notification.session {
            if let Some(watchers) = routes.watchers_by_session.get(session) {
                targets.extend(watchers.iter().copied());
            }
        }
        let mut delivered = 0;
        for connection_id in targets {
            let Some(entry) = routes.connections.get_mut(&connection_id) else { continue };
            let Some(sender) = &entry.sender else { continue };
            match sender.try_send(text.clone()) {
                Ok(()) => {
                    delivered += 1;
                    bump(&self.metrics.notifications_delivered);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Better a closed socket that resyncs on reconnect than one silently stale.
                    tracing::warn!(connection_id, user = %entry.user, "socket fell behind; closing it");
                    bump(&self.metrics.notifications_dropped);
                    entry.sender = None;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
    }

    /// Starts using a (new) private queue: binds every key currently needed to it.
    pub async fn install_queue(&self, queue: &str) -> Result<()> {
        let mut bindings = self.bindings.lock().await;
        bindings.queue = None;
        let users: Vec<String> = bindings.needed.keys().cloned().collect();
        for user in users {
            self.bus.set_binding(queue, &self.notify_exchange, &protocol::topology::user_routing_key(&user), Binding::Bind).await?;
        }
        bindings.queue = Some(queue.to_owned());
        Ok(())
    }

    /// Forgets the queue (the consumer lost it); bindings are redone by the next `install_queue`.
    pub async fn forget_queue(&self) {
        self.bindings.lock().await.queue = None;
    }

    async fn need_binding(&self, user: &str) -> Result<()> {
        let mut bindings = self.bindings.lock().await;
        let already_bound = bindings.needed.get(user).is_some_and(|count| *count > 0);
        if !already_bound {
            if let Some(queue) = &bindings.queue {
                self.bus.set_binding(queue, &self.notify_exchange, &protocol::topology::user_routing_key(user), Binding::Bind).await?;
            }
        }
        *bindings.needed.entry(user.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    async fn release_binding(&self, user: &str) {
        let mut bindings = self.bindings.lock().await;
        let Some(count) = bindings.needed.get_mut(user) else { return };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return;
        }
        bindings.needed.remove(user);
        if let Some(queue) = bindings.queue.clone() {
            let key = protocol::topology::user_routing_key(user);
            if let Err(error) = self.bus.set_binding(&queue, &self.notify_exchange, &key, Binding::Unbind).await {
                // Harmless: the instance receives a few notifications nobody here reads, and the
                // binding goes with the queue.
                tracing::warn!(user, %error, "could not unbind a user's notifications");
            }
        }
    }

    /// The exchange the users' keys are bound on.
    pub fn notify_exchange(&self) -> &str {
        &self.notify_exchange
    }

    /// The private queue notifications currently arrive on, if the consumer is running.
    pub async fn current_queue(&self) -> Option<String> {
        self.bindings.lock().await.queue.clone()
    }

    /// Connections currently registered (for draining on shutdown and for tests).
    pub fn connection_count(&self) -> usize {
        self.routes().connections.len()
    }
}

fn remove_from_index(index: &mut HashMap<String, HashSet<ConnectionId>>, key: &str, connection_id: ConnectionId) {
    if let Some(members) = index.get_mut(key) {
        members.remove(&connection_id);
        if members.is_empty() {
            index.remove(key);
        }
    }
}
