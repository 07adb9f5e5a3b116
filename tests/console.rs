//! The web console in a real browser: headless Chromium (Debian's `chromium`) driven over the
//! DevTools protocol from Rust, against the real `berth dev` binary on its own RabbitMQ vhost,
//! Redis database, object directory and store, with the real Docker engine.
//!
//! Sign in with the link `berth dev` prints → open a workspace and watch the badge go
//! materializing → running with the progress bar moving → type in the terminal and see it echoed →
//! upload a file by drag and drop and `cat` it → edit a file in the browser and read the change
//! through the files API → container stats drawn → idle badge, a key in the terminal wakes it →
//! the admin view → close → closed → sign out, sign in as bob and see none of it. Every step saves
//! a screenshot under `target/console-screenshots/<browser>/`; no console error is allowed.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const JWT_SECRET: &str = "console-test-secret-long-enough-for-hs256";
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Files seeded into the workspace so that materializing takes long enough to watch.
const SEEDED_FILES: usize = 8000;
const SEEDED_FILE_BYTES: usize = 8 * 1024;

/// Everything one run owns, removed on drop.
struct Environment {
    vhost: String,
    redis_db: u32,
    root: PathBuf,
    session_port: u16,
    deployment: String,
}

impl Environment {
    fn new() -> Environment {
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let vhost = format!("berth-console-{run}");
        run_ok("rabbitmqctl", &["add_vhost", &vhost]);
        run_ok("rabbitmqctl", &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let root = std::env::temp_dir().join(format!("berth-console-{run}"));
        std::fs::create_dir_all(root.join("objects")).expect("temp root");
        let session_port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        // Database 8 is this test's alone (the end-to-end runs use 10-15 and flush theirs).
        Environment { vhost, redis_db: 8, root, session_port, deployment: format!("console-{run}") }
    }

    fn objects(&self) -> PathBuf {
        self.root.join("objects")
    }

    /// Puts a file into the object store (a directory here) under `console/<user>/<workspace>/`.
    fn seed(&self, user: &str, workspace: &str, path: &str, body: &[u8]) {
        let file = self.objects().join("console").join(user).join(workspace).join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("object folder");
        std::fs::write(file, body).expect("seed object");
    }

    fn start_berth(&self) -> Berth {
        self.start_berth_with("console")
    }

    /// `berth dev` on `profile`, a folder under tests/profiles.
    fn start_berth_with(&self, profile: &str) -> Berth {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let log_path = self.root.join("berth.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["--profile", profile, "dev"])
            .env("BERTH_PROFILES_DIR", manifest.join("tests/profiles"))
            .env("BERTH_PATTERNS_DIR", manifest.join("patterns"))
            .env("BERTH_AMQP_URL", format!("amqp://guest:guest@127.0.0.1:5672/{}", self.vhost))
            .env("BERTH_REDIS_URL", format!("redis://127.0.0.1:6379/{}", self.redis_db))
            .env("BERTH_STORE_URL", format!("sqlite://{}", self.root.join("store.sqlite").display()))
            .env("BERTH_OBJECT_STORE_URL", format!("file://{}", self.objects().display()))
            .env("BERTH_WORKSPACE_ROOT", self.root.join("workspaces"))
            .env("BERTH_DEPLOYMENT", &self.deployment)
            .env("BERTH_SESSION_ADDR", format!("127.0.0.1:{}", self.session_port))
            .env("BERTH_JWT_SECRET", JWT_SECRET)
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
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.root.join("berth.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- berth dev's log, last lines ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.vhost]).output();
        let _ = Command::new("redis-cli").args(["-n", &self.redis_db.to_string(), "FLUSHDB"]).output();
        let listed = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=berth.deployment={}", self.deployment), "--filter", "label=berth.managed=true"])
            .output();
        if let Ok(listed) = listed {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        // The deployment's bridge network: left behind, they use up Docker's address pools.
        let networks = Command::new("docker")
            .args(["network", "ls", "-q", "--filter", &format!("label=berth.deployment={}", self.deployment)])
            .output();
        if let Ok(networks) = networks {
            for id in String::from_utf8_lossy(&networks.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["network", "rm", id]).output();
            }
        }
        // A session left open (a failed assertion) may leave its workspace image mounted.
        let root = self.root.display().to_string();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut mounted: Vec<&str> =
            mounts.lines().filter_map(|line| line.split_whitespace().nth(1)).filter(|point| point.starts_with(&root)).collect();
        mounted.sort_by(|a, b| b.cmp(a));
        for point in mounted {
            let _ = Command::new("umount").args(["-l", point]).output();
        }
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

    /// Waits for the welcome text and returns the one-click links it printed, in order.
    async fn sign_in_links(&mut self) -> Vec<String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll berth") {
                panic!("berth dev exited early ({status}):\n{}", self.log());
            }
            let log = self.log();
            let links: Vec<String> = log
                .lines()
                .filter_map(|line| line.trim().strip_prefix("http://"))
                .filter(|rest| rest.contains("/console/signin?link="))
                .map(|rest| format!("http://{rest}"))
                .collect();
            if links.len() >= 2 && http_get(self.session_port, "/readyz").is_some_and(|(status, _)| status == 200) {
                return links;
            }
            assert!(Instant::now() < deadline, "berth dev printed no sign-in links:\n{log}");
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

/// A plain HTTP/1.0 request on 127.0.0.1; `(status, body)`, or None when nothing answers.
fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> Option<(u16, Vec<u8>)> {
    request(port, "HTTP/1.0", method, path, token)
}

/// Chromium's DevTools server answers HTTP/1.1 only.
fn devtools_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    request(port, "HTTP/1.1", "GET", path, None)
}

fn request(port: u16, version: &str, method: &str, path: &str, token: Option<&str>) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let authorization = token.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    write!(stream, "{method} {path} {version}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{authorization}\r\n").ok()?;
    // Read to the end of the body: `Content-Length` when given (a keep-alive server never closes),
    // else until the server closes.
    let mut response = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        if let Some(split) = response.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
            let length =
                head.lines().find_map(|line| line.strip_prefix("content-length:")).and_then(|value| value.trim().parse::<usize>().ok());
            if length.is_some_and(|length| response.len() >= split + 4 + length) {
                break;
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => response.extend_from_slice(&buffer[..read]),
            Err(_) => return None,
        }
    }
    let split = response.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response[split + 4..].to_vec()))
}

fn http_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    http(port, "GET", path, None)
}

fn mint(user: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["--profile", "console", "token", "--user", user, "--ttl", "15m"])
        .env("BERTH_PROFILES_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/profiles"))
        .env("BERTH_JWT_SECRET", JWT_SECRET)
        .output()
        .expect("berth token runs");
    assert!(output.status.success(), "berth token: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().last().expect("a token").trim().to_owned()
}

/// A browser process, killed when dropped (also when a launch fails halfway).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    process: ChildGuard,
    profile_dir: PathBuf,
    page: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
    devtools_port: u16,
    /// Console errors and uncaught exceptions the page reported.
    errors: Vec<String>,
    screenshots: PathBuf,
    shots: usize,
}

impl Browser {
    async fn launch(screenshots: PathBuf, width: u32, height: u32) -> Browser {
        let chromium = ["chromium", "chromium-browser"]
            .into_iter()
            .find(|name| Command::new("which").arg(name).output().is_ok_and(|out| out.status.success()));
        let chromium = chromium.expect("Debian's chromium is installed (scripts/services.sh installs it)");
        let profile_dir = std::env::temp_dir().join(format!("berth-console-chromium-{}", uuid::Uuid::new_v4().simple()));
        let mut process = Command::new(chromium)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile_dir.display()),
                &format!("--window-size={width},{height}"),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = process.stderr.take().expect("stderr");
        let process = ChildGuard(process);
        let (found, endpoint) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        let _ = found.send(url.trim().to_owned());
                        sent = true;
                    }
                }
            }
        });
        let browser_url = endpoint.recv_timeout(Duration::from_secs(30)).expect("chromium prints its DevTools address");
        let port: u16 = browser_url
            .split(':')
            .nth(2)
            .and_then(|rest| rest.split('/').next())
            .and_then(|port| port.parse().ok())
            .expect("DevTools port");
        let (_, list) = devtools_get(port, "/json/list").expect("DevTools lists its pages");
        let pages: Value = serde_json::from_slice(&list).expect("page list");
        let page_url = pages
            .as_array()
            .and_then(|pages| pages.iter().find(|page| page["type"] == "page"))
            .and_then(|page| page["webSocketDebuggerUrl"].as_str())
            .expect("a page")
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(page_url.as_str()).await.expect("DevTools page socket");
        std::fs::create_dir_all(&screenshots).expect("screenshot folder");
        let mut browser =
            Browser { process, profile_dir, page, next_id: 0, devtools_port: port, errors: Vec::new(), screenshots, shots: 0 };
        browser.call("Runtime.enable", json!({})).await;
        browser.call("Log.enable", json!({})).await;
        browser.call("Page.enable", json!({})).await;
        browser.set_viewport(width, height, false).await;
        browser
    }

    fn note_event(&mut self, event: &Value) {
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let details = &event["params"]["exceptionDetails"];
                let text = details["exception"]["description"].as_str().or(details["text"].as_str()).unwrap_or("exception");
                self.errors.push(format!("uncaught: {text}"));
            }
            Some("Runtime.consoleAPICalled") if event["params"]["type"] == "error" => {
                self.errors.push(format!("console.error: {}", event["params"]["args"]));
            }
            Some("Log.entryAdded") if event["params"]["entry"]["level"] == "error" => {
                self.errors.push(format!("log: {} {}", event["params"]["entry"]["text"], event["params"]["entry"]["url"]));
            }
            _ => {}
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.page.send(Message::text(json!({"id": id, "method": method, "params": params}).to_string())).await.expect("send to DevTools");
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let next =
                tokio::time::timeout_at(deadline, self.page.next()).await.unwrap_or_else(|_| panic!("DevTools did not answer {method}"));
            let Some(Ok(Message::Text(text))) = next else { continue };
            let message: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if message["id"] == id {
                assert!(message.get("error").is_none(), "{method} failed: {}", message["error"]);
                return message["result"].clone();
            }
            self.note_event(&message);
        }
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self.call("Runtime.evaluate", json!({"expression": expression, "awaitPromise": true, "returnByValue": true})).await;
        if let Some(details) = result.get("exceptionDetails") {
            panic!("evaluating {expression}: {details}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy; returns its value.
    async fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let value = self.eval(expression).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false)) && value != json!("") && value != json!(0);
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                self.screenshot(&format!("timeout-{}", what.replace(' ', "-"))).await;
                panic!("timed out waiting for {what} ({expression}); page errors: {:?}", self.errors);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for another tab whose address contains `needle` to finish loading; its DevTools entry.
    async fn wait_for_page(&mut self, needle: &str) -> Value {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let pages = devtools_get(self.devtools_port, "/json/list").and_then(|(_, body)| serde_json::from_slice::<Value>(&body).ok());
            let found = pages.and_then(|pages| {
                pages
                    .as_array()?
                    .iter()
                    .find(|page| page["type"] == "page" && page["url"].as_str().is_some_and(|url| url.contains(needle)))
                    .cloned()
            });
            if let Some(page) = found {
                return page;
            }
            assert!(Instant::now() < deadline, "no tab opened at {needle}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn close_page(&mut self, page: &Value) {
        let id = page["id"].as_str().unwrap_or_default();
        let _ = devtools_get(self.devtools_port, &format!("/json/close/{id}"));
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("the page to load", "document.readyState === 'complete'").await;
    }

    async fn screenshot(&mut self, name: &str) -> PathBuf {
        self.shots += 1;
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        let bytes = base64_decode(shot["data"].as_str().expect("screenshot data"));
        let path = self.screenshots.join(format!("{:02}-{name}.png", self.shots));
        std::fs::write(&path, bytes).expect("write screenshot");
        path
    }

    async fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text})).await;
    }

    async fn press_enter(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            let mut params =
                json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13});
            if kind == "keyDown" {
                params["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", params).await;
        }
    }

    async fn set_viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        let _ = std::fs::remove_dir_all(&self.profile_dir);
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |byte: u8| match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let sextets: Vec<u8> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(sextets.len() * 3 / 4);
    for chunk in sextets.chunks(4) {
        let bits = chunk.iter().enumerate().fold(0u32, |bits, (index, sextet)| bits | (u32::from(*sextet) << (18 - 6 * index)));
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// The terminal's visible text (xterm's buffer, one line per row).
const TERMINAL_TEXT: &str = "(() => { const t = window.berthTerminal; if (!t) return ''; const b = t.buffer.active; \
    let s = []; for (let i = 0; i < b.length; i++) { const l = b.getLine(i); if (l) s.push(l.translateToString(true)); } return s.join('\\n'); })()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let environment = Environment::new();
    let workspace = "thesis";
    // Many small files (so materializing takes long enough to watch) and one to edit.
    let filler = vec![b'x'; SEEDED_FILE_BYTES];
    for index in 0..SEEDED_FILES {
        environment.seed("alice", workspace, &format!("data/part-{index:04}.txt"), &filler);
    }
    environment.seed("alice", workspace, "notes.txt", b"first line\n");
    let mut berth = environment.start_berth();
    let links = berth.sign_in_links().await;
    let port = environment.session_port;
    let screenshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots/chromium");
    let _ = std::fs::remove_dir_all(&screenshots);
    let mut browser = Browser::launch(screenshots.clone(), 1280, 900).await;

    // Signed out: the sign-in form.
    browser.navigate(&format!("http://127.0.0.1:{port}/")).await;
    browser.wait_for("the sign-in form", "!!document.querySelector('#token')").await;
    browser.screenshot("sign-in").await;

    // The one-click link berth dev printed first (alice): the cookie is set and the token leaves
    // the address bar.
    browser.navigate(&links[0]).await;
    browser
        .wait_for(
            "alice signed in",
            "document.querySelector('#who')?.textContent.includes('alice') && !!document.querySelector('#open-form')",
        )
        .await;
    let address = browser.eval("location.href").await;
    assert_eq!(address, json!(format!("http://127.0.0.1:{port}/")), "the token left the address bar");
    assert_eq!(browser.eval("document.cookie").await, json!(""), "the cookie is HttpOnly");
    browser.screenshot("sessions-empty").await;
    // The link works once.
    let (status, _) = http_get(port, &links[0]["http://127.0.0.1:".len() + port.to_string().len()..]).expect("link answers");
    assert_eq!(status, 401, "a used link is refused");

    // Open a workspace: the badge goes materializing → running, the progress bar moves.
    browser
        .eval(&format!("document.querySelector('#workspace').value = '{workspace}'; document.querySelector('#open').click(); true"))
        .await;
    browser.wait_for("the workspace view", "location.hash.startsWith('#/s/')").await;
    let session = browser.eval("location.hash.slice(4)").await.as_str().expect("session id").to_owned();
    browser.wait_for("the progress bar", "!!document.querySelector('.progress progress')").await;
    browser.wait_for("some files copied", "(window.berthConsole.progress[location.hash.slice(4)] || []).length >= 1 && !!document.querySelector('.progress-text')?.textContent.includes('files')").await;
    browser.screenshot("materializing").await;
    browser.wait_for("running", "document.querySelector('.badge')?.dataset.state === 'running'").await;
    let states = browser.eval("window.berthConsole.states[location.hash.slice(4)]").await;
    let states: Vec<String> = serde_json::from_value(states).expect("states");
    let position = |state: &str| states.iter().position(|seen| seen == state);
    assert!(
        position("materializing").is_some() && position("materializing") < position("running"),
        "materializing before running: {states:?}"
    );
    let progress = browser.eval("window.berthConsole.progress[location.hash.slice(4)].map(p => p.files_done)").await;
    let progress: Vec<u64> = serde_json::from_value(progress).expect("progress");
    assert!(
        progress.len() >= 2 && progress.windows(2).all(|pair| pair[0] <= pair[1]) && progress.first() < progress.last(),
        "the progress bar moved: {progress:?}"
    );
    assert!(progress.last() >= Some(&(SEEDED_FILES as u64)), "all files counted: {progress:?}");
    browser.wait_for("stage timings", "document.querySelector('.timings')?.textContent.includes('ready in')").await;

    // The terminal: type, see it echoed.
    browser
        .wait_for("the terminal connected", "document.querySelector('#terminal-note')?.textContent === '' && !!window.berthTerminal")
        .await;
    browser.wait_for("a prompt", &format!("{TERMINAL_TEXT}.trim().length > 0")).await;
    browser.eval("window.berthTerminal.focus(); true").await;
    browser.type_text("echo hello-from-browser").await;
    browser.press_enter().await;
    browser.wait_for("the echo", &format!("{TERMINAL_TEXT}.split('hello-from-browser').length >= 3")).await;
    browser.screenshot("terminal").await;

    // Upload by drag and drop, then cat it in the terminal.
    browser.wait_for("the file list", "!!document.querySelector('#files li[data-path=\"notes.txt\"]')").await;
    browser
        .eval(
            "(() => { const dt = new DataTransfer(); dt.items.add(new File(['dropped-by-the-browser\\n'], 'dropped.txt', {type: 'text/plain'})); \
             document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); return true; })()",
        )
        .await;
    browser.wait_for("the uploaded file listed", "!!document.querySelector('#files li[data-path=\"dropped.txt\"]')").await;
    browser.eval("window.berthTerminal.focus(); true").await;
    browser.type_text("cat /workspace/dropped.txt").await;
    browser.press_enter().await;
    browser.wait_for("the uploaded file in the terminal", &format!("{TERMINAL_TEXT}.split('dropped-by-the-browser').length >= 2")).await;
    browser.screenshot("uploaded").await;

    // Edit a file in the browser; the files API returns the change.
    browser.eval("document.querySelector('#files li[data-path=\"notes.txt\"] button.entry').click(); true").await;
    browser.wait_for("the editor", "document.querySelector('#editor-text')?.value === 'first line\\n'").await;
    browser.eval("const area = document.querySelector('#editor-text'); area.value += 'edited in the browser\\n'; document.querySelector('#editor-save').click(); true").await;
    browser.wait_for("saved", "document.querySelector('#editor-status')?.textContent === 'Saved.'").await;
    let alice = mint("alice");
    let (status, body) = http(port, "GET", &format!("/api/sessions/{session}/files/notes.txt"), Some(&alice)).expect("files API answers");
    assert_eq!((status, String::from_utf8_lossy(&body).into_owned()), (200, "first line\nedited in the browser\n".to_owned()));
    browser.screenshot("edited").await;

    // Container stats reach the charts while the view is open.
    browser.wait_for("stats drawn", "document.querySelectorAll('#charts .value')[1]?.textContent.includes(' of ')").await;
    browser.eval("document.querySelector('#editor').hidden = true; window.scrollTo(0, 0); true").await;
    browser.screenshot("workspace").await;

    // "Open app" opens the session's service through the proxy in a new tab.
    browser.eval("document.querySelector('[data-action=\"app\"]').click(); true").await;
    let app_page = browser.wait_for_page(&format!("/s/{session}/")).await;
    assert!(app_page["url"].as_str().is_some_and(|url| !url.contains("token")), "no token in the app's address: {app_page}");
    browser.close_page(&app_page).await;

    // Phone width: still readable (no horizontal scrolling of the page).
    browser.set_viewport(390, 844, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let overflow = browser.eval("document.documentElement.scrollWidth <= window.innerWidth + 1").await;
    browser.screenshot("phone").await;
    assert_eq!(overflow, json!(true), "no horizontal scroll at phone width");
    browser.set_viewport(1280, 900, false).await;

    // The warning before the pause (idle_warning_secs before it) offers "Keep working": pressed,
    // the session keeps running and the warning goes.
    browser
        .wait_for(
            "the pause warning",
            "!!document.querySelector('[data-warning=\"pause\"]') && !!document.querySelector('[data-action=\"keepalive\"]')",
        )
        .await;
    browser.screenshot("warning").await;
    browser.eval("document.querySelector('[data-action=\"keepalive\"]').click(); true").await;
    browser
        .wait_for(
            "kept working",
            "!document.querySelector('[data-warning]') && document.querySelector('.badge')?.dataset.state === 'running'",
        )
        .await;

    // Idle: nothing typed for the profile's idle time → the badge turns idle and the tier says
    // how long a wake takes; a key wakes it.
    browser.wait_for("idle", "document.querySelector('.badge')?.dataset.state === 'idle'").await;
    browser.wait_for("the tier", "document.querySelector('[data-tier=\"idle\"]')?.textContent.includes('Paused')").await;
    browser.screenshot("idle").await;
    browser.eval("window.berthTerminal.focus(); true").await;
    browser.type_text("x").await;
    browser.wait_for("awake again", "document.querySelector('.badge')?.dataset.state === 'running'").await;
    browser.wait_for("the terminal back", "document.querySelector('#terminal-note')?.textContent === ''").await;
    browser.screenshot("woken").await;

    // The host has room for one session (the profile's limits): a second workspace, opened by
    // keyboard alone, waits in the queue and says where it stands.
    browser.navigate(&format!("http://127.0.0.1:{port}/#/")).await;
    browser.wait_for("the open form", "!!document.querySelector('#workspace')").await;
    browser.eval("document.querySelector('#workspace').focus(); true").await;
    browser.type_text("second").await;
    browser.press_enter().await;
    browser
        .wait_for("the second session's view", &format!("location.hash.startsWith('#/s/') && !location.hash.includes('{session}')"))
        .await;
    let second = browser.eval("location.hash.slice(4)").await.as_str().expect("second session id").to_owned();
    browser.wait_for("queued", "document.querySelector('.badge')?.dataset.state === 'queued'").await;
    browser.wait_for("the queue position", "document.querySelector('.queue')?.textContent.includes('number 1 in the queue')").await;
    browser.screenshot("queued").await;

    // The admin view, signed in with the admin link berth dev printed: alice's session, the queue.
    browser.navigate(&links[1]).await;
    browser.wait_for("admin signed in", "document.querySelector('#who')?.textContent.includes('admin')").await;
    browser.navigate(&format!("http://127.0.0.1:{port}/#/admin")).await;
    browser
        .wait_for(
            "alice's session in the admin view",
            &format!("!!document.querySelector('#admin-sessions tr[data-session=\"{session}\"]')"),
        )
        .await;
    browser.wait_for("capacity shown", "document.querySelector('#admin')?.textContent.includes('128 MiB used, 0 MiB free')").await;
    browser.wait_for("the queue shown", "document.querySelector('#admin')?.textContent.includes('Queue (1)')").await;
    browser.screenshot("admin").await;

    // Back as alice: close the first → closed, and the queued one is let in and runs.
    let relink = mint("alice");
    browser.navigate(&format!("http://127.0.0.1:{port}/console/signin?link={relink}")).await;
    browser
        .wait_for("alice again", "document.querySelector('#who')?.textContent.includes('alice') && !!document.querySelector('#sessions')")
        .await;
    browser.wait_for("alice's card", &format!("!!document.querySelector('li[data-session=\"{session}\"] [data-action=\"close\"]')")).await;
    browser.eval(&format!("document.querySelector('li[data-session=\"{session}\"] [data-action=\"close\"]').click(); true")).await;
    browser
        .wait_for("closed", &format!("document.querySelector('li[data-session=\"{session}\"] .badge')?.dataset.state === 'closed'"))
        .await;
    browser
        .wait_for(
            "the queued session admitted and running",
            &format!("document.querySelector('li[data-session=\"{second}\"] .badge')?.dataset.state === 'running'"),
        )
        .await;
    browser.screenshot("closed").await;
    browser.eval(&format!("document.querySelector('li[data-session=\"{second}\"] [data-action=\"close\"]').click(); true")).await;
    browser
        .wait_for(
            "the second closed",
            &format!("document.querySelector('li[data-session=\"{second}\"] .badge')?.dataset.state === 'closed'"),
        )
        .await;

    // Sign out, sign in as bob: none of alice's sessions.
    browser.eval("document.querySelector('#signout').click(); true").await;
    browser.wait_for("signed out", "!!document.querySelector('#token')").await;
    let bob = mint("bob");
    browser.navigate(&format!("http://127.0.0.1:{port}/console/signin?link={bob}")).await;
    browser
        .wait_for(
            "bob signed in",
            "document.querySelector('#who')?.textContent.includes('bob') && !!document.querySelector('#sessions li')",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cards = browser.eval("document.querySelectorAll('#sessions li[data-session]').length").await;
    assert_eq!(cards, json!(0), "bob sees none of alice's sessions");
    browser.navigate(&format!("http://127.0.0.1:{port}/#/s/{session}")).await;
    browser.wait_for("not found for bob", "document.querySelector('h1')?.textContent === 'No such session'").await;
    browser.screenshot("bob").await;

    let errors = browser.errors.clone();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    drop(browser);
    berth.stop();
    println!("screenshots in {}", screenshots.display());
}

/// Headless Firefox with one tab, driven over WebDriver BiDi (Firefox's own remote protocol).
struct Firefox {
    process: ChildGuard,
    profile_dir: PathBuf,
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    context: String,
    next_id: u64,
    errors: Vec<String>,
    screenshots: PathBuf,
}

impl Firefox {
    async fn launch(screenshots: PathBuf) -> Firefox {
        let profile_dir = std::env::temp_dir().join(format!("berth-console-firefox-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&profile_dir).expect("firefox profile");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let process = Command::new("firefox-esr")
            .args([
                "--headless",
                "--no-remote",
                "--profile",
                &profile_dir.display().to_string(),
                "--remote-debugging-port",
                &port.to_string(),
                "--window-size=1280,900",
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("firefox-esr starts");
        let process = ChildGuard(process);
        let deadline = Instant::now() + STEP_TIMEOUT;
        let socket = loop {
            if let Ok((socket, _)) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/session")).await {
                break socket;
            }
            assert!(Instant::now() < deadline, "Firefox's WebDriver BiDi did not come up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut firefox = Firefox { process, profile_dir, socket, context: String::new(), next_id: 0, errors: Vec::new(), screenshots };
        firefox.call("session.new", json!({"capabilities": {}})).await;
        firefox.call("session.subscribe", json!({"events": ["log.entryAdded"]})).await;
        let tree = firefox.call("browsingContext.getTree", json!({})).await;
        firefox.context = tree["contexts"][0]["context"].as_str().expect("a tab").to_owned();
        firefox
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.socket.send(Message::text(json!({"id": id, "method": method, "params": params}).to_string())).await.expect("send to Firefox");
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let next =
                tokio::time::timeout_at(deadline, self.socket.next()).await.unwrap_or_else(|_| panic!("Firefox did not answer {method}"));
            let Some(Ok(Message::Text(text))) = next else { continue };
            let message: Value = serde_json::from_str(text.as_str()).expect("BiDi JSON");
            if message["id"] == id {
                assert_ne!(message["type"], "error", "{method} failed: {message}");
                return message["result"].clone();
            }
            if message["method"] == "log.entryAdded" && message["params"]["level"] == "error" {
                self.errors.push(format!("{}: {}", message["params"]["type"], message["params"]["text"]));
            }
        }
    }

    /// Evaluates `expression` in the tab; its value, through JSON.
    async fn eval(&mut self, expression: &str) -> Value {
        let wrapped = format!("(async () => JSON.stringify(await ({expression})))()");
        let context = self.context.clone();
        let result =
            self.call("script.evaluate", json!({"expression": wrapped, "target": {"context": context}, "awaitPromise": true})).await;
        assert_eq!(result["type"], "success", "evaluating {expression}: {result}");
        result["result"]["value"].as_str().map_or(Value::Null, |text| serde_json::from_str(text).unwrap_or(Value::Null))
    }

    async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let value = self.eval(expression).await;
            if !matches!(&value, Value::Null | Value::Bool(false)) && value != json!("") && value != json!(0) {
                return;
            }
            if Instant::now() > deadline {
                self.screenshot(&format!("timeout-{}", what.replace(' ', "-"))).await;
                panic!("Firefox: timed out waiting for {what} ({expression}); page errors: {:?}", self.errors);
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn navigate(&mut self, url: &str) {
        let context = self.context.clone();
        self.call("browsingContext.navigate", json!({"context": context, "url": url, "wait": "complete"})).await;
    }

    async fn screenshot(&mut self, name: &str) {
        let context = self.context.clone();
        let shot = self.call("browsingContext.captureScreenshot", json!({"context": context})).await;
        let bytes = base64_decode(shot["data"].as_str().expect("screenshot data"));
        std::fs::create_dir_all(&self.screenshots).expect("screenshot folder");
        std::fs::write(self.screenshots.join(format!("{name}.png")), bytes).expect("write screenshot");
    }

    /// Real key presses into whatever has focus (`\n` is Enter).
    async fn type_keys(&mut self, text: &str) {
        let mut actions = Vec::new();
        for character in text.chars() {
            let value = if character == '\n' { "\u{E007}".to_owned() } else { character.to_string() };
            actions.push(json!({"type": "keyDown", "value": value}));
            actions.push(json!({"type": "keyUp", "value": value}));
        }
        let context = self.context.clone();
        self.call("input.performActions", json!({"context": context, "actions": [{"type": "key", "id": "keyboard", "actions": actions}]}))
            .await;
    }
}

impl Drop for Firefox {
    fn drop(&mut self) {
        let _ = self.process.0.kill();
        let _ = self.process.0.wait();
        let _ = std::fs::remove_dir_all(&self.profile_dir);
    }
}

/// The same console in Firefox: sign in with the printed link, open a workspace, see it run, type
/// in the terminal, list the files, close it; no console error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_firefox() {
    let mut environment = Environment::new();
    // Its own Redis database: the Chromium test runs at the same time on 8.
    environment.redis_db = 7;
    environment.seed("carol", "essay", "draft.txt", b"a draft\n");
    let mut berth = environment.start_berth();
    let links = berth.sign_in_links().await;
    let port = environment.session_port;
    let screenshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots/firefox");
    let _ = std::fs::remove_dir_all(&screenshots);
    let mut firefox = Firefox::launch(screenshots).await;
    // The printed link is alice's; carol gets one the same way (`berth token`).
    assert!(links[0].contains("/console/signin?link="));
    let carol = mint("carol");
    firefox.navigate(&format!("http://127.0.0.1:{port}/console/signin?link={carol}")).await;
    firefox
        .wait_for(
            "carol signed in",
            "document.querySelector('#who')?.textContent.includes('carol') && !!document.querySelector('#open-form')",
        )
        .await;
    assert_eq!(firefox.eval("location.href").await, json!(format!("http://127.0.0.1:{port}/")));
    firefox.eval("(document.querySelector('#workspace').value = 'essay', document.querySelector('#open').click(), true)").await;
    firefox.wait_for("running", "document.querySelector('.badge')?.dataset.state === 'running'").await;
    firefox
        .wait_for("the terminal connected", "document.querySelector('#terminal-note')?.textContent === '' && !!window.berthTerminal")
        .await;
    firefox.eval("(window.berthTerminal.focus(), true)").await;
    firefox.type_keys("echo firefox-$((6*7))\n").await;
    firefox.wait_for("the echo", &format!("{TERMINAL_TEXT}.includes('firefox-42')")).await;
    firefox.wait_for("the files", "!!document.querySelector('#files li[data-path=\"draft.txt\"]')").await;
    firefox.screenshot("workspace").await;
    firefox.eval("(document.querySelector('[data-action=\"close\"]').click(), true)").await;
    firefox.wait_for("closed", "document.querySelector('.badge')?.dataset.state === 'closed'").await;
    firefox.screenshot("closed").await;
    let errors = firefox.errors.clone();
    assert!(errors.is_empty(), "Firefox console errors: {errors:#?}");
    drop(firefox);
    berth.stop();
}

/// A workspace that fails (its image never answers the health check) is explained in plain words:
/// a red `failed` badge and a sentence, no address, path or trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_explains_a_failure() {
    let mut environment = Environment::new();
    // Its own Redis database: the other console tests run at the same time on 8 and 7.
    environment.redis_db = 6;
    let mut berth = environment.start_berth_with("console-broken");
    let links = berth.sign_in_links().await;
    let screenshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots/failure");
    let _ = std::fs::remove_dir_all(&screenshots);
    let mut browser = Browser::launch(screenshots, 1280, 900).await;
    browser.navigate(&links[0]).await;
    browser.wait_for("alice signed in", "!!document.querySelector('#open-form')").await;
    browser.eval("document.querySelector('#workspace').value = 'doomed'; document.querySelector('#open').click(); true").await;
    browser.wait_for("the workspace view", "location.hash.startsWith('#/s/')").await;
    browser.wait_for("failed", "document.querySelector('.badge')?.dataset.state === 'failed'").await;
    let explained = browser.eval("document.querySelector('[role=alert].error')?.textContent || ''").await;
    let explained = explained.as_str().unwrap_or_default().to_owned();
    browser.screenshot("failed").await;
    assert!(explained.contains("did not start in time"), "the failure is explained: {explained:?}");
    for leak in ["://", "/tmp", "/var", " at ", ".rs:", "Error {", "127.0.0.1"] {
        assert!(!explained.contains(leak), "the explanation {explained:?} shows {leak:?}");
    }
    let errors = browser.errors.clone();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    drop(browser);
    berth.stop();
}
