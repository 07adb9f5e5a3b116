//! What the proxy knows about each session it serves: owner, state and upstream address. Read
//! once from the store, then kept current by the engine's notifications (the owner's routing key
//! is bound on this instance while the proxy uses the session), and forgotten when unused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use protocol::Notification;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Result;
use crate::hub::Hub;
use crate::store::SessionStore;

/// A session the proxy has not served for this long is forgotten (and its owner's binding given
/// back); the next request reads the store again.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// A service's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
}

/// Where a session's service answers, as the container agent reported it: the container's own
/// address on the session network when this instance runs on the container's machine (no Docker
/// port proxy in between), else the published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream: Upstream,
    /// The published port when `upstream` is the network address: where a request goes when
    /// the network address cannot be connected to (an instance on the machine but in a network
    /// namespace without a route to the session network).
    pub fallback: Option<Upstream>,
}

impl Route {
    /// Which of the two addresses `upstream` is, for the log.
    pub fn via(&self) -> &'static str {
        if self.fallback.is_some() {
            "network"
        } else {
            "published"
        }
    }
}

/// The machine this instance runs on: its host id ([`protocol::Profile::host`]) and kernel boot
/// id. A container's network address is used only when both are the container agent's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Here {
    pub host: String,
    pub boot_id: Option<String>,
}

impl Here {
    /// This process's machine, `host` being its host id.
    pub fn this_machine(host: String) -> Here {
        Here { host, boot_id: protocol::host::boot_id().map(str::to_owned) }
    }
}

/// A session's state and, while it runs, its upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub state: String,
    pub upstream: Option<Route>,
}

/// One session the proxy serves.
pub struct Entry {
    pub owner: String,
    view: watch::Sender<View>,
    last_used: Mutex<Instant>,
    /// When this instance last published a wake for it.
    wake_sent: Mutex<Option<Instant>>,
    /// When the activity gate last admitted (and the proxy published) activity for it: the gate
    /// debounces everything else within its interval, so the proxy need not ask it.
    activity_published: Mutex<Option<Instant>>,
}

impl Entry {
    fn new(owner: String, view: View) -> Entry {
        let (view, _) = watch::channel(view);
        Entry { owner, view, last_used: Mutex::new(Instant::now()), wake_sent: Mutex::new(None), activity_published: Mutex::new(None) }
    }

    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.view.subscribe()
    }

    /// Whether this request should publish the wake (none was sent in the last `within`).
    pub fn claim_wake(&self, within: Duration) -> bool {
        let mut sent = self.wake_sent.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if sent.is_some_and(|at| now.duration_since(at) < within) {
            return false;
        }
        *sent = Some(now);
        true
    }

    /// Whether activity was published less than `within` ago (the gate would debounce more).
    pub fn activity_published_within(&self, within: Duration) -> bool {
        let published = *self.activity_published.lock().unwrap_or_else(PoisonError::into_inner);
        published.is_some_and(|at| at.elapsed() < within)
    }

    /// Activity the gate admitted at (no later than) `at` was published.
    pub fn activity_published_at(&self, at: Instant) {
        let mut published = self.activity_published.lock().unwrap_or_else(PoisonError::into_inner);
        if published.is_none_or(|previous| previous < at) {
            *published = Some(at);
        }
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn apply(&self, notification: &Notification, here: &Here) {
        let upstream = upstream_of(&notification.detail, here);
        self.view.send_modify(|view| {
            view.state = notification.state.clone();
            if notification.state == "running" {
                if upstream.is_some() {
                    view.upstream = upstream;
                }
            } else if is_ended(&notification.state) {
                view.upstream = None;
            }
        });
        if notification.state == "running" {
            *self.wake_sent.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

/// States after which a session never runs again.
pub fn is_ended(state: &str) -> bool {
    matches!(state, "closed" | "stopped" | "failed" | "recovered")
}

/// The upstream a record or a `running` notification names: `network` (a
/// [`protocol::host::NetworkAddress`]) when it is on `here`'s machine, else `host`/`port`.
fn upstream_of(record: &Value, here: &Here) -> Option<Route> {
    let host = record.get("host").and_then(Value::as_str).filter(|host| !host.is_empty())?;
    let port = record.get("port").and_then(Value::as_u64).and_then(|port| u16::try_from(port).ok()).filter(|port| *port > 0)?;
    let published = Upstream { host: host.to_owned(), port };
    let network = record
        .get("network")
        .filter(|network| network.as_object().is_some_and(|fields| !fields.is_empty()))
        .and_then(|network| serde_json::from_value::<protocol::host::NetworkAddress>(network.clone()).ok())
        .filter(|network| network.port > 0 && network.is_on(&here.host, here.boot_id.as_deref()));
    Some(match network {
        Some(network) => Route { upstream: Upstream { host: network.ip.to_string(), port: network.port }, fallback: Some(published) },
        None => Route { upstream: published, fallback: None },
    })
}

fn log_choice(session: &str, before: Option<&Route>, after: Option<&Route>) {
    if let Some(route) = after.filter(|after| before != Some(*after)) {
        tracing::info!(session_id = %session, via = route.via(), host = %route.upstream.host, port = route.upstream.port, "proxy upstream");
    }
}

/// The sessions this instance proxies.
pub struct Directory {
    hub: Arc<Hub>,
    store: SessionStore,
    here: Here,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

impl Directory {
    /// A directory kept current by `hub`'s notifications, for an instance on `here`'s machine.
    pub fn new(hub: Arc<Hub>, store: SessionStore, here: Here) -> Arc<Directory> {
        let directory = Arc::new(Directory { hub: hub.clone(), store, here, entries: Mutex::new(HashMap::new()) });
        let weak = Arc::downgrade(&directory);
        hub.observe(Arc::new(move |notification: &Notification| {
            if let Some(directory) = weak.upgrade() {
                directory.on_notification(notification);
            }
        }));
        directory
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn on_notification(&self, notification: &Notification) {
        let Some(session) = &notification.session else { return };
        let entry = self.entries().get(session).cloned();
        if let Some(entry) = entry {
            if entry.owner == notification.user {
                let before = entry.view().upstream;
                entry.apply(notification, &self.here);
                log_choice(session, before.as_ref(), entry.view().upstream.as_ref());
            }
        }
    }

    /// The session, or `None` when the store has no record of it.
    pub async fn lookup(&self, session: &str) -> Result<Option<Arc<Entry>>> {
        let known = self.entries().get(session).cloned();
        if let Some(entry) = known {
            entry.touch();
            return Ok(Some(entry));
        }
        let Some(record) = self.store.session(session).await? else { return Ok(None) };
        let Some(owner) = record.get("user").and_then(Value::as_str).map(str::to_owned) else { return Ok(None) };
        // Bound before the record is read again, so no change can fall between the two.
        self.hub.hold_user(&owner).await?;
        let record = match self.store.session(session).await {
            Ok(Some(fresh)) => fresh,
            Ok(None) => record,
            Err(error) => {
                self.hub.release_user(&owner).await;
                return Err(error);
            }
        };
        let state = record.get("state").and_then(Value::as_str).unwrap_or("unknown").to_owned();
        let upstream = if state == "running" || state == "idle" { upstream_of(&record, &self.here) } else { None };
        log_choice(session, None, upstream.as_ref());
        let entry = Arc::new(Entry::new(owner.clone(), View { state, upstream }));
        let (kept, duplicate) = {
            let mut entries = self.entries();
            match entries.get(session) {
                Some(existing) => (existing.clone(), true),
                None => {
                    entries.insert(session.to_owned(), entry.clone());
                    (entry, false)
                }
            }
        };
        if duplicate {
            // Another request got there first and holds the binding.
            self.hub.release_user(&owner).await;
        }
        Ok(Some(kept))
    }

    /// Reads the session's record again and takes its state if it differs: for a request that
    /// has waited a while, in case a notification was lost (the broker connection dropped).
    pub async fn refresh(&self, entry: &Entry, session: &str) {
        let Ok(Some(record)) = self.store.session(session).await else { return };
        let Some(state) = record.get("state").and_then(Value::as_str) else { return };
        if state == entry.view().state {
            return;
        }
        tracing::debug!(session_id = %session, state, "the store knows a newer state than the notifications told");
        let upstream = upstream_of(&record, &self.here);
        entry.view.send_modify(|view| {
            view.state = state.to_owned();
            view.upstream = if state == "running" || state == "idle" { upstream.or(view.upstream.take()) } else { None };
        });
    }

    /// Forgets sessions unused for [`FORGET_AFTER`] (ended ones after 30 s), giving their
    /// bindings back.
    pub async fn sweep(&self) {
        let now = Instant::now();
        let forgotten: Vec<Arc<Entry>> = {
            let mut entries = self.entries();
            let stale: Vec<String> = entries
                .iter()
                .filter(|(_, entry)| {
                    let unused_for = now.duration_since(*entry.last_used.lock().unwrap_or_else(PoisonError::into_inner));
                    unused_for > FORGET_AFTER || (is_ended(&entry.view().state) && unused_for > Duration::from_secs(30))
                })
                .map(|(session, _)| session.clone())
                .collect();
            stale.iter().filter_map(|session| entries.remove(session)).collect()
        };
        for entry in forgotten {
            self.hub.release_user(&entry.owner).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn notifications_move_the_view() {
        let entry = Entry::new("alice".into(), View { state: "provisioning".into(), upstream: None });
        let notify = |state: &str, detail: Value| Notification {
            id: uuid::Uuid::now_v7(),
            user: "alice".into(),
            session: Some("s".into()),
            state: state.into(),
            detail,
            cause: None,
        };
        let here = Here { host: "local".into(), boot_id: Some("boot".into()) };
        entry.apply(&notify("running", json!({"host": "127.0.0.1", "port": 49153, "container_id": "c"})), &here);
        assert_eq!(entry.view().upstream, Some(Route { upstream: Upstream { host: "127.0.0.1".into(), port: 49153 }, fallback: None }));
        entry.apply(&notify("idle", json!({})), &here);
        assert_eq!((entry.view().state.as_str(), entry.view().upstream.is_some()), ("idle", true));
        assert!(entry.claim_wake(Duration::from_secs(5)));
        assert!(!entry.claim_wake(Duration::from_secs(5)));
        entry.apply(&notify("running", json!({"host": "127.0.0.1", "port": 49153})), &here);
        assert!(entry.claim_wake(Duration::from_secs(5)), "a running notification ends the wake");
        entry.apply(&notify("closed", json!({})), &here);
        assert_eq!(entry.view(), View { state: "closed".into(), upstream: None });
    }

    #[test]
    fn the_network_address_is_taken_on_its_own_machine_only() {
        let here = Here { host: "h1".into(), boot_id: Some("boot-1".into()) };
        let record = |network: Value| json!({"host": "127.0.0.1", "port": 49153, "network": network});
        let published_port = Upstream { host: "127.0.0.1".into(), port: 49153 };
        let published = Some(Route { upstream: published_port.clone(), fallback: None });
        let network = json!({"ip": "172.18.0.5", "port": 8080, "host": "h1", "boot_id": "boot-1"});
        assert_eq!(
            upstream_of(&record(network.clone()), &here),
            Some(Route { upstream: Upstream { host: "172.18.0.5".into(), port: 8080 }, fallback: Some(published_port) })
        );
        let mut other_host = network.clone();
        other_host["host"] = json!("h2");
        let mut other_boot = network.clone();
        other_boot["boot_id"] = json!("boot-2");
        let mut no_port = network.clone();
        no_port["port"] = json!(0);
        for (case, network) in [
            ("another host", other_host),
            ("another machine on the same host id", other_boot),
            ("no port", no_port),
            ("none reported (an older agent, the pattern's empty default)", json!({})),
            ("null", Value::Null),
            ("not an address", json!({"ip": "nowhere", "port": 8080, "host": "h1", "boot_id": "boot-1"})),
        ] {
            assert_eq!(upstream_of(&record(network), &here), published, "{case}");
        }
        let unknown_machine = Here { host: "h1".into(), boot_id: None };
        assert_eq!(upstream_of(&record(network), &unknown_machine), published, "an instance that cannot tell its machine");
        assert_eq!(upstream_of(&json!({"network": {"ip": "172.18.0.5"}}), &here), None, "nothing published: not running");
    }
}
