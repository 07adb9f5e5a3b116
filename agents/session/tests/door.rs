//! The HTTP twin of the protocol, the files API and the terminal, against the real RabbitMQ,
//! Redis and Docker: a persistence responder on a private queue serves a test table of sessions,
//! a fake engine answers opens on the test's own events exchange, and terminals attach to a real
//! busybox container made by the test (labelled, removed at the end).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use protocol::bus::{Acks, AutoDelete, Durability, ExchangeKind};
use protocol::events::{InputSource, SessionActivity, SessionClose, SessionKeepalive, SessionOpen};
use protocol::{Bus, BusConfig, CloudEvent, ConsumeSpec, Notification, Outcome, Profile, Task};
use serde_json::{json, Value};
use session::{KeyMaterial, SessionConfig, StoreRoute};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);
const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const TEST_LABEL: &str = "berth.test";
const IMAGE: &str = "berth-test/busybox:latest";

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn dev_profile() -> Profile {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../run-profiles/dev/profile.toml");
    let text = std::fs::read_to_string(path).expect("dev profile");
    Profile::parse(&text, std::path::Path::new(path)).expect("dev profile parses")
}

type Table = Arc<Mutex<HashMap<String, Value>>>;

/// A broker connection, a persistence responder, an events exchange of the test's own, a fake
/// engine answering opens, and a scratch workspace root.
struct World {
    bus: Bus,
    events_exchange: String,
    table: Table,
    store_queue: String,
    engine_queue: String,
    opens: Arc<Mutex<Vec<CloudEvent>>>,
    secret: String,
    root: PathBuf,
    stop_responder: Option<tokio::sync::oneshot::Sender<()>>,
}

impl World {
    async fn new() -> Result<World> {
        let bus = Bus::connect(BusConfig::new(AMQP_URL, "session-door-tests")).await?;
        bus.declare_topology().await?;
        let store_queue = bus.declare_private_queue(protocol::topology::TASKS_EXCHANGE, &[]).await?;
        let table: Table = Arc::default();
        let (stop_responder, stopped) = tokio::sync::oneshot::channel::<()>();
        {
            let responder_table = table.clone();
            let queue = store_queue.clone();
            tokio::spawn(async move {
                let bus = match Bus::connect(BusConfig::new(AMQP_URL, "session-door-store")).await {
                    Ok(bus) => bus,
                    Err(_) => return,
                };
                let replier = bus.clone();
                let handler = move |incoming: protocol::Incoming| {
                    let bus = replier.clone();
                    let table = responder_table.clone();
                    async move {
                        let reply = answer_store_request(&table, &incoming.body);
                        let _ = bus.reply(&incoming, &serde_json::to_vec(&reply).unwrap_or_default()).await;
                        Outcome::Ack
                    }
                };
                let _ = bus
                    .consume(ConsumeSpec::new(&queue, 16), handler, async move {
                        let _ = stopped.await;
                    })
                    .await;
                bus.close().await;
            });
        }
        let events_exchange = unique("berth.test.door-events");
        bus.declare_exchange(&events_exchange, ExchangeKind::Topic, Durability::Transient, AutoDelete::Never).await?;
        let (engine_queue, opens) = fake_engine(&bus, &events_exchange, table.clone()).await?;
        let root = std::env::temp_dir().join(unique("berth-door"));
        std::fs::create_dir_all(&root)?;
        Ok(World {
            bus,
            events_exchange,
            table,
            store_queue,
            engine_queue,
            opens,
            secret: format!("test-secret-{}", uuid::Uuid::new_v4().simple()),
            root,
            stop_responder: Some(stop_responder),
        })
    }

    fn config(&self) -> SessionConfig {
        let mut config = SessionConfig::with_key(&dev_profile(), &KeyMaterial::inline(&self.secret)).expect("config");
        config.store = StoreRoute { exchange: String::new(), routing_key: self.store_queue.clone(), timeout: Duration::from_secs(5) };
        config.events_exchange = self.events_exchange.clone();
        config.activity_debounce = Duration::from_secs(1);
        config.max_messages_per_second = 1000;
        config.open_answer_timeout = Duration::from_secs(5);
        config.profile.services.workspace_root = self.root.clone();
        config
    }

    fn token(&self, user: &str) -> String {
        session::TokenAuthority::new(&KeyMaterial::inline(&self.secret), "berth")
            .expect("authority")
            .mint(user, &[], Duration::from_secs(600))
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

    fn opens_of(&self, workspace: &str) -> usize {
        self.opens
            .lock()
            .expect("opens")
            .iter()
            .filter(|event| event.data_as::<SessionOpen>().is_ok_and(|open| open.workspace == workspace))
            .count()
    }

    async fn instance(&self, config: SessionConfig) -> Result<Instance> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_handle, running) = session::start(config, self.bus.clone(), listener, async move {
            let _ = stopped.await;
        })
        .await?;
        let task = tokio::spawn(running);
        Ok(Instance { address, stop: Some(stop), task: Some(task) })
    }

    async fn finish(mut self) {
        if let Some(stop) = self.stop_responder.take() {
            let _ = stop.send(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = self.bus.delete_queue(&self.store_queue).await;
        let _ = self.bus.delete_queue(&self.engine_queue).await;
        let _ = self.bus.delete_exchange(&self.events_exchange).await;
        self.bus.close().await;
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Answers `session.open` like the engine: the first open of a (user, workspace) starts that
/// session (`materializing`, recorded in the table), later ones join it (`running`).
async fn fake_engine(bus: &Bus, events_exchange: &str, table: Table) -> Result<(String, Arc<Mutex<Vec<CloudEvent>>>)> {
    let queue = bus.declare_private_queue(events_exchange, &["session.open".to_owned()]).await?;
    let mut subscription = bus.subscribe(&queue, Acks::Automatic).await?;
    let opens: Arc<Mutex<Vec<CloudEvent>>> = Arc::default();
    let seen = opens.clone();
    let publisher = bus.clone();
    tokio::spawn(async move {
        let mut live: HashMap<(String, String), String> = HashMap::new();
        while let Some(Ok(delivery)) = subscription.next().await {
            let Ok(event) = CloudEvent::parse(&delivery.body, 1 << 20) else { continue };
            seen.lock().expect("opens").push(event.clone());
            let user = event.extension("userid").unwrap_or_default().to_owned();
            let workspace = event.data_as::<SessionOpen>().map(|open| String::from(open.workspace)).unwrap_or_default();
            let requested = event.subject.clone().unwrap_or_default();
            let (session, state, detail) = match live.get(&(user.clone(), workspace.clone())) {
                Some(live_session) => (live_session.clone(), "running", json!({"joined": true})),
                None => {
                    live.insert((user.clone(), workspace.clone()), requested.clone());
                    let record = json!({"id": requested, "user": user, "state": "materializing", "workspace": workspace, "profile": "dev",
                                        "created": chrono::Utc::now().to_rfc3339()});
                    table.lock().expect("table").insert(requested.clone(), record);
                    (requested, "materializing", json!({}))
                }
            };
            let mut answer = notification(&user, &session, state, detail);
            answer.cause = Some(event.id.clone());
            let _ = publisher.publish_notification(&answer).await;
        }
    });
    Ok((queue, opens))
}

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

struct Instance {
    address: SocketAddr,
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
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One HTTP/1.1 exchange on a fresh connection.
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How a request's body is sent.
enum Upload<'a> {
    None,
    Bytes(&'a [u8]),
    /// `Transfer-Encoding: chunked` in pieces of this many bytes: no length known in advance.
    Chunked(&'a [u8], usize),
}

async fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    extra_headers: &[(&str, &str)],
    upload: Upload<'_>,
) -> Result<Reply> {
    let mut stream = TcpStream::connect(address).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match &upload {
        Upload::None => head.push_str("Content-Length: 0\r\n"),
        Upload::Bytes(bytes) => head.push_str(&format!("Content-Length: {}\r\n", bytes.len())),
        Upload::Chunked(..) => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    match upload {
        Upload::None => {}
        Upload::Bytes(bytes) => stream.write_all(bytes).await?,
        Upload::Chunked(bytes, piece) => {
            for chunk in bytes.chunks(piece) {
                // The server may answer (and close) before the whole body is sent.
                if stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.is_err()
                    || stream.write_all(chunk).await.is_err()
                    || stream.write_all(b"\r\n").await.is_err()
                {
                    break;
                }
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
        }
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await.context("no response in time")?;
    let split = response.windows(4).position(|window| window == b"\r\n\r\n").context("no header end")?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut raw_body = response[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines.next().context("no status line")?.split(' ').nth(1).context("no status")?.parse()?;
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    if headers.get("transfer-encoding").is_some_and(|value| value.contains("chunked")) {
        raw_body = dechunk(&raw_body)?;
    }
    Ok(Reply { status, headers, body: raw_body })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|window| window == b"\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end])?.split(';').next().unwrap_or("0").trim(), 16)?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(raw.get(..size).context("short chunk")?);
        raw = raw.get(size + 2..).context("chunk end")?;
    }
}

/// Session events on the test's exchange.
async fn tap(world: &World) -> Result<(String, tokio::sync::mpsc::UnboundedReceiver<CloudEvent>)> {
    let keys = ["session.open", "session.close", "session.activity", "session.keepalive"].map(str::to_owned);
    let queue = world.bus.declare_private_queue(&world.events_exchange, &keys).await?;
    let mut subscription = world.bus.subscribe(&queue, Acks::Automatic).await?;
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
    Ok((queue, events))
}

async fn expect_event(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<CloudEvent>,
    session: &str,
    event_type: &str,
) -> Result<CloudEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .with_context(|| format!("no {event_type} in time"))?
            .context("tap ended")?;
        if event.subject.as_deref() == Some(session) && event.event_type == event_type {
            return Ok(event);
        }
    }
}

#[tokio::test]
async fn the_http_api_runs_a_session_life_cycle_and_honours_idempotency_keys() -> Result<()> {
    let world = World::new().await?;
    let instance = world.instance(world.config()).await?;
    let (tap_queue, mut events) = tap(&world).await?;
    let address = instance.address;
    let alice = unique("alice");
    let bob = unique("bob");
    let alice_token = world.token(&alice);
    let bob_token = world.token(&bob);

    let refused = http(address, "POST", "/api/sessions", None, &[], Upload::Bytes(br#"{"workspace":"w1"}"#)).await?;
    assert_eq!((refused.status, refused.json()["error"].as_str()), (401, Some("unauthorized")));
    let bad = http(address, "POST", "/api/sessions", Some(&alice_token), &[], Upload::Bytes(br#"{"workspace":"../w"}"#)).await?;
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("bad_request")), "{}", bad.text());
    let bad = http(address, "POST", "/api/sessions", Some(&alice_token), &[], Upload::Bytes(br#"{"workspace":"w1","user":"bob"}"#)).await?;
    assert_eq!(bad.status, 400, "a body cannot name the user: {}", bad.text());
    let bad =
        http(address, "POST", "/api/sessions", Some(&alice_token), &[], Upload::Bytes(br#"{"workspace":"w1","profile":"prod"}"#)).await?;
    assert_eq!((bad.status, bad.json()["error"].as_str()), (400, Some("bad_request")));

    // Open: a new session, then a second open joins it.
    let opened = http(address, "POST", "/api/sessions", Some(&alice_token), &[], Upload::Bytes(br#"{"workspace":"w1"}"#)).await?;
    assert_eq!(opened.status, 201, "{}", opened.text());
    let body = opened.json();
    let session = body["session"].as_str().context("session")?.to_owned();
    assert_eq!((body["state"].as_str(), body["joined"].as_bool()), (Some("materializing"), Some(false)));
    assert_eq!(opened.headers.get("location").map(String::as_str), Some(format!("/api/sessions/{session}").as_str()));
    let open_event = expect_event(&mut events, &session, "session.open").await?;
    assert_eq!(open_event.extension("userid"), Some(alice.as_str()));
    let joined =
        http(address, "POST", "/api/sessions", Some(&alice_token), &[], Upload::Bytes(br#"{"workspace":"w1","profile":"dev"}"#)).await?;
    assert_eq!(joined.status, 200, "{}", joined.text());
    assert_eq!(joined.json(), json!({"session": session, "state": "running", "joined": true}));

    // Read it, alone and in the list; bob sees nothing of it.
    let listed = http(address, "GET", "/api/sessions", Some(&alice_token), &[], Upload::None).await?;
    let sessions = listed.json()["sessions"].as_array().cloned().unwrap_or_default();
    assert!(sessions.iter().any(|status| status["session"] == session.as_str()), "{}", listed.text());
    let read = http(address, "GET", &format!("/api/sessions/{session}"), Some(&alice_token), &[], Upload::None).await?;
    assert_eq!(
        (read.status, read.json()["state"].as_str(), read.json()["user"].as_str()),
        (200, Some("materializing"), Some(alice.as_str()))
    );
    let hidden = http(address, "GET", &format!("/api/sessions/{session}"), Some(&bob_token), &[], Upload::None).await?;
    let missing = http(address, "GET", &format!("/api/sessions/{}", uuid::Uuid::now_v7()), Some(&bob_token), &[], Upload::None).await?;
    assert_eq!((hidden.status, hidden.json()["error"].as_str()), (404, Some("not_found")));
    assert_eq!(missing.status, 404);
    assert_eq!(hidden.json()["message"], format!("no session {session} among yours"), "another user's session looks missing");
    let not_an_id = http(address, "GET", "/api/sessions/.nope", Some(&alice_token), &[], Upload::None).await?;
    assert_eq!(not_an_id.status, 400);

    // Activity, debounced like the socket's; bob's is refused and publishes nothing.
    let activity = http(address, "POST", &format!("/api/sessions/{session}/activity"), Some(&alice_token), &[], Upload::None).await?;
    assert_eq!(activity.json(), json!({"session": session, "debounced": false}));
    let event = expect_event(&mut events, &session, "session.activity").await?;
    assert_eq!(event.data_as::<SessionActivity>()?.source, InputSource::Api);
    let again = http(address, "POST", &format!("/api/sessions/{session}/activity"), Some(&alice_token), &[], Upload::None).await?;
    assert_eq!(again.json()["debounced"], true);
    let foreign = http(address, "POST", &format!("/api/sessions/{session}/activity"), Some(&bob_token), &[], Upload::None).await?;
    assert_eq!(foreign.status, 404);
    // "Keep working": every keep-alive is published (the engine bounds how many count).
    for _ in 0..2 {
        let kept = http(address, "POST", &format!("/api/sessions/{session}/keepalive"), Some(&alice_token), &[], Upload::None).await?;
        assert_eq!((kept.status, kept.json()), (202, json!({"session": session})));
        let event = expect_event(&mut events, &session, "session.keepalive").await?;
        assert_eq!((event.data_as::<SessionKeepalive>()?.source, event.extension("userid")), (InputSource::Api, Some(alice.as_str())));
    }
    let foreign = http(address, "POST", &format!("/api/sessions/{session}/keepalive"), Some(&bob_token), &[], Upload::None).await?;
    assert_eq!(foreign.status, 404);
    let foreign = http(address, "DELETE", &format!("/api/sessions/{session}"), Some(&bob_token), &[], Upload::None).await?;
    assert_eq!(foreign.status, 404);

    // Close.
    let closed =
        http(address, "DELETE", &format!("/api/sessions/{session}?reason=done%20for%20today"), Some(&alice_token), &[], Upload::None)
            .await?;
    assert_eq!((closed.status, closed.json()), (202, json!({"session": session})));
    let close_event = expect_event(&mut events, &session, "session.close").await?;
    assert_eq!(
        (close_event.data_as::<SessionClose>()?.reason.as_deref(), close_event.extension("userid")),
        (Some("done for today"), Some(alice.as_str()))
    );

    // Idempotency-Key: the repeat answers the same and sends nothing; another body is refused.
    let key = [("Idempotency-Key", "open-w2-0001")];
    let first = http(address, "POST", "/api/sessions", Some(&alice_token), &key, Upload::Bytes(br#"{"workspace":"w2"}"#)).await?;
    assert_eq!(first.status, 201, "{}", first.text());
    let repeat = http(address, "POST", "/api/sessions", Some(&alice_token), &key, Upload::Bytes(br#"{"workspace":"w2"}"#)).await?;
    assert_eq!((repeat.status, repeat.json()), (201, first.json()), "the repeat answers what the first got, joined: false included");
    assert_eq!(repeat.headers.get("idempotent-replayed").map(String::as_str), Some("true"));
    let other_body = http(address, "POST", "/api/sessions", Some(&alice_token), &key, Upload::Bytes(br#"{"workspace":"w3"}"#)).await?;
    assert_eq!((other_body.status, other_body.json()["error"].as_str()), (409, Some("conflict")));
    // The same key is bob's own: keys are per user.
    let bobs = http(address, "POST", "/api/sessions", Some(&bob_token), &key, Upload::Bytes(br#"{"workspace":"w2"}"#)).await?;
    assert_eq!(bobs.status, 201);
    assert_ne!(bobs.json()["session"], first.json()["session"]);
    // Two requests with one fresh key at once: one open.
    let racing_key = [("Idempotency-Key", "open-w4-race")];
    let (left, right) = tokio::join!(
        http(address, "POST", "/api/sessions", Some(&alice_token), &racing_key, Upload::Bytes(br#"{"workspace":"w4"}"#)),
        http(address, "POST", "/api/sessions", Some(&alice_token), &racing_key, Upload::Bytes(br#"{"workspace":"w4"}"#)),
    );
    let (left, right) = (left?, right?);
    assert_eq!((left.status, right.status), (201, 201), "{} / {}", left.text(), right.text());
    assert_eq!(left.json(), right.json());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(world.opens_of("w2"), 2, "alice's w2 once, bob's w2 once");
    assert_eq!(world.opens_of("w4"), 1);
    let bad_key = http(
        address,
        "POST",
        "/api/sessions",
        Some(&alice_token),
        &[("Idempotency-Key", "has space")],
        Upload::Bytes(br#"{"workspace":"w5"}"#),
    )
    .await?;
    assert_eq!(bad_key.status, 400);

    // The document is served, and is the committed one.
    let document = http(address, "GET", "/api/openapi.json", None, &[], Upload::None).await?;
    assert_eq!(document.status, 200);
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))?;
    assert_eq!(document.text(), committed);

    let _ = world.bus.delete_queue(&tap_queue).await;
    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

/// A session in `state` whose directory exists under the world's root; returns its directory.
fn session_with_directory(world: &World, config: &SessionConfig, session: &str, user: &str, state: &str) -> Result<PathBuf> {
    world.put_session(session, user, state, json!({}));
    let directory = config.profile.session_dir(session);
    std::fs::create_dir_all(&directory)?;
    Ok(directory)
}

fn mkfifo(path: &Path) -> Result<()> {
    if !std::process::Command::new("mkfifo").arg(path).status()?.success() {
        bail!("mkfifo failed");
    }
    Ok(())
}

#[tokio::test]
async fn the_files_api_reads_writes_and_refuses_what_path_safety_refuses() -> Result<()> {
    let world = World::new().await?;
    let mut config = world.config();
    config.profile.workspace.quota_mib = 1;
    // A plain directory: an image of its own needs a workspace agent that may mount (root).
    config.profile.workspace.filesystem = protocol::profile::WorkspaceFilesystem::Directory;
    let alice = unique("alice");
    let session = uuid::Uuid::now_v7().to_string();
    let directory = session_with_directory(&world, &config, &session, &alice, "running")?;
    let instance = world.instance(config).await?;
    let address = instance.address;
    let token = world.token(&alice);
    let files = format!("/api/sessions/{session}/files");
    let call = |method: &'static str, path: String, upload: Upload<'static>| {
        let token = token.clone();
        async move { http(address, method, &path, Some(&token), &[], upload).await }
    };

    // Upload (creating folders), read back, replace, list.
    let put = call("PUT", format!("{files}/notes/day%201/a.txt"), Upload::Bytes(b"hello")).await?;
    assert_eq!(put.status, 201, "{}", put.text());
    assert_eq!(
        (put.json()["path"].as_str(), put.json()["size"].as_u64(), put.json()["mode"].as_str()),
        (Some("notes/day 1/a.txt"), Some(5), Some("644"))
    );
    assert_eq!(std::fs::read(directory.join("notes/day 1/a.txt"))?, b"hello");
    let got = call("GET", format!("{files}/notes/day%201/a.txt"), Upload::None).await?;
    assert_eq!((got.status, got.body.as_slice()), (200, b"hello".as_slice()));
    assert_eq!(got.headers.get("content-type").map(String::as_str), Some("application/octet-stream"));
    let replaced = call("PUT", format!("{files}/notes/day%201/a.txt"), Upload::Chunked(b"hello again, streamed", 4)).await?;
    assert_eq!(replaced.status, 200, "{}", replaced.text());
    assert_eq!(std::fs::read(directory.join("notes/day 1/a.txt"))?, b"hello again, streamed");
    let own_uid = std::fs::metadata(&world.root).map(|metadata| std::os::unix::fs::MetadataExt::uid(&metadata))?;
    if own_uid == 0 {
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(directory.join("notes/day 1/a.txt"))?);
        assert_eq!(uid, 1000, "written as the container user, like materialize");
    }
    let listing = call("GET", format!("{files}/notes/day%201"), Upload::None).await?;
    assert_eq!(listing.status, 200, "{}", listing.text());
    let entries = listing.json()["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(
        (entry["name"].as_str(), entry["kind"].as_str(), entry["size"].as_u64(), entry["mode"].as_str()),
        (Some("a.txt"), Some("file"), Some(21), Some("644"))
    );
    assert!(entry["mtime"].as_str().is_some_and(|mtime| mtime.ends_with('Z')), "{entry}");
    let top = call("GET", files.clone(), Upload::None).await?;
    assert!(
        top.json()["entries"]
            .as_array()
            .is_some_and(|entries| entries.iter().any(|entry| entry["name"] == "notes" && entry["kind"] == "directory")),
        "{}",
        top.text()
    );

    // Folders, renames (never replacing), deletes.
    let made = call("POST", format!("{files}/deep/er?op=mkdir"), Upload::None).await?;
    assert_eq!(made.status, 201, "{}", made.text());
    assert!(directory.join("deep/er").is_dir());
    assert_eq!(call("POST", format!("{files}/deep/er?op=mkdir"), Upload::None).await?.status, 200);
    let renamed = call("POST", format!("{files}/notes/day%201/a.txt?op=rename&to=deep%2Fb.txt"), Upload::None).await?;
    assert_eq!((renamed.status, renamed.json()["path"].as_str()), (201, Some("deep/b.txt")), "{}", renamed.text());
    assert_eq!(call("GET", format!("{files}/notes/day%201/a.txt"), Upload::None).await?.status, 404);
    std::fs::write(directory.join("taken.txt"), b"mine")?;
    let onto = call("POST", format!("{files}/deep/b.txt?op=rename&to=taken.txt"), Upload::None).await?;
    assert_eq!((onto.status, onto.json()["error"].as_str()), (409, Some("conflict")));
    assert_eq!(std::fs::read(directory.join("taken.txt"))?, b"mine");
    let not_empty = call("DELETE", format!("{files}/deep"), Upload::None).await?;
    assert_eq!((not_empty.status, not_empty.json()["error"].as_str()), (409, Some("conflict")), "{}", not_empty.text());
    assert_eq!(call("DELETE", format!("{files}/deep/b.txt"), Upload::None).await?.status, 204);
    assert_eq!(call("DELETE", format!("{files}/deep?recursive=true"), Upload::None).await?.status, 204);
    assert!(!directory.join("deep").exists());
    assert_eq!(call("DELETE", format!("{files}/deep"), Upload::None).await?.status, 404);

    // `..`, raw or percent-encoded, and other hostile paths.
    for hostile in ["../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "a/./b", "a//b", "a%5Cb%5C..", "%00"] {
        let refused = call("GET", format!("{files}/{hostile}"), Upload::None).await?;
        assert_eq!((refused.status, refused.json()["error"].as_str()), (400, Some("bad_request")), "{hostile}: {}", refused.text());
        let refused = call("PUT", format!("{files}/{hostile}"), Upload::Bytes(b"x")).await?;
        assert_eq!(refused.status, 400, "{hostile}");
    }
    let refused = call("POST", format!("{files}/taken.txt?op=rename&to=..%2Fescaped"), Upload::None).await?;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(!directory.parent().context("parent")?.join("escaped").exists());

    // A symlink pointing outside is never followed: not read, not listed through, not written through.
    let outside = world.root.join("outside");
    std::fs::create_dir_all(&outside)?;
    std::fs::write(outside.join("secret"), b"host secret")?;
    std::os::unix::fs::symlink(&outside, directory.join("out"))?;
    std::os::unix::fs::symlink(outside.join("secret"), directory.join("secret-link"))?;
    for path in ["out", "out/secret", "secret-link"] {
        let refused = call("GET", format!("{files}/{path}"), Upload::None).await?;
        assert_eq!((refused.status, refused.json()["error"].as_str()), (403, Some("unsafe_path")), "{path}: {}", refused.text());
        assert!(!refused.text().contains("host secret"));
    }
    for path in ["out/new", "secret-link"] {
        let refused = call("PUT", format!("{files}/{path}"), Upload::Bytes(b"overwritten")).await?;
        assert_eq!((refused.status, refused.json()["error"].as_str()), (403, Some("unsafe_path")), "{path}: {}", refused.text());
    }
    assert_eq!(call("POST", format!("{files}/out/made?op=mkdir"), Upload::None).await?.status, 403);
    assert!(!outside.join("new").exists() && !outside.join("made").exists());
    assert_eq!(std::fs::read(outside.join("secret"))?, b"host secret");
    let listed = call("GET", files.clone(), Upload::None).await?;
    let link = listed.json()["entries"]
        .as_array()
        .and_then(|entries| entries.iter().find(|entry| entry["name"] == "out").cloned())
        .context("link listed")?;
    assert_eq!((link["kind"].as_str(), link["target"].as_str()), (Some("symlink"), outside.to_str()));
    // Deleting the link removes the link, not what it points to.
    assert_eq!(call("DELETE", format!("{files}/secret-link"), Upload::None).await?.status, 204);
    assert_eq!(std::fs::read(outside.join("secret"))?, b"host secret");

    // A FIFO is never opened (a read would hang), nor written.
    mkfifo(&directory.join("pipe"))?;
    let fifo = call("GET", format!("{files}/pipe"), Upload::None).await?;
    assert_eq!((fifo.status, fifo.json()["error"].as_str()), (403, Some("unsafe_path")));
    assert!(fifo.json()["message"].as_str().is_some_and(|message| message.contains("FIFO")), "{}", fifo.text());
    assert_eq!(call("PUT", format!("{files}/pipe"), Upload::Bytes(b"x")).await?.status, 403);
    // Berth's reserved name at the top.
    assert_eq!(call("PUT", format!("{files}/.berth/tree.json"), Upload::Bytes(b"{}")).await?.status, 403);

    // The quota (1 MiB here): declared or streamed, refused before anything lands.
    let big = vec![7u8; 1024 * 1024 + 1];
    let over = http(address, "PUT", &format!("{files}/big.bin"), Some(&token), &[], Upload::Bytes(&big)).await?;
    assert_eq!((over.status, over.json()["error"].as_str()), (507, Some("quota_exceeded")), "{}", over.text());
    let over = http(address, "PUT", &format!("{files}/big.bin"), Some(&token), &[], Upload::Chunked(&big, 64 * 1024)).await?;
    assert_eq!((over.status, over.json()["error"].as_str()), (507, Some("quota_exceeded")), "{}", over.text());
    assert!(!directory.join("big.bin").exists());
    let staging = world.root.join(dev_profile_deployment(&world)).join(".berth-staging").join(&session);
    assert_eq!(std::fs::read_dir(&staging).map(Iterator::count).unwrap_or(0), 0, "no staged leftovers");

    // Only the owner; only while the session is running or idle.
    let bob = world.token(&unique("bob"));
    let foreign = http(address, "GET", &format!("{files}/taken.txt"), Some(&bob), &[], Upload::None).await?;
    assert_eq!((foreign.status, foreign.json()["error"].as_str()), (404, Some("not_found")));
    let no_token = http(address, "GET", &format!("{files}/taken.txt"), None, &[], Upload::None).await?;
    assert_eq!(no_token.status, 401);
    world.put_session(&session, &alice, "stopping", json!({}));
    let late = call("PUT", format!("{files}/late.txt"), Upload::Bytes(b"x")).await?;
    assert_eq!((late.status, late.json()["error"].as_str()), (409, Some("conflict")));
    assert_eq!(call("GET", format!("{files}/taken.txt"), Upload::None).await?.body, b"mine", "reads go on while it stops");

    instance.shutdown().await?;
    world.finish().await;
    Ok(())
}

fn dev_profile_deployment(world: &World) -> String {
    world.config().profile.deployment()
}

/// A busybox container like a session's (sleeping instead of serving), labelled for cleanup.
async fn start_container(docker: &bollard::Docker, label: &str) -> Result<String> {
    use bollard::container::{Config, CreateContainerOptions, StartContainerOptions};
    let name = unique("berth-door-test");
    let config = Config {
        image: Some(IMAGE.to_owned()),
        cmd: Some(vec!["/bin/sleep".to_owned(), "3600".to_owned()]),
        labels: Some(HashMap::from([(TEST_LABEL.to_owned(), label.to_owned())])),
        ..Default::default()
    };
    let created = docker.create_container(Some(CreateContainerOptions { name: name.clone(), platform: None }), config).await?;
    docker.start_container(&created.id, None::<StartContainerOptions<String>>).await?;
    Ok(created.id)
}

async fn remove_labelled(docker: &bollard::Docker, label: &str) {
    use bollard::container::{ListContainersOptions, RemoveContainerOptions};
    let filters = HashMap::from([("label".to_owned(), vec![format!("{TEST_LABEL}={label}")])]);
    let Ok(containers) = docker.list_containers(Some(ListContainersOptions { all: true, filters, ..Default::default() })).await else {
        return;
    };
    for container in containers {
        if let Some(id) = container.id {
            let _ = docker.unpause_container(&id).await;
            let _ = docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await;
        }
    }
}

type Terminal = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open_terminal(address: SocketAddr, session: &str, token: &str) -> Result<Terminal, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://{address}/api/sessions/{session}/terminal").into_client_request()?;
    request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).expect("header"));
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;
    Ok(socket)
}

/// Reads the terminal until its output contains `expected`; returns everything read.
async fn read_until(terminal: &mut Terminal, expected: &str) -> Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut output = String::new();
    while !output.contains(expected) {
        let message = tokio::time::timeout_at(deadline, terminal.next())
            .await
            .with_context(|| format!("no {expected:?} in {output:?}"))?
            .context("terminal ended")??;
        match message {
            Message::Binary(bytes) => output.push_str(&String::from_utf8_lossy(&bytes)),
            Message::Ping(_) | Message::Pong(_) => {}
            other => bail!("unexpected {other:?} while waiting for {expected:?} (so far {output:?})"),
        }
    }
    Ok(output)
}

/// The close frame's code, skipping output.
async fn close_code(terminal: &mut Terminal) -> Result<u16> {
    loop {
        let message =
            tokio::time::timeout(WAIT, terminal.next()).await.context("not closed in time")?.context("ended without a close frame")??;
        if let Message::Close(frame) = message {
            return Ok(frame.map(|frame| u16::from(frame.code)).unwrap_or(0));
        }
    }
}

#[tokio::test]
async fn terminals_echo_resize_run_side_by_side_and_close_when_the_session_pauses() -> Result<()> {
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let label = unique("door");
    let world = World::new().await?;
    let outcome = terminal_checks(&world, &docker, &label).await;
    remove_labelled(&docker, &label).await;
    world.finish().await;
    outcome
}

async fn terminal_checks(world: &World, docker: &bollard::Docker, label: &str) -> Result<()> {
    let container = start_container(docker, label).await?;
    let instance = world.instance(world.config()).await?;
    let (tap_queue, mut events) = tap(world).await?;
    let address = instance.address;
    let alice = unique("alice");
    let token = world.token(&alice);
    let session = uuid::Uuid::now_v7().to_string();

    // Not running yet: a plain HTTP refusal, no upgrade.
    world.put_session(&session, &alice, "provisioning", json!({"container_id": container}));
    match open_terminal(address, &session, &token).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 409),
        other => bail!("expected 409, got {:?}", other.map(|_| "an upgrade")),
    }
    let bob = world.token(&unique("bob"));
    world.put_session(&session, &alice, "running", json!({"container_id": container}));
    match open_terminal(address, &session, &bob).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 404),
        other => bail!("expected 404 for another user, got {:?}", other.map(|_| "an upgrade")),
    }

    let mut first = open_terminal(address, &session, &token).await?;
    // The quotes keep the typed command's echo from matching: only the output says `hello`.
    first.send(Message::Binary(b"echo hel''lo\n".to_vec().into())).await?;
    let output = read_until(&mut first, "hello").await?;
    assert!(output.contains("hel''lo"), "the PTY echoes what was typed: {output:?}");
    let activity = expect_event(&mut events, &session, "session.activity").await?;
    assert_eq!(
        (activity.data_as::<SessionActivity>()?.source, activity.extension("userid")),
        (InputSource::Terminal, Some(alice.as_str()))
    );

    // The shell runs as the profile says (container user 1000, in the workspace mount).
    first.send(Message::Text("id -u; pwd\n".into())).await?;
    let output = read_until(&mut first, "/workspace").await?;
    assert!(output.contains("1000"), "{output:?}");

    // Resize, then ask the PTY its size.
    first.send(Message::Text(r#"{"type":"resize","cols":101,"rows":41}"#.into())).await?;
    first.send(Message::Binary(b"stty size\n".to_vec().into())).await?;
    read_until(&mut first, "41 101").await?;

    // A second terminal is a shell of its own.
    let mut second = open_terminal(address, &session, &token).await?;
    second.send(Message::Binary(b"echo sec''ond\n".to_vec().into())).await?;
    read_until(&mut second, "second").await?;
    first.send(Message::Binary(b"echo fi''rst\n".to_vec().into())).await?;
    let first_output = read_until(&mut first, "first").await?;
    assert!(!first_output.contains("second"), "{first_output:?}");
    // A closed terminal's shell does not linger (Docker cannot end an exec; the agent hangs it up).
    second.close(None).await?;
    let shells = |ps: &str| ps.lines().filter(|line| line.trim_end().ends_with(" /bin/sh") && !line.contains('{')).count();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        first.send(Message::Binary(b"ps; echo do''ne\n".to_vec().into())).await?;
        let ps = read_until(&mut first, "done").await?;
        if shells(&ps) == 1 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the closed terminal's shell is still there: {ps}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut second = open_terminal(address, &session, &token).await?;
    second.send(Message::Binary(b"echo ag''ain\n".to_vec().into())).await?;
    read_until(&mut second, "again").await?;

    // The engine pauses the session: both terminals close with the paused code.
    docker.pause_container(&container).await?;
    world.bus.publish_notification(&notification(&alice, &session, "idle", json!({}))).await?;
    assert_eq!(close_code(&mut first).await?, 4001);
    assert_eq!(close_code(&mut second).await?, 4001);
    // Paused in Docker while the record still says running: refused, nothing exec'd into it.
    match open_terminal(address, &session, &token).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status().as_u16(), 409),
        other => bail!("expected 409 for a paused container, got {:?}", other.map(|_| "an upgrade")),
    }

    let _ = world.bus.delete_queue(&tap_queue).await;
    instance.shutdown().await?;
    Ok(())
}

/// The proxy-test app in a container of its own on Docker's default bridge, its 8080 published on
/// loopback: its address on the bridge and its published address.
async fn start_app(docker: &bollard::Docker, label: &str) -> Result<(std::net::IpAddr, u16)> {
    use bollard::container::{Config, CreateContainerOptions, StartContainerOptions};
    use bollard::models::{HostConfig, PortBinding};
    let name = unique("berth-door-app");
    let config = Config {
        image: Some("berth-test/proxy-app:latest".to_owned()),
        labels: Some(HashMap::from([(TEST_LABEL.to_owned(), label.to_owned())])),
        exposed_ports: Some(HashMap::from([("8080/tcp".to_owned(), HashMap::new())])),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(
                "8080/tcp".to_owned(),
                Some(vec![PortBinding { host_ip: Some("127.0.0.1".to_owned()), host_port: None }]),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = docker.create_container(Some(CreateContainerOptions { name, platform: None }), config).await?;
    docker.start_container(&created.id, None::<StartContainerOptions<String>>).await?;
    let inspected = docker.inspect_container(&created.id, None).await?;
    let settings = inspected.network_settings.context("no network settings")?;
    let ip = settings
        .networks
        .as_ref()
        .and_then(|networks| networks.get("bridge"))
        .and_then(|bridge| bridge.ip_address.as_deref())
        .context("no address on the default bridge")?
        .parse()?;
    let port = settings
        .ports
        .as_ref()
        .and_then(|ports| ports.get("8080/tcp").cloned().flatten())
        .and_then(|bindings| bindings.into_iter().find_map(|binding| binding.host_port?.parse().ok()))
        .context("8080 not published")?;
    // Up once it answers on both addresses.
    let deadline = tokio::time::Instant::now() + WAIT;
    while TcpStream::connect((ip, 8080)).await.is_err()
        || http(SocketAddr::from(([127, 0, 0, 1], port)), "GET", "/", None, &[], Upload::None).await.is_err()
    {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the app never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((ip, port))
}

/// A server that is not the app: answers every connection `decoy`.
async fn decoy() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\ndecoy").await;
            });
        }
    });
    Ok(address)
}

/// A loopback port nobody listens on.
fn closed_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::test]
async fn the_proxy_reaches_a_container_on_its_machine_by_its_network_address_and_others_by_the_published_port() -> Result<()> {
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let label = unique("door-upstream");
    let world = World::new().await?;
    let outcome = upstream_checks(&world, &docker, &label).await;
    remove_labelled(&docker, &label).await;
    world.finish().await;
    outcome
}

async fn upstream_checks(world: &World, docker: &bollard::Docker, label: &str) -> Result<()> {
    let (ip, published) = start_app(docker, label).await?;
    let config = world.config();
    let here = config.profile.host();
    let boot_id = protocol::host::boot_id().context("no boot id")?.to_owned();
    let instance = world.instance(config).await?;
    let alice = unique("alice");
    let token = world.token(&alice);
    let network = |ip: String, port: u16, host: &str, boot_id: &str| json!({"ip": ip, "port": port, "host": host, "boot_id": boot_id});
    let echoed_path = |reply: &Reply| reply.json()["path"].as_str().map(str::to_owned);

    // On this machine: the container's own address, even with nothing at the published port.
    let direct = uuid::Uuid::now_v7().to_string();
    let dead = closed_port()?;
    world.put_session(
        &direct,
        &alice,
        "running",
        json!({"host": "127.0.0.1", "port": dead, "network": network(ip.to_string(), 8080, &here, &boot_id)}),
    );
    let reply = http(instance.address, "GET", &format!("/s/{direct}/through-the-network"), Some(&token), &[], Upload::None).await?;
    assert_eq!((reply.status, echoed_path(&reply)), (200, Some("/through-the-network".to_owned())), "{}", reply.text());
    // A WebSocket too.
    let mut request = format!("ws://{}/s/{direct}/ws", instance.address).into_client_request()?;
    request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    socket.send(Message::Text("over the network".into())).await?;
    let echoed = tokio::time::timeout(WAIT, socket.next()).await?.context("socket ended")??;
    assert_eq!(echoed.into_text()?.as_str(), "over the network");

    // Another machine's address (another host id, or the same default id on another kernel) is
    // never used: a decoy answering there must not be reached; the published port is.
    let decoy = decoy().await?;
    for (case, foreign) in [
        ("another host id", network("127.0.0.1".to_owned(), decoy.port(), "elsewhere", &boot_id)),
        ("another machine's kernel", network("127.0.0.1".to_owned(), decoy.port(), &here, "another-boot")),
    ] {
        let session = uuid::Uuid::now_v7().to_string();
        world.put_session(&session, &alice, "running", json!({"host": "127.0.0.1", "port": published, "network": foreign}));
        let reply = http(instance.address, "GET", &format!("/s/{session}/by-the-published-port"), Some(&token), &[], Upload::None).await?;
        assert_eq!((reply.status, echoed_path(&reply)), (200, Some("/by-the-published-port".to_owned())), "{case}: {}", reply.text());
    }

    // On this machine but not reachable (nothing listens there): the published port answers.
    let unreachable = uuid::Uuid::now_v7().to_string();
    world.put_session(
        &unreachable,
        &alice,
        "running",
        json!({"host": "127.0.0.1", "port": published, "network": network("127.0.0.1".to_owned(), dead, &here, &boot_id)}),
    );
    for _ in 0..2 {
        let reply = http(instance.address, "GET", &format!("/s/{unreachable}/fallback"), Some(&token), &[], Upload::None).await?;
        assert_eq!((reply.status, echoed_path(&reply)), (200, Some("/fallback".to_owned())), "{}", reply.text());
    }
    let mut request = format!("ws://{}/s/{unreachable}/ws", instance.address).into_client_request()?;
    request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    socket.send(Message::Text("by the published port".into())).await?;
    let echoed = tokio::time::timeout(WAIT, socket.next()).await?.context("socket ended")??;
    assert_eq!(echoed.into_text()?.as_str(), "by the published port");

    // An older agent's record (no network address) goes to the published port as before.
    let older = uuid::Uuid::now_v7().to_string();
    world.put_session(&older, &alice, "running", json!({"host": "127.0.0.1", "port": published}));
    let reply = http(instance.address, "GET", &format!("/s/{older}/"), Some(&token), &[], Upload::None).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());

    instance.shutdown().await?;
    Ok(())
}

/// What a command run in `container` (not through a terminal) prints, or `None` when Docker did
/// not run it within [`WAIT`] (a wedged container).
async fn exec_output(docker: &bollard::Docker, container: &str, command: &str) -> Option<String> {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    let run = async {
        let options = CreateExecOptions::<String> {
            attach_stdout: Some(true),
            cmd: Some(vec!["/bin/sh".to_owned(), "-c".to_owned(), command.to_owned()]),
            ..Default::default()
        };
        let created = docker.create_exec(container, options).await.ok()?;
        let StartExecResults::Attached { mut output, .. } = docker.start_exec(&created.id, None).await.ok()? else { return None };
        let mut text = String::new();
        while let Some(Ok(chunk)) = output.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        Some(text)
    };
    tokio::time::timeout(WAIT, run).await.ok().flatten()
}

/// Thaws `container`'s freezer cgroup by hand (cgroup v1 as on this machine, then v2), as an
/// operator would a wedged container, so a failing run still cleans up.
fn thaw_by_hand(container: &str) {
    let _ = std::fs::write(format!("/sys/fs/cgroup/freezer/docker/{container}/freezer.state"), "THAWED");
    let _ = std::fs::write(format!("/sys/fs/cgroup/system.slice/docker-{container}.scope/cgroup.freeze"), "0");
}

/// A terminal closed by its client at the moment Docker pauses the session's container, again and
/// again with the pause a little later each time: the container always pauses and resumes within
/// the timeout (a process started in it while it froze would wedge it until thawed by hand), and
/// the closed terminal's processes are gone once it runs again.
#[tokio::test]
async fn a_terminal_closed_as_its_session_pauses_leaves_the_container_able_to_pause_and_resume() -> Result<()> {
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let label = unique("door-race");
    let world = World::new().await?;
    let container = start_container(&docker, &label).await?;
    let outcome = close_while_pausing(&world, &docker, &container).await;
    if outcome.is_err() {
        thaw_by_hand(&container);
    }
    remove_labelled(&docker, &label).await;
    world.finish().await;
    outcome
}

async fn close_while_pausing(world: &World, docker: &bollard::Docker, container: &str) -> Result<()> {
    let instance = world.instance(world.config()).await?;
    let alice = unique("alice");
    let token = world.token(&alice);
    let session = uuid::Uuid::now_v7().to_string();
    world.put_session(&session, &alice, "running", json!({"container_id": container}));
    for round in 0..10u64 {
        let mut terminal = open_terminal(instance.address, &session, &token).await?;
        // A job of the shell's, so "gone" covers what the shell started, not only the shell.
        let marker = format!("31415{round}");
        terminal.send(Message::Binary(format!("sleep {marker} & echo star''ted\n").into_bytes().into())).await?;
        read_until(&mut terminal, "started").await?;
        // The close goes first; the pause follows a few milliseconds later each round, so some
        // round's pause lands while the agent reacts to the close.
        let pause = async {
            tokio::time::sleep(Duration::from_millis(round * 4)).await;
            tokio::time::timeout(WAIT, docker.pause_container(container)).await
        };
        let (closed, paused) = tokio::join!(terminal.close(None), pause);
        closed?;
        paused.with_context(|| format!("round {round}: the pause did not return within {WAIT:?}"))??;
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::time::timeout(WAIT, docker.unpause_container(container))
            .await
            .with_context(|| format!("round {round}: the unpause did not return within {WAIT:?}"))??;
        let state = docker.inspect_container(container, None).await?.state.unwrap_or_default();
        assert_eq!((state.running, state.paused), (Some(true), Some(false)), "round {round}: running again");
        // Once it runs, the closed terminal's shell and its job end (SIGHUP, SIGKILL a second later).
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ps =
                exec_output(docker, container, "ps -o pid,args").await.with_context(|| format!("round {round}: Docker ran nothing"))?;
            let left: Vec<&str> = ps.lines().filter(|line| line.contains(&marker) || line.trim_end().ends_with(" /bin/sh")).collect();
            if left.is_empty() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("round {round}: the closed terminal's processes are still there: {left:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    instance.shutdown().await?;
    Ok(())
}
