//! The compose stack, run for real: `compose/docker-compose.yml` with the override
//! `compose/docker-compose.local.yml` (image sources swapped for images built on this machine by
//! `scripts/compose-images.sh`, the store on SQLite because no MongoDB server can be had here),
//! started with Debian's `docker-compose` against the host's Docker engine.
//!
//! In order: Redis and RabbitMQ healthy → bootstrap once, exit 0 → the engine and the agents start
//! after it, report ready and become healthy; a second `up` changes nothing bootstrap made. A
//! session through the published session port (WebSocket): the container agent provisions the
//! session container on the host's engine, the workspace agent materializes into the directory
//! both agents and the host see at the same path, `running`, the workspace answers, the engine and
//! two agents are restarted mid-session, a file written inside is synced on close, everything is
//! removed. A broker outage shows as an unhealthy service in `docker-compose ps` and heals. `down`,
//! `up`: the records survive, nothing is orphaned. Then the same open through `berth dev` on the
//! host, for the time next to it.
//!
//! Skipped, saying so, only without a Docker engine or `docker-compose`, or when no Debian mirror
//! can be reached to build the images. Everything is removed at the end (`down -v`, the session
//! containers by label, the session network, the workspace root, the S3 server).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use protocol::store::{collections, FindArgs, StoreClient};
use protocol::{Bus, BusConfig};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const PROJECT: &str = "berth-compose-test";
const DEPLOYMENT: &str = "compose-test";
/// The stack's default profile (BERTH_PROFILE is left unset), with its `directory` workspaces; its
/// workspace image is a local stand-in when the real one is missing (scripts/compose-images.sh).
const PROFILE: &str = "ide";
const USER: &str = "dev-ana";
/// Where the ide profile mounts the workspace in the session container.
const MOUNT: &str = "/home/coder/project";
const JWT_SECRET: &str = "compose-test-secret-long-enough-for-hs256";
const S3_USER: &str = "berth-test:berth-test";
const STEP_TIMEOUT: Duration = Duration::from_secs(90);
/// The services that keep running, each with a healthcheck.
const LONG_RUNNING: [&str; 7] = ["redis", "rabbitmq", "engine", "container-agent", "workspace-agent", "persistence-agent", "session-agent"];
const BERTH_SERVICES: [&str; 5] = ["engine", "container-agent", "workspace-agent", "persistence-agent", "session-agent"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One line on stderr, written past the test harness' capture: the skip notice, the MongoDB note and
/// the times belong in `scripts/test.sh`'s output (which counts `compose: SKIPPED` lines as skipped).
fn say(message: impl AsRef<str>) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "compose: {}", message.as_ref());
}

fn command_works(program: &str, arguments: &[&str]) -> bool {
    Command::new(program).args(arguments).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn output(program: &str, arguments: &[&str]) -> Output {
    Command::new(program).args(arguments).output().unwrap_or_else(|error| panic!("{program} runs: {error}"))
}

fn stdout_of(program: &str, arguments: &[&str]) -> String {
    let result = output(program, arguments);
    assert!(result.status.success(), "{program} {arguments:?} failed: {}", String::from_utf8_lossy(&result.stderr));
    String::from_utf8_lossy(&result.stdout).trim().to_owned()
}

fn free_port(address: &str) -> u16 {
    std::net::TcpListener::bind((address, 0)).and_then(|listener| listener.local_addr()).expect("a free port").port()
}

fn docker_inspect(target: &str, format: &str) -> Option<String> {
    let result = Command::new("docker").args(["inspect", "-f", format, target]).output().ok()?;
    result.status.success().then(|| String::from_utf8_lossy(&result.stdout).trim().to_owned())
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

/// Whether `condition` holds within `timeout`.
async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    true
}

async fn wait_until(what: &str, timeout: Duration, context: impl Fn() -> String, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}\n{}", context());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An S3-compatible server (moto, as scripts/services.sh installs it) on the Docker bridge's
/// gateway address: the host and every container reach it there, and nothing outside does. It is
/// the test's stand-in for the object store a deployment brings.
struct S3 {
    child: Child,
    endpoint: String,
    bucket: String,
}

impl S3 {
    fn start(bucket: &str) -> S3 {
        let gateway = bridge_gateway();
        let port = free_port(&gateway);
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{PROJECT}-s3.log"))).expect("s3 log");
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", &gateway, "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("python3 -m moto.server starts (scripts/services.sh installs moto)");
        let endpoint = format!("http://{gateway}:{port}");
        let s3 = S3 { child, endpoint, bucket: bucket.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !command_works("curl", &["-fsS", "-o", "/dev/null", &format!("{}/moto-api/", s3.endpoint)]) {
            assert!(Instant::now() < deadline, "the S3 server on {} did not start", s3.endpoint);
            std::thread::sleep(Duration::from_millis(250));
        }
        s3.curl_ok(&["-X", "PUT", &format!("{}/{}", s3.endpoint, s3.bucket)]);
        s3
    }

    fn curl(&self, arguments: &[&str]) -> Output {
        let mut command = Command::new("curl");
        command.args(["-fsS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", S3_USER]).args(arguments);
        command.output().expect("curl runs")
    }

    fn curl_ok(&self, arguments: &[&str]) {
        let result = self.curl(arguments);
        assert!(result.status.success(), "curl {arguments:?}: {}", String::from_utf8_lossy(&result.stderr));
    }

    fn put(&self, key: &str, body: &[u8]) {
        let path = std::env::temp_dir().join(format!("{PROJECT}-upload.tmp"));
        std::fs::write(&path, body).expect("upload file");
        let file = format!("@{}", path.display());
        // Without a content type curl sends a form, which the server reads as an empty body.
        self.curl_ok(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &file,
            &format!("{}/{}/{key}", self.endpoint, self.bucket),
        ]);
        let _ = std::fs::remove_file(path);
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let result = self.curl(&[&format!("{}/{}/{key}", self.endpoint, self.bucket)]);
        result.status.success().then_some(result.stdout)
    }
}

/// The host's address on Docker's default bridge: IPAM's gateway when Docker records one, else the
/// bridge interface's own address.
fn bridge_gateway() -> String {
    let recorded = stdout_of("docker", &["network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Gateway}}{{end}}"]);
    if !recorded.is_empty() {
        return recorded;
    }
    let interface = docker_inspect("bridge", "{{index .Options \"com.docker.network.bridge.name\"}}")
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "docker0".to_owned());
    let addresses = Command::new("ip")
        .args(["-4", "-o", "addr", "show", &interface])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    let address = addresses
        .unwrap_or_default()
        .split_whitespace()
        .skip_while(|word| *word != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next().map(str::to_owned));
    // Without iproute2 on the host: the default route a container on that bridge gets.
    address.unwrap_or_else(|| {
        let route = stdout_of("docker", &["run", "--rm", "--network", "bridge", "berth-test/busybox:latest", "ip", "route"]);
        let gateway = route.lines().find_map(|line| line.strip_prefix("default via ")).and_then(|rest| rest.split_whitespace().next());
        gateway.expect("the Docker bridge has a gateway address").to_owned()
    })
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stack: its settings, and everything it leaves, removed on drop.
struct Stack {
    workspace_root: PathBuf,
    session_port: u16,
    amqp_port: u16,
    management_port: u16,
    s3_endpoint: String,
    bucket: String,
}

impl Stack {
    fn compose(&self, arguments: &[&str]) -> Output {
        let mut command = Command::new("docker-compose");
        command
            .args(["-p", PROJECT, "-f"])
            .arg(repo().join("compose/docker-compose.yml"))
            .arg("-f")
            .arg(repo().join("compose/docker-compose.local.yml"))
            .args(arguments)
            // Only what the stack is meant to read: the test's own environment (AWS_*, BERTH_* of
            // the host's services) must not leak into the pass-through variables.
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()))
            .env("HOME", std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
            .env("BERTH_JWT_SECRET", JWT_SECRET)
            .env("BERTH_DEPLOYMENT", DEPLOYMENT)
            .env("BERTH_DOCKER_GID", stdout_of("stat", &["-c", "%g", "/var/run/docker.sock"]))
            .env("BERTH_WORKSPACE_ROOT", &self.workspace_root)
            .env("BERTH_SESSION_PUBLISH", format!("127.0.0.1:{}", self.session_port))
            .env("BERTH_AMQP_HOST_PORT", self.amqp_port.to_string())
            .env("BERTH_RABBITMQ_MANAGEMENT_HOST_PORT", self.management_port.to_string())
            .env("BERTH_OBJECT_STORE_URL", format!("s3://{}", self.bucket))
            .env("AWS_ENDPOINT_URL", &self.s3_endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "berth-test")
            .env("AWS_SECRET_ACCESS_KEY", "berth-test")
            .env("RUST_LOG", "info,lapin=warn");
        if let Ok(docker_host) = std::env::var("DOCKER_HOST") {
            command.env("DOCKER_HOST", docker_host);
        }
        command.output().expect("docker-compose runs")
    }

    fn compose_ok(&self, arguments: &[&str]) -> String {
        let result = self.compose(arguments);
        let text = format!("{}{}", String::from_utf8_lossy(&result.stdout), String::from_utf8_lossy(&result.stderr));
        assert!(result.status.success(), "docker-compose {arguments:?} failed:\n{text}\n{}", self.logs());
        text
    }

    fn logs(&self) -> String {
        let result = self.compose(&["logs", "--no-color", "--tail", "40"]);
        format!("--- docker-compose logs ---\n{}", String::from_utf8_lossy(&result.stdout))
    }

    fn ps(&self) -> String {
        let result = self.compose(&["ps", "-a"]);
        String::from_utf8_lossy(&result.stdout).into_owned()
    }

    /// The container ids of a service (stopped ones too).
    fn containers(&self, service: &str) -> Vec<String> {
        let result = self.compose(&["ps", "-a", "-q", service]);
        String::from_utf8_lossy(&result.stdout).split_whitespace().map(str::to_owned).collect()
    }

    fn container(&self, service: &str) -> String {
        let ids = self.containers(service);
        assert_eq!(ids.len(), 1, "{service} has one container: {ids:?}\n{}", self.ps());
        ids[0].clone()
    }

    fn health(&self, service: &str) -> String {
        docker_inspect(&self.container(service), "{{if .State.Health}}{{.State.Health.Status}}{{end}}").unwrap_or_default()
    }

    async fn wait_healthy(&self, services: &[&str]) {
        let context = || format!("{}\n{}", self.ps(), self.logs());
        wait_until("every service healthy", STEP_TIMEOUT, context, || services.iter().all(|s| self.health(s) == "healthy")).await;
    }

    /// The broker as its administrator `berth-admin`, whose password the `secrets` job generated
    /// (there is no guest user in the stack).
    fn amqp_url(&self) -> String {
        let config = self.exec("rabbitmq", &["cat", "/run/berth/rabbitmq/10-berth-admin.conf"]);
        let password = config.lines().find_map(|line| line.strip_prefix("default_pass = ")).expect("the generated admin password");
        format!("amqp://berth-admin:{password}@127.0.0.1:{}/%2f", self.amqp_port)
    }

    fn exec(&self, service: &str, arguments: &[&str]) -> String {
        let container = self.container(service);
        let mut all = vec!["exec", container.as_str()];
        all.extend_from_slice(arguments);
        stdout_of("docker", &all)
    }

    /// What bootstrap makes: the broker's durable topology, Redis' notification setting, and the
    /// records it seeds (patterns, users).
    async fn bootstrap_work(&self, store: &StoreClient) -> (String, String, String, Vec<Value>) {
        let mut queues: Vec<String> = self
            .exec("rabbitmq", &["rabbitmqctl", "-q", "list_queues", "name", "type", "durable", "arguments"])
            .lines()
            .filter(|line| !line.starts_with("amq.gen-") && !line.starts_with("name"))
            .map(str::to_owned)
            .collect();
        queues.sort();
        let mut exchanges: Vec<String> =
            self.exec("rabbitmq", &["rabbitmqctl", "-q", "list_exchanges", "name", "type", "durable"]).lines().map(str::to_owned).collect();
        exchanges.sort();
        let notifications = self.exec("redis", &["redis-cli", "config", "get", "notify-keyspace-events"]);
        let mut records = Vec::new();
        for collection in [collections::PATTERNS, collections::USERS] {
            let mut found = store.find(find_all(collection)).await.expect("store answers");
            found.sort_by_key(|record| record["_id"].to_string() + &record["id"].to_string());
            records.extend(found);
        }
        (queues.join("\n"), exchanges.join("\n"), notifications, records)
    }

    fn remove_session_containers(&self) {
        let listed = output("docker", &["ps", "-aq", "--filter", &format!("label=berth.deployment={DEPLOYMENT}")]);
        for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
            let _ = output("docker", &["rm", "-f", id]);
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}\n{}", self.ps(), self.logs());
        }
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "10"]);
        self.remove_session_containers();
        remove_session_network();
        if let Some(parent) = self.workspace_root.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// One compose test at a time on a machine: the project, its `berth` network and the ports of the
/// host's Docker engine are shared. A directory holding the owner's pid; a dead owner's is taken over.
struct RunLock(PathBuf);

impl RunLock {
    fn acquire() -> RunLock {
        let path = std::env::temp_dir().join(format!("{PROJECT}.lock"));
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            if std::fs::create_dir(&path).is_ok() {
                std::fs::write(path.join("pid"), std::process::id().to_string()).expect("lock pid");
                return RunLock(path);
            }
            let owner = std::fs::read_to_string(path.join("pid")).unwrap_or_default();
            let alive = !owner.trim().is_empty() && Path::new("/proc").join(owner.trim()).exists();
            if !alive {
                // Written just now by a starting owner, or left by a dead one: wait a moment, then take it.
                std::thread::sleep(Duration::from_secs(1));
                if std::fs::read_to_string(path.join("pid")).unwrap_or_default() == owner {
                    let _ = std::fs::remove_dir_all(&path);
                }
                continue;
            }
            assert!(Instant::now() < deadline, "another compose test (pid {}) held {} for 15 minutes", owner.trim(), path.display());
            say(format!("waiting for the compose test of pid {} to finish", owner.trim()));
            std::thread::sleep(Duration::from_secs(10));
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the session network the container agent made, and the egress rules it installed for it
/// on the host (`BERTH-E-`/`BERTH-H-<network id>` chains and the jumps into them).
fn remove_session_network() {
    let network = format!("berth-sessions-{DEPLOYMENT}");
    if let Some(id) = docker_inspect(&network, "{{.Id}}").filter(|id| id.len() >= 12) {
        let short = &id[..12];
        let script = format!(
            "command -v iptables >/dev/null || exit 0; \
             for pair in DOCKER-USER:BERTH-E-{short} INPUT:BERTH-H-{short}; do \
               parent=${{pair%%:*}} chain=${{pair#*:}}; \
               iptables -S \"$parent\" 2>/dev/null | grep -e \"-j $chain\\$\" | sed 's/^-A /-D /' | while read -r rule; do eval iptables \"$rule\"; done; \
               iptables -F \"$chain\" 2>/dev/null; iptables -X \"$chain\" 2>/dev/null; \
             done; true"
        );
        let _ = output("bash", &["-c", &script]);
    }
    let _ = output("docker", &["network", "rm", &network]);
}

fn find_all(collection: &str) -> FindArgs {
    FindArgs::new(collection, serde_json::from_value(json!({})).expect("an empty filter"))
}

fn mint_token(user: &str) -> String {
    let result = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["--profile", PROFILE, "token", "--user", user])
        .env("BERTH_PROFILES_DIR", repo().join("run-profiles"))
        .env("BERTH_JWT_SECRET", JWT_SECRET)
        .output()
        .expect("berth token runs");
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    String::from_utf8_lossy(&result.stdout).lines().last().expect("a token line").trim().to_owned()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, token: &str) -> Socket {
    let url = format!("ws://127.0.0.1:{port}/ws?access_token={token}");
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).expect("request");
    let (socket, _) = tokio_tungstenite::connect_async(request).await.expect("the session agent's WebSocket answers");
    socket
}

async fn next_frame(socket: &mut Socket, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} frame within {STEP_TIMEOUT:?}; saw {seen:?}"));
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            other => panic!("the socket ended while waiting for {what}: {other:?}; saw {seen:?}"),
        };
        let frame: Value = serde_json::from_str(&text).expect("server frames are JSON");
        if matches(&frame) {
            return frame;
        }
        seen.push(frame);
    }
}

async fn send(socket: &mut Socket, frame: Value) {
    socket.send(Message::text(frame.to_string())).await.expect("frame sent");
}

/// Opens `workspace` over the WebSocket; `(session, port, seconds from open to running)`.
async fn open_session(socket: &mut Socket, workspace: &str) -> (String, u16, f64) {
    let started = Instant::now();
    send(socket, json!({"type": "open", "id": "open-1", "workspace": workspace, "profile": PROFILE})).await;
    let opened = next_frame(socket, "ok for open", |f| f["type"] == "ok" && f["id"] == "open-1").await;
    let session = opened["session"].as_str().expect("open names the session").to_owned();
    let running =
        next_frame(socket, "status running", |f| f["type"] == "status" && f["state"] == "running" && f["session"] == session.as_str())
            .await;
    let seconds = started.elapsed().as_secs_f64();
    let port = running["port"].as_u64().or_else(|| running["detail"]["port"].as_u64()).expect("running carries the port") as u16;
    (session, port, seconds)
}

/// A time Docker prints (`2026-12-01T08:09:36.1234Z` in `State`, `2026-12-01 08:09:36.1234 +0000 UTC`
/// in health logs; both UTC here) as something that orders: (date and time to the second, nanoseconds).
fn instant(text: &str) -> (String, u32) {
    let text = text.trim();
    let seconds = text.get(..19).unwrap_or(text).replace(' ', "T");
    let fraction: String = text.get(19..).unwrap_or("").strip_prefix('.').unwrap_or("").chars().take_while(char::is_ascii_digit).collect();
    let nanos = format!("{fraction:0<9}").get(..9).and_then(|digits| digits.parse().ok()).unwrap_or(0);
    (seconds, nanos)
}

fn state_time(container: &str, field: &str) -> (String, u32) {
    instant(&docker_inspect(container, &format!("{{{{.State.{field}}}}}")).expect("container inspects"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_runs_for_real() {
    // ---- can it run here at all ----
    if !command_works("docker", &["info"]) {
        say("SKIPPED: no Docker engine answers (docker info)");
        return;
    }
    if !command_works("docker-compose", &["version"]) {
        say("SKIPPED: docker-compose is not installed (apt-get install docker-compose; scripts/services.sh does)");
        return;
    }
    let _lock = RunLock::acquire();
    let run_started = Instant::now();
    let images = Command::new(repo().join("scripts/compose-images.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_berth")])
        .output()
        .expect("scripts/compose-images.sh runs");
    let images_log = String::from_utf8_lossy(&images.stderr).into_owned();
    if images.status.code() == Some(3) {
        say(format!("SKIPPED: the local images cannot be built here:\n{images_log}"));
        return;
    }
    assert!(images.status.success(), "scripts/compose-images.sh failed:\n{images_log}");
    let images_seconds = run_started.elapsed().as_secs_f64();
    for line in images_log.lines() {
        say(line);
    }
    say("MongoDB: not run here (no server image can be had); the store is SQLite on the volume store-data \
         (compose/docker-compose.local.yml), the mongo service and its replica-set healthcheck are checked \
         statically by scripts/compose-check.sh");

    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let s3 = S3::start(&format!("berth-compose-{run}"));
    let stack = Stack {
        workspace_root: PathBuf::from(format!("/var/tmp/{PROJECT}-{run}/workspaces")),
        session_port: free_port("127.0.0.1"),
        amqp_port: free_port("127.0.0.1"),
        management_port: free_port("127.0.0.1"),
        s3_endpoint: s3.endpoint.clone(),
        bucket: s3.bucket.clone(),
    };
    // A run that died before its clean-up may have left the project behind (under the lock, all
    // of it is this test's).
    let _ = stack.compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
    stack.remove_session_containers();
    remove_session_network();
    for entry in std::fs::read_dir("/var/tmp").into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&format!("{PROJECT}-")) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }

    // ---- up: infrastructure, bootstrap once, then the services ----
    let up_started = Instant::now();
    stack.compose_ok(&["up", "-d", "--no-build"]);
    let up_seconds = up_started.elapsed().as_secs_f64();
    assert!(stack.containers("mongo").is_empty(), "the override leaves mongo out");
    let bootstrap = stack.container("bootstrap");
    assert_eq!(docker_inspect(&bootstrap, "{{.State.Status}} {{.State.ExitCode}}").as_deref(), Some("exited 0"), "{}", stack.logs());
    let bootstrap_started = state_time(&bootstrap, "StartedAt");
    let bootstrap_finished = state_time(&bootstrap, "FinishedAt");
    for infrastructure in ["redis", "rabbitmq"] {
        // A successful probe before bootstrap started: compose waited for it to be healthy.
        let probes = docker_inspect(&stack.container(infrastructure), "{{range .State.Health.Log}}{{.ExitCode}} {{.End}}\n{{end}}")
            .unwrap_or_default();
        let healthy_before =
            probes.lines().any(|line| line.split_once(' ').is_some_and(|(code, end)| code == "0" && instant(end) < bootstrap_started));
        assert!(healthy_before, "{infrastructure} was healthy before bootstrap started at {bootstrap_started:?}: {probes}");
    }
    for service in BERTH_SERVICES {
        let started = state_time(&stack.container(service), "StartedAt");
        assert!(started > bootstrap_finished, "{service} started at {started:?}, before bootstrap finished at {bootstrap_finished:?}");
    }
    stack.wait_healthy(&LONG_RUNNING).await;
    let healthy_seconds = up_started.elapsed().as_secs_f64();
    let ps = stack.ps();
    for service in LONG_RUNNING {
        let line = ps.lines().find(|line| line.contains(&format!("_{service}_1"))).unwrap_or_default();
        assert!(line.contains("(healthy)"), "docker-compose ps shows {service} healthy:\n{ps}");
    }
    // Each reports ready: it consumes its queue (the session agent: /readyz through the published port).
    for (service, ready) in [
        ("engine", "\"queue\":\"berth.engine\""),
        ("container-agent", "\"queue\":\"berth.agent.container\""),
        ("workspace-agent", "\"queue\":\"berth.agent.workspace\""),
        ("persistence-agent", "\"queue\":\"berth.agent.persistence\""),
        ("session-agent", "consuming notifications"),
    ] {
        let logs = String::from_utf8_lossy(&stack.compose(&["logs", "--no-color", service]).stdout).into_owned();
        assert!(logs.lines().any(|line| line.contains("consuming") && line.contains(ready)), "{service} reports ready:\n{logs}");
    }
    assert_eq!(
        http_get(stack.session_port, "/readyz").map(|(status, _)| status),
        Some(200),
        "the session agent is ready on its published port"
    );
    // Bus identities: every service is connected as its own user, nobody as guest (which does not
    // exist), and each service holds only its own password.
    let users = stack.exec("rabbitmq", &["rabbitmqctl", "-q", "list_users"]);
    assert!(!users.lines().any(|line| line.starts_with("guest")), "no guest user in the stack's broker:\n{users}");
    let connected = stack.exec("rabbitmq", &["rabbitmqctl", "-q", "list_connections", "user"]);
    for user in ["berth-engine", "berth-container", "berth-workspace", "berth-persistence", "berth-session"] {
        assert!(connected.lines().any(|line| line.trim() == user), "{user} is connected:\n{connected}");
    }
    assert!(!connected.lines().any(|line| line.trim() == "berth-admin"), "no service runs as the admin:\n{connected}");
    assert_eq!(stack.exec("engine", &["ls", "/run/berth/amqp"]).trim(), "berth-engine", "the engine sees only its own password");
    // The example secret is refused: the job every other service waits for fails, saying why.
    let refused = stack.compose(&["run", "--rm", "-e", "BERTH_JWT_SECRET=change-me-to-32-random-bytes-of-hex", "secrets"]);
    assert!(!refused.status.success(), "the secrets job accepted the example JWT secret");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("placeholder"), "{}", String::from_utf8_lossy(&refused.stderr));
    say(format!("up -d returned after {up_seconds:.1} s; every service healthy after {healthy_seconds:.1} s"));

    // The stack's own settings took effect: AOF Redis, limits, the non-root user, the socket group.
    assert_eq!(stack.exec("redis", &["redis-cli", "config", "get", "appendonly"]).lines().last(), Some("yes"));
    assert_eq!(stack.exec("redis", &["redis-cli", "config", "get", "appendfsync"]).lines().last(), Some("everysec"));
    for service in BERTH_SERVICES {
        let container = stack.container(service);
        // The container agent is root for NET_ADMIN alone (egress rules), in berth's group.
        let expected = if service == "container-agent" { "0:1000 true [ALL] [NET_ADMIN]" } else { "berth:berth true [ALL] []" };
        let hardening =
            docker_inspect(&container, "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.CapAdd}}");
        assert_eq!(hardening.as_deref(), Some(expected), "{service}");
        let memory: u64 = docker_inspect(&container, "{{.HostConfig.Memory}}").and_then(|m| m.parse().ok()).unwrap_or(0);
        assert!(memory > 0, "{service} runs with its memory limit");
    }

    // ---- a second up leaves bootstrap's work unchanged ----
    let bus = Bus::connect(BusConfig::new(&stack.amqp_url(), "compose-test")).await.expect("the stack's broker on its published port");
    let store = StoreClient::new(bus.clone());
    let before = stack.bootstrap_work(&store).await;
    assert!(!before.3.is_empty(), "bootstrap seeded patterns and users");
    let services_before: Vec<String> = BERTH_SERVICES.iter().map(|s| stack.container(s)).collect();
    stack.compose_ok(&["up", "-d", "--no-build"]);
    assert_eq!(docker_inspect(&stack.container("bootstrap"), "{{.State.Status}} {{.State.ExitCode}}").as_deref(), Some("exited 0"));
    let second_logs = String::from_utf8_lossy(&stack.compose(&["logs", "--no-color", "bootstrap"]).stdout).into_owned();
    assert!(!second_logs.contains("deleted") && !second_logs.contains("replaced"), "{second_logs}");
    let services_after: Vec<String> = BERTH_SERVICES.iter().map(|s| stack.container(s)).collect();
    assert_eq!(services_before, services_after, "a second up re-creates no service");
    let after = stack.bootstrap_work(&store).await;
    assert_eq!(before, after, "a second up left bootstrap's work unchanged");

    // ---- a session through the stack ----
    let workspace = "w1";
    let key = |file: &str| format!("{PROFILE}/{USER}/projects/{workspace}/{file}");
    s3.put(&key("hello.txt"), b"hello through compose\n");
    s3.put(&key("src/main.rs"), b"fn main() {}\n");
    let token = mint_token(USER);
    let mut socket = connect(stack.session_port, &token).await;
    let snapshot = next_frame(&mut socket, "snapshot", |f| f["type"] == "snapshot").await;
    assert_eq!(snapshot["user"], USER);
    let (session, port, open_to_running) = open_session(&mut socket, workspace).await;
    say(format!("open -> running through the stack: {open_to_running:.2} s"));
    let container = format!("berth-{session}");
    let session_dir = stack.workspace_root.join(DEPLOYMENT).join(&session);
    assert_eq!(docker_inspect(&container, "{{index .Config.Labels \"berth.deployment\"}}").as_deref(), Some(DEPLOYMENT));
    let mount_source = docker_inspect(&container, "{{range .Mounts}}{{if eq .Type \"bind\"}}{{.Source}}{{end}}{{end}}");
    assert_eq!(
        mount_source.as_deref(),
        Some(session_dir.to_str().expect("utf-8 path")),
        "the container mounts the host path the agents wrote"
    );
    assert_eq!(std::fs::read(session_dir.join("src/main.rs")).expect("materialized file on the host"), b"fn main() {}\n");
    let materialized = session_dir.join("src/main.rs");
    for agent in ["workspace-agent", "container-agent"] {
        stack.exec(agent, &["test", "-f", materialized.to_str().expect("utf-8 path")]);
    }
    assert_eq!(http_get(port, "/health").map(|(status, _)| status), Some(200), "the workspace answers on its published port");
    assert_eq!(stdout_of("docker", &["exec", &container, "cat", &format!("{MOUNT}/hello.txt")]), "hello through compose");
    stdout_of("docker", &["exec", &container, "sh", "-c", &format!("echo written inside > {MOUNT}/new.txt")]);

    // ---- restarts in the middle of the session lose nothing ----
    for service in ["engine", "workspace-agent", "container-agent"] {
        let restarted = Instant::now();
        stack.compose_ok(&["restart", service]);
        say(format!("restarted {service} mid-session in {:.1} s", restarted.elapsed().as_secs_f64()));
    }
    stack.wait_healthy(&BERTH_SERVICES).await;
    send(&mut socket, json!({"type": "activity", "id": "activity-1", "session": session})).await;
    next_frame(&mut socket, "ok for activity", |f| f["type"] == "ok" && f["id"] == "activity-1").await;
    stdout_of("docker", &["exec", &container, "sh", "-c", &format!("echo after the restarts > {MOUNT}/later.txt")]);
    assert_eq!(docker_inspect(&container, "{{.State.Running}}").as_deref(), Some("true"));

    // ---- close: final sync, then everything removed ----
    send(&mut socket, json!({"type": "close", "id": "close-1", "session": session})).await;
    next_frame(&mut socket, "ok for close", |f| f["type"] == "ok" && f["id"] == "close-1").await;
    next_frame(&mut socket, "status closed", |f| f["type"] == "status" && f["state"] == "closed" && f["session"] == session.as_str()).await;
    assert_eq!(s3.get(&key("new.txt")).as_deref(), Some(&b"written inside\n"[..]), "synced on close");
    assert_eq!(s3.get(&key("later.txt")).as_deref(), Some(&b"after the restarts\n"[..]), "synced on close");
    let gone = || docker_inspect(&container, "{{.Id}}").is_none() && !session_dir.exists();
    wait_until("container and directory removed", STEP_TIMEOUT, || stack.logs(), gone).await;
    let record = store.get(collections::SESSIONS, &session).await.expect("store answers").expect("the session's record");
    assert_eq!(record["state"], "closed", "{record}");
    let dead = stack.exec("rabbitmq", &["rabbitmqctl", "-q", "list_queues", "name", "messages"]);
    let dead_letters = dead.lines().find(|line| line.starts_with("berth.dead-letter")).unwrap_or_default().to_owned();
    assert!(dead_letters.ends_with("\t0") || dead_letters.ends_with(" 0"), "nothing was dead-lettered: {dead_letters:?}");
    drop(socket);

    // ---- a failing healthcheck is visible in docker-compose ps ----
    stack.exec("rabbitmq", &["rabbitmqctl", "-q", "stop_app"]);
    let unhealthy_since = Instant::now();
    let context = || stack.ps();
    wait_until("the session agent reported unhealthy", STEP_TIMEOUT, context, || {
        stack.ps().lines().any(|line| line.contains("_session-agent_1") && line.contains("(unhealthy)"))
    })
    .await;
    let line = stack.ps().lines().find(|line| line.contains("_session-agent_1")).unwrap_or_default().to_owned();
    say(format!(
        "broker stopped: docker-compose ps after {:.0} s: {}",
        unhealthy_since.elapsed().as_secs_f64(),
        line.split_whitespace().collect::<Vec<_>>().join(" ")
    ));
    stack.exec("rabbitmq", &["rabbitmqctl", "-q", "start_app"]);
    let healed = Instant::now();
    // Every service heals by itself once the broker is back.
    let recovered = eventually(Duration::from_secs(60), || LONG_RUNNING.iter().all(|service| stack.health(service) == "healthy")).await;
    let stuck: Vec<&str> = LONG_RUNNING.iter().copied().filter(|service| stack.health(service) != "healthy").collect();
    let ready = http_get(stack.session_port, "/readyz").map(|(status, body)| format!("{status} {}", String::from_utf8_lossy(&body)));
    assert!(
        recovered,
        "{stuck:?} did not recover from the broker outage within 60 s (the session agent's /readyz: {ready:?})\n{}",
        stack.ps()
    );
    say(format!("broker back: every service healthy again by itself after {:.1} s", healed.elapsed().as_secs_f64()));
    bus.close().await;

    // ---- down, up: records survive, nothing is orphaned ----
    stack.compose_ok(&["down", "-t", "20"]);
    let leftovers = stdout_of("docker", &["ps", "-aq", "--filter", &format!("label=com.docker.compose.project={PROJECT}")]);
    assert!(leftovers.is_empty(), "down removed every container of the stack: {leftovers}");
    let sessions_left = stdout_of("docker", &["ps", "-aq", "--filter", &format!("label=berth.deployment={DEPLOYMENT}")]);
    assert!(sessions_left.is_empty(), "no session container is orphaned: {sessions_left}");
    let again = Instant::now();
    stack.compose_ok(&["up", "-d", "--no-build"]);
    stack.wait_healthy(&LONG_RUNNING).await;
    say(format!("down, up: every service healthy after {:.1} s", again.elapsed().as_secs_f64()));
    let bus = Bus::connect(BusConfig::new(&stack.amqp_url(), "compose-test")).await.expect("broker after up");
    let store = StoreClient::new(bus.clone());
    let record = store.get(collections::SESSIONS, &session).await.expect("store answers").expect("the record survived down/up");
    assert_eq!(record["state"], "closed", "{record}");
    let history = store
        .find(FindArgs::new(collections::EVENTS, serde_json::from_value(json!({"session": {"eq": session}})).expect("filter")))
        .await
        .expect("history");
    let targets: Vec<&str> = history.iter().filter_map(|entry| entry["to"].as_str()).collect();
    for state in ["materializing", "provisioning", "running", "stopping", "closed"] {
        assert!(targets.contains(&state), "the history {targets:?} survived down/up with {state}");
    }
    bus.close().await;
    drop(stack);

    // ---- the same open through `berth dev` on this machine, for the time next to it ----
    match berth_dev_open_to_running(&s3).await {
        Ok(seconds) => say(format!("open -> running through `berth dev`: {seconds:.2} s (through the stack: {open_to_running:.2} s)")),
        Err(why) => say(format!("note: the `berth dev` comparison did not run: {why}")),
    }
    say(format!(
        "images {images_seconds:.0} s, up to healthy {healthy_seconds:.1} s, open -> running {open_to_running:.2} s, whole run {:.0} s",
        run_started.elapsed().as_secs_f64()
    ));
}

/// Opens one session through `berth dev` on the host's RabbitMQ and Redis (its own vhost) and the
/// same S3 server; the seconds from open to running. A measurement, so it reports rather than fails.
async fn berth_dev_open_to_running(s3: &S3) -> Result<f64, String> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let vhost = format!("berth-compose-dev-{run}");
    // Databases 10-15 are the end-to-end runs' (tests/e2e.rs); test binaries run one at a time.
    let redis_db = 10 + u32::from_str_radix(&run[..4], 16).unwrap_or(0) % 6;
    if !command_works("rabbitmqctl", &["add_vhost", &vhost]) {
        return Err("the host's RabbitMQ (rabbitmqctl add_vhost) is not available".into());
    }
    let _ = command_works("rabbitmqctl", &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let root = std::env::temp_dir().join(format!("{PROJECT}-dev-{run}"));
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let port = free_port("127.0.0.1");
    let log = std::fs::File::create(root.join("berth.log")).map_err(|e| e.to_string())?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["--profile", PROFILE, "dev"])
        .env("BERTH_PROFILES_DIR", repo().join("run-profiles"))
        .env("BERTH_PATTERNS_DIR", repo().join("patterns"))
        .env("BERTH_AMQP_URL", format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"))
        .env("BERTH_REDIS_URL", format!("redis://127.0.0.1:6379/{redis_db}"))
        .env("BERTH_DEPLOYMENT", format!("compose-dev-{run}"))
        .env("BERTH_STORE_URL", format!("sqlite://{}", root.join("store.sqlite").display()))
        .env("BERTH_OBJECT_STORE_URL", format!("s3://{}", s3.bucket))
        .env("BERTH_WORKSPACE_ROOT", root.join("workspaces"))
        .env("BERTH_SESSION_ADDR", format!("127.0.0.1:{port}"))
        .env("BERTH_JWT_SECRET", JWT_SECRET)
        .env("AWS_ENDPOINT_URL", &s3.endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "berth-test")
        .env("AWS_SECRET_ACCESS_KEY", "berth-test")
        .env("RUST_LOG", "info,lapin=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = async {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while http_get(port, "/readyz").map(|(status, _)| status) != Some(200) {
            if Instant::now() > deadline {
                return Err("berth dev did not become ready".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        s3.put(&format!("{PROFILE}/{USER}/projects/dev-w1/hello.txt"), b"hello through berth dev\n");
        let mut socket = connect(port, &mint_token(USER)).await;
        next_frame(&mut socket, "snapshot", |f| f["type"] == "snapshot").await;
        let (session, _, seconds) = open_session(&mut socket, "dev-w1").await;
        send(&mut socket, json!({"type": "close", "id": "close-1", "session": session})).await;
        next_frame(&mut socket, "status closed", |f| f["type"] == "status" && f["state"] == "closed").await;
        Ok(seconds)
    }
    .await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = command_works("rabbitmqctl", &["delete_vhost", &vhost]);
    let _ = command_works("redis-cli", &["-n", &redis_db.to_string(), "FLUSHDB"]);
    let listed = output("docker", &["ps", "-aq", "--filter", &format!("label=berth.deployment=compose-dev-{run}")]);
    for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
        let _ = output("docker", &["rm", "-f", id]);
    }
    let _ = output("docker", &["network", "rm", &format!("berth-sessions-compose-dev-{run}")]);
    let _ = std::fs::remove_dir_all(&root);
    result
}
