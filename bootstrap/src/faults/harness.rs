//! One deployment run as separate `berth` processes, each on services of its own, so that any
//! component or service can be killed, cut off and brought back alone.
//!
//! A deployment owns: a RabbitMQ vhost, a redis-server on its own port (restartable; FLUSHALL hurts
//! nobody else), a bucket on the shared S3-compatible server reached through a socat TCP proxy (the
//! object-store outage), the Docker engine reached through a socat UNIX-socket proxy (the Docker
//! outage), a temporary root holding the workspace root, the SQLite store and the logs, and a
//! deployment id on every container, network and directory. Dropping it removes all of that, even
//! after a failed assertion.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use protocol::events::{EventData, SessionClose, SessionOpen};
use protocol::ids::{UserId, WorkspaceId};
use protocol::store::{collections, FindArgs, StoreClient};
use protocol::{topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Notification, Outcome};
use serde_json::{json, Value};

/// The profile every fault deployment runs (also `tests/profiles/faults/profile.toml`).
pub const PROFILE_TEXT: &str = include_str!("../../../tests/profiles/faults/profile.toml");
pub const PROFILE_NAME: &str = "faults";
/// The secret user tokens of fault deployments are signed with.
const JWT_SECRET: &str = "faults-secret-that-is-long-enough-for-hs256";
/// Orphans older than this are recovered (`BERTH_ORPHAN_GRACE_SECS`); production waits 60 s.
pub const ORPHAN_GRACE_SECS: u64 = 3;
/// Inventories go out this often (`BERTH_INVENTORY_INTERVAL_SECS`); production: 60 s.
pub const INVENTORY_INTERVAL_SECS: u64 = 2;
/// The longest one step of a session may take before a case gives up.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the harness finds what it runs.
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// The `berth` binary.
    pub binary: PathBuf,
    pub patterns_dir: PathBuf,
    /// The S3-compatible server (moto) holding the deployment's bucket.
    pub s3_endpoint: String,
    /// The run-profile the deployment runs ([`PROFILE_TEXT`] unless a test varies it).
    pub profile_text: String,
}

impl HarnessConfig {
    /// The test services of `scripts/services.sh`.
    pub fn local(binary: PathBuf, patterns_dir: PathBuf) -> HarnessConfig {
        let s3_endpoint = std::env::var("BERTH_FAULTS_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9000".to_owned());
        HarnessConfig { binary, patterns_dir, s3_endpoint, profile_text: PROFILE_TEXT.to_owned() }
    }

    /// The same with workspaces as plain directories instead of per-session images.
    pub fn with_plain_directories(mut self) -> HarnessConfig {
        self.profile_text = self.profile_text.replace("filesystem = \"image\"", "filesystem = \"directory\"");
        self
    }
}

/// The separately running components of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Engine,
    Container,
    Workspace,
    Persistence,
    Session,
}

impl Component {
    pub const ALL: [Component; 5] =
        [Component::Persistence, Component::Engine, Component::Container, Component::Workspace, Component::Session];

    fn arguments(self) -> &'static [&'static str] {
        match self {
            Component::Engine => &["engine"],
            Component::Container => &["agent", "container"],
            Component::Workspace => &["agent", "workspace"],
            Component::Persistence => &["agent", "persistence"],
            Component::Session => &["agent", "session"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Component::Engine => "engine",
            Component::Container => "container",
            Component::Workspace => "workspace",
            Component::Persistence => "persistence",
            Component::Session => "session",
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run_quietly(program: &str, arguments: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program).args(arguments).stdin(Stdio::null()).output().with_context(|| format!("{program} runs"))?;
    if !output.status.success() {
        bail!("{program} {arguments:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Kills a child's whole process group (socat forks one child per connection). Only for children
/// spawned with their own process group and not reaped yet, so the group id is still theirs.
fn kill_group(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
    let _ = child.kill();
    let _ = child.wait();
}

/// A socat proxy that can be stopped (connections refused, open ones cut) and started again.
struct Proxy {
    listen: String,
    connect: String,
    child: Option<Child>,
}

impl Proxy {
    fn start(listen: String, connect: String) -> anyhow::Result<Proxy> {
        let mut proxy = Proxy { listen, connect, child: None };
        proxy.resume()?;
        Ok(proxy)
    }

    fn resume(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = Command::new("socat")
            .args([self.listen.as_str(), self.connect.as_str()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("socat runs (apt-get install socat)")?;
        self.child = Some(child);
        Ok(())
    }

    fn cut(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A redis-server of the deployment's own, with the append-only file as deployments run it.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start(dir: PathBuf) -> anyhow::Result<Redis> {
        std::fs::create_dir_all(&dir)?;
        let mut redis = Redis { port: free_port()?, dir, child: None };
        redis.spawn()?;
        Ok(redis)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("redis.log"))?;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "everysec", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("redis-server runs")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["ping"]).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not come up", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn cli(&self, arguments: &[&str]) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let mut all = vec!["-p", port.as_str()];
        all.extend_from_slice(arguments);
        let output = run_quietly("redis-cli", &all)?;
        if output.starts_with("ERR") || output.contains("Could not connect") {
            bail!("redis-cli {arguments:?}: {output}");
        }
        Ok(output)
    }

    /// A clean shutdown (the append-only file is flushed), then nothing listens.
    fn stop(&mut self) {
        let _ = self.cli(&["shutdown"]);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                // Reaped: its pid may be reused from now on, so it is never signalled after this.
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill_group(&mut child);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}

/// One notification and when it arrived.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub notification: Notification,
}

/// Every notification of the deployment, for all users, in arrival order.
#[derive(Clone, Default)]
pub struct Inbox {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn all(&self) -> Vec<Seen> {
        self.lock().clone()
    }

    /// The states `session` went through, in order.
    pub fn states(&self, session: &str) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|seen| seen.notification.session.as_deref() == Some(session))
            .map(|seen| seen.notification.state.clone())
            .collect()
    }

    pub fn find(&self, matches: impl Fn(&Notification) -> bool) -> Option<Seen> {
        self.lock().iter().find(|seen| matches(&seen.notification)).cloned()
    }

    /// Waits for the first notification matching `matches` (including ones already seen).
    pub async fn wait(&self, what: &str, timeout: Duration, matches: impl Fn(&Notification) -> bool) -> anyhow::Result<Seen> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.find(&matches) {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!("{what} did not happen within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `session` reaches `state`.
    pub async fn wait_state(&self, session: &str, state: &str, timeout: Duration) -> anyhow::Result<Seen> {
        self.wait(&format!("session {session} reaching {state}"), timeout, |n| n.session.as_deref() == Some(session) && n.state == state)
            .await
            .map_err(|error| anyhow!("{error}; it went through {:?}", self.states(session)))
    }

    /// Waits until `session` reaches any of the terminal states; returns that notification.
    pub async fn wait_terminal(&self, session: &str, timeout: Duration) -> anyhow::Result<Notification> {
        let terminal = ["closed", "stopped", "failed", "recovered"];
        let found = self
            .wait(&format!("session {session} ending"), timeout, |n| {
                n.session.as_deref() == Some(session) && terminal.contains(&n.state.as_str())
            })
            .await
            .map_err(|error| anyhow!("{error}; it went through {:?}", self.states(session)))?;
        Ok(found.notification)
    }
}

/// A running deployment of separate `berth` processes.
pub struct Deployment {
    config: HarnessConfig,
    pub run: String,
    /// The deployment id (`BERTH_DEPLOYMENT`).
    pub id: String,
    pub vhost: String,
    pub bucket: String,
    pub root: PathBuf,
    session_port: u16,
    redis: Redis,
    store_proxy: Proxy,
    store_proxy_port: u16,
    docker_proxy: Proxy,
    docker_socket: PathBuf,
    processes: BTreeMap<Component, Child>,
    /// Leftovers already counted as stranded (a bench counts each once, not after every case).
    pub reported_leftovers: BTreeSet<String>,
    starts: BTreeMap<Component, usize>,
    pub bus: Bus,
    pub inbox: Inbox,
    /// Stops the inbox's consumer before the vhost goes.
    stop_listening: tokio::sync::watch::Sender<bool>,
    /// The bucket, straight on the S3 server (not through the proxy the agents use).
    objects: Arc<dyn ObjectStore>,
}

impl Deployment {
    /// Creates the deployment's services, bootstraps it and starts every component.
    pub async fn start(config: &HarnessConfig) -> anyhow::Result<Deployment> {
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let root = std::env::temp_dir().join(format!("berth-faults-{run}"));
        std::fs::create_dir_all(root.join("logs"))?;
        std::fs::create_dir_all(root.join("profiles").join(PROFILE_NAME))?;
        std::fs::create_dir_all(root.join("workspaces"))?;
        std::fs::write(root.join("profiles").join(PROFILE_NAME).join("profile.toml"), &config.profile_text)?;
        let vhost = format!("berth-faults-{run}");
        let bucket = format!("berth-faults-{run}");
        let id = format!("faults-{run}");

        run_quietly("rabbitmqctl", &["add_vhost", &vhost])?;
        run_quietly("rabbitmqctl", &["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"])?;
        s3_curl(&config.s3_endpoint, &["-fsS", "-X", "PUT", &format!("{}/{bucket}", config.s3_endpoint)])?;
        let redis = Redis::start(root.join("redis"))?;
        let store_proxy_port = free_port()?;
        let s3_address = config.s3_endpoint.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let store_proxy =
            Proxy::start(format!("TCP-LISTEN:{store_proxy_port},bind=127.0.0.1,fork,reuseaddr"), format!("TCP:{s3_address}"))?;
        let docker_socket = root.join("docker.sock");
        let docker_proxy = Proxy::start(
            format!("UNIX-LISTEN:{},fork,unlink-early", docker_socket.display()),
            "UNIX-CONNECT:/var/run/docker.sock".to_owned(),
        )?;
        let objects: Arc<dyn ObjectStore> = Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&bucket)
                .with_endpoint(&config.s3_endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id("berth-test")
                .with_secret_access_key("berth-test")
                .with_virtual_hosted_style_request(false)
                .build()?,
        );
        let bus_placeholder = Bus::connect(BusConfig::new(&format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"), "berth-faults")).await?;
        let mut deployment = Deployment {
            config: config.clone(),
            run,
            id,
            vhost,
            bucket,
            root,
            session_port: free_port()?,
            redis,
            store_proxy,
            store_proxy_port,
            docker_proxy,
            docker_socket,
            processes: BTreeMap::new(),
            reported_leftovers: BTreeSet::new(),
            starts: BTreeMap::new(),
            bus: bus_placeholder,
            inbox: Inbox::default(),
            stop_listening: tokio::sync::watch::channel(false).0,
            objects,
        };
        deployment.wait_for_socket()?;
        deployment.bootstrap()?;
        deployment.listen().await?;
        for component in Component::ALL {
            deployment.start_component(component)?;
        }
        deployment.wait_session_agent().await?;
        Ok(deployment)
    }

    fn wait_for_socket(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.docker_socket.exists() {
            if Instant::now() > deadline {
                bail!("the Docker proxy socket {} did not appear", self.docker_socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.vhost)
    }

    /// A `berth` command with the deployment's environment (tests start more components with it,
    /// e.g. a second host's agents).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.config.binary);
        command
            .args(["--profile", PROFILE_NAME])
            .env("BERTH_PROFILES_DIR", self.root.join("profiles"))
            .env("BERTH_PATTERNS_DIR", &self.config.patterns_dir)
            .env("BERTH_AMQP_URL", self.amqp_url())
            .env("BERTH_REDIS_URL", format!("redis://127.0.0.1:{}/0", self.redis.port))
            .env("BERTH_STORE_URL", format!("sqlite://{}", self.root.join("store.sqlite").display()))
            .env("BERTH_OBJECT_STORE_URL", format!("s3://{}", self.bucket))
            .env("BERTH_WORKSPACE_ROOT", self.root.join("workspaces"))
            .env("BERTH_DEPLOYMENT", &self.id)
            .env("BERTH_SESSION_ADDR", format!("127.0.0.1:{}", self.session_port))
            .env("BERTH_JWT_SECRET", JWT_SECRET)
            .env(protocol::profile::ORPHAN_GRACE_ENV, ORPHAN_GRACE_SECS.to_string())
            .env(protocol::profile::INVENTORY_INTERVAL_ENV, INVENTORY_INTERVAL_SECS.to_string())
            .env("DOCKER_HOST", format!("unix://{}", self.docker_socket.display()))
            .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.store_proxy_port))
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "berth-test")
            .env("AWS_SECRET_ACCESS_KEY", "berth-test")
            .env("RUST_LOG", std::env::var("BERTH_FAULTS_LOG").unwrap_or_else(|_| "info,lapin=warn".to_owned()))
            .env_remove("BERTH_PROFILE")
            .env_remove("BERTH_LOG_FORMAT")
            .stdin(Stdio::null());
        command
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }

    fn bootstrap(&self) -> anyhow::Result<()> {
        let output = self.command().arg("bootstrap").output().context("berth bootstrap runs")?;
        std::fs::write(self.log_path("bootstrap"), [&output.stdout[..], &output.stderr[..]].concat())?;
        if !output.status.success() {
            bail!("berth bootstrap failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// Collects every notification of the deployment (routing keys `user.*`).
    async fn listen(&mut self) -> anyhow::Result<()> {
        let queue = self.bus.declare_private_queue(topology::NOTIFY_EXCHANGE, &["user.#".to_owned()]).await?;
        let inbox = self.inbox.clone();
        let bus = self.bus.clone();
        let mut stop = self.stop_listening.subscribe();
        tokio::spawn(async move {
            let handler = move |incoming: protocol::Incoming| {
                let inbox = inbox.clone();
                async move {
                    if let Ok(notification) = Notification::decode(&incoming.body) {
                        inbox.lock().push(Seen { at: Instant::now(), notification });
                    }
                    Outcome::Ack
                }
            };
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            let _ = bus.consume(ConsumeSpec::new(&queue, 200), handler, stopped).await;
        });
        Ok(())
    }

    /// Starts (or starts again) one component; its log is appended to `logs/<component>.log`.
    pub fn start_component(&mut self, component: Component) -> anyhow::Result<()> {
        if let Some(child) = self.processes.get_mut(&component) {
            if child.try_wait()?.is_none() {
                return Ok(());
            }
        }
        let starts = {
            let count = self.starts.entry(component).or_default();
            *count += 1;
            *count
        };
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(component.name()))?;
        writeln!(log, "===== harness: start #{starts} of {} at {:?} =====", component.name(), SystemTime::now())?;
        let child = self
            .command()
            .args(component.arguments())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("berth {:?} starts", component.arguments()))?;
        self.processes.insert(component, child);
        Ok(())
    }

    /// SIGKILL: no shutdown, nothing in flight finishes.
    pub fn kill(&mut self, component: Component) {
        if let Some(mut child) = self.processes.remove(&component) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Components that exited on their own (they never should).
    pub fn exited_components(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        for (component, child) in &mut self.processes {
            if let Ok(Some(status)) = child.try_wait() {
                exited.push(format!("{} ({status})", component.name()));
            }
        }
        exited
    }

    async fn wait_session_agent(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(self.session_port, "/readyz").is_some_and(|(status, _)| status == 200) {
                return Ok(());
            }
            if let Some(exited) = self.exited_components().into_iter().next() {
                bail!("{exited} exited at start:\n{}", self.logs_tail(40));
            }
            if Instant::now() > deadline {
                bail!("the session agent is not ready:\n{}", self.logs_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` lines of every log, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        for name in ["bootstrap", "engine", "container", "workspace", "persistence", "session"] {
            let log = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
            let all: Vec<&str> = log.lines().collect();
            text.push_str(&format!("--- {name} (last {lines} lines) ---\n"));
            for line in &all[all.len().saturating_sub(lines)..] {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    pub fn log(&self, component: Component) -> String {
        std::fs::read_to_string(self.log_path(component.name())).unwrap_or_default()
    }

    // ----- faults -----

    pub fn cut_store(&mut self) {
        self.store_proxy.cut();
    }

    pub fn restore_store(&mut self) -> anyhow::Result<()> {
        self.store_proxy.resume()
    }

    pub fn cut_docker(&mut self) {
        self.docker_proxy.cut();
    }

    pub fn restore_docker(&mut self) -> anyhow::Result<()> {
        self.docker_proxy.resume()?;
        self.wait_for_socket()
    }

    pub fn redis_flushall(&self) -> anyhow::Result<()> {
        self.redis.cli(&["flushall"]).map(drop)
    }

    /// Any redis-cli command on the deployment's Redis; its raw output.
    pub fn redis_cli(&self, arguments: &[&str]) -> anyhow::Result<String> {
        self.redis.cli(arguments)
    }

    /// `CONFIG GET name` of the deployment's Redis (the value alone).
    pub fn redis_config(&self, name: &str) -> anyhow::Result<String> {
        let output = self.redis.cli(&["config", "get", name])?;
        Ok(output.lines().nth(1).unwrap_or_default().trim().to_owned())
    }

    pub fn stop_redis(&mut self) {
        self.redis.stop();
    }

    pub fn start_redis(&mut self) -> anyhow::Result<()> {
        self.redis.spawn()
    }

    // ----- sessions -----

    /// Publishes `session.open` over AMQP and returns the session it ended up in (its own, or the
    /// live session of the workspace it joined).
    pub async fn open_amqp(&self, user: &str, workspace: &str) -> anyhow::Result<String> {
        let requested = uuid::Uuid::now_v7().to_string();
        let open = SessionOpen { user: UserId::parse(user)?, workspace: WorkspaceId::parse(workspace)?, profile: None };
        let event = CloudEvent::of("/berth/faults", Some(&requested), &open).with_extension("userid", user);
        self.publish_as_client(&event).await?;
        let answer = self
            .inbox
            .wait(&format!("an answer to the open of {requested}"), STEP_TIMEOUT, |n| n.cause.as_deref() == Some(event.id.as_str()))
            .await?;
        answer.notification.session.ok_or_else(|| anyhow!("the answer to an open names no session"))
    }

    pub async fn publish<T: EventData>(&self, session: &str, user: &str, data: &T) -> anyhow::Result<()> {
        let event = CloudEvent::of("/berth/faults", Some(session), data).with_extension("userid", user);
        self.publish_as_client(&event).await
    }

    /// Publishes a client's event as the client identity (the engine accepts nothing else from
    /// outside); one connection per event is nothing next to what the cases measure.
    async fn publish_as_client(&self, event: &CloudEvent) -> anyhow::Result<()> {
        let client = Bus::connect(BusConfig::for_identity(self.bus.url(), protocol::Identity::Client, "berth-faults-client")?).await?;
        let published = client.publish_event(event).await;
        client.close().await;
        Ok(published?)
    }

    pub async fn close(&self, session: &str, user: &str) -> anyhow::Result<()> {
        self.publish(session, user, &SessionClose { reason: Some("faults".to_owned()) }).await
    }

    /// A user token from `berth token`.
    pub fn mint_token(&self, user: &str) -> anyhow::Result<String> {
        let output = self.command().args(["token", "--user", user]).output()?;
        if !output.status.success() {
            bail!("berth token failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text.lines().last().unwrap_or_default().trim().to_owned())
    }

    /// The port the deployment's session agent (the door of host `local`) listens on, on 127.0.0.1.
    pub fn session_port(&self) -> u16 {
        self.session_port
    }

    pub fn websocket_url(&self, token: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?access_token={token}", self.session_port)
    }

    pub fn store_client(&self) -> StoreClient {
        StoreClient::new(self.bus.clone()).with_timeout(Duration::from_secs(20))
    }

    /// The session's audit trail (`events`), oldest first.
    pub async fn history(&self, session: &str) -> anyhow::Result<Vec<Value>> {
        let filter = serde_json::from_value(json!({"session": {"eq": session}}))?;
        let mut entries = self.store_client().find(FindArgs::new(collections::EVENTS, filter)).await?;
        entries.sort_by(|a, b| a["at"].as_str().unwrap_or_default().cmp(b["at"].as_str().unwrap_or_default()));
        Ok(entries)
    }

    pub async fn record(&self, session: &str) -> anyhow::Result<Option<Value>> {
        Ok(self.store_client().get(collections::SESSIONS, session).await?)
    }

    // ----- host and Docker -----

    pub fn deployment_root(&self) -> PathBuf {
        self.root.join("workspaces").join(&self.id)
    }

    pub fn session_dir(&self, session: &str) -> PathBuf {
        self.deployment_root().join(session)
    }

    pub fn preserved_dir(&self, session: &str) -> PathBuf {
        self.deployment_root().join(".berth-preserved").join(session)
    }

    pub fn container_name(session: &str) -> String {
        format!("berth-{session}")
    }

    /// Runs a shell command inside the session's container (as the container's user).
    pub fn exec(&self, session: &str, script: &str) -> anyhow::Result<String> {
        run_quietly("docker", &["exec", &Deployment::container_name(session), "sh", "-c", script])
    }

    /// Writes `bytes` to `path` (relative to the workspace) from inside the container.
    pub fn write_inside(&self, session: &str, path: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let target = format!("/workspace/{path}");
        let parent = Path::new(&target).parent().map(|p| p.display().to_string()).unwrap_or_else(|| "/workspace".into());
        let script = format!("mkdir -p '{parent}' && cat > '{target}'");
        let mut child = Command::new("docker")
            .args(["exec", "-i", &Deployment::container_name(session), "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?.write_all(bytes)?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!("writing {path} inside {session} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    /// Containers of this deployment (any state), by name.
    pub fn containers(&self) -> Vec<String> {
        let filter = format!("label=berth.deployment={}", self.id);
        run_quietly("docker", &["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"])
            .map(|text| text.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    pub fn container_state(&self, session: &str) -> Option<String> {
        run_quietly("docker", &["inspect", "-f", "{{.State.Status}}", &Deployment::container_name(session)])
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// Session directories and staging leftovers in the deployment root.
    pub fn directories(&self) -> Vec<String> {
        let mut found = Vec::new();
        let root = self.deployment_root();
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') {
                    found.push(name);
                }
            }
        }
        for leftovers in [".berth-staging", ".berth-images"] {
            if let Ok(entries) = std::fs::read_dir(root.join(leftovers)) {
                for entry in entries.flatten() {
                    found.push(format!("{leftovers}/{}", entry.file_name().to_string_lossy()));
                }
            }
        }
        found.extend(self.mounts().into_iter().map(|mount| format!("mount {}", mount.display())));
        found.sort();
        found
    }

    /// File systems mounted under the run's root (per-session workspace images).
    fn mounts(&self) -> Vec<PathBuf> {
        let table = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        table
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .map(|point| PathBuf::from(point.replace("\\040", " ")))
            .filter(|point| point.starts_with(&self.root))
            .collect()
    }

    /// Messages in the deployment's dead-letter queue, with their reasons (they stay there).
    pub async fn dead_letters(&self) -> anyhow::Result<Vec<String>> {
        let count = self.bus.ready_messages(topology::DEAD_LETTER_QUEUE).await?;
        let mut reasons = Vec::new();
        for message in self.bus.peek_messages(topology::DEAD_LETTER_QUEUE, 10).await? {
            let reason = message.headers.get(topology::REASON_HEADER).cloned().unwrap_or_default();
            let body: String = String::from_utf8_lossy(&message.body).chars().take(300).collect();
            reasons.push(format!("{reason}: {body}"));
        }
        for _ in reasons.len()..count as usize {
            reasons.push("(more)".to_owned());
        }
        Ok(reasons)
    }

    // ----- the object store -----

    pub fn object_key(user: &str, workspace: &str, path: &str) -> String {
        format!("{PROFILE_NAME}/{user}/{workspace}/{path}")
    }

    pub async fn put_object(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.objects.put(&ObjectPath::from(key), PutPayload::from(bytes)).await?;
        Ok(())
    }

    pub async fn get_object(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match self.objects.get(&ObjectPath::from(key)).await {
            Ok(result) => Ok(Some(result.bytes().await?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Every key under `prefix`.
    pub async fn list_objects(&self, prefix: &str) -> anyhow::Result<BTreeSet<String>> {
        let prefix = ObjectPath::from(prefix);
        let listed: Vec<_> = self.objects.list(Some(&prefix)).try_collect().await?;
        Ok(listed.into_iter().map(|meta| meta.location.to_string()).collect())
    }

    /// Deletes every object, on a thread of its own (Drop may run inside or outside a runtime).
    fn empty_bucket(&self) {
        let objects = self.objects.clone();
        let emptied = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                let keys: Vec<ObjectPath> = match objects.list(None).map_ok(|meta| meta.location).try_collect().await {
                    Ok(keys) => keys,
                    Err(_) => return,
                };
                futures::stream::iter(keys)
                    .for_each_concurrent(16, |key| {
                        let objects = objects.clone();
                        async move {
                            let _ = objects.delete(&key).await;
                        }
                    })
                    .await;
            });
        });
        let _ = emptied.join();
    }

    /// Stops everything and removes all the deployment created (Drop does the same, without
    /// closing the connection politely).
    pub async fn teardown(self) {
        let _ = self.stop_listening.send(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.bus.close().await;
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.stop_listening.send(true);
        for (_, mut child) in std::mem::take(&mut self.processes) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for container in self.containers() {
            let _ = run_quietly("docker", &["rm", "-f", "-v", &container]);
        }
        let network_filter = format!("label=berth.deployment={}", self.id);
        if let Ok(networks) = run_quietly("docker", &["network", "ls", "-q", "--filter", &network_filter]) {
            for network in networks.split_whitespace() {
                let _ = run_quietly("docker", &["network", "rm", network]);
            }
        }
        let _ = run_quietly("docker", &["network", "rm", &format!("berth-faults-{}", self.id)]);
        let _ = run_quietly("rabbitmqctl", &["delete_vhost", &self.vhost]);
        self.empty_bucket();
        let _ = s3_curl(&self.config.s3_endpoint, &["-sS", "-X", "DELETE", &format!("{}/{}", self.config.s3_endpoint, self.bucket)]);
        // Workspace images a failed case left mounted: unmount them and free their loop devices.
        for mount in self.mounts() {
            let _ = run_quietly("umount", &["-l", &mount.display().to_string()]);
        }
        if let Ok(images) = std::fs::read_dir(self.deployment_root().join(".berth-images")) {
            for image in images.flatten() {
                let path = image.path().display().to_string();
                if let Ok(listed) = run_quietly("losetup", &["-j", &path]) {
                    for device in listed.lines().filter_map(|line| line.split(':').next()) {
                        let _ = run_quietly("losetup", &["-d", device]);
                    }
                }
            }
        }
        self.redis.stop();
        self.store_proxy.cut();
        self.docker_proxy.cut();
        if std::env::var_os("BERTH_FAULTS_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// curl with S3 signing (the test server refuses anonymous requests).
fn s3_curl(endpoint: &str, arguments: &[&str]) -> anyhow::Result<String> {
    let _ = endpoint;
    let mut all = vec!["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "berth-test:berth-test"];
    all.extend_from_slice(arguments);
    run_quietly("curl", &all)
}

/// A plain HTTP/1.0 GET on 127.0.0.1; `(status, body)`, or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response[split + 4..].to_vec()))
}
