//! The whole lifecycle end to end, through the real `berth dev` binary against the real RabbitMQ,
//! Redis, Docker engine and S3-compatible server:
//!
//! open over AMQP → files materialized from S3 → container running with its limits → `running` with
//! the port pushed to the user → the workspace answers on it → a file written inside the container →
//! idle timeout pauses the container → activity resumes it → close → final sync puts the new file in
//! the object store → container and directory removed → session record `closed` with its history.
//! The same through the WebSocket, and the failure path: an image that never gets healthy ends
//! `failed`, cleaned up, and the user is told why.
//!
//! Each run gets its own RabbitMQ vhost, Redis database, bucket, workspace root and store, so it
//! neither sees nor leaves anything of other runs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use protocol::events::{EventData, InputSource, SessionActivity, SessionClose, SessionOpen};
use protocol::store::StoreClient;
use protocol::{topology, Bus, BusConfig, CloudEvent, Notification};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const S3_ENDPOINT: &str = "http://127.0.0.1:9000";
/// curl signs its S3 requests (the test server refuses anonymous reads) with these.
const SIGNED: [&str; 4] = ["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "berth-test:berth-test"];

/// curl with S3 signing, then `arguments`.
fn s3_curl(arguments: &[&str]) -> Command {
    let mut command = Command::new("curl");
    command.args(SIGNED).args(arguments);
    command
}

fn s3_curl_ok(arguments: &[&str]) {
    let output = s3_curl(arguments).output().expect("curl runs");
    assert!(output.status.success(), "curl {arguments:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}
const JWT_SECRET: &str = "e2e-secret-that-is-long-enough-for-hs256";
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything one run owns, removed on drop.
struct Environment {
    vhost: String,
    redis_db: u32,
    bucket: String,
    root: PathBuf,
    session_port: u16,
    /// The deployment id the run's components use (directories live under it).
    deployment: String,
}

impl Environment {
    fn new() -> Environment {
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let vhost = format!("berth-e2e-{run}");
        run_ok("rabbitmqctl", &["add_vhost", &vhost]);
        run_ok("rabbitmqctl", &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let bucket = format!("berth-e2e-{run}");
        s3_curl_ok(&["-fsS", "-X", "PUT", &format!("{S3_ENDPOINT}/{bucket}")]);
        let root = std::env::temp_dir().join(format!("berth-e2e-{run}"));
        std::fs::create_dir_all(&root).expect("temp root");
        let session_port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        // Databases 10-15 are left to end-to-end runs; the engine's timers use the db's own channel.
        // Two runs sharing one would fire each other's timers (and one's FLUSHDB would end the
        // other's sessions): each run claims a free database, and FLUSHDB at the end frees it.
        let start = u32::from_str_radix(&run[..4], 16).unwrap_or(0) % 6;
        let redis_db = (0..6)
            .map(|offset| 10 + (start + offset) % 6)
            .find(|db| {
                let claim = Command::new("redis-cli")
                    .args(["-n", &db.to_string(), "SET", "berth:test-run-claim", &run, "NX", "EX", "3600"])
                    .output();
                claim.is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "OK")
            })
            .expect("a free Redis database among 10-15 for this run");
        let deployment = format!("e2e-{run}");
        Environment { vhost, redis_db, bucket, root, session_port, deployment }
    }

    fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.vhost)
    }

    fn workspace_root(&self) -> PathBuf {
        self.root.join("workspaces")
    }

    /// A session's host directory (`Profile::session_dir` of this run's deployment).
    fn session_dir(&self, session: &str) -> PathBuf {
        self.workspace_root().join(&self.deployment).join(session)
    }

    fn put_object(&self, key: &str, body: &[u8]) {
        let path = self.root.join("upload.tmp");
        std::fs::write(&path, body).expect("write upload");
        let url = format!("{S3_ENDPOINT}/{}/{key}", self.bucket);
        let file = format!("@{}", path.display());
        s3_curl_ok(&["-fsS", "-X", "PUT", "-H", "Content-Type: application/octet-stream", "--data-binary", &file, &url]);
    }

    fn get_object(&self, key: &str) -> Option<Vec<u8>> {
        let output = s3_curl(&["-fsS", &format!("{S3_ENDPOINT}/{}/{key}", self.bucket)]).output().expect("curl runs");
        output.status.success().then_some(output.stdout)
    }

    /// Starts `berth dev` on `profile` (a folder under tests/profiles).
    fn start_berth(&self, profile: &str) -> Berth {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let log_path = self.root.join(format!("berth-{profile}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["--profile", profile, "dev"])
            .env("BERTH_PROFILES_DIR", manifest.join("tests/profiles"))
            .env("BERTH_PATTERNS_DIR", manifest.join("patterns"))
            .env("BERTH_AMQP_URL", self.amqp_url())
            .env("BERTH_REDIS_URL", format!("redis://127.0.0.1:6379/{}", self.redis_db))
            .env("BERTH_STORE_URL", format!("sqlite://{}", self.root.join("store.sqlite").display()))
            .env("BERTH_OBJECT_STORE_URL", format!("s3://{}", self.bucket))
            .env("BERTH_WORKSPACE_ROOT", self.workspace_root())
            .env("BERTH_DEPLOYMENT", &self.deployment)
            .env("BERTH_SESSION_ADDR", format!("127.0.0.1:{}", self.session_port))
            .env("BERTH_JWT_SECRET", JWT_SECRET)
            .env("AWS_ENDPOINT_URL", S3_ENDPOINT)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "berth-test")
            .env("AWS_SECRET_ACCESS_KEY", "berth-test")
            .env("RUST_LOG", "info,lapin=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("berth dev starts");
        Berth { child, log_path, session_port: self.session_port }
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.vhost]).output();
        let _ = Command::new("redis-cli").args(["-n", &self.redis_db.to_string(), "FLUSHDB"]).output();
        // Containers of this run carry its deployment; remove any a failed assertion left, then
        // the run's session network (Docker has address pools for only a few dozen networks).
        let deployment_label = format!("label=berth.deployment={}", self.deployment);
        let listed =
            Command::new("docker").args(["ps", "-aq", "--filter", &deployment_label, "--filter", "label=berth.managed=true"]).output();
        if let Ok(listed) = listed {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        let networks = Command::new("docker").args(["network", "ls", "-q", "--filter", &deployment_label]).output();
        if let Ok(networks) = networks {
            for id in String::from_utf8_lossy(&networks.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["network", "rm", id]).output();
            }
        }
        // Workspace images a failed run left mounted go before the directory does.
        let _ = workspace::unmount_all_under(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A running `berth dev`, stopped with SIGTERM on drop.
struct Berth {
    child: Child,
    log_path: PathBuf,
    session_port: u16,
}

impl Berth {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll berth") {
                panic!("berth dev exited early ({status}):\n{}", self.log());
            }
            if http_get(self.session_port, "/readyz").is_some_and(|(status, _)| status == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "berth dev not ready:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_ok(program: &str, arguments: &[&str]) {
    let output = Command::new(program).args(arguments).output().unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(output.status.success(), "{program} {arguments:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// A plain HTTP/1.0 GET on 127.0.0.1; `(status, body)`, or None when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response[split + 4..].to_vec()))
}

fn docker_inspect(container: &str, format: &str) -> Option<String> {
    let output = Command::new("docker").args(["inspect", "-f", format, container]).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Reads notifications for one user from a private queue on `berth.notify`.
struct Inbox {
    receiver: tokio::sync::mpsc::UnboundedReceiver<Notification>,
    seen: Vec<Notification>,
}

impl Inbox {
    async fn open(bus: &Bus, user: &str) -> Inbox {
        let queue = bus.declare_private_queue(topology::NOTIFY_EXCHANGE, &[topology::user_routing_key(user)]).await.expect("notify queue");
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let consumer_bus = bus.clone();
        tokio::spawn(async move {
            let handler = move |incoming: protocol::Incoming| {
                let sender = sender.clone();
                async move {
                    if let Ok(notification) = Notification::decode(&incoming.body) {
                        let _ = sender.send(notification);
                    }
                    protocol::Outcome::Ack
                }
            };
            let _ = consumer_bus.consume(protocol::ConsumeSpec::new(&queue, 50), handler, std::future::pending()).await;
        });
        Inbox { receiver, seen: Vec::new() }
    }

    /// Waits for `session` to reach `state` (now or earlier); returns that notification.
    async fn wait_for(&mut self, session: &str, state: &str, berth: &Berth) -> Notification {
        if let Some(found) = self.seen.iter().find(|n| n.session.as_deref() == Some(session) && n.state == state) {
            return found.clone();
        }
        self.wait_for_next(session, state, berth).await
    }

    /// Waits for a notification of `session` reaching `state` that has not arrived yet.
    async fn wait_for_next(&mut self, session: &str, state: &str, berth: &Berth) -> Notification {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.receiver.recv()).await;
            let Ok(Some(notification)) = next else {
                let states: Vec<_> = self.seen.iter().map(|n| n.state.as_str()).collect();
                panic!("session {session} never reached {state}; saw {states:?}\n--- berth log ---\n{}", berth.log());
            };
            self.seen.push(notification.clone());
            if notification.session.as_deref() == Some(session) && notification.state == state {
                return notification;
            }
        }
    }
}

fn port_of(notification: &Notification) -> u16 {
    let port = &notification.detail["port"];
    port.as_u64().or_else(|| port.as_str().and_then(|text| text.parse().ok())).expect("running carries the port") as u16
}

/// A client's `session.open` of `workspace`.
fn open(user: &str, workspace: &str) -> SessionOpen {
    SessionOpen { user: user.parse().expect("a user id"), workspace: workspace.parse().expect("a workspace id"), profile: None }
}

/// Publishes a client's event as a client does: as the client identity `berth dev`'s bootstrap
/// created in this run's vhost (the engine dead-letters session events from anyone else).
async fn publish<T: EventData>(bus: &Bus, session: &str, user: &str, data: &T) {
    let event = CloudEvent::of("/tests/e2e", Some(session), data).with_extension("userid", user);
    let config =
        BusConfig::for_identity(bus.url(), protocol::Identity::Client, "e2e-client-identity").expect("the client identity's password");
    let client = Bus::connect(config).await.expect("broker as the client identity");
    client.publish_event(&event).await.expect("published");
    client.close().await;
}

async fn wait_for_condition(what: &str, berth: &Berth, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "{what} did not happen\n--- berth log ---\n{}", berth.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_lifecycle_over_amqp_and_websocket_and_the_failure_path() {
    let environment = Environment::new();
    let user = format!("alice-{}", &environment.bucket[10..18]);
    environment.put_object(&format!("e2e/{user}/w1/hello.txt"), b"hello from object storage\n");
    environment.put_object(&format!("e2e/{user}/w1/src/main.rs"), b"fn main() {}\n");
    environment.put_object(&format!("e2e/{user}/w2/readme.md"), b"# w2\n");

    let mut berth = environment.start_berth("e2e");
    berth.wait_ready().await;
    let bus = Bus::connect(BusConfig::new(&environment.amqp_url(), "e2e-client")).await.expect("broker");
    let mut inbox = Inbox::open(&bus, &user).await;

    // --- open over AMQP ---
    let session = uuid::Uuid::now_v7().to_string();
    publish(&bus, &session, &user, &open(&user, "w1")).await;
    let running = inbox.wait_for(&session, "running", &berth).await;
    let port = port_of(&running);
    let container = format!("berth-{session}");

    // The workspace answers on its port with the materialized file.
    let (status, body) = http_get(port, "/hello.txt").expect("workspace answers");
    assert_eq!(status, 200);
    assert_eq!(body, b"hello from object storage\n");
    assert_eq!(std::fs::read(environment.session_dir(&session).join("src/main.rs")).expect("file on host"), b"fn main() {}\n");

    // The container runs with its limits and hardening.
    assert_eq!(docker_inspect(&container, "{{.HostConfig.Memory}}").as_deref(), Some("134217728"));
    assert_eq!(docker_inspect(&container, "{{.HostConfig.NanoCpus}}").as_deref(), Some("500000000"));
    assert_eq!(docker_inspect(&container, "{{.HostConfig.PidsLimit}}").as_deref(), Some("64"));
    assert_eq!(docker_inspect(&container, "{{.HostConfig.CapDrop}}").as_deref(), Some("[ALL]"));
    assert_eq!(docker_inspect(&container, "{{.HostConfig.ReadonlyRootfs}}").as_deref(), Some("true"));

    // A file written inside the container.
    run_ok("docker", &["exec", &container, "sh", "-c", "echo written inside > /workspace/new.txt"]);

    // Idle timeout pauses the container; activity resumes it.
    inbox.wait_for(&session, "idle", &berth).await;
    // Entering `idle` sends the pause task; the container agent pauses right after.
    wait_for_condition("pause after idle", &berth, || docker_inspect(&container, "{{.State.Paused}}").as_deref() == Some("true")).await;
    publish(&bus, &session, &user, &SessionActivity { source: InputSource::Api }).await;
    wait_for_condition("resume after activity", &berth, || docker_inspect(&container, "{{.State.Paused}}").as_deref() == Some("false"))
        .await;
    inbox.wait_for_next(&session, "running", &berth).await;

    // Close: final sync, then container and directory removed, record closed with its history.
    publish(&bus, &session, &user, &SessionClose { reason: Some("done".to_owned()) }).await;
    inbox.wait_for(&session, "closed", &berth).await;
    assert_eq!(
        environment.get_object(&format!("e2e/{user}/w1/new.txt")).as_deref(),
        Some(&b"written inside\n"[..]),
        "the final sync put the new file in the object store"
    );
    assert!(docker_inspect(&container, "{{.Id}}").is_none(), "container removed");
    assert!(!environment.session_dir(&session).exists(), "workspace directory removed");
    let store = StoreClient::new(bus.clone());
    let record = store.get(protocol::store::collections::SESSIONS, &session).await.expect("store answers");
    let record = record.expect("session record exists");
    assert_eq!(record["state"], "closed", "{record}");
    let history = store
        .find(protocol::store::FindArgs::new(
            protocol::store::collections::EVENTS,
            serde_json::from_value(json!({"session": {"eq": session}})).expect("filter"),
        ))
        .await
        .expect("history");
    let targets: Vec<&str> = history.iter().filter_map(|entry| entry["to"].as_str()).collect();
    for state in ["materializing", "provisioning", "running", "idle", "stopping", "saving", "closed"] {
        assert!(targets.contains(&state), "history {targets:?} lacks {state}");
    }

    // --- open through the WebSocket ---
    let token = mint_token(&user);
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://127.0.0.1:{}/ws?access_token={token}",
        environment.session_port
    ))
    .expect("request");
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.expect("websocket connects");
    let snapshot = next_frame(&mut socket, |frame| frame["type"] == "snapshot").await;
    assert_eq!(snapshot["user"], user.as_str());
    socket
        .send(Message::text(json!({"type": "open", "id": "o1", "workspace": "w2", "profile": "e2e"}).to_string()))
        .await
        .expect("send open");
    let opened = next_frame(&mut socket, |frame| frame["type"] == "ok" && frame["id"] == "o1").await;
    let web_session = opened["session"].as_str().expect("open names the session").to_owned();
    let ready = next_frame(&mut socket, |frame| frame["type"] == "status" && frame["state"] == "running").await;
    assert_eq!(ready["session"], web_session.as_str());
    let web_port = ready["port"].as_u64().or_else(|| ready["detail"]["port"].as_u64()).expect("status carries the port") as u16;
    assert_eq!(http_get(web_port, "/readme.md").map(|(_, body)| body), Some(b"# w2\n".to_vec()));
    socket.send(Message::text(json!({"type": "close", "id": "c1", "session": web_session}).to_string())).await.expect("send close");
    next_frame(&mut socket, |frame| frame["type"] == "ok" && frame["id"] == "c1").await;
    next_frame(&mut socket, |frame| frame["type"] == "status" && frame["state"] == "closed").await;
    drop(socket);
    berth.stop();

    // --- the failure path: an image that never answers its health check ---
    let mut broken = environment.start_berth("e2e-broken");
    broken.wait_ready().await;
    let failing = uuid::Uuid::now_v7().to_string();
    publish(&bus, &failing, &user, &open(&user, "w1")).await;
    let failed = inbox.wait_for(&failing, "failed", &broken).await;
    let reason = failed.detail["error"].as_str().unwrap_or_default().to_owned();
    assert!(!reason.is_empty(), "the user is told why: {failed:?}");
    wait_for_condition("failed container removed", &broken, || docker_inspect(&format!("berth-{failing}"), "{{.Id}}").is_none()).await;
    let failed_record = StoreClient::new(bus.clone())
        .get(protocol::store::collections::SESSIONS, &failing)
        .await
        .expect("store answers")
        .expect("record exists");
    assert_eq!(failed_record["state"], "failed");
    assert_eq!(
        environment.get_object(&format!("e2e/{user}/w1/hello.txt")).as_deref(),
        Some(&b"hello from object storage\n"[..]),
        "storage is kept on failure"
    );
    bus.close().await;
}

fn mint_token(user: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["--profile", "e2e", "token", "--user", user])
        .env("BERTH_PROFILES_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/profiles"))
        .env("BERTH_JWT_SECRET", JWT_SECRET)
        .output()
        .expect("berth token runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().last().expect("token line").trim().to_owned()
}

async fn next_frame<S>(socket: &mut S, matches: impl Fn(&Value) -> bool) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next()).await.expect("frame within the timeout");
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            other => panic!("socket ended while waiting for a frame: {other:?}"),
        };
        let frame: Value = serde_json::from_str(&text).expect("server frames are JSON");
        if matches(&frame) {
            return frame;
        }
    }
}

/// One HTTP/1.1 request with the user's token on a fresh connection: `(status, body)`.
fn http_call(port: u16, method: &str, path: &str, token: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("session agent answers");
    stream.set_read_timeout(Some(STEP_TIMEOUT)).expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body)).expect("request sent");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response read");
    let split = response.windows(4).position(|window| window == b"\r\n\r\n").expect("header end");
    let status =
        String::from_utf8_lossy(&response[..split]).split_whitespace().nth(1).and_then(|status| status.parse().ok()).expect("status");
    (status, response[split + 4..].to_vec())
}

/// The HTTP API, the files API and the terminal on the real `berth dev`: open over HTTP (twice with
/// one `Idempotency-Key`), a file uploaded over HTTP is seen by a shell in the container, a file
/// the shell writes is read over HTTP (both inside the session's own mounted image), the terminal
/// closes with 4001 when the engine pauses the idle session, and after a close over HTTP the final
/// sync has stored both files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_files_and_terminal_on_berth_dev() {
    let environment = Environment::new();
    let user = format!("dora-{}", &environment.bucket[10..18]);
    environment.put_object(&format!("e2e/{user}/wd/hello.txt"), b"hello from object storage\n");
    let mut berth = environment.start_berth("e2e");
    berth.wait_ready().await;
    let port = environment.session_port;
    let bus = Bus::connect(BusConfig::new(&environment.amqp_url(), "e2e-door")).await.expect("broker");
    let mut inbox = Inbox::open(&bus, &user).await;
    let token = mint_token(&user);

    // Open over HTTP; the same Idempotency-Key answers the same.
    let key = [("Idempotency-Key", "e2e-door-open")];
    let (status, body) = http_call(port, "POST", "/api/sessions", &token, &key, br#"{"workspace":"wd"}"#);
    assert_eq!(status, 201, "{}\n{}", String::from_utf8_lossy(&body), berth.log());
    let opened: Value = serde_json::from_slice(&body).expect("json");
    let session = opened["session"].as_str().expect("session").to_owned();
    // `queued` when the open came before both of the host's agents had reported (the engine then
    // admits it once the host can take it); either way a new session, not a joined one.
    assert!(matches!(opened["state"].as_str(), Some("materializing" | "queued")), "{opened}");
    assert_eq!(opened["joined"].as_bool(), Some(false), "{opened}");
    let (status, again) = http_call(port, "POST", "/api/sessions", &token, &key, br#"{"workspace":"wd"}"#);
    assert_eq!((status, serde_json::from_slice::<Value>(&again).expect("json")), (201, opened.clone()));
    inbox.wait_for(&session, "running", &berth).await;
    wait_for_condition("the store records running", &berth, || {
        let (status, body) = http_call(port, "GET", &format!("/api/sessions/{session}"), &token, &[], b"");
        status == 200 && serde_json::from_slice::<Value>(&body).is_ok_and(|status| status["state"] == "running")
    })
    .await;

    // Files: the materialized file, and one uploaded over HTTP.
    let files = format!("/api/sessions/{session}/files");
    let (status, body) = http_call(port, "GET", &format!("{files}/hello.txt"), &token, &[], b"");
    assert_eq!((status, body.as_slice()), (200, &b"hello from object storage\n"[..]));
    let (status, body) = http_call(port, "PUT", &format!("{files}/notes/from-api.txt"), &token, &[], b"written over http\n");
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));

    // The terminal: the container sees the upload, and what the shell writes is readable over HTTP.
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://127.0.0.1:{port}/api/sessions/{session}/terminal"
    ))
    .expect("request");
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    let (mut terminal, _) = tokio_tungstenite::connect_async(request).await.expect("terminal upgrades");
    terminal
        .send(Message::Binary(b"cat /workspace/notes/from-api.txt; echo typed > /workspace/typed.txt; echo do''ne\n".to_vec().into()))
        .await
        .expect("typed");
    let mut output = String::new();
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !output.contains("done") {
        match tokio::time::timeout_at(deadline, terminal.next()).await.expect("terminal output in time") {
            Some(Ok(Message::Binary(bytes))) => output.push_str(&String::from_utf8_lossy(&bytes)),
            Some(Ok(_)) => {}
            other => panic!("terminal ended: {other:?} after {output:?}"),
        }
    }
    assert!(output.contains("written over http"), "{output:?}");
    let (status, body) = http_call(port, "GET", &format!("{files}/typed.txt"), &token, &[], b"");
    assert_eq!((status, body.as_slice()), (200, &b"typed\n"[..]));

    // No more input: the session goes idle, the engine pauses it, the terminal closes with 4001.
    let code = loop {
        match tokio::time::timeout_at(tokio::time::Instant::now() + STEP_TIMEOUT, terminal.next()).await.expect("closed in time") {
            Some(Ok(Message::Close(frame))) => break frame.map(|frame| u16::from(frame.code)),
            Some(Ok(_)) => {}
            other => panic!("terminal ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(4001));
    inbox.wait_for(&session, "idle", &berth).await;

    // Close over HTTP: the final sync stores both files.
    let (status, _) = http_call(port, "DELETE", &format!("/api/sessions/{session}?reason=done"), &token, &[], b"");
    assert_eq!(status, 202);
    inbox.wait_for(&session, "closed", &berth).await;
    assert_eq!(environment.get_object(&format!("e2e/{user}/wd/notes/from-api.txt")).as_deref(), Some(&b"written over http\n"[..]));
    assert_eq!(environment.get_object(&format!("e2e/{user}/wd/typed.txt")).as_deref(), Some(&b"typed\n"[..]));
    bus.close().await;
}

/// The cache entries of this run's deployment (dot-folders are entries being moved).
fn cache_entries(environment: &Environment) -> Vec<PathBuf> {
    let folder = environment.workspace_root().join(&environment.deployment).join(workspace::CACHE_DIR);
    let Ok(entries) = std::fs::read_dir(folder) else { return Vec::new() };
    entries.flatten().filter(|entry| !entry.file_name().to_string_lossy().starts_with('.')).map(|entry| entry.path()).collect()
}

/// Open, write inside the container, close; then a change in the store from elsewhere; then a
/// reopen on the same host: it starts from the cached copy (the agent says so), with the file
/// written in the first session and the store's newer version of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_on_the_same_host_starts_from_the_cached_workspace() {
    let environment = Environment::new();
    let user = format!("carol-{}", &environment.bucket[10..18]);
    environment.put_object(&format!("e2e/{user}/w3/hello.txt"), b"first version\n");
    let mut berth = environment.start_berth("e2e");
    berth.wait_ready().await;
    let bus = Bus::connect(BusConfig::new(&environment.amqp_url(), "e2e-client")).await.expect("broker");
    let mut inbox = Inbox::open(&bus, &user).await;

    let first = uuid::Uuid::now_v7().to_string();
    publish(&bus, &first, &user, &open(&user, "w3")).await;
    inbox.wait_for(&first, "running", &berth).await;
    run_ok("docker", &["exec", &format!("berth-{first}"), "sh", "-c", "echo made in the first session > /workspace/made.txt"]);
    publish(&bus, &first, &user, &SessionClose { reason: Some("done".to_owned()) }).await;
    inbox.wait_for(&first, "closed", &berth).await;
    assert!(!environment.session_dir(&first).exists(), "the session's directory is gone");
    assert_eq!(environment.get_object(&format!("e2e/{user}/w3/made.txt")).as_deref(), Some(&b"made in the first session\n"[..]));
    assert_eq!(cache_entries(&environment).len(), 1, "the closed workspace is cached on this host");

    environment.put_object(&format!("e2e/{user}/w3/hello.txt"), b"second version, written elsewhere\n");
    let second = uuid::Uuid::now_v7().to_string();
    publish(&bus, &second, &user, &open(&user, "w3")).await;
    let running = inbox.wait_for(&second, "running", &berth).await;
    let directory = environment.session_dir(&second);
    assert_eq!(std::fs::read(directory.join("made.txt")).expect("the file is there"), b"made in the first session\n");
    assert_eq!(
        std::fs::read(directory.join("hello.txt")).expect("hello"),
        b"second version, written elsewhere\n",
        "the change made elsewhere is seen"
    );
    assert_eq!(http_get(port_of(&running), "/made.txt").map(|(_, body)| body), Some(b"made in the first session\n".to_vec()));
    assert!(cache_entries(&environment).is_empty(), "the entry became the new session's directory");
    let log = berth.log();
    assert!(
        log.lines().any(|line| line.contains("reopened from the host's workspace cache") && line.contains(&second)),
        "the reopen used the cache\n--- berth log ---\n{log}"
    );
    publish(&bus, &second, &user, &SessionClose { reason: Some("done".to_owned()) }).await;
    inbox.wait_for(&second, "closed", &berth).await;
    bus.close().await;
}

/// Starts `script` in the session's container in the background (`docker exec -d`: no terminal).
fn start_in_container(container: &str, script: &str) {
    run_ok("docker", &["exec", "-d", container, "sh", "-c", script]);
}

/// Stops what `start_in_container` started with `script` (the image has `ps` but no `pkill`;
/// the first character in brackets keeps the search from finding itself).
fn stop_in_container(container: &str, script: &str) {
    let pattern = format!("[{}]{}", &script[..1], &script[1..]);
    let kill = format!("kill $(ps -o pid,args | grep '{pattern}' | sed 's/^ *\\([0-9]*\\).*/\\1/')");
    run_ok("docker", &["exec", container, "sh", "-c", &kill]);
}

/// Waits `window` and fails if `session` paused meanwhile (the container is checked, not only
/// the notifications).
async fn stays_running(inbox: &mut Inbox, session: &str, container: &str, window: Duration, what: &str, berth: &Berth) {
    let until = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < until {
        while let Ok(notification) = inbox.receiver.try_recv() {
            inbox.seen.push(notification);
        }
        let paused = inbox.seen.iter().any(|n| n.session.as_deref() == Some(session) && n.state == "idle");
        assert!(!paused, "{what}: the session was paused while working\n--- berth log ---\n{}", berth.log());
        assert_eq!(docker_inspect(container, "{{.State.Paused}}").as_deref(), Some("false"), "{what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Issue 16.3 and 16.4 on the real `berth dev` (profile `ladder`: pause after 3 s without input
/// or work, dormant 8 s after pausing, closed 20 s after pausing): a busy loop and a background
/// writer keep the session running; a quiet session is warned, paused, woken in place, paused
/// again, stopped with its directory kept, woken on the same directory (its files intact, maybe
/// on a new port), and finally closed with every file saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_keeps_a_session_running_and_a_quiet_one_climbs_the_idle_ladder() {
    let environment = Environment::new();
    let user = format!("dora-{}", &environment.bucket[10..18]);
    environment.put_object(&format!("ladder/{user}/wl/hello.txt"), b"hello\n");
    let mut berth = environment.start_berth("ladder");
    berth.wait_ready().await;
    let bus = Bus::connect(BusConfig::new(&environment.amqp_url(), "e2e-client")).await.expect("broker");
    let mut inbox = Inbox::open(&bus, &user).await;
    let session = uuid::Uuid::now_v7().to_string();
    let container = format!("berth-{session}");
    publish(&bus, &session, &user, &open(&user, "wl")).await;
    inbox.wait_for(&session, "running", &berth).await;
    // One client connection, made before any wake is timed.
    let client = Bus::connect(BusConfig::for_identity(bus.url(), protocol::Identity::Client, "e2e-ladder").expect("client identity"))
        .await
        .expect("broker");
    let activity =
        || CloudEvent::of("/tests/e2e", Some(&session), &SessionActivity { source: InputSource::Api }).with_extension("userid", &user);

    // Work: a busy loop, then a background writer, each for several idle intervals.
    let busy_loop = "while :; do :; done";
    start_in_container(&container, busy_loop);
    stays_running(&mut inbox, &session, &container, Duration::from_secs(10), "a busy loop", &berth).await;
    stop_in_container(&container, busy_loop);
    let writer = "while :; do date > /workspace/clock.txt; sleep 1; done";
    start_in_container(&container, writer);
    stays_running(&mut inbox, &session, &container, Duration::from_secs(10), "a background writer", &berth).await;
    stop_in_container(&container, writer);
    run_ok("docker", &["exec", &container, "sh", "-c", "echo last words > /workspace/notes.txt"]);
    let working = inbox.seen.iter().filter(|n| n.session.as_deref() == Some(session.as_str()) && n.detail.get("working").is_some()).count();
    assert!(working >= 2, "each kept deadline tells the user why ({working} notifications)");

    // Quiet: a warning, then the pause; a wake from the paused tier resumes the same container.
    let warning = loop {
        let next = inbox.wait_for_next(&session, "running", &berth).await;
        if next.detail["warning"] == "pause" {
            break next;
        }
    };
    assert_eq!(warning.detail["in_secs"], json!(1));
    let paused = inbox.wait_for_next(&session, "idle", &berth).await;
    assert_eq!(paused.detail["tier"], json!("paused"));
    wait_for_condition("paused", &berth, || docker_inspect(&container, "{{.State.Paused}}").as_deref() == Some("true")).await;
    let woken_at = Instant::now();
    client.publish_event(&activity()).await.expect("published");
    let running = inbox.wait_for_next(&session, "running", &berth).await;
    // A request to a container still frozen waits in the kernel until it thaws: the first answer
    // is the wake as the user sees it.
    assert_eq!(http_get(port_of(&running), "/notes.txt").map(|(_, body)| body), Some(b"last words\n".to_vec()));
    eprintln!("wake from the paused tier: {} ms (activity published → first HTTP answer)", woken_at.elapsed().as_millis());

    // Quiet again: paused, then dormant (the container stopped, the directory kept).
    inbox.wait_for_next(&session, "idle", &berth).await;
    let dormant = inbox.wait_for_next(&session, "dormant", &berth).await;
    assert_eq!(dormant.detail["tier"], json!("dormant"));
    wait_for_condition("stopped", &berth, || docker_inspect(&container, "{{.State.Status}}").as_deref() == Some("exited")).await;
    assert_eq!(std::fs::read(environment.session_dir(&session).join("notes.txt")).expect("the directory is kept"), b"last words\n");
    let woken_at = Instant::now();
    client.publish_event(&activity()).await.expect("published");
    inbox.wait_for_next(&session, "waking", &berth).await;
    let running = inbox.wait_for_next(&session, "running", &berth).await;
    let port = port_of(&running);
    assert_eq!(http_get(port, "/notes.txt").map(|(_, body)| body), Some(b"last words\n".to_vec()), "the same files on port {port}");
    eprintln!("wake from the dormant tier: {} ms (activity published → first HTTP answer)", woken_at.elapsed().as_millis());
    assert!(http_get(port, "/clock.txt").is_some_and(|(status, _)| status == 200));
    let materialized = inbox.seen.iter().filter(|n| n.session.as_deref() == Some(session.as_str()) && n.state == "materializing").count();
    assert_eq!(materialized, 1, "a wake from the dormant tier does not materialize again");

    // Quiet for the whole ladder: closed at the longest interval, everything saved first.
    inbox.wait_for_next(&session, "dormant", &berth).await;
    let stopped = inbox.wait_for_next(&session, "stopped", &berth).await;
    assert_eq!(stopped.detail["reason"], json!("idle"));
    assert_eq!(environment.get_object(&format!("ladder/{user}/wl/notes.txt")).as_deref(), Some(&b"last words\n"[..]));
    assert!(environment.get_object(&format!("ladder/{user}/wl/clock.txt")).is_some_and(|body| !body.is_empty()));
    assert!(!environment.session_dir(&session).exists(), "the directory goes only after the final sync");
    assert!(docker_inspect(&container, "{{.State.Status}}").is_none(), "the container is removed");
    client.close().await;
    bus.close().await;
}
