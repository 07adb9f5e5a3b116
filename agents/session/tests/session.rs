//! End-to-end tests of the session agent: real RabbitMQ, real WebSocket clients over TCP, and a
//! small persistence responder on the broker serving a test table of sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use protocol::bus::{Acks, AutoDelete, Durability, ExchangeKind};
use protocol::events::{InputSource, SessionActivity, SessionClose, SessionOpen};
use protocol::{Bus, BusConfig, CloudEvent, ConsumeSpec, Notification, Outcome, Profile, Task};
use serde_json::{json, Value};
use session::{InstanceHandle, KeyMaterial, SessionConfig, StoreRoute};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const METRICS_TOKEN: &str = "test-metrics-token";

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn new_session_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn dev_profile() -> Profile {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../run-profiles/dev/profile.toml");
    let text = std::fs::read_to_string(path).expect("dev profile");
    Profile::parse(&text, std::path::Path::new(path)).expect("dev profile parses")
}

/// The sessions table the test responder serves, keyed by session id.
type Table = Arc<Mutex<HashMap<String, Value>>>;

/// A broker connection, a persistence responder on a private queue, and a secret for tokens.
struct World {
    bus: Bus,
    /// The agent under test connects as the session identity, as it does in a deployment (the
    /// engine accepts session events from it, and it may read users' notifications).
    agent_bus: Bus,
    /// This test's own events exchange, so its events never reach the real engine queue.
    events_exchange: String,
    table: Table,
    store_queue: String,
    secret: String,
    stop_responder: Option<tokio::sync::oneshot::Sender<()>>,
}

impl World {
    async fn new() -> Result<World> {
        let bus = Bus::connect(BusConfig::new(AMQP_URL, "session-tests")).await?;
        bus.declare_topology().await?;
        protocol::broker_admin::ensure_identities(AMQP_URL).await?;
        let agent_bus = Bus::connect(BusConfig::for_identity(AMQP_URL, protocol::Identity::Session, "session-tests-agent")?).await?;
        let store_queue = bus.declare_private_queue(protocol::topology::TASKS_EXCHANGE, &[]).await?;
        let table: Table = Arc::default();
        let (stop_responder, stopped) = tokio::sync::oneshot::channel::<()>();
        let responder_bus = bus.clone();
        let responder_table = table.clone();
        let queue = store_queue.clone();
        tokio::spawn(async move {
            let handler = move |incoming: protocol::Incoming| {
                let bus = responder_bus.clone();
                let table = responder_table.clone();
                async move {
                    let reply = answer_store_request(&table, &incoming.body);
                    let _ = bus.reply(&incoming, &serde_json::to_vec(&reply).unwrap_or_default()).await;
                    Outcome::Ack
                }
            };
            let _ = bus_consume(&queue, handler, stopped).await;
        });
        let secret = format!("test-secret-{}", uuid::Uuid::new_v4().simple());
        // An isolated world's name (`berth-test.<tag>.events`): the session identity may publish there.
        let events_exchange = format!("berth-test.{}.events", uuid::Uuid::new_v4().simple());
        bus.declare_exchange(&events_exchange, ExchangeKind::Topic, Durability::Transient, AutoDelete::Never).await?;
        Ok(World { bus, agent_bus, events_exchange, table, store_queue, secret, stop_responder: Some(stop_responder) })
    }

    fn config(&self) -> SessionConfig {
        let mut config = SessionConfig::with_key(&dev_profile(), &KeyMaterial::inline(&self.secret)).expect("config");
        config.store = StoreRoute { exchange: String::new(), routing_key: self.store_queue.clone(), timeout: Duration::from_secs(5) };
        config.events_exchange = self.events_exchange.clone();
        config.activity_debounce = Duration::from_secs(1);
        config.max_messages_per_second = 1000;
        config.edge.metrics_token = Some(METRICS_TOKEN.to_owned());
        config
    }

    fn token(&self, user: &str, roles: &[&str]) -> String {
        let roles: Vec<String> = roles.iter().map(|role| role.to_string()).collect();
        session::TokenAuthority::new(&KeyMaterial::inline(&self.secret), "berth")
            .expect("authority")
            .mint(user, &roles, Duration::from_secs(600))
            .expect("token")
    }

    fn put_session(&self, session: &str, user: &str, state: &str, extra: Value) {
        let mut record = json!({"id": session, "user": user, "state": state, "workspace": "w1", "profile": "dev",
                                "created": chrono::Utc::now().to_rfc3339()});
        if let (Value::Object(record), Value::Object(extra)) = (&mut record, extra) {
            record.extend(extra);
        }
        self.table.lock().expect("table").insert(session.to_owned(), record);
    }

    async fn instance(&self, config: SessionConfig) -> Result<Instance> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (handle, running) = session::start(config, self.agent_bus.clone(), listener, async move {
            let _ = stopped.await;
        })
        .await?;
        let task = tokio::spawn(running);
        Ok(Instance { address, handle, stop: Some(stop), task: Some(task) })
    }

    async fn finish(mut self) {
        if let Some(stop) = self.stop_responder.take() {
            let _ = stop.send(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = self.bus.delete_queue(&self.store_queue).await;
        let _ = self.bus.delete_exchange(&self.events_exchange).await;
        self.agent_bus.close().await;
        self.bus.close().await;
    }
}

async fn bus_consume<H, F>(queue: &str, handler: H, stopped: tokio::sync::oneshot::Receiver<()>) -> Result<()>
where
    H: Fn(protocol::Incoming) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Outcome> + Send + 'static,
{
    let bus = Bus::connect(BusConfig::new(AMQP_URL, "session-tests-store")).await?;
    bus.consume(ConsumeSpec::new(queue, 16), handler, async move {
        let _ = stopped.await;
    })
    .await?;
    bus.close().await;
    Ok(())
}

/// Serves `get` and `find` (with a `user` eq filter or none) from the table, in the persistence
/// agent's reply shape.
fn answer_store_request(table: &Table, body: &[u8]) -> Value {
    let Ok(task) = Task::decode(body) else {
        return json!({"ok": false, "error": {"kind": "bad_request", "message": "not a task"}});
    };
    let table = table.lock().expect("table");
    match task.action.as_str() {
        "get" => {
            let id = task.args.get("id").and_then(Value::as_str).unwrap_or_default();
            match table.get(id) {
                Some(record) => json!({"ok": true, "result": record}),
                None => json!({"ok": false, "error": {"kind": "not_found", "message": "no such record"}}),
            }
        }
        "find" => {
            let user = task.args.pointer("/filter/user/eq").and_then(Value::as_str);
            let records: Vec<&Value> =
                table.values().filter(|record| user.is_none_or(|user| record.get("user").and_then(Value::as_str) == Some(user))).collect();
            json!({"ok": true, "result": records})
        }
        other => json!({"ok": false, "error": {"kind": "bad_request", "message": format!("unexpected {other}")}}),
    }
}

struct Instance {
    address: SocketAddr,
    handle: InstanceHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<session::Result<()>>>,
}

impl Instance {
    async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.context("instance did not stop")???;
        }
        Ok(())
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.address)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Where the token goes in the upgrade request.
enum TokenIn<'a> {
    Header(&'a str),
    Subprotocol(&'a str),
    Query(&'a str),
    Nowhere,
}

async fn try_connect(instance: &Instance, token: TokenIn<'_>) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let url = match &token {
        TokenIn::Query(token) => format!("{}?access_token={token}", instance.url()),
        _ => instance.url(),
    };
    let mut request = url.into_client_request()?;
    match token {
        TokenIn::Header(token) => {
            request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).expect("header"));
        }
        TokenIn::Subprotocol(token) => {
            request
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_str(&format!("berth.v1, bearer.{token}")).expect("header"));
        }
        TokenIn::Query(_) | TokenIn::Nowhere => {}
    }
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

/// Connects and reads the snapshot frame.
async fn connect(instance: &Instance, token: &str) -> Result<(Socket, Value)> {
    let mut socket = try_connect(instance, TokenIn::Header(token)).await?;
    let snapshot = next_frame(&mut socket).await?;
    if snapshot["type"] != "snapshot" {
        bail!("expected a snapshot first, got {snapshot}");
    }
    Ok((socket, snapshot))
}

fn status_of_refused_upgrade(error: &tokio_tungstenite::tungstenite::Error) -> Option<u16> {
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => Some(response.status().as_u16()),
        _ => None,
    }
}

/// The next JSON text frame (pings and pongs are skipped).
async fn next_frame(socket: &mut Socket) -> Result<Value> {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next()).await.context("no frame in time")?.context("socket ended")??;
        match message {
            Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => bail!("unexpected message {other:?}"),
        }
    }
}

/// The next frame if one arrives within `window`.
async fn frame_within(socket: &mut Socket, window: Duration) -> Option<Value> {
    tokio::time::timeout(window, next_frame(socket)).await.ok().and_then(Result::ok)
}

async fn request(socket: &mut Socket, frame: Value) -> Result<Value> {
    socket.send(Message::Text(frame.to_string().into())).await?;
    next_frame(socket).await
}

/// Session events on `berth.events`, for checking what the agent published.
struct EventTap {
    bus: Bus,
    queue: String,
    events: tokio::sync::mpsc::UnboundedReceiver<CloudEvent>,
}

impl EventTap {
    async fn new(world: &World) -> Result<EventTap> {
        let bus = &world.bus;
        let keys = ["session.open", "session.close", "session.activity", "session.keepalive"].map(str::to_owned);
        let queue = bus.declare_private_queue(&world.events_exchange, &keys).await?;
        let mut subscription = bus.subscribe(&queue, Acks::Automatic).await?;
        let (sender, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = subscription.next().await {
                if let Ok(event) = CloudEvent::parse(&delivery.body, 1 << 20) {
                    if sender.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(EventTap { bus: bus.clone(), queue, events })
    }

    /// Every event about `session` seen within `window`.
    async fn collect(&mut self, session: &str, window: Duration) -> Vec<CloudEvent> {
        let deadline = tokio::time::Instant::now() + window;
        let mut seen = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            if event.subject.as_deref() == Some(session) {
                seen.push(event);
            }
        }
        seen
    }

    /// The first event about `session` of `event_type`.
    async fn expect(&mut self, session: &str, event_type: &str) -> Result<CloudEvent> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event =
                tokio::time::timeout_at(deadline, self.events.recv()).await.context("event not seen in time")?.context("tap ended")?;
            if event.subject.as_deref() == Some(session) && event.event_type == event_type {
                return Ok(event);
            }
        }
    }

    async fn finish(self) {
        let _ = self.bus.delete_queue(&self.queue).await;
    }
}

/// Plays the engine's side of `open` on the test's events exchange: the first `session.open` of a
/// (user, workspace) starts that session (`materializing`), every later one joins it (`running`,
/// `detail.joined`), each answered with a notification whose `cause` is the open's event id. One
/// open at a time, like the engine's per-workspace commit. `silent` never answers.
struct FakeEngine {
    bus: Bus,
    queue: String,
    /// Every `session.open` seen, in order.
    opens: Arc<Mutex<Vec<CloudEvent>>>,
}

impl FakeEngine {
    async fn start(world: &World, silent: bool) -> Result<FakeEngine> {
        let bus = world.bus.clone();
        let queue = bus.declare_private_queue(&world.events_exchange, &["session.open".to_owned()]).await?;
        let mut subscription = bus.subscribe(&queue, Acks::Automatic).await?;
        let opens: Arc<Mutex<Vec<CloudEvent>>> = Arc::default();
        let seen = opens.clone();
        let publisher = bus.clone();
        tokio::spawn(async move {
            let mut live: HashMap<(String, String), String> = HashMap::new();
            while let Some(Ok(delivery)) = subscription.next().await {
                let Ok(event) = CloudEvent::parse(&delivery.body, 1 << 20) else { continue };
                seen.lock().expect("opens").push(event.clone());
                if silent {
                    continue;
                }
                let user = event.extension("userid").unwrap_or_default().to_owned();
                let workspace = event.data_as::<SessionOpen>().map(|open| String::from(open.workspace)).unwrap_or_default();
                let requested = event.subject.clone().unwrap_or_default();
                let (session, state, detail) = match live.get(&(user.clone(), workspace.clone())) {
                    Some(live_session) => (live_session.clone(), "running", json!({"joined": true, "host": "127.0.0.1", "port": 40123})),
                    None => {
                        live.insert((user.clone(), workspace), requested.clone());
                        (requested, "materializing", json!({}))
                    }
                };
                let mut answer = notification(&user, &session, state, detail);
                answer.cause = Some(event.id.clone());
                let _ = publisher.publish_notification(&answer).await;
            }
        });
        Ok(FakeEngine { bus, queue, opens })
    }

    fn opens(&self) -> Vec<CloudEvent> {
        self.opens.lock().expect("opens").clone()
    }

    async fn finish(self) {
        let _ = self.bus.delete_queue(&self.queue).await;
    }
}

/// A minimal HTTP/1.1 GET returning status and body.
async fn http_get(address: SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(address).await?;
    let authorization = token.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{authorization}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = text.split(' ').nth(1).context("no status")?.parse()?;
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

fn notification(user: &str, session: &str, state: &str, detail: Value) -> Notification {
    Notification {
        id: uuid::Uuid::now_v7(),
        user: user.to_owned(),
        session: Some(session.to_owned()),
        state: state.to_owned(),
        detail,
        cause: None,
    }
}

#[tokio::test]
async fn unauthenticated_requests_get_401_and_no_upgrade() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let alice = unique("alice");

    let no_token = try_connect(&instance, TokenIn::Nowhere).await.expect_err("no token must be refused");
    assert_eq!(status_of_refused_upgrade(&no_token), Some(401));

    let forged = session::TokenAuthority::new(&KeyMaterial::inline("some-other-secret-0123456789"), "berth")?.mint(
        &alice,
        &[],
        Duration::from_secs(600),
    )?;
    let bad_signature = try_connect(&instance, TokenIn::Header(&forged)).await.expect_err("forged token must be refused");
    assert_eq!(status_of_refused_upgrade(&bad_signature), Some(401));

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let sign = |claims: Value| {
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(world.secret.as_bytes()))
            .expect("sign")
    };
    let expired = sign(json!({"sub": alice, "aud": "berth", "exp": now - 3600, "iat": now - 7200}));
    let error = try_connect(&instance, TokenIn::Header(&expired)).await.expect_err("expired token must be refused");
    assert_eq!(status_of_refused_upgrade(&error), Some(401));

    let wrong_audience = sign(json!({"sub": alice, "aud": "someone-else", "exp": now + 600}));
    let error = try_connect(&instance, TokenIn::Header(&wrong_audience)).await.expect_err("wrong audience must be refused");
    assert_eq!(status_of_refused_upgrade(&error), Some(401));

    // A subject that would be a routing wildcard must never bind `user.#`.
    let wildcard = sign(json!({"sub": "#", "aud": "berth", "exp": now + 600}));
    let error = try_connect(&instance, TokenIn::Header(&wildcard)).await.expect_err("wildcard subject must be refused");
    assert_eq!(status_of_refused_upgrade(&error), Some(401));

    let (status, body) = http_get(instance.address, "/api/sessions", None).await?;
    assert_eq!(status, 401, "{body}");
    let (status, _) = http_get(instance.address, "/api/sessions", Some(&expired)).await?;
    assert_eq!(status, 401);
    assert_eq!(instance.handle.metrics.auth_failures.load(Ordering::Relaxed), 7);
    let (_, metrics) = http_get(instance.address, "/metrics", Some(METRICS_TOKEN)).await?;
    for line in [
        "berth_session_auth_failures_total 7",
        r#"berth_session_auth_failures_by_reason_total{reason="missing"} 2"#,
        r#"berth_session_auth_failures_by_reason_total{reason="signature"} 1"#,
        r#"berth_session_auth_failures_by_reason_total{reason="expired"} 2"#,
        r#"berth_session_auth_failures_by_reason_total{reason="audience"} 1"#,
        r#"berth_session_auth_failures_by_reason_total{reason="subject"} 1"#,
    ] {
        assert!(metrics.lines().any(|candidate| candidate == line), "missing {line:?} in\n{metrics}");
    }
    assert_eq!(instance.handle.metrics.connections_total.load(Ordering::Relaxed), 0, "nothing was upgraded");

    // The same token is accepted from each place a client can put it.
    let token = world.token(&alice, &[]);
    for place in [TokenIn::Header(&token), TokenIn::Subprotocol(&token), TokenIn::Query(&token)] {
        let mut socket = try_connect(&instance, place).await?;
        let snapshot = next_frame(&mut socket).await?;
        assert_eq!(snapshot["type"], "snapshot");
        assert_eq!(snapshot["user"], Value::String(alice.clone()));
        socket.close(None).await?;
    }

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn users_see_and_control_only_their_own_sessions() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let mut tap = EventTap::new(&world).await?;
    let (alice, bob, admin) = (unique("alice"), unique("bob"), unique("admin"));
    let (alices_session, bobs_session) = (new_session_id(), new_session_id());
    world.put_session(&alices_session, &alice, "running", json!({"host": "127.0.0.1", "port": 40001}));
    world.put_session(&bobs_session, &bob, "running", json!({}));

    let (mut alice_socket, snapshot) = connect(&instance, &world.token(&alice, &[])).await?;
    let listed: Vec<&str> = snapshot["sessions"].as_array().context("sessions")?.iter().filter_map(|s| s["session"].as_str()).collect();
    assert_eq!(listed, [alices_session.as_str()], "alice's snapshot lists exactly her session");

    for frame_type in ["close", "activity", "subscribe"] {
        let reply = request(&mut alice_socket, json!({"type": frame_type, "id": frame_type, "session": bobs_session})).await?;
        assert_eq!(reply["type"], "error", "{frame_type}: {reply}");
        assert_eq!(reply["code"], "not_found", "{frame_type}: {reply}");
        assert_eq!(reply["id"], frame_type);
    }
    // A session id nobody has looks exactly the same.
    let reply = request(&mut alice_socket, json!({"type": "close", "id": "x", "session": new_session_id()})).await?;
    assert_eq!(reply["code"], "not_found");
    assert!(tap.collect(&bobs_session, Duration::from_millis(500)).await.is_empty(), "nothing was published about bob's session");

    // Her own session: allowed, and the event carries the token's user.
    let reply = request(&mut alice_socket, json!({"type": "close", "id": "mine", "session": alices_session, "reason": "done"})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");
    let closed = tap.expect(&alices_session, "session.close").await?;
    assert_eq!(closed.extension("userid"), Some(alice.as_str()));
    assert_eq!(closed.data_as::<SessionClose>()?, SessionClose { reason: Some("done".to_owned()) });

    // The HTTP API agrees.
    let alice_token = world.token(&alice, &[]);
    let (status, body) = http_get(instance.address, "/api/sessions", Some(&alice_token)).await?;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(body["sessions"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["sessions"][0]["session"], Value::String(alices_session.clone()));
    let (status, _) = http_get(instance.address, &format!("/api/sessions?user={bob}"), Some(&alice_token)).await?;
    assert_eq!(status, 403);

    // An admin sees and controls everyone's sessions, and the event names the admin.
    let admin_token = world.token(&admin, &["admin"]);
    let (status, body) = http_get(instance.address, &format!("/api/sessions?user={bob}"), Some(&admin_token)).await?;
    assert_eq!(status, 200);
    assert!(body.contains(&bobs_session));
    let (mut admin_socket, _) = connect(&instance, &admin_token).await?;
    let reply = request(&mut admin_socket, json!({"type": "subscribe", "id": "s", "session": bobs_session})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(reply["status"]["state"], "running");
    world.bus.publish_notification(&notification(&bob, &bobs_session, "idle", json!({}))).await?;
    let pushed = next_frame(&mut admin_socket).await?;
    assert_eq!(
        (pushed["type"].as_str(), pushed["session"].as_str(), pushed["state"].as_str()),
        (Some("status"), Some(bobs_session.as_str()), Some("idle"))
    );
    let reply = request(&mut admin_socket, json!({"type": "close", "id": "c", "session": bobs_session})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");
    let closed = tap.expect(&bobs_session, "session.close").await?;
    assert_eq!(closed.extension("userid"), Some(admin.as_str()));

    tap.finish().await;
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn open_publishes_with_the_token_user_and_a_new_session_id() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let mut tap = EventTap::new(&world).await?;
    let alice = unique("alice");
    let (mut socket, _) = connect(&instance, &world.token(&alice, &[])).await?;

    let engine = FakeEngine::start(&world, false).await?;
    let reply = request(&mut socket, json!({"type": "open", "id": "o1", "workspace": "thesis", "profile": "dev"})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(reply["joined"], false, "{reply}");
    let session = reply["session"].as_str().context("session id in the reply")?.to_owned();
    assert_eq!(uuid::Uuid::parse_str(&session)?.get_version_num(), 7);
    let opened = tap.expect(&session, "session.open").await?;
    assert_eq!(opened.extension("userid"), Some(alice.as_str()));
    assert_eq!(
        opened.data_as::<SessionOpen>()?,
        SessionOpen { user: alice.parse()?, workspace: "thesis".parse()?, profile: Some("dev".to_owned()) }
    );
    // The answer came first; the notification it waited for is pushed as a status as always.
    let status = next_frame(&mut socket).await?;
    assert_eq!(
        (status["type"].as_str(), status["session"].as_str(), status["state"].as_str()),
        (Some("status"), Some(session.as_str()), Some("materializing"))
    );

    // The frame cannot choose the user, nor another deployment's profile.
    let reply = request(&mut socket, json!({"type": "open", "id": "o2", "workspace": "w", "profile": "dev", "user": "bob"})).await?;
    assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some("bad_request")), "{reply}");
    let reply = request(&mut socket, json!({"type": "open", "id": "o3", "workspace": "w", "profile": "prod"})).await?;
    assert_eq!(reply["code"], "bad_request", "{reply}");

    // The session opened on this socket can be acted on before the store knows it.
    let reply = request(&mut socket, json!({"type": "activity", "id": "a", "session": session})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");
    let activity = tap.expect(&session, "session.activity").await?;
    assert_eq!(activity.extension("userid"), Some(alice.as_str()));
    assert_eq!(activity.data_as::<SessionActivity>()?, SessionActivity { source: InputSource::Websocket });

    engine.finish().await;
    tap.finish().await;
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn open_waits_for_the_engine_and_answers_with_the_session_it_joined() -> Result<()> {
    let world = World::new().await?;
    let first = world.instance(world.config()).await?;
    let second = world.instance(world.config()).await?;
    let engine = FakeEngine::start(&world, false).await?;
    let mut tap = EventTap::new(&world).await?;
    let alice = unique("alice");
    let token = world.token(&alice, &[]);
    let (mut tab_one, _) = connect(&first, &token).await?;
    let (mut tab_two, _) = connect(&first, &token).await?;
    let (mut tab_three, _) = connect(&second, &token).await?;

    // Three tabs on two instances open the same workspace at once.
    let open = |id: &str| Message::Text(json!({"type": "open", "id": id, "workspace": "thesis", "profile": "dev"}).to_string().into());
    tab_one.send(open("a")).await?;
    tab_two.send(open("b")).await?;
    tab_three.send(open("c")).await?;
    let mut replies = Vec::new();
    for socket in [&mut tab_one, &mut tab_two, &mut tab_three] {
        // Another tab's open pushes that session's status to every tab of the user.
        let reply = next_reply(socket).await?;
        assert_eq!(reply["type"], "ok", "{reply}");
        replies.push(reply);
    }
    let sessions: Vec<&str> = replies.iter().filter_map(|reply| reply["session"].as_str()).collect();
    assert_eq!(sessions.len(), 3);
    assert!(sessions.iter().all(|session| *session == sessions[0]), "one session for the workspace: {replies:?}");
    let joined: Vec<bool> = replies.iter().filter_map(|reply| reply["joined"].as_bool()).collect();
    assert_eq!(joined.iter().filter(|joined| !**joined).count(), 1, "exactly one started it: {replies:?}");
    assert_eq!(joined.iter().filter(|joined| **joined).count(), 2, "{replies:?}");
    // Every open was published with its own new id; the one that started is the session.
    let opens = engine.opens();
    assert_eq!(opens.len(), 3);
    assert!(opens.iter().any(|open| open.subject.as_deref() == Some(sessions[0])));
    assert_eq!(first.handle.metrics.opens_joined.load(Ordering::Relaxed) + second.handle.metrics.opens_joined.load(Ordering::Relaxed), 2);

    // A tab that joined may act on the live session at once, though the store never heard of it.
    let live = sessions[0].to_owned();
    let joiner = if replies[0]["joined"] == true { &mut tab_one } else { &mut tab_two };
    let reply = request_skipping_status(joiner, json!({"type": "activity", "id": "act", "session": live})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");
    assert_eq!(tap.expect(&live, "session.activity").await?.extension("userid"), Some(alice.as_str()));

    engine.finish().await;
    tap.finish().await;
    first.shutdown().await?;
    second.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn an_open_the_engine_does_not_answer_times_out_and_later_requests_keep_their_order() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.open_answer_timeout = Duration::from_millis(700);
    let instance = world.instance(config).await?;
    let engine = FakeEngine::start(&world, true).await?;
    let alice = unique("alice");
    let (mut socket, _) = connect(&instance, &world.token(&alice, &[])).await?;

    let began = tokio::time::Instant::now();
    socket.send(Message::Text(json!({"type": "open", "id": "o", "workspace": "w", "profile": "dev"}).to_string().into())).await?;
    socket.send(Message::Text(json!({"type": "ping", "id": "p"}).to_string().into())).await?;
    // A status push for another session still flows while the open waits.
    let other = new_session_id();
    world.bus.publish_notification(&notification(&alice, &other, "running", json!({}))).await?;
    let pushed = next_frame(&mut socket).await?;
    assert_eq!((pushed["type"].as_str(), pushed["session"].as_str()), (Some("status"), Some(other.as_str())), "{pushed}");
    assert!(began.elapsed() < Duration::from_millis(700), "the push did not wait for the open");

    let reply = next_frame(&mut socket).await?;
    assert!(began.elapsed() >= Duration::from_millis(700));
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str(), reply["id"].as_str()),
        (Some("error"), Some("timeout"), Some("o")),
        "{reply}"
    );
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains("was sent") && message.contains("status updates"), "{message}");
    let requested = reply["session"].as_str().context("the requested session id")?.to_owned();
    assert_eq!(engine.opens().iter().filter_map(|open| open.subject.clone()).collect::<Vec<_>>(), std::slice::from_ref(&requested));
    assert_eq!(next_frame(&mut socket).await?, json!({"type": "ok", "id": "p"}), "the ping is answered after the open");
    assert_eq!(instance.handle.metrics.opens_timed_out.load(Ordering::Relaxed), 1);

    // A late answer is an ordinary status push, and the requested session is the socket's own.
    let mut late = notification(&alice, &requested, "materializing", json!({}));
    late.cause = Some(engine.opens()[0].id.clone());
    world.bus.publish_notification(&late).await?;
    assert_eq!(next_frame(&mut socket).await?["session"], Value::String(requested.clone()));
    let reply = request(&mut socket, json!({"type": "close", "id": "c", "session": requested})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");

    engine.finish().await;
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

/// The real engine (isolated exchanges, queue and Redis prefix; nobody serves its tasks) behind two
/// instances: tabs of one user opening one workspace at once all land in its one live session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabs_opening_one_workspace_at_once_share_its_session_through_the_real_engine() -> Result<()> {
    let world = World::new().await?;
    let mut profile = dev_profile();
    profile.apply_overrides(|name| std::env::var(name).ok());
    let engine_config = engine::EngineConfig::isolated(&uuid::Uuid::now_v7().simple().to_string());
    engine::service::declare(&world.bus, &engine_config).await?;
    let pattern_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../patterns/workspace-session.json");
    let pattern = engine::load_pattern_file(std::path::Path::new(pattern_path))?;
    let running_engine = engine::Engine::connect(profile.clone(), vec![pattern], engine_config.clone()).await?;
    let (stop_engine, engine_stopped) = tokio::sync::oneshot::channel::<()>();
    let engine_task = tokio::spawn(async move {
        running_engine
            .serve(async move {
                let _ = engine_stopped.await;
            })
            .await
    });
    let mut config = world.config();
    config.events_exchange = engine_config.events_exchange.clone();
    config.notify_exchange = engine_config.notify_exchange.clone();
    let first = world.instance(config.clone()).await?;
    let second = world.instance(config).await?;
    let alice = unique("alice");
    let token = world.token(&alice, &[]);
    let (mut tab_one, _) = connect(&first, &token).await?;
    let (mut tab_two, _) = connect(&second, &token).await?;
    let (mut tab_three, _) = connect(&first, &token).await?;

    let open = |id: &str, workspace: &str| {
        Message::Text(json!({"type": "open", "id": id, "workspace": workspace, "profile": "dev"}).to_string().into())
    };
    let (sent_one, sent_two, sent_three) =
        tokio::join!(tab_one.send(open("a", "thesis")), tab_two.send(open("b", "thesis")), tab_three.send(open("c", "thesis")));
    sent_one?;
    sent_two?;
    sent_three?;
    let mut replies = Vec::new();
    for socket in [&mut tab_one, &mut tab_two, &mut tab_three] {
        let reply = next_reply(socket).await?;
        assert_eq!(reply["type"], "ok", "{reply}");
        replies.push(reply);
    }
    let live = replies[0]["session"].as_str().context("a session")?.to_owned();
    assert!(replies.iter().all(|reply| reply["session"] == live.as_str()), "one session for the workspace: {replies:?}");
    let started: Vec<&Value> = replies.iter().filter(|reply| reply["joined"] == false).collect();
    assert_eq!(started.len(), 1, "exactly one open started the session: {replies:?}");
    assert_eq!(replies.iter().filter(|reply| reply["joined"] == true).count(), 2, "{replies:?}");

    // A later open joins too; another workspace starts its own session.
    let (mut late_tab, _) = connect(&second, &token).await?;
    let reply = request_skipping_status(&mut late_tab, json!({"type": "open", "id": "d", "workspace": "thesis", "profile": "dev"})).await?;
    assert_eq!((reply["session"].as_str(), reply["joined"].as_bool()), (Some(live.as_str()), Some(true)), "{reply}");
    let reply = request_skipping_status(&mut late_tab, json!({"type": "open", "id": "e", "workspace": "essay", "profile": "dev"})).await?;
    assert_eq!(reply["joined"], false, "{reply}");
    assert_ne!(reply["session"], live.as_str());
    // The joining tab may close the live session it was given.
    let reply = request_skipping_status(&mut late_tab, json!({"type": "close", "id": "f", "session": live})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");

    for socket in [tab_one, tab_two, tab_three, late_tab] {
        drop(socket);
    }
    first.shutdown().await?;
    second.shutdown().await?;
    let _ = stop_engine.send(());
    engine_task.await??;
    engine::service::teardown(&world.bus, &profile.services.redis_url, &engine_config).await?;
    world.finish().await;
    Ok(())
}

/// Sends a request and returns its reply, skipping status pushes that arrive before it.
async fn request_skipping_status(socket: &mut Socket, frame: Value) -> Result<Value> {
    socket.send(Message::Text(frame.to_string().into())).await?;
    next_reply(socket).await
}

/// The next frame that is not a status push.
async fn next_reply(socket: &mut Socket) -> Result<Value> {
    loop {
        let next = next_frame(socket).await?;
        if next["type"] != "status" {
            return Ok(next);
        }
    }
}

#[tokio::test]
async fn status_reaches_only_the_owners_sockets_across_two_instances() -> Result<()> {
    let world = World::new().await?;
    let first = world.instance(world.config()).await?;
    let second = world.instance(world.config()).await?;
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (alices_session, bobs_session) = (new_session_id(), new_session_id());
    let (mut alice_on_first, _) = connect(&first, &world.token(&alice, &[])).await?;
    let (mut alice_on_second, _) = connect(&second, &world.token(&alice, &[])).await?;
    let (mut bob_on_second, _) = connect(&second, &world.token(&bob, &[])).await?;

    let detail = json!({"host": "127.0.0.1", "port": 41234, "progress": {"files_done": 3, "files_total": 3}});
    world.bus.publish_notification(&notification(&alice, &alices_session, "running", detail)).await?;
    for socket in [&mut alice_on_first, &mut alice_on_second] {
        let status = next_frame(socket).await?;
        assert_eq!(status["type"], "status");
        assert_eq!(status["session"], Value::String(alices_session.clone()));
        assert_eq!(status["state"], "running");
        assert_eq!(status["host"], "127.0.0.1");
        assert_eq!(status["port"], 41234);
        assert_eq!(status["progress"]["files_done"], 3);
    }
    world.bus.publish_notification(&notification(&bob, &bobs_session, "idle", json!({}))).await?;
    let status = next_frame(&mut bob_on_second).await?;
    assert_eq!(status["session"], Value::String(bobs_session.clone()), "bob's first status is his own, not alice's");
    for socket in [&mut alice_on_first, &mut alice_on_second] {
        assert_eq!(frame_within(socket, Duration::from_millis(300)).await, None, "alice must not see bob's status");
    }
    assert_eq!(first.handle.metrics.notifications_delivered.load(Ordering::Relaxed), 1);
    assert_eq!(second.handle.metrics.notifications_delivered.load(Ordering::Relaxed), 2);

    // Once alice leaves the first instance, it no longer receives her notifications at all.
    alice_on_first.close(None).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while first.handle.hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received_before = first.handle.metrics.notifications_received.load(Ordering::Relaxed);
    world.bus.publish_notification(&notification(&alice, &alices_session, "idle", json!({}))).await?;
    assert_eq!(next_frame(&mut alice_on_second).await?["state"], "idle");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.handle.metrics.notifications_received.load(Ordering::Relaxed), received_before, "unbound on last disconnect");

    first.shutdown().await?;
    second.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn reconnecting_gets_the_current_state() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let alice = unique("alice");
    let session = new_session_id();
    world.put_session(&session, &alice, "provisioning", json!({}));
    let token = world.token(&alice, &[]);

    let (mut socket, snapshot) = connect(&instance, &token).await?;
    assert_eq!(snapshot["sessions"][0]["state"], "provisioning");
    socket.close(None).await?;

    // While the browser is away the session becomes ready.
    world.put_session(&session, &alice, "running", json!({"host": "127.0.0.1", "port": 40999}));
    world.bus.publish_notification(&notification(&alice, &session, "running", json!({"host": "127.0.0.1", "port": 40999}))).await?;

    let (_socket, snapshot) = connect(&instance, &token).await?;
    let current = &snapshot["sessions"][0];
    assert_eq!(current["session"], Value::String(session.clone()));
    assert_eq!(current["state"], "running");
    assert_eq!(current["port"], 40999);

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn malformed_and_oversized_frames_get_errors() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.max_frame_bytes = 1024;
    config.hard_frame_limit_bytes = 8192;
    let instance = world.instance(config).await?;
    let (mut socket, _) = connect(&instance, &world.token(&unique("alice"), &[])).await?;

    let cases: [(Message, &str); 6] = [
        (Message::Text("{".into()), "bad_request"),
        (Message::Text("[1,2]".into()), "bad_request"),
        (Message::Text(r#"{"type":"dance","id":"d"}"#.into()), "bad_request"),
        (Message::Text(r#"{"type":"close","id":"c","session":"../not-a-session-id"}"#.into()), "bad_request"),
        (Message::Binary(vec![1, 2, 3].into()), "bad_request"),
        (Message::Text(format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(2000)).into()), "frame_too_large"),
    ];
    for (message, code) in cases {
        let shown = format!("{message:?}");
        socket.send(message).await?;
        let reply = next_frame(&mut socket).await?;
        assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some(code)), "{shown}: {reply}");
    }
    let reply = request(&mut socket, json!({"type": "dance", "id": "keeps-id"})).await?;
    assert_eq!(reply["id"], "keeps-id", "the request id is echoed even on errors");
    let reply = request(&mut socket, json!({"type": "ping", "id": "alive"})).await?;
    assert_eq!((reply["type"].as_str(), reply["id"].as_str()), (Some("ok"), Some("alive")), "the connection survived");

    // Beyond the hard limit the frame cannot even be read: the server closes with 1009.
    socket.send(Message::Text("y".repeat(20_000).into())).await?;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|frame| u16::from(frame.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await?;
    // Usually the close frame with 1009 arrives; the rest of the unread payload can make the
    // server's kernel reset the connection first, which is also a clean end, never a hang.
    assert!(ended.is_none_or(|code| code == 1009), "closed with {ended:?}");
    assert!(instance.handle.metrics.frames_refused.load(Ordering::Relaxed) >= 7);

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn activity_is_debounced_into_one_event_per_interval() -> Result<()> {
    let world = World::new().await?;
    let interval = Duration::from_secs(3);
    let mut config = world.config();
    config.activity_debounce = interval;
    let instance = world.instance(config).await?;
    let mut tap = EventTap::new(&world).await?;
    let alice = unique("alice");
    let session = new_session_id();
    world.put_session(&session, &alice, "running", json!({}));
    let (mut socket, _) = connect(&instance, &world.token(&alice, &[])).await?;

    let started = tokio::time::Instant::now();
    let mut debounced = Vec::new();
    for index in 0..10 {
        let reply = request(&mut socket, json!({"type": "activity", "id": format!("a{index}"), "session": session})).await?;
        assert_eq!(reply["type"], "ok", "{reply}");
        debounced.push(reply["debounced"].as_bool().context("debounced flag")?);
    }
    assert!(started.elapsed() < interval, "the burst must fit in one interval for this test to mean anything");
    assert!(!debounced[0], "the first activity is published at once");
    assert_eq!(debounced.iter().filter(|folded| !**folded).count(), 1, "{debounced:?}");
    let first_burst = tap.collect(&session, interval.saturating_sub(started.elapsed()).saturating_sub(Duration::from_millis(200))).await;
    assert_eq!(first_burst.len(), 1, "one event for the burst");

    tokio::time::sleep_until(started + interval + Duration::from_millis(300)).await;
    for index in 0..5 {
        request(&mut socket, json!({"type": "activity", "id": format!("b{index}"), "session": session})).await?;
    }
    let second_burst = tap.collect(&session, Duration::from_millis(1500)).await;
    assert_eq!(second_burst.len(), 1, "one more event after the interval");
    assert!(second_burst.iter().chain(&first_burst).all(|event| event.event_type == "session.activity"));

    // A socket that merely stays open publishes nothing.
    let quiet = tap.collect(&session, Duration::from_millis(1500)).await;
    assert!(quiet.is_empty(), "an open socket is not activity");

    tap.finish().await;
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

/// "Keep working" is never debounced: each frame is one `session.keepalive` (the engine bounds how
/// many count), and it is no `session.activity`.
#[tokio::test]
async fn keepalive_frames_are_each_published_as_session_keepalive() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let mut tap = EventTap::new(&world).await?;
    let alice = unique("alice");
    let session = new_session_id();
    world.put_session(&session, &alice, "running", json!({}));
    let (mut socket, _) = connect(&instance, &world.token(&alice, &[])).await?;
    for index in 0..3 {
        let reply = request(&mut socket, json!({"type": "keepalive", "id": format!("k{index}"), "session": session})).await?;
        assert_eq!((reply["type"].as_str(), reply["session"].as_str()), (Some("ok"), Some(session.as_str())), "{reply}");
    }
    let events = tap.collect(&session, Duration::from_millis(1500)).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().all(|event| event.event_type == "session.keepalive" && event.extension("userid") == Some(alice.as_str())));
    let bob = unique("bob");
    let (mut other, _) = connect(&instance, &world.token(&bob, &[])).await?;
    let refused = request(&mut other, json!({"type": "keepalive", "id": "x", "session": session})).await?;
    assert_eq!(refused["code"], "not_found", "{refused}");
    assert!(tap.collect(&session, Duration::from_millis(500)).await.is_empty());
    tap.finish().await;
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn rate_and_connection_limits_refuse_cleanly() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.max_messages_per_second = 5;
    config.max_connections_per_user = 2;
    let instance = world.instance(config).await?;
    let alice = unique("alice");
    let token = world.token(&alice, &[]);
    let (mut socket, _) = connect(&instance, &token).await?;

    for index in 0..20 {
        socket.send(Message::Text(json!({"type": "ping", "id": format!("p{index}")}).to_string().into())).await?;
    }
    let mut codes = HashMap::<String, usize>::new();
    let mut reply_ids = Vec::new();
    for _ in 0..20 {
        let reply = next_frame(&mut socket).await?;
        let label = reply["code"].as_str().unwrap_or("ok").to_owned();
        *codes.entry(label).or_default() += 1;
        reply_ids.push(reply["id"].as_str().unwrap_or_default().to_owned());
    }
    let expected_ids: Vec<String> = (0..20).map(|index| format!("p{index}")).collect();
    assert_eq!(reply_ids, expected_ids, "one reply per request, in order, refused ones included");
    assert!(codes.get("rate_limited").copied().unwrap_or(0) >= 10, "{codes:?}");
    assert!(codes.get("ok").copied().unwrap_or(0) >= 5, "{codes:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(request(&mut socket, json!({"type": "ping", "id": "later"})).await?["type"], "ok", "the budget refills");

    let (_second, _) = connect(&instance, &token).await?;
    let refused = try_connect(&instance, TokenIn::Header(&token)).await.expect_err("a third connection is over the limit");
    assert_eq!(status_of_refused_upgrade(&refused), Some(429));
    socket.close(None).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let third = loop {
        match try_connect(&instance, TokenIn::Header(&token)).await {
            Ok(socket) => break socket,
            Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(error) => bail!("slot was not given back: {error}"),
        }
    };
    drop(third);

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn heartbeats_drop_dead_sockets_and_keep_live_ones() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.heartbeat_interval = Duration::from_millis(200);
    config.heartbeat_timeout = Duration::from_millis(1000);
    let instance = world.instance(config).await?;
    let (mut live, _) = connect(&instance, &world.token(&unique("alice"), &[])).await?;
    let (_dead, _) = connect(&instance, &world.token(&unique("bob"), &[])).await?;

    // The live client keeps reading (and so answers pings); the dead one never polls its socket.
    let reader = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, live.next()).await {}
        live
    });
    let mut live = reader.await?;
    assert_eq!(instance.handle.hub.connection_count(), 1, "only the dead socket was dropped");
    assert_eq!(instance.handle.metrics.sockets_dropped_heartbeat.load(Ordering::Relaxed), 1);
    assert_eq!(request(&mut live, json!({"type": "ping", "id": "still"})).await?["type"], "ok");

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn http_endpoints_and_shutdown() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let alice = unique("alice");

    assert_eq!(http_get(instance.address, "/healthz", None).await?.0, 200);
    let (status, body) = http_get(instance.address, "/readyz", None).await?;
    assert_eq!(status, 200, "{body}");
    // Readiness tells whether Redis would keep thred state across its own restart.
    let client = redis::Client::open(dev_profile().services.redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let appendonly: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(&mut redis).await?;
    let readiness: Value = serde_json::from_str(&body)?;
    assert_eq!(readiness["redis_append_only"], json!(appendonly.get(1).map(String::as_str) == Some("yes")), "{body}");
    let (mut socket, _) = connect(&instance, &world.token(&alice, &[])).await?;
    let (status, metrics) = http_get(instance.address, "/metrics", Some(METRICS_TOKEN)).await?;
    assert_eq!(status, 200);
    for line in ["berth_session_connections_open 1", "berth_session_connections_total 1", "berth_session_auth_failures_total 0"] {
        assert!(metrics.lines().any(|candidate| candidate == line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("# TYPE berth_session_notifications_delivered counter"));
    assert!(metrics.lines().any(|line| line.starts_with("berth_session_bus_connections_total ")), "the bus's counters too: {metrics}");

    // Shutdown says goodbye to connected sockets with 1001.
    instance.shutdown().await?;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|frame| u16::from(frame.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await?;
    assert_eq!(closed, Some(1001));
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn berth_token_and_the_agent_agree_through_the_machine_secret_file() -> Result<()> {
    let world = World::new().await?;
    let root = std::env::temp_dir().join(unique("berth-session-profile"));
    let mut profile = dev_profile();
    profile.services.workspace_root = root.join("workspaces");
    // A variable nobody sets, so the key comes from `<parent of workspace_root>/jwt-secret`.
    profile.session.jwt_key_env = format!("BERTH_TEST_UNSET_{}", uuid::Uuid::new_v4().simple()).to_uppercase();
    let alice = unique("alice");

    let token = session::mint_token(&profile, &alice, &["admin".to_owned()], "1h")?;
    assert!(!token.contains(char::is_whitespace));
    assert!(root.join("jwt-secret").exists(), "the secret file was created next to the workspace root");
    let mut config = SessionConfig::from_profile(&profile)?;
    config.store = world.config().store;
    config.events_exchange = world.events_exchange.clone();
    let identity = config.authority.verify(&token)?;
    assert!(identity.is_admin());
    let instance = world.instance(config).await?;
    let (_socket, snapshot) = connect(&instance, &token).await?;
    assert_eq!(snapshot["roles"], json!(["admin"]));
    assert!(session::mint_token(&profile, &alice, &[], "forever").is_err(), "a bad ttl is refused");

    instance.shutdown().await?;
    std::fs::remove_dir_all(&root)?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn a_public_key_verifies_es256_tokens_and_refuses_algorithm_confusion() -> Result<()> {
    let world = World::new().await?;
    let public_pem = include_str!("keys/ec-public.pem");
    let mut config = SessionConfig::with_key(&dev_profile(), &KeyMaterial::inline(public_pem))?;
    config.store = world.config().store;
    config.events_exchange = world.events_exchange.clone();
    let instance = world.instance(config).await?;
    let carol = unique("carol");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let claims = json!({"sub": carol, "aud": "berth", "exp": now + 600, "roles": ["admin"]});

    let private_key = jsonwebtoken::EncodingKey::from_ec_pem(include_str!("keys/ec-private.pem").as_bytes())?;
    let signed = jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &claims, &private_key)?;
    let (_socket, snapshot) = connect(&instance, &signed).await?;
    assert_eq!(snapshot["user"], Value::String(carol.clone()));

    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(public_pem.trim().as_bytes()),
    )?;
    let refused = try_connect(&instance, TokenIn::Header(&confused)).await.expect_err("HS256 signed with the public key");
    assert_eq!(status_of_refused_upgrade(&refused), Some(401));

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn losing_the_notification_queue_recovers_with_a_new_one() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let alice = unique("alice");
    let session = new_session_id();
    let (mut socket, _) = connect(&instance, &world.token(&alice, &[])).await?;
    let original_queue = instance.handle.hub.current_queue().await.context("a queue is installed")?;

    // The broker drops the queue (as after a broker restart): the consumer must start over.
    world.bus.delete_queue(&original_queue).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    let replacement = loop {
        match instance.handle.hub.current_queue().await {
            Some(queue) if queue != original_queue => break queue,
            _ if tokio::time::Instant::now() > deadline => bail!("no replacement queue"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_ne!(replacement, original_queue);
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(instance.address, "/readyz", None).await?.0 != 200 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The connected user was rebound to the new queue.
    world.bus.publish_notification(&notification(&alice, &session, "running", json!({}))).await?;
    let status = next_frame(&mut socket).await?;
    assert_eq!((status["type"].as_str(), status["session"].as_str()), (Some("status"), Some(session.as_str())));

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn activity_debouncing_holds_across_instances() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.activity_debounce = Duration::from_secs(5);
    let first = world.instance(config.clone()).await?;
    let second = world.instance(config).await?;
    let mut tap = EventTap::new(&world).await?;
    let alice = unique("alice");
    let session = new_session_id();
    world.put_session(&session, &alice, "running", json!({}));
    let token = world.token(&alice, &[]);
    let (mut on_first, _) = connect(&first, &token).await?;
    let (mut on_second, _) = connect(&second, &token).await?;

    let mut folded = Vec::new();
    for index in 0..4 {
        let socket = if index % 2 == 0 { &mut on_first } else { &mut on_second };
        let reply = request(socket, json!({"type": "activity", "id": format!("a{index}"), "session": session})).await?;
        folded.push(reply["debounced"].as_bool().context("debounced flag")?);
    }
    assert_eq!(folded, [false, true, true, true], "the second instance folds into the first one's event");
    assert_eq!(tap.collect(&session, Duration::from_millis(1500)).await.len(), 1);

    tap.finish().await;
    first.shutdown().await?;
    second.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn a_socket_is_closed_when_its_token_expires() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let claims = json!({"sub": unique("alice"), "aud": "berth", "exp": now + 2});
    let short_lived =
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(world.secret.as_bytes()))?;
    let (mut socket, _) = connect(&instance, &short_lived).await?;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|frame| (u16::from(frame.code), frame.reason.to_string())),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await?;
    assert_eq!(closed, Some((1008, "token expired".to_owned())));
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn the_hub_routes_by_user_and_evicts_a_socket_that_falls_behind() -> Result<()> {
    let world = World::new().await?;
    let metrics = Arc::new(session::metrics::Metrics::default());
    // No queue is installed, so attaching makes no broker calls: this exercises routing alone.
    let hub = session::hub::Hub::new(world.bus.clone(), metrics.clone(), 4);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let (_alice_connection, mut alice_frames) = hub.attach(&alice).await?;
    let (_bob_connection, mut bob_frames) = hub.attach(&bob).await?;
    let session = new_session_id();
    let for_alice = notification(&alice, &session, "running", json!({}));

    assert_eq!(hub.deliver(&for_alice.routing_key(), &for_alice.to_bytes()), 1);
    assert!(alice_frames.try_recv().is_ok());
    assert!(bob_frames.try_recv().is_err(), "bob gets nothing of alice's");
    // A body naming alice that arrived under bob's key is dropped, not delivered to either.
    assert_eq!(hub.deliver(&protocol::topology::user_routing_key(&bob), &for_alice.to_bytes()), 0);
    assert_eq!(hub.deliver(&for_alice.routing_key(), b"not json"), 0);

    // Alice stops reading: after the queue fills, her socket is told to close instead of going stale.
    let delivered: usize = (0..300).map(|_| hub.deliver(&for_alice.routing_key(), &for_alice.to_bytes())).sum();
    assert_eq!(delivered, 256);
    assert_eq!(metrics.notifications_dropped.load(Ordering::Relaxed), 1);
    let mut drained = 0;
    while alice_frames.recv().await.is_some() {
        drained += 1;
    }
    assert_eq!(drained, 256, "everything queued is still sent, then the channel ends");
    let for_bob = notification(&bob, &session, "idle", json!({}));
    assert_eq!(hub.deliver(&for_bob.routing_key(), &for_bob.to_bytes()), 1, "bob is unaffected");

    // An open waits for the notification its event caused, and only one to its own user.
    let awaited = hub.await_notification(&bob, "event-1");
    let mut for_alice_caused = notification(&alice, &session, "running", json!({}));
    for_alice_caused.cause = Some("event-1".into());
    hub.deliver(&for_alice_caused.routing_key(), &for_alice_caused.to_bytes());
    let mut unrelated = notification(&bob, &session, "running", json!({}));
    unrelated.cause = Some("event-2".into());
    hub.deliver(&unrelated.routing_key(), &unrelated.to_bytes());
    let mut answer = notification(&bob, &session, "materializing", json!({}));
    answer.cause = Some("event-1".into());
    let delivered = hub.deliver(&answer.routing_key(), &answer.to_bytes());
    assert_eq!(delivered, 1, "the answer is also an ordinary status push");
    assert_eq!(awaited.wait(Duration::from_secs(1)).await, Some(answer));
    // Nobody waits any more: a second notification with that cause is only a push.
    let never = hub.await_notification(&bob, "event-3");
    assert_eq!(never.wait(Duration::from_millis(50)).await, None);

    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn a_store_outage_is_reported_and_the_socket_keeps_working() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    // Nobody consumes this routing key: every store request times out.
    config.store = StoreRoute { exchange: String::new(), routing_key: unique("nobody-home"), timeout: Duration::from_millis(300) };
    let instance = world.instance(config).await?;
    let alice = unique("alice");
    let token = world.token(&alice, &[]);

    let (mut socket, snapshot) = connect(&instance, &token).await?;
    assert!(snapshot.get("sessions").is_none(), "{snapshot}");
    assert!(snapshot["error"].as_str().is_some_and(|error| error.contains("unavailable")), "{snapshot}");
    let reply = request(&mut socket, json!({"type": "close", "id": "c", "session": new_session_id()})).await?;
    assert_eq!((reply["code"].as_str(), reply["id"].as_str()), (Some("unavailable"), Some("c")), "{reply}");
    let (status, _) = http_get(instance.address, "/api/sessions", Some(&token)).await?;
    assert_eq!(status, 503);

    // Live status still flows, and the socket still answers.
    let session = new_session_id();
    world.bus.publish_notification(&notification(&alice, &session, "running", json!({}))).await?;
    assert_eq!(next_frame(&mut socket).await?["session"], Value::String(session));
    assert_eq!(request(&mut socket, json!({"type": "ping", "id": "p"})).await?["type"], "ok");

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

// ---- The edge (crate::edge): origins, the connection cap, header timeouts, the metrics token. ----

/// A WebSocket upgrade with an `Origin` header.
async fn connect_from(instance: &Instance, token: &str, origin: &str) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = instance.url().into_client_request()?;
    request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).expect("header"));
    request.headers_mut().insert("origin", HeaderValue::from_str(origin).expect("header"));
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

#[tokio::test]
async fn foreign_origins_are_refused_and_metrics_want_their_token() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.edge.allowed_origins = vec!["https://console.example.org".to_owned()];
    let instance = world.instance(config).await?;
    let token = world.token(&unique("alice"), &[]);

    match connect_from(&instance, &token, "https://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default())?;
            assert_eq!(body["error"], "forbidden_origin", "{body}");
        }
        other => bail!("a foreign origin must be refused with 403, got {:?}", other.map(|_| "an upgrade")),
    }
    // Listed, the agent's own (the console's), and none at all (not a browser) all pass.
    for origin in ["https://console.example.org".to_owned(), format!("http://{}", instance.address)] {
        let mut socket = connect_from(&instance, &token, &origin).await.with_context(|| format!("origin {origin}"))?;
        assert_eq!(next_frame(&mut socket).await?["type"], "snapshot");
        socket.close(None).await?;
    }
    let (mut socket, _) = connect(&instance, &token).await?;
    socket.close(None).await?;

    let (status, _) = http_get(instance.address, "/metrics", None).await?;
    assert_eq!(status, 401);
    let (status, _) = http_get(instance.address, "/metrics", Some("wrong-token")).await?;
    assert_eq!(status, 401);
    let (status, metrics) = http_get(instance.address, "/metrics", Some(METRICS_TOKEN)).await?;
    assert_eq!(status, 200);
    assert!(metrics.lines().any(|line| line == "berth_session_origins_refused_total 1"), "{metrics}");
    instance.shutdown().await?;

    // No token configured: there are no metrics to see.
    let mut config = world.config();
    config.edge.metrics_token = None;
    let instance = world.instance(config).await?;
    let (status, _) = http_get(instance.address, "/metrics", Some(METRICS_TOKEN)).await?;
    assert_eq!(status, 404);
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn half_a_request_line_is_disconnected_after_the_header_timeout() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.edge.header_read_timeout = Duration::from_secs(1);
    let instance = world.instance(config).await?;

    let mut slow = TcpStream::connect(instance.address).await?;
    slow.write_all(b"GET /healthz HT").await?;
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    // Hyper closes without an answer (or with a 408); either way the connection ends.
    let ended = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "the connection must be closed after the header timeout");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800) && waited < Duration::from_secs(4), "closed after {waited:?}");
    // An idle keep-alive connection is bounded the same way; a prompt client is served.
    let (status, body) = http_get(instance.address, "/healthz", None).await?;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn the_connection_cap_holds_under_two_thousand_idle_connections() -> Result<()> {
    const CAP: usize = 100;
    const FLOOD: usize = 2000;
    let world = World::new().await?;
    let mut config = world.config();
    config.edge.max_connections = CAP;
    let instance = world.instance(config).await?;

    // Each connection costs two descriptors in this process (client and server side); the
    // workspace forbids `unsafe`, so setrlimit is out: with a low limit, flood less and say so.
    let soft_limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    let flood = FLOOD.min(soft_limit.saturating_sub(300) / 2);
    if flood < FLOOD {
        eprintln!("open-files limit {soft_limit}: flooding with {flood} connections instead of {FLOOD}");
    }
    assert!(flood > 2 * CAP, "the open-files limit ({soft_limit}) is too low for this test");
    let mut streams = Vec::with_capacity(flood);
    for _ in 0..flood {
        streams.push(tokio::time::timeout(WAIT, TcpStream::connect(instance.address)).await.context("connect timed out")??);
    }
    // A refused connection gets its 503 at once; an accepted one hears nothing (it sent nothing).
    let reads = streams.into_iter().map(|mut stream| async move {
        let mut answer = Vec::new();
        match tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await {
            Err(_) => (Some(stream), None),
            Ok(_) => (None, Some(String::from_utf8_lossy(&answer).into_owned())),
        }
    });
    let outcomes = futures::future::join_all(reads).await;
    let mut accepted: Vec<TcpStream> = Vec::new();
    let mut refused = 0;
    for (stream, answer) in outcomes {
        match (stream, answer) {
            (Some(stream), _) => accepted.push(stream),
            (None, Some(answer)) => {
                assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("server_busy"), "{answer:?}");
                refused += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    assert_eq!(accepted.len(), CAP, "the cap must hold");
    assert_eq!(refused, flood - CAP);
    assert_eq!(instance.handle.metrics.connections_refused_busy.load(Ordering::Relaxed), (flood - CAP) as u64);
    // Held connections are unaffected: one of them is served.
    let held = &mut accepted[0];
    held.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, held.read_to_end(&mut answer)).await??;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    drop(accepted);
    // Once the flood is gone a new client is served (the server notices the closes promptly).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = http_get(instance.address, "/healthz", None).await?;
        if status == 200 {
            assert_eq!(body, "ok\n");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still refused: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

/// A raw HTTP request with a JSON body; returns the status and the body.
async fn http_send(address: SocketAddr, method: &str, path: &str, token: &str, body: &Value) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(address).await?;
    let body = body.to_string();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = text.split(' ').nth(1).context("no status")?.parse()?;
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The real engine with `limits.max_sessions_per_user = 1`: a second open is refused with a typed
/// `limit_exceeded` on the socket and 429 on the REST API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_over_the_users_limit_is_a_typed_refusal_through_the_real_engine() -> Result<()> {
    let world = World::new().await?;
    let mut profile = dev_profile();
    profile.apply_overrides(|name| std::env::var(name).ok());
    profile.limits.max_sessions_per_user = 1;
    let engine_config = engine::EngineConfig::isolated(&uuid::Uuid::now_v7().simple().to_string());
    engine::service::declare(&world.bus, &engine_config).await?;
    let pattern_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../patterns/workspace-session.json");
    let pattern = engine::load_pattern_file(std::path::Path::new(pattern_path))?;
    let running_engine = engine::Engine::connect(profile.clone(), vec![pattern], engine_config.clone()).await?;
    let (stop_engine, engine_stopped) = tokio::sync::oneshot::channel::<()>();
    let engine_task = tokio::spawn(async move {
        running_engine
            .serve(async move {
                let _ = engine_stopped.await;
            })
            .await
    });
    let mut config = world.config();
    config.events_exchange = engine_config.events_exchange.clone();
    config.notify_exchange = engine_config.notify_exchange.clone();
    let instance = world.instance(config).await?;
    let alice = unique("alice");
    let token = world.token(&alice, &[]);
    let (mut tab, _) = connect(&instance, &token).await?;

    let reply = request_skipping_status(&mut tab, json!({"type": "open", "id": "a", "workspace": "thesis", "profile": "dev"})).await?;
    assert_eq!((reply["type"].as_str(), reply["joined"].as_bool()), (Some("ok"), Some(false)), "{reply}");
    let reply = request_skipping_status(&mut tab, json!({"type": "open", "id": "b", "workspace": "essay", "profile": "dev"})).await?;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str(), reply["limit"].as_str()),
        (Some("error"), Some("limit_exceeded"), Some("sessions_per_user")),
        "{reply}"
    );
    assert_eq!(reply["id"], "b");

    let (status, body) =
        http_send(instance.address, "POST", "/api/sessions", &token, &json!({"workspace": "notes", "profile": "dev"})).await?;
    assert_eq!(status, 429, "{body}");
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!((body["error"].as_str(), body["limit"].as_str()), (Some("limit_exceeded"), Some("sessions_per_user")), "{body}");
    // Joining the live session is no new session: still allowed.
    let (status, body) = http_send(instance.address, "POST", "/api/sessions", &token, &json!({"workspace": "thesis"})).await?;
    assert_eq!(status, 200, "{body}");

    drop(tab);
    instance.shutdown().await?;
    let _ = stop_engine.send(());
    engine_task.await??;
    engine::service::teardown(&world.bus, &profile.services.redis_url, &engine_config).await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn usage_is_read_from_the_store_for_the_caller_or_by_an_admin() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let alice = unique("alice");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let id = format!("{alice}/{today}");
    let document = json!({"id": id, "user": alice, "profile": "dev", "period": today, "running_secs": 120.0, "idle_secs": 30.0,
                          "cpu_secs": 240.0, "gib_secs": 60.0, "cost": 0.25});
    world.table.lock().expect("table").insert(id, document);

    let token = world.token(&alice, &[]);
    let (status, body) = http_get(instance.address, "/api/usage?period=day", Some(&token)).await?;
    assert_eq!(status, 200, "{body}");
    let usage: Value = serde_json::from_str(&body)?;
    assert_eq!(
        (usage["period"].as_str(), usage["cost"].as_f64(), usage["running_secs"].as_f64()),
        (Some(today.as_str()), Some(0.25), Some(120.0)),
        "{usage}"
    );
    // Nothing metered this month (in the test table): zeros, not an error.
    let (status, body) = http_get(instance.address, "/api/usage?period=month", Some(&token)).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body)?["cost"], json!(0.0));
    let (status, _) = http_get(instance.address, "/api/usage?period=year", Some(&token)).await?;
    assert_eq!(status, 400);
    let bob = world.token(&unique("bob"), &[]);
    let (status, _) = http_get(instance.address, &format!("/api/usage?user={alice}"), Some(&bob)).await?;
    assert_eq!(status, 403);
    let admin = world.token(&unique("root"), &["admin"]);
    let (status, body) = http_get(instance.address, &format!("/api/usage?user={alice}&period=day"), Some(&admin)).await?;
    assert_eq!((status, serde_json::from_str::<Value>(&body)?["cost"].as_f64()), (200, Some(0.25)), "{body}");
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

#[tokio::test]
async fn a_stalled_request_body_is_disconnected_after_the_idle_timeout() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.edge.idle_timeout = Duration::from_secs(1);
    let instance = world.instance(config).await?;

    let mut stalled = TcpStream::connect(instance.address).await?;
    // The whole head of an authenticated request (an unauthenticated one is refused before its
    // body is read), then 10 of the 100 bytes it announces, then nothing.
    let token = world.token(&unique("alice"), &[]);
    let head = format!(
        "POST /api/sessions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"workspac"
    );
    stalled.write_all(head.as_bytes()).await?;
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(6), stalled.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "a connection that stopped moving bytes must be closed");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800) && waited < Duration::from_secs(5), "closed after {waited:?}");
    // An upgraded socket is no longer HTTP: quiet for longer than the idle timeout, it stays.
    let (mut socket, _) = connect(&instance, &world.token(&unique("alice"), &[])).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reply = request_skipping_status(&mut socket, json!({"type": "ping", "id": "p"})).await?;
    assert_eq!(reply["type"], "ok", "{reply}");
    drop(socket);
    let (status, _) = http_get(instance.address, "/healthz", None).await?;
    assert_eq!(status, 200);
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}
