//! The session agent's reverse proxy end to end, through the real `berth dev` binary (engine and
//! every agent) against the real RabbitMQ, Redis, Docker engine and S3-compatible server, with the
//! `berth-test/proxy-app` image (agents/session/examples/proxy-test-app.rs):
//!
//! path and host routing, what the app is told (and never told: Berth's token and cookie), a large
//! download streamed, a large upload, a WebSocket echo, the owner allowed and another user refused
//! exactly like a missing session, the token exchange and its cookie (Origin checked, expiry
//! refused), activity from WebSocket frames but not from a silent socket or a background path, a
//! request to a paused session waking it, and a closed session answered as closed.
//!
//! Each run gets its own RabbitMQ vhost, Redis database, bucket, workspace root and store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const S3_ENDPOINT: &str = "http://127.0.0.1:9000";
const JWT_SECRET: &str = "proxy-e2e-secret-that-is-long-enough";
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Everything one run owns, removed on drop.
struct Environment {
    vhost: String,
    redis_db: u32,
    bucket: String,
    root: PathBuf,
    session_port: u16,
    deployment: String,
}

impl Environment {
    fn new() -> Environment {
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let vhost = format!("berth-proxy-{run}");
        run_ok("rabbitmqctl", &["add_vhost", &vhost]);
        run_ok("rabbitmqctl", &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let bucket = format!("berth-proxy-{run}");
        run_ok(
            "curl",
            &[
                "-fsS",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                "berth-test:berth-test",
                "-X",
                "PUT",
                &format!("{S3_ENDPOINT}/{bucket}"),
            ],
        );
        let root = std::env::temp_dir().join(format!("berth-proxy-{run}"));
        std::fs::create_dir_all(&root).expect("temp root");
        let session_port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        // Databases 10-15 are left to end-to-end runs.
        let redis_db = 10 + (u32::from_str_radix(&run[..4], 16).unwrap_or(0) % 6);
        Environment { vhost, redis_db, bucket, root, session_port, deployment: format!("proxy-{run}") }
    }

    fn start_berth(&self) -> Berth {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let log_path = self.root.join("berth.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["--profile", "proxy", "dev"])
            .env("BERTH_PROFILES_DIR", manifest.join("tests/profiles"))
            .env("BERTH_PATTERNS_DIR", manifest.join("patterns"))
            .env("BERTH_AMQP_URL", format!("amqp://guest:guest@127.0.0.1:5672/{}", self.vhost))
            .env("BERTH_REDIS_URL", format!("redis://127.0.0.1:6379/{}", self.redis_db))
            .env("BERTH_STORE_URL", format!("sqlite://{}", self.root.join("store.sqlite").display()))
            .env("BERTH_OBJECT_STORE_URL", format!("s3://{}", self.bucket))
            .env("BERTH_WORKSPACE_ROOT", self.root.join("workspaces"))
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
        Berth { child, log_path }
    }
}

impl Drop for Environment {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.vhost]).output();
        let _ = Command::new("redis-cli").args(["-n", &self.redis_db.to_string(), "FLUSHDB"]).output();
        let label = format!("label=berth.deployment={}", self.deployment);
        if let Ok(listed) = Command::new("docker").args(["ps", "-aq", "--filter", &label]).output() {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        // Workspace images a failed run left mounted go before the directory does.
        let _ = workspace::unmount_all_under(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
        // The container agent's network of this run's deployment (`{network}-{deployment}`).
        let _ = Command::new("docker").args(["network", "rm", &format!("berth-sessions-{}", self.deployment)]).output();
    }
}

/// A running `berth dev`, stopped with SIGTERM on drop.
struct Berth {
    child: Child,
    log_path: PathBuf,
}

impl Berth {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_ok(program: &str, arguments: &[&str]) {
    let output = Command::new(program).args(arguments).output().unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(output.status.success(), "{program} {arguments:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// One curl exchange: status, response headers (lowercased names), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `curl -si` with `arguments`, on a blocking thread (the server runs in another process).
async fn curl(arguments: Vec<String>) -> Reply {
    tokio::task::spawn_blocking(move || {
        let output = Command::new("curl").args(["-sS", "-D", "-", "--max-time", "60"]).args(&arguments).output().expect("curl runs");
        assert!(output.status.success(), "curl {arguments:?}: {}", String::from_utf8_lossy(&output.stderr));
        let mut raw = output.stdout;
        // `100 Continue` heads (curl sends `Expect` with large bodies) come first.
        while raw.starts_with(b"HTTP/1.1 100") {
            let end = raw.windows(4).position(|window| window == b"\r\n\r\n").expect("a whole interim head");
            raw.drain(..end + 4);
        }
        let split = raw
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head for {arguments:?}: {:?}", String::from_utf8_lossy(&raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines.next().and_then(|line| line.split_whitespace().nth(1)).and_then(|code| code.parse().ok()).expect("status");
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        Reply { status, headers, body: raw[split + 4..].to_vec() }
    })
    .await
    .expect("curl thread")
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

fn container_state(session: &str) -> String {
    let label = format!("label=berth.session={session}");
    let output = Command::new("docker").args(["ps", "-a", "--filter", &label, "--format", "{{.State}}"]).output().expect("docker ps");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

async fn connect(
    url: &str,
    token: &str,
    origin: Option<&str>,
    cookie: Option<&str>,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    if !token.is_empty() {
        request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).expect("header"));
    }
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", HeaderValue::from_str(origin).expect("header"));
    }
    if let Some(cookie) = cookie {
        request.headers_mut().insert("cookie", HeaderValue::from_str(cookie).expect("header"));
    }
    tokio_tungstenite::connect_async(request).await.map(|(socket, _)| socket)
}

/// Reads status pushes until `session` reaches `state`; returns the other states seen on the way.
async fn wait_state(socket: &mut Socket, session: &str, state: &str, timeout: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("{session} never reached {state}; saw {seen:?}"));
        let Some(Ok(Message::Text(text))) = frame else { continue };
        let frame: Value = serde_json::from_str(text.as_str()).expect("json frame");
        if frame["type"] == "status" && frame["session"] == session {
            let current = frame["state"].as_str().unwrap_or_default().to_owned();
            if current == state {
                return seen;
            }
            seen.push(current);
        }
    }
}

/// States pushed for `session` within `window`.
async fn states_within(socket: &mut Socket, session: &str, window: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + window;
    let mut seen = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, socket.next()).await {
        let Message::Text(text) = message else { continue };
        let frame: Value = serde_json::from_str(text.as_str()).expect("json frame");
        if frame["type"] == "status" && frame["session"] == session {
            seen.push(frame["state"].as_str().unwrap_or_default().to_owned());
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_routes_authenticates_streams_wakes_and_closes() {
    let environment = Environment::new();
    let berth = environment.start_berth();
    let port = environment.session_port;
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while curl_ready(port).await.is_none() {
        assert!(Instant::now() < deadline, "berth dev not ready:\n{}", berth.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let profile =
        protocol::Profile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/profiles/proxy/profile.toml")).expect("profile");
    let authority =
        session::TokenAuthority::new(&session::KeyMaterial::inline(JWT_SECRET), &profile.session.jwt_audience).expect("authority");
    let alice = authority.mint("alice", &[], Duration::from_secs(3600)).expect("token");
    let bob = authority.mint("bob", &[], Duration::from_secs(3600)).expect("token");
    let bearer = |token: &str| format!("Authorization: Bearer {token}");

    // Open a workspace over the WebSocket and wait for it to run.
    let mut status = connect(&format!("ws://127.0.0.1:{port}/ws"), &alice, None, None).await.expect("status socket");
    let _snapshot = status.next().await;
    status
        .send(Message::Text(json!({"type": "open", "id": "1", "workspace": "site", "profile": "proxy"}).to_string().into()))
        .await
        .expect("open");
    let session = loop {
        let Some(Ok(Message::Text(text))) = status.next().await else { continue };
        let frame: Value = serde_json::from_str(text.as_str()).expect("json");
        if frame["type"] == "ok" && frame["id"] == "1" {
            break frame["session"].as_str().expect("session").to_owned();
        }
        assert_ne!(frame["type"], "error", "{frame}");
    };
    wait_state(&mut status, &session, "running", STEP_TIMEOUT).await;
    let prefix = format!("{base}/s/{session}");

    // Path routing: the prefix is stripped, the app is told where it lives and who calls, and
    // never sees Berth's token.
    let reply = curl(args(&["-H", &bearer(&alice), "-H", "Cookie: app=1", &format!("{prefix}/hello/there?x=1")])).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    assert_eq!((echo["path"].as_str(), echo["query"].as_str()), (Some("/hello/there"), Some("x=1")));
    let headers = &echo["headers"];
    assert_eq!(headers["x-forwarded-prefix"], format!("/s/{session}"));
    assert_eq!(headers["x-berth-user"], "alice");
    assert_eq!(headers["cookie"], "app=1");
    assert!(headers.get("authorization").is_none(), "the token reached the app: {headers}");
    let bare = curl(args(&["-H", &bearer(&alice), &prefix])).await;
    assert_eq!((bare.status, bare.header("location")), (308, Some(format!("/s/{session}/").as_str())));

    // Host routing: the app owns `{session}.proxy.test`, at `/`, whatever the path.
    let host = format!("Host: {session}.proxy.test:{port}");
    let reply = curl(args(&["-H", &bearer(&alice), "-H", &host, &format!("{base}/api/sessions?y=2")])).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!((reply.json()["path"].as_str(), reply.json()["query"].as_str()), (Some("/api/sessions"), Some("y=2")));

    // Another user, a missing session and no credentials.
    let refused = curl(args(&["-H", &bearer(&bob), &format!("{prefix}/")])).await;
    let missing_id = uuid::Uuid::now_v7().to_string();
    let missing = curl(args(&["-H", &bearer(&alice), &format!("{base}/s/{missing_id}/")])).await;
    assert_eq!((refused.status, missing.status), (404, 404));
    assert_eq!(
        refused.text().replace(&session, "ID"),
        missing.text().replace(&missing_id, "ID"),
        "bob's refusal differs from a missing session"
    );
    let anonymous = curl(args(&[&format!("{prefix}/")])).await;
    assert_eq!((anonymous.status, anonymous.header("www-authenticate")), (401, Some("Bearer")));
    let host_refused = curl(args(&["-H", &bearer(&bob), "-H", &host, &format!("{base}/")])).await;
    assert_eq!(host_refused.status, 404);

    // A large download streams through intact.
    let download = environment.root.join("large.bin");
    let size: usize = 48 * 1024 * 1024;
    let download_path = download.display().to_string();
    let reply = curl(args(&["-H", &bearer(&alice), "-o", &download_path, &format!("{prefix}/large?bytes={size}")])).await;
    assert_eq!(reply.status, 200);
    let bytes = std::fs::read(&download).expect("download");
    assert_eq!(bytes.len(), size);
    assert!(bytes.iter().enumerate().all(|(index, byte)| usize::from(*byte) == index % 251), "the download was altered");

    // A large upload reaches the app whole.
    let upload = environment.root.join("upload.bin");
    let upload_bytes: Vec<u8> = (0..20 * 1024 * 1024u32).map(|index| (index % 253) as u8).collect();
    let sum = upload_bytes.iter().fold(0u32, |sum, byte| sum.wrapping_add(u32::from(*byte)));
    std::fs::write(&upload, &upload_bytes).expect("upload file");
    let reply = curl(args(&[
        "-H",
        &bearer(&alice),
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{prefix}/upload"),
    ]))
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"bytes": upload_bytes.len(), "sum": sum}));

    // A WebSocket echo, by path and by host.
    let mut echo_socket = connect(&format!("ws://127.0.0.1:{port}/s/{session}/ws"), &alice, None, None).await.expect("proxied websocket");
    echo_socket.send(Message::Text("hello".into())).await.expect("send");
    assert_eq!(echo_socket.next().await.expect("echo").expect("echo"), Message::Text("hello".into()));
    echo_socket.send(Message::Binary(vec![1u8, 2, 3].into())).await.expect("send");
    assert_eq!(echo_socket.next().await.expect("echo").expect("echo"), Message::Binary(vec![1u8, 2, 3].into()));
    let mut host_request = format!("ws://127.0.0.1:{port}/ws").into_client_request().expect("request");
    host_request.headers_mut().insert("host", HeaderValue::from_str(&format!("{session}.proxy.test:{port}")).expect("host"));
    host_request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {alice}")).expect("header"));
    let (mut host_socket, _) = tokio_tungstenite::connect_async(host_request).await.expect("websocket by host");
    host_socket.send(Message::Text("by host".into())).await.expect("send");
    assert_eq!(host_socket.next().await.expect("echo").expect("echo"), Message::Text("by host".into()));
    let _ = host_socket.close(None).await;

    // The token exchange: one hop with the token, then the cookie alone.
    let reply = curl(args(&[&format!("{prefix}/page?berth_token={alice}&a=1")])).await;
    assert_eq!(reply.status, 303, "{}", reply.text());
    assert_eq!(reply.header("location"), Some(format!("/s/{session}/page?a=1").as_str()));
    let set_cookie = reply.header("set-cookie").expect("set-cookie").to_owned();
    assert!(
        set_cookie.contains(&format!("Path=/s/{session};")) && set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains(&alice), "the cookie is not the token");
    let cookie = set_cookie.split(';').next().expect("cookie pair").to_owned();
    let reply = curl(args(&["-H", &format!("Cookie: app=2; {cookie}"), &format!("{prefix}/page?a=1")])).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["cookie"], "app=2", "the app saw Berth's cookie");
    let origin = format!("Origin: http://127.0.0.1:{port}");
    let no_origin = curl(args(&["-H", &format!("Cookie: {cookie}"), "-d", "x", &format!("{prefix}/form")])).await;
    let wrong_origin =
        curl(args(&["-H", &format!("Cookie: {cookie}"), "-H", "Origin: http://evil.example", "-d", "x", &format!("{prefix}/form")])).await;
    let same_origin = curl(args(&["-H", &format!("Cookie: {cookie}"), "-H", &origin, "-d", "x", &format!("{prefix}/form")])).await;
    assert_eq!((no_origin.status, wrong_origin.status, same_origin.status), (403, 403, 200));
    let hijack = connect(&format!("ws://127.0.0.1:{port}/s/{session}/ws"), "", Some("http://evil.example"), Some(&cookie)).await;
    assert!(hijack.is_err(), "a cross-origin WebSocket with the cookie was let through");
    let other_session = curl(args(&["-H", &format!("Cookie: {cookie}"), &format!("{base}/s/{missing_id}/")])).await;
    assert_eq!(other_session.status, 401, "a cookie opens its own session only");
    let exchanged = curl(args(&["-X", "POST", "-H", &bearer(&alice), &format!("{base}/api/sessions/{session}/cookie")])).await;
    assert_eq!(exchanged.status, 200, "{}", exchanged.text());
    assert_eq!(exchanged.json()["path"], format!("/s/{session}/"));
    assert!(exchanged.header("set-cookie").is_some_and(|value| value.starts_with("berth_proxy=")));

    // A cookie never outlives the token it came from: a 2 s token's cookie is refused after it.
    let short = authority.mint("alice", &[], Duration::from_secs(2)).expect("token");
    let reply = curl(args(&[&format!("{prefix}/?berth_token={short}")])).await;
    let short_cookie = reply.header("set-cookie").expect("set-cookie").split(';').next().expect("pair").to_owned();
    assert_eq!(curl(args(&["-H", &format!("Cookie: {short_cookie}"), &format!("{prefix}/")])).await.status, 200);

    // Activity: WebSocket frames keep the session running past the 3 s idle timeout ... (the
    // checks above may have let it pause: a request wakes it, and earlier pushes are forgotten).
    let _ = states_within(&mut status, &session, Duration::from_millis(200)).await;
    assert_eq!(curl(args(&["-H", &bearer(&alice), &format!("{prefix}/")])).await.status, 200);
    let _ = states_within(&mut status, &session, Duration::from_millis(500)).await;
    for _ in 0..6 {
        echo_socket.send(Message::Text("typing".into())).await.expect("send");
        let _ = echo_socket.next().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let during_frames = states_within(&mut status, &session, Duration::from_millis(100)).await;
    assert!(!during_frames.contains(&"idle".to_owned()), "frames did not count as activity: {during_frames:?}");
    // ... while the same socket held open in silence, and a background poll, do not.
    let poller = {
        let (url, header) = (format!("{prefix}/status"), bearer(&alice));
        tokio::spawn(async move {
            loop {
                let _ = curl(args(&["-H", &header, &url])).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    wait_state(&mut status, &session, "idle", Duration::from_secs(20)).await;
    poller.abort();
    let paused_by = Instant::now() + Duration::from_secs(15);
    while container_state(&session) != "paused" {
        assert!(Instant::now() < paused_by, "the container was not paused: {}", container_state(&session));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let background = curl(args(&["-H", &bearer(&alice), &format!("{prefix}/status")])).await;
    assert_eq!((background.status, background.json()["error"].as_str()), (503, Some("idle")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(container_state(&session), "paused", "a background request woke the session");

    // A request to the paused session wakes it and is answered once it runs.
    let started = Instant::now();
    let woken = curl(args(&["-H", &bearer(&alice), &format!("{prefix}/after-pause")])).await;
    let wake_took = started.elapsed();
    assert_eq!(woken.status, 200, "{}", woken.text());
    assert_eq!(woken.json()["path"], "/after-pause");
    // The app answered, so it is thawed; Docker records the unpause a moment after.
    let resumed_by = Instant::now() + Duration::from_secs(5);
    while container_state(&session) != "running" {
        assert!(Instant::now() < resumed_by, "the container was not resumed: {}", container_state(&session));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_state(&mut status, &session, "running", Duration::from_secs(5)).await;
    println!("wake on request: first answer after {:.1} ms", wake_took.as_secs_f64() * 1000.0);
    let _ = echo_socket.close(None).await;

    // A closed session is answered as closed: JSON, or a page for browsers.
    status.send(Message::Text(json!({"type": "close", "id": "2", "session": session}).to_string().into())).await.expect("close");
    wait_state(&mut status, &session, "closed", STEP_TIMEOUT).await;
    let closed = curl(args(&["-H", &bearer(&alice), &format!("{prefix}/")])).await;
    assert_eq!((closed.status, closed.json()["error"].as_str()), (410, Some("session_closed")), "{}", closed.text());
    let closed_page = curl(args(&["-H", &bearer(&alice), "-H", "Accept: text/html", &format!("{prefix}/")])).await;
    assert_eq!(closed_page.status, 410);
    assert!(closed_page.text().contains("closed"), "{}", closed_page.text());
    // Long after its token's 2 s, the short cookie is refused.
    let expired = curl(args(&["-H", &format!("Cookie: {short_cookie}"), "-H", "Accept: text/html", &format!("{prefix}/")])).await;
    assert_eq!(expired.status, 401);
    assert!(expired.header("content-type").is_some_and(|value| value.starts_with("text/html")), "browsers get a page");
    let log = berth.log();
    assert!(!log.contains(&alice) && !log.contains(&cookie[12..]), "a token or cookie reached the log");
}

async fn curl_ready(port: u16) -> Option<()> {
    let output =
        tokio::task::spawn_blocking(move || Command::new("curl").args(["-fsS", &format!("http://127.0.0.1:{port}/readyz")]).output())
            .await
            .ok()?
            .ok()?;
    output.status.success().then_some(())
}
