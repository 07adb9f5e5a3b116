//! `berth bench provision`: time from task publish to `container.ready`, for sequential and
//! concurrent sessions, next to `docker run` plus the first health answer of the same image with
//! the same limits, measured in the same run; and the time to resume a paused session.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::container::{ListContainersOptions, RemoveContainerOptions};
use protocol::event::DEFAULT_MAX_EVENT_BYTES;
use protocol::events::ContainerReady;
use protocol::ids::{UserId, WorkspaceId};
use protocol::profile::HealthCheck;
use protocol::tasks::{ContainerPause, ContainerProvision, ContainerResume, TaskArgs};
use protocol::{topology, Bus, BusConfig, CloudEvent, ConsumeSpec, Outcome, Profile, Task};
use tokio::sync::oneshot;

use container::{connect_docker, probe, spec, Agent, AgentSettings};

use crate::stats::{milliseconds, percentile};

const BENCH_LABEL: &str = "berth.bench";
const SEQUENTIAL_SESSIONS: usize = 20;
const CONCURRENT_SESSIONS: usize = 10;
const RESUME_ROUNDS: usize = 20;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

type Waiters = Arc<Mutex<HashMap<(String, String), oneshot::Sender<CloudEvent>>>>;

/// Everything one benchmark run needs.
struct Bench {
    profile: Profile,
    bus: Bus,
    agent: Agent,
    bench_id: String,
    task_queue: String,
    waiters: Waiters,
    /// Per provision: create, start, ready (as the agent measured them) and everything else.
    stages: Mutex<Vec<[Duration; 4]>>,
}

/// `berth bench provision`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    spec::check_container_hardening(&profile)?;
    let docker = connect_docker().await?;
    let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "berth-bench-provision")).await?;
    bus.declare_topology().await?;
    let bench_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let mut settings = AgentSettings::production();
    settings.extra_labels = BTreeMap::from([(BENCH_LABEL.to_owned(), bench_id.clone())]);
    settings.inventory_interval = Duration::from_secs(3600);
    let agent = Agent::with_settings(profile.clone(), bus.clone(), docker.clone(), settings)?;

    // A private task queue reached through the default exchange: the benchmark's agent takes only
    // the benchmark's tasks, even when a real container agent serves the same broker.
    let task_queue = bus.declare_private_queue(topology::TASKS_EXCHANGE, &[]).await?;
    let answer_keys = ["container.ready", "container.failed", "container.paused", "container.resumed"].map(str::to_owned);
    let answer_queue = bus.declare_private_queue(topology::EVENTS_EXCHANGE, &answer_keys).await?;
    let waiters: Waiters = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tap = tokio::spawn(route_answers(bus.clone(), answer_queue, waiters.clone(), stopped.clone()));
    let serving_agent = agent.clone();
    let serving_queue = task_queue.clone();
    let mut serve_stopped = stopped.clone();
    let server = tokio::spawn(async move {
        serving_agent
            .serve(&serving_queue, async move {
                let _ = serve_stopped.wait_for(|stop| *stop).await;
            })
            .await
    });

    let bench = Bench { profile, bus: bus.clone(), agent, bench_id, task_queue, waiters, stages: Mutex::default() };
    let measured = bench.measure_everything().await;
    // Stop serving first, so that removing the benchmark's containers is not reported as exits.
    let _ = stop.send(true);
    let _ = server.await;
    let _ = tap.await;
    bench.clean_up().await;
    bus.close().await;
    measured?.print();
    Ok(())
}

struct Figures {
    agent_sequential: Vec<Duration>,
    agent_concurrent: Vec<Duration>,
    docker_sequential: Vec<Duration>,
    docker_concurrent: Vec<Duration>,
    api_sequential: Vec<Duration>,
    api_concurrent: Vec<Duration>,
    resume_answer: Vec<Duration>,
    resume_first_http: Vec<Duration>,
    stages: Vec<[Duration; 4]>,
    image: String,
}

impl Bench {
    async fn measure_everything(&self) -> anyhow::Result<Figures> {
        // One warm-up of each path so that network creation and page cache do not count.
        self.provision_via_broker("warmup").await?;
        self.docker_run_until_healthy("warmup").await?;

        let mut agent_sequential = Vec::new();
        for index in 0..SEQUENTIAL_SESSIONS {
            agent_sequential.push(self.provision_via_broker(&format!("seq{index}")).await?);
        }
        let mut docker_sequential = Vec::new();
        for index in 0..SEQUENTIAL_SESSIONS {
            docker_sequential.push(self.docker_run_until_healthy(&format!("seq{index}")).await?);
        }
        let agent_concurrent =
            futures::future::try_join_all((0..CONCURRENT_SESSIONS).map(|index| self.provision_via_broker_owned(format!("con{index}"))))
                .await?;
        let docker_concurrent =
            futures::future::try_join_all((0..CONCURRENT_SESSIONS).map(|index| self.docker_run_until_healthy_owned(format!("con{index}"))))
                .await?;
        let mut api_sequential = Vec::new();
        for index in 0..SEQUENTIAL_SESSIONS {
            api_sequential.push(self.docker_api_until_healthy(format!("apiseq{index}")).await?);
        }
        let api_concurrent =
            futures::future::try_join_all((0..CONCURRENT_SESSIONS).map(|index| self.docker_api_until_healthy(format!("apicon{index}"))))
                .await?;
        let (resume_answer, resume_first_http) = self.resume_rounds().await?;
        Ok(Figures {
            agent_sequential,
            agent_concurrent,
            docker_sequential,
            docker_concurrent,
            api_sequential,
            api_concurrent,
            resume_answer,
            resume_first_http,
            stages: self.stages.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
            image: self.profile.container.image.clone(),
        })
    }

    fn session(&self, name: &str) -> String {
        format!("bench{}-{name}", self.bench_id)
    }

    async fn provision_via_broker_owned(&self, name: String) -> anyhow::Result<Duration> {
        self.provision_via_broker(&name).await
    }

    /// Publish → `container.ready`, through the broker.
    async fn provision_via_broker(&self, name: &str) -> anyhow::Result<Duration> {
        let session = self.session(name);
        let task =
            self.task(&session, &ContainerProvision { user: UserId::parse("bench")?, workspace: WorkspaceId::parse(name)?, slot: None });
        let (event, elapsed) = self.send_and_wait(&task, "container.ready").await?;
        let ready: ContainerReady =
            event.data_as().map_err(|error| anyhow::anyhow!("provision of {session} failed: {error}: {}", event.data))?;
        let [create, start, ready] = [ready.timings_ms.create, ready.timings_ms.start, ready.timings_ms.ready].map(Duration::from_millis);
        let docker_part = create + start + ready;
        self.stages.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push([
            create,
            start,
            ready,
            elapsed.saturating_sub(docker_part),
        ]);
        Ok(elapsed)
    }

    fn task<T: TaskArgs>(&self, session: &str, args: &T) -> Task {
        Task::of(uuid::Uuid::now_v7(), Some(session), args)
    }

    /// Publishes a task and waits for its answer of `expected_type` (or `container.failed`).
    async fn send_and_wait(&self, task: &Task, expected_type: &str) -> anyhow::Result<(CloudEvent, Duration)> {
        let session = task.session.clone().unwrap_or_default();
        let (answered, answer) = oneshot::channel();
        let (failed, failure) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            waiters.insert((session.clone(), expected_type.to_owned()), answered);
            waiters.insert((session.clone(), "container.failed".to_owned()), failed);
        }
        let began = Instant::now();
        self.bus.publish("", &self.task_queue, &task.to_bytes(), task_properties()).await?;
        let event = tokio::time::timeout(ANSWER_TIMEOUT, async {
            tokio::select! {
                event = answer => event,
                event = failure => event,
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer for {session} within {ANSWER_TIMEOUT:?}"))??;
        let elapsed = began.elapsed();
        let mut waiters = self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        waiters.remove(&(session.clone(), expected_type.to_owned()));
        waiters.remove(&(session, "container.failed".to_owned()));
        Ok((event, elapsed))
    }

    async fn docker_run_until_healthy_owned(&self, name: String) -> anyhow::Result<Duration> {
        self.docker_run_until_healthy(&name).await
    }

    /// `docker run -d` with the same image, limits and hardening, then the first health answer.
    async fn docker_run_until_healthy(&self, name: &str) -> anyhow::Result<Duration> {
        let settings = &self.profile.container;
        let name = format!("berth-bench-{}-docker-{name}", self.bench_id);
        let network = spec::network_name(&self.profile);
        let workspace = self.profile.session_dir(&name);
        tokio::fs::create_dir_all(&workspace).await?;
        let mut arguments: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            &format!("{BENCH_LABEL}={}", self.bench_id),
            "--network",
            &network,
            "-p",
            &format!("{}::{}", spec::PUBLISH_HOST, settings.service_port),
            "--memory",
            &format!("{}m", settings.memory_mib),
            "--memory-swap",
            &format!("{}m", settings.memory_mib),
            "--cpus",
            &settings.cpus.to_string(),
            "--pids-limit",
            &spec::docker_pids_limit(settings).to_string(),
            "--runtime",
            settings.runtime.docker_name(),
            "--log-driver",
            spec::LOG_DRIVER,
            "--log-opt",
            &format!("max-size={}m", settings.log_max_size_mib),
            "--log-opt",
            &format!("max-file={}", settings.log_max_files),
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--tmpfs",
            &format!("/tmp:rw,noexec,nosuid,nodev,size={}m,mode=1777", settings.tmpfs_size_mib),
            "-v",
            &format!("{}:{}", workspace.display(), settings.workspace_mount),
        ]
        .iter()
        .map(|argument| argument.to_string())
        .collect();
        // The agent's root is always read-only (writable paths are sized tmpfs mounts).
        arguments.push("--read-only".to_owned());
        for (path, options) in spec::tmpfs_mounts(settings) {
            if path != "/tmp" {
                arguments.extend(["--tmpfs".to_owned(), format!("{path}:{options}")]);
            }
        }
        if let Some(user) = &settings.user {
            arguments.extend(["--user".to_owned(), user.clone()]);
        }
        arguments.push(settings.image.clone());
        let began = Instant::now();
        let output = tokio::process::Command::new("docker").args(&arguments).output().await?;
        anyhow::ensure!(output.status.success(), "docker run failed: {}", String::from_utf8_lossy(&output.stderr));
        let container_id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let deadline = began + Duration::from_secs(settings.ready_timeout_secs);
        let port_key = spec::service_port_key(settings);
        loop {
            let inspected = self.agent.docker().inspect_container(&container_id, None).await?;
            let port = inspected
                .network_settings
                .as_ref()
                .and_then(|network| network.ports.as_ref())
                .and_then(|ports| ports.get(&port_key).cloned().flatten())
                .and_then(|bindings| bindings.iter().find_map(|binding| binding.host_port.as_deref()?.parse::<u16>().ok()));
            let healthy = match (&settings.health, port) {
                (HealthCheck::Http(path), Some(port)) => probe::http_ready(spec::PUBLISH_HOST, port, path).await,
                (HealthCheck::Tcp, Some(port)) => probe::tcp_ready(spec::PUBLISH_HOST, port).await,
                (HealthCheck::Docker, _) => inspected
                    .state
                    .and_then(|state| state.health)
                    .and_then(|health| health.status)
                    .is_some_and(|status| status == bollard::models::HealthStatusEnum::HEALTHY),
                (_, None) => false,
            };
            if healthy {
                return Ok(began.elapsed());
            }
            anyhow::ensure!(Instant::now() < deadline, "{name} never answered its health check");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The same container through Docker's API directly (create, start, health): the floor under
    /// both the agent and the CLI, without a broker, a CLI process or any checks.
    async fn docker_api_until_healthy(&self, name: String) -> anyhow::Result<Duration> {
        let docker = self.agent.docker();
        let settings = &self.profile.container;
        let session = format!("berth-bench-{}-api-{name}", self.bench_id);
        let identity = spec::SessionIdentity { session: session.clone(), user: "bench".into(), workspace: name, thred: None };
        let workspace = self.profile.session_dir(&session);
        tokio::fs::create_dir_all(&workspace).await?;
        let labels = BTreeMap::from([(BENCH_LABEL.to_owned(), self.bench_id.clone())]);
        let config = spec::container_config(&self.profile, &identity, &workspace, &labels);
        let began = Instant::now();
        let options = bollard::container::CreateContainerOptions { name: spec::container_name(&session), platform: None };
        let created = docker.create_container(Some(options), config).await?;
        docker.start_container(&created.id, None::<bollard::container::StartContainerOptions<String>>).await?;
        let inspected = docker.inspect_container(&created.id, None).await?;
        let port = inspected
            .network_settings
            .and_then(|network| network.ports)
            .and_then(|ports| ports.get(&spec::service_port_key(settings)).cloned().flatten())
            .and_then(|bindings| bindings.iter().find_map(|binding| binding.host_port.as_deref()?.parse::<u16>().ok()))
            .ok_or_else(|| anyhow::anyhow!("{session}: no published port"))?;
        let deadline = began + Duration::from_secs(settings.ready_timeout_secs);
        loop {
            let healthy = match &settings.health {
                HealthCheck::Http(path) => probe::http_ready(spec::PUBLISH_HOST, port, path).await,
                HealthCheck::Tcp | HealthCheck::Docker => probe::tcp_ready(spec::PUBLISH_HOST, port).await,
            };
            if healthy {
                return Ok(began.elapsed());
            }
            anyhow::ensure!(Instant::now() < deadline, "{session} never answered its health check");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pause, then time resume → `container.resumed`, and resume → first HTTP answer.
    async fn resume_rounds(&self) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
        let session = self.session("seq0");
        let port = self
            .agent
            .inventory()
            .await?
            .into_iter()
            .find(|entry| entry.session.as_ref().is_some_and(|id| *id == session))
            .and_then(|entry| entry.host_port)
            .ok_or_else(|| anyhow::anyhow!("the benchmark session {session} has no port"))?;
        let mut answers = Vec::new();
        let mut first_answers = Vec::new();
        for _round in 0..RESUME_ROUNDS {
            let (paused, _) = self.send_and_wait(&self.task(&session, &ContainerPause {}), "container.paused").await?;
            anyhow::ensure!(paused.event_type == "container.paused", "pause failed: {}", paused.data);
            let began = Instant::now();
            let (resumed, answer_time) = self.send_and_wait(&self.task(&session, &ContainerResume {}), "container.resumed").await?;
            anyhow::ensure!(resumed.event_type == "container.resumed", "resume failed: {}", resumed.data);
            while !probe::http_ready(spec::PUBLISH_HOST, port, "/").await {
                anyhow::ensure!(began.elapsed() < Duration::from_secs(10), "no HTTP answer after resume");
            }
            answers.push(answer_time);
            first_answers.push(began.elapsed());
        }
        Ok((answers, first_answers))
    }

    async fn clean_up(&self) {
        let docker = self.agent.docker();
        let options = ListContainersOptions {
            all: true,
            filters: HashMap::from([("label".to_owned(), vec![format!("{BENCH_LABEL}={}", self.bench_id)])]),
            ..Default::default()
        };
        let containers = docker.list_containers(Some(options)).await.unwrap_or_default();
        for container in containers {
            let Some(id) = container.id else { continue };
            let _ = docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await;
        }
        let root = self.profile.services.workspace_root.clone();
        let prefixes = [format!("bench{}-", self.bench_id), format!("berth-bench-{}-", self.bench_id)];
        // The bench's containers are all labelled; their directories all carry the bench id.
        if let Ok(mut entries) = tokio::fs::read_dir(&root).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                let name = entry.file_name().to_string_lossy().into_owned();
                if prefixes.iter().any(|prefix| name.starts_with(prefix)) {
                    let _ = tokio::fs::remove_dir_all(entry.path()).await;
                }
            }
        }
    }
}

fn task_properties() -> protocol::Properties {
    protocol::Properties::json()
}

/// Routes answer events to the waiter registered for (session, type).
async fn route_answers(bus: Bus, queue: String, waiters: Waiters, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let handler = move |incoming: protocol::Incoming| {
        let waiters = waiters.clone();
        async move {
            if let Ok(event) = CloudEvent::parse(&incoming.body, DEFAULT_MAX_EVENT_BYTES) {
                let key = (event.subject.clone().unwrap_or_default(), event.event_type.clone());
                let waiter = waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(event);
                }
            }
            Outcome::Ack
        }
    };
    let spec = ConsumeSpec::new(&queue, 64);
    if let Err(error) = bus
        .consume(spec, handler, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        })
        .await
    {
        tracing::warn!(%error, "benchmark answer consumer failed");
    }
}

impl Figures {
    fn print(&self) {
        println!("berth bench provision — image {}", self.image);
        println!("{:<34} {:>9} {:>9}", "", "p50 ms", "p95 ms");
        let rows = [
            (format!("agent, {SEQUENTIAL_SESSIONS} sequential (publish→ready)"), &self.agent_sequential),
            (format!("docker run, {SEQUENTIAL_SESSIONS} sequential (→health)"), &self.docker_sequential),
            (format!("agent, {CONCURRENT_SESSIONS} concurrent"), &self.agent_concurrent),
            (format!("docker run, {CONCURRENT_SESSIONS} concurrent"), &self.docker_concurrent),
            (format!("docker API, {SEQUENTIAL_SESSIONS} sequential"), &self.api_sequential),
            (format!("docker API, {CONCURRENT_SESSIONS} concurrent"), &self.api_concurrent),
            (format!("resume, {RESUME_ROUNDS}× (publish→resumed)"), &self.resume_answer),
            (format!("resume, {RESUME_ROUNDS}× (publish→first HTTP)"), &self.resume_first_http),
        ];
        for (label, samples) in rows {
            println!("{label:<34} {:>9.1} {:>9.1}", milliseconds(percentile(samples, 0.5)), milliseconds(percentile(samples, 0.95)));
        }
        let stage = |index: usize| {
            let samples: Vec<Duration> = self.stages.iter().map(|stages| stages[index]).collect();
            milliseconds(percentile(&samples, 0.5))
        };
        println!(
            "agent stages, p50 ms: create {:.0}, start {:.0}, until healthy {:.0}, broker and bookkeeping {:.0}",
            stage(0),
            stage(1),
            stage(2),
            stage(3)
        );
        let overhead = |ours: &[Duration], docker: &[Duration]| {
            let docker_p50 = milliseconds(percentile(docker, 0.5));
            (milliseconds(percentile(ours, 0.5)) - docker_p50) / docker_p50 * 100.0
        };
        println!(
            "overhead at p50 vs docker run: sequential {:+.1}%, concurrent {:+.1}% (goal: under 15%)",
            overhead(&self.agent_sequential, &self.docker_sequential),
            overhead(&self.agent_concurrent, &self.docker_concurrent)
        );
        println!(
            "overhead at p50 vs the bare API: sequential {:+.1}%, concurrent {:+.1}%",
            overhead(&self.agent_sequential, &self.api_sequential),
            overhead(&self.agent_concurrent, &self.api_concurrent)
        );
        println!("resume p50: {:.1} ms to container.resumed (goal: under 50 ms)", milliseconds(percentile(&self.resume_answer, 0.5)));
    }
}
