//! Bounded tenants, against the real Docker engine: a log flood stays within the profile's log
//! bound, a fork bomb within the pids limit, connections to the host, to link-local/metadata and to
//! private addresses are refused by the egress rules (their counters prove it; nothing leaves the
//! machine), and all of it holds under gVisor (`runsc`) as under `runc`.
//!
//! Each test has its own network (so its own egress chains), workspace root and `berth.test`
//! label; a guard removes the containers, the network and its firewall rules, even on panic.

#![allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::Docker;
use container::{connect_docker, egress, spec, Agent, AgentSettings};
use protocol::events::ContainerReady;
use protocol::profile::Runtime;
use protocol::{AgentKind, Bus, BusConfig, CloudEvent, Profile, Task};
use serde_json::{json, Value};
use uuid::Uuid;

const TEST_LABEL: &str = "berth.test";

fn amqp_url() -> String {
    std::env::var("BERTH_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Removes the test's containers, its network with its egress chains, and its workspace root.
struct Cleanup {
    test_id: String,
    workspace_root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let filter = format!("label={TEST_LABEL}={}", self.test_id);
        if let Ok(listed) = Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output() {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        if let Ok(listed) = Command::new("docker").args(["network", "ls", "-q", "--no-trunc", "--filter", &filter]).output() {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["network", "rm", id]).output();
                egress::remove_for_network_blocking(id);
            }
        }
        let _ = std::fs::remove_dir_all(&self.workspace_root);
    }
}

struct Fixture {
    profile: Profile,
    bus: Bus,
    docker: Docker,
    settings: AgentSettings,
    test_id: String,
    _cleanup: Cleanup,
}

impl Fixture {
    async fn new(runtime: Runtime, edit: impl FnOnce(&mut Profile)) -> Fixture {
        let test_id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../run-profiles/dev/profile.toml")).unwrap();
        let mut profile = Profile::parse(&text, std::path::Path::new("dev/profile.toml")).unwrap();
        profile.container.network = format!("berth-tenant-{test_id}");
        profile.container.runtime = runtime;
        profile.services.workspace_root = std::env::temp_dir().join(format!("berth-tenant-test-{test_id}"));
        profile.services.amqp_url = amqp_url();
        edit(&mut profile);
        let cleanup = Cleanup { test_id: test_id.clone(), workspace_root: profile.services.workspace_root.clone() };
        let bus = Bus::connect(BusConfig::new(&amqp_url(), &format!("tenant-test-{test_id}"))).await.unwrap();
        bus.declare_topology().await.unwrap();
        let docker = connect_docker().await.unwrap();
        let mut settings = AgentSettings::production();
        settings.extra_labels = BTreeMap::from([(TEST_LABEL.to_owned(), test_id.clone())]);
        settings.stop_timeout_secs = 1;
        Fixture { profile, bus, docker, settings, test_id, _cleanup: cleanup }
    }

    fn agent(&self) -> Agent {
        Agent::with_settings(self.profile.clone(), self.bus.clone(), self.docker.clone(), self.settings.clone()).unwrap()
    }

    fn session(&self, name: &str) -> String {
        format!("t{}-{name}", self.test_id)
    }
}

fn task(session: &str, action: &str, args: Value) -> Task {
    Task {
        id: Uuid::now_v7(),
        agent: AgentKind::Container,
        action: action.to_owned(),
        session: Some(session.to_owned()),
        thred: None,
        cause: None,
        args,
    }
}

async fn answer(agent: &Agent, task: &Task) -> CloudEvent {
    let mut events = agent.handle(task).await.expect("task handled");
    events.remove(0)
}

/// Provisions a session and returns (container id, host port).
async fn provision(agent: &Agent, session: &str) -> (String, u16) {
    let ready = answer(agent, &task(session, "provision", json!({"user": "alice", "workspace": "w1"}))).await;
    let ready: ContainerReady = ready.data_as().unwrap_or_else(|error| panic!("{error}: {}", ready.data));
    (ready.container_id, ready.port)
}

/// Runs a script in the container; a sandbox that dies meanwhile can leave `docker exec` hanging,
/// so it gives up after 60 s (status 124, like `timeout`).
async fn exec(container_id: &str, script: &str) -> std::process::Output {
    let mut command = tokio::process::Command::new("docker");
    command.args(["exec", container_id, "sh", "-c", script]).kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(60), command.output()).await {
        Ok(output) => output.unwrap(),
        Err(_) => {
            use std::os::unix::process::ExitStatusExt;
            std::process::Output {
                status: std::process::ExitStatus::from_raw(124 << 8),
                stdout: Vec::new(),
                stderr: b"docker exec timed out".to_vec(),
            }
        }
    }
}

async fn exec_text(container_id: &str, script: &str) -> String {
    let output = exec(container_id, script).await;
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

async fn answers_http(port: u16) -> bool {
    container::probe::http_ready("127.0.0.1", port, "/").await
}

/// Whether the app answers within `limit`, asking every 100 ms.
async fn answers_http_within(port: u16, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if answers_http(port).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

// ------------------------------------------------------------------------------------ logs

async fn log_flood_stays_within_the_log_bound(runtime: Runtime) {
    let fixture = Fixture::new(runtime, |profile| {
        profile.container.log_max_size_mib = 1;
        profile.container.log_max_files = 2;
    })
    .await;
    let agent = fixture.agent();
    let (container_id, port) = provision(&agent, &fixture.session("flood")).await;
    let inspected = fixture.docker.inspect_container(&container_id, None).await.unwrap();
    let log_config = inspected.host_config.unwrap().log_config.unwrap();
    assert_eq!(log_config.typ.as_deref(), Some(spec::LOG_DRIVER));
    let log_path = PathBuf::from(inspected.log_path.expect("json-file logs have a path"));

    // 30 MB of 200-character lines written to the main process's stdout: `yes` through the log.
    let flooded = exec(&container_id, "yes $(printf '%0200d' 0) | head -c 30000000 > /proc/1/fd/1; echo flooded").await;
    assert!(String::from_utf8_lossy(&flooded.stdout).contains("flooded"), "{flooded:?}");
    let directory = log_path.parent().unwrap().to_owned();
    let file_name = log_path.file_name().unwrap().to_string_lossy().into_owned();
    let (files, total_bytes) = blocking(move || {
        let mut files = 0;
        let mut total = 0;
        for entry in std::fs::read_dir(&directory).unwrap().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&file_name) {
                files += 1;
                total += entry.metadata().unwrap().len();
            }
        }
        (files, total)
    })
    .await;
    println!("{runtime:?}: log after a 30 MB flood: {files} files, {total_bytes} bytes");
    assert!(files <= 2, "{files} log files, the profile keeps 2");
    assert!(total_bytes <= 2 * 1024 * 1024 + 64 * 1024, "the log holds {total_bytes} bytes, bound 2 MiB");
    assert!(total_bytes > 512 * 1024, "the flood did reach the log ({total_bytes} bytes)");
    assert!(answers_http(port).await, "the flooded container still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_flood_is_bounded_under_runc() {
    log_flood_stays_within_the_log_bound(Runtime::Runc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_flood_is_bounded_under_runsc() {
    log_flood_stays_within_the_log_bound(Runtime::Runsc).await;
}

// ------------------------------------------------------------------------------------ pids

async fn fork_bomb_stays_within_the_pids_limit(runtime: Runtime) {
    let fixture = Fixture::new(runtime, |_| {}).await;
    let agent = fixture.agent();
    let (container_id, port) = provision(&agent, &fixture.session("bomb")).await;
    let limit = spec::docker_pids_limit(&fixture.profile.container);
    let cgroup = PathBuf::from(format!("/sys/fs/cgroup/pids/docker/{container_id}"));
    // Forks until the kernel says no: 1000 children that live 4 s each, far over the limit of 64.
    let bomb = exec(&container_id, "i=0; while [ $i -lt 1000 ]; do sleep 4 & i=$((i+1)); done").await;
    let refused = String::from_utf8_lossy(&bomb.stderr).into_owned();
    let mut peak: Option<i64> = None;
    if let Ok(current) = std::fs::read_to_string(cgroup.join("pids.current")) {
        peak = current.trim().parse().ok();
        let max = std::fs::read_to_string(cgroup.join("pids.max")).unwrap();
        assert_eq!(max.trim(), limit.to_string(), "the kernel's limit is the profile's");
    }
    println!("{runtime:?}: fork bomb: exit {:?}, {refused:?}, pids.current after {peak:?}", bomb.status.code());
    assert!(!bomb.status.success() || refused.contains("fork"), "the bomb was never stopped: {bomb:?}");
    if let Some(peak) = peak {
        assert!(peak <= limit, "{peak} processes with a limit of {limit}");
    }
    // The children die; the tenant's service comes back on its own (or, under gVisor, the sandbox
    // that ran out of threads stopped: either way nothing outside the container was touched).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut recovered = false;
    while Instant::now() < deadline {
        if answers_http(port).await {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let state = fixture.docker.inspect_container(&container_id, None).await.unwrap().state.unwrap();
    println!("{runtime:?}: after the bomb the service answers: {recovered}, container {:?}", state.status);
    if runtime == Runtime::Runc {
        assert!(recovered, "the container serves again once the bomb's children are gone");
    }
    // The host can still start processes, and other tenants too.
    let other = Fixture::new(runtime, |_| {}).await;
    let (_, other_port) = provision(&other.agent(), &other.session("neighbour")).await;
    assert!(answers_http(other_port).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_held_by_the_pids_limit_under_runc() {
    fork_bomb_stays_within_the_pids_limit(Runtime::Runc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_held_by_the_pids_limit_under_runsc() {
    fork_bomb_stays_within_the_pids_limit(Runtime::Runsc).await;
}

// ------------------------------------------------------------------------------------ egress

/// The packets the rules of `chain` that name `destination` have matched so far.
async fn packets(chain: &str, destination: &str) -> u64 {
    let chain = chain.to_owned();
    let destination = destination.to_owned();
    blocking(move || egress::rule_packets_blocking(&chain, &destination)).await.expect("chain exists")
}

/// Tries a TCP connection from inside the container's network namespace (the static busybox of the
/// test image has no working TCP client: its wget and nc crash resolving even numeric addresses),
/// with the host's bash entering the namespace of the container's process: the packets leave
/// through the container's interface onto its bridge, exactly as the workspace's own would.
async fn connect_from(container_id: &str, address: &str, port: u16) -> String {
    let inspected = Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", container_id]).output().unwrap();
    let pid = String::from_utf8_lossy(&inspected.stdout).trim().to_owned();
    let script = format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/{port}' 2>&1; echo exit=$?");
    let output = tokio::process::Command::new("nsenter").args(["-t", &pid, "-n", "bash", "-c", &script]).output().await.unwrap();
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

async fn egress_is_refused_by_rules(runtime: Runtime) {
    let fixture = Fixture::new(runtime, |_| {}).await;
    let agent = fixture.agent();
    let ready = answer(&agent, &task(&fixture.session("egress"), "provision", json!({"user": "alice", "workspace": "w1"}))).await;
    let ready: ContainerReady = ready.data_as().unwrap_or_else(|error| panic!("{error}: {}", ready.data));
    let (container_id, port) = (ready.container_id.clone(), ready.port);
    let plan = agent.egress_plan().expect("the network was checked");
    // The rules are in place before any packet is sent: nothing can leave the machine.
    let listed = blocking({
        let plan = plan.clone();
        move || {
            let docker_user = Command::new("iptables").args(["-S", egress::DOCKER_USER_CHAIN]).output().unwrap();
            let input = Command::new("iptables").args(["-S", "INPUT"]).output().unwrap();
            let egress_chain = Command::new("iptables").args(["-S", &plan.egress_chain]).output().unwrap();
            (
                String::from_utf8_lossy(&docker_user.stdout).into_owned(),
                String::from_utf8_lossy(&input.stdout).into_owned(),
                String::from_utf8_lossy(&egress_chain.stdout).into_owned(),
            )
        }
    })
    .await;
    assert_eq!(listed.0.matches(&plan.egress_chain).count(), 1, "one jump from DOCKER-USER: {}", listed.0);
    assert_eq!(listed.1.matches(&plan.host_chain).count(), 1, "one jump from INPUT: {}", listed.1);
    for range in ["169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"] {
        assert!(listed.2.contains(&format!("-d {range} -j REJECT")), "{range} refused: {}", listed.2);
    }
    // Applying again changes nothing (and keeps the counters).
    let again = plan.clone();
    assert!(!blocking(move || egress::apply_blocking(&again)).await.unwrap(), "the rules are idempotent");

    // The host through the bridge gateway: Redis, RabbitMQ and any other port.
    let network = fixture.docker.inspect_network::<String>(&spec::network_name(&fixture.profile), None).await.unwrap();
    let gateway = network.ipam.unwrap().config.unwrap()[0].gateway.clone().unwrap();
    let host_refusals_before = host_rejects(&plan.host_chain).await;
    for host_port in [6379, 5672, 22, port] {
        let outcome = connect_from(&container_id, &gateway, host_port).await;
        assert!(!outcome.contains("exit=0"), "{gateway}:{host_port} reached: {outcome}");
        // Refused by the rule (ICMP admin-prohibited), not by a service that happens to listen
        // on loopback only (which would answer with a reset: "Connection refused").
        assert!(outcome.contains("No route to host"), "{gateway}:{host_port}: {outcome}");
        println!("{runtime:?}: {gateway}:{host_port} -> {}", outcome.trim().replace('\n', " | "));
    }
    let host_refusals = host_rejects(&plan.host_chain).await - host_refusals_before;
    assert!(host_refusals >= 4, "the host chain refused {host_refusals} packets for 4 connections");

    // Metadata and a private address: refused in FORWARD, before the packet could leave.
    for (address, range) in [("169.254.169.254", "169.254.0.0/16"), ("192.168.254.254", "192.168.0.0/16"), ("10.254.254.254", "10.0.0.0/8")]
    {
        let before = packets(&plan.egress_chain, range).await;
        let outcome = connect_from(&container_id, address, 80).await;
        let after = packets(&plan.egress_chain, range).await;
        println!("{runtime:?}: {address}:80 -> {} ({} packets refused)", outcome.trim().replace('\n', " | "), after - before);
        assert!(!outcome.contains("exit=0"), "{address} reached: {outcome}");
        assert!(after > before, "the {range} rule did not refuse the connection to {address}");
    }
    // IPv6: the session network has none, and Docker disables it in the container's namespace.
    if runtime == Runtime::Runc {
        assert_eq!(exec_text(&container_id, "cat /proc/net/if_inet6").await.trim(), "", "no IPv6 address inside");
    }
    // The published port still answers from the host, and keeps answering.
    assert!(answers_http(port).await, "the published port works with the egress rules in place");
    // So does the container's own address on the session network, which `container.ready`
    // reports for a session proxy on this machine: the host's connection and its replies pass.
    let own = ready.network.clone().expect("network in container.ready");
    assert_eq!((own.port, own.host.clone(), Some(own.boot_id.as_str())), (8080, fixture.profile.host(), protocol::host::boot_id()));
    assert!(container::probe::http_ready(&own.ip.to_string(), own.port, "/").await, "{} answers the host", own.ip);
    // Another session's container on the same network cannot reach it.
    let (other_id, _) = provision(&agent, &fixture.session("egress-other")).await;
    let outcome = connect_from(&other_id, &own.ip.to_string(), own.port).await;
    println!("{runtime:?}: another session -> {}:{} -> {}", own.ip, own.port, outcome.trim().replace('\n', " | "));
    assert!(!outcome.contains("exit=0"), "another session reached {}: {outcome}", own.ip);
    let _ = fixture
        .docker
        .remove_container(&other_id, Some(bollard::container::RemoveContainerOptions { force: true, ..Default::default() }))
        .await;

    // Removing the network removes its rules.
    let _ = fixture
        .docker
        .remove_container(&container_id, Some(bollard::container::RemoveContainerOptions { force: true, ..Default::default() }))
        .await;
    agent.remove_network().await.unwrap();
    let chain = plan.egress_chain.clone();
    let gone = blocking(move || Command::new("iptables").args(["-S", &chain]).output().unwrap().status.success()).await;
    assert!(!gone, "the egress chain went with the network");
}

/// Packets the host chain's final REJECT matched.
async fn host_rejects(chain: &str) -> u64 {
    let chain = chain.to_owned();
    blocking(move || {
        let listing = Command::new("iptables").args(["-v", "-x", "-n", "-L", &chain]).output().unwrap();
        String::from_utf8_lossy(&listing.stdout)
            .lines()
            .filter(|line| line.contains("REJECT") && line.contains("0.0.0.0/0") && !line.contains("dpt:"))
            .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_to_host_metadata_and_private_ranges_is_refused_under_runc() {
    egress_is_refused_by_rules(Runtime::Runc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_to_host_metadata_and_private_ranges_is_refused_under_runsc() {
    egress_is_refused_by_rules(Runtime::Runsc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_listed_destination_passes_the_rules() {
    // Port 4 of the host's private ranges allow-listed (the network's gateway is in one of them,
    // wherever Docker's pools put it): that port gets through the host chain, every other port is
    // still refused.
    let fixture = Fixture::new(Runtime::Runc, |profile| {
        profile.container.egress_allow = ["172.16.0.0/12", "192.168.0.0/16", "10.0.0.0/8"]
            .into_iter()
            .map(|cidr| protocol::profile::EgressAllow { cidr: cidr.into(), port: Some(4) })
            .collect();
    })
    .await;
    let agent = fixture.agent();
    let (container_id, _) = provision(&agent, &fixture.session("allowed")).await;
    let plan = agent.egress_plan().unwrap();
    let network = fixture.docker.inspect_network::<String>(&spec::network_name(&fixture.profile), None).await.unwrap();
    let gateway_here = network.ipam.unwrap().config.unwrap()[0].gateway.clone().unwrap();
    let allowed = connect_from(&container_id, &gateway_here, 4).await;
    let refused = connect_from(&container_id, &gateway_here, 5).await;
    // Nothing listens on port 4 of the host: the kernel answers "connection refused" (a reset),
    // which only happens when the rules let the packet reach the host's TCP stack.
    assert!(allowed.contains("Connection refused"), "allow-listed port: {allowed}");
    assert!(refused.contains("No route to host") && !refused.contains("exit=0"), "other port: {refused}");
    let mut matched = 0;
    for cidr in ["172.16.0.0/12", "192.168.0.0/16", "10.0.0.0/8"] {
        matched += packets(&plan.host_chain, cidr).await;
    }
    assert!(matched >= 1, "the allow rule matched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_chains_of_networks_that_are_gone_are_swept() {
    let fixture = Fixture::new(Runtime::Runc, |_| {}).await;
    let agent = fixture.agent();
    let (container_id, _) = provision(&agent, &fixture.session("live")).await;
    let live = agent.egress_plan().unwrap();
    // Chains left behind by a network that no longer exists (an id Docker never gave out).
    let ghost_id = fixture.test_id.clone(); // 12 hex digits, like a network id prefix
    let ghost = egress::EgressPlan::new("berth-ghost", &ghost_id, "br-ghost", &[]);
    let installed = ghost.clone();
    blocking(move || egress::apply_blocking(&installed)).await.unwrap();
    // (Another test's agent may sweep them first: either way they must be gone afterwards.)
    agent.remove_stale_egress_rules().await.unwrap();
    let remaining = blocking(egress::chain_network_ids_blocking).await;
    assert!(!remaining.contains(&ghost_id), "swept");
    assert!(remaining.iter().any(|id| live.egress_chain.ends_with(id.as_str())), "the live network keeps its chains");
    let input =
        blocking(|| String::from_utf8_lossy(&Command::new("iptables").args(["-S", "INPUT"]).output().unwrap().stdout).into_owned()).await;
    assert!(!input.contains("br-ghost"), "the ghost's jump is gone too");
    drop(container_id);
}

// ------------------------------------------------------------------------------------ gVisor

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runsc_session_runs_under_gvisor_with_every_limit_and_hardening_option() {
    let fixture = Fixture::new(Runtime::Runsc, |_| {}).await;
    let agent = fixture.agent();
    let session = fixture.session("gvisor");
    let session_dir = fixture.profile.session_dir(&session);
    std::fs::create_dir_all(&session_dir).unwrap();
    std::fs::write(session_dir.join("hello.txt"), "hello from gVisor").unwrap();
    let (container_id, port) = provision(&agent, &session).await;
    let body = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
    assert!(body, "published port answers");

    // Really gVisor: its kernel introduces itself, and the host kernel's version is not visible.
    let dmesg = exec_text(&container_id, "dmesg").await;
    assert!(dmesg.contains("Starting gVisor"), "{dmesg}");
    let inspected = fixture.docker.inspect_container(&container_id, None).await.unwrap();
    let host = inspected.host_config.clone().unwrap();
    assert_eq!(host.runtime.as_deref(), Some("runsc"));
    // Limits and hardening, as Docker holds them and as the sandbox shows them.
    assert_eq!(host.memory, Some(128 * 1024 * 1024));
    assert_eq!(host.memory_swap, host.memory);
    assert_eq!(host.pids_limit, Some(spec::docker_pids_limit(&fixture.profile.container)));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(host.readonly_rootfs, Some(true));
    assert!(host.security_opt.unwrap_or_default().iter().any(|option| option.starts_with("no-new-privileges")));
    let cgroup_memory = std::fs::read_to_string(format!("/sys/fs/cgroup/memory/docker/{container_id}/memory.limit_in_bytes"));
    if let Ok(limit) = cgroup_memory {
        assert_eq!(limit.trim(), (128 * 1024 * 1024).to_string(), "the sandbox's cgroup holds the memory limit");
    }
    assert_eq!(exec_text(&container_id, "id -u").await.trim(), "1000");
    let status = exec_text(&container_id, "cat /proc/self/status").await;
    assert!(status.lines().any(|line| line.starts_with("CapEff:") && line.ends_with("0000000000000000")), "{status}");
    let root_write = exec_text(&container_id, "touch /etc/x; echo exit=$?").await;
    assert!(root_write.contains("exit=1"), "read-only root: {root_write}");
    let mounts = exec_text(&container_id, "cat /proc/mounts").await;
    let tmp = mounts.lines().find(|line| line.split_whitespace().nth(1) == Some("/tmp")).expect("tmp mount");
    assert!(tmp.contains("tmpfs") && tmp.contains("noexec") && tmp.contains("size=16m"), "{tmp}");
    let tmp_exec = exec_text(&container_id, "cp /bin/busybox /tmp/b && /tmp/b true; echo exit=$?").await;
    assert!(!tmp_exec.contains("exit=0"), "/tmp is not executable: {tmp_exec}");
    let workspace = exec_text(&container_id, "cat /workspace/hello.txt").await;
    assert!(workspace.contains("hello from gVisor"), "{workspace}");
    // Pause and resume work through gVisor.
    assert_eq!(answer(&agent, &task(&session, "pause", json!({}))).await.event_type, "container.paused");
    assert!(!answers_http(port).await, "a paused sandbox does not answer");
    assert_eq!(answer(&agent, &task(&session, "resume", json!({}))).await.event_type, "container.resumed");
    // gVisor's ptrace platform may take a moment after the thaw on a loaded machine.
    assert!(answers_http_within(port, Duration::from_secs(15)).await, "resumed under gVisor");
    // Memory: a hog inside is stopped by the sandbox's limit (the host's OOM killer ends the
    // sandbox, Docker reports it), never by the host running out.
    let hog = exec(&container_id, "head -c 400000000 /dev/zero | tail > /dev/null; echo survived").await;
    assert!(!String::from_utf8_lossy(&hog.stdout).contains("survived"), "a 400 MB hog in a 128 MiB sandbox: {hog:?}");
    let state = fixture.docker.inspect_container(&container_id, None).await.unwrap().state.unwrap();
    println!("after the memory hog: running {:?}, oom_killed {:?}", state.running, state.oom_killed);
    assert!(state.running == Some(true) || state.oom_killed == Some(true), "{state:?}");
}

// ------------------------------------------------------------------------------------ figures

/// open → ready and resume under runc and runsc, one run:
/// `cargo test -p container --test tenants -- --ignored --nocapture runtime_figures`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: about a minute"]
async fn runtime_figures() {
    const ROUNDS: usize = 20;
    let mut table = Vec::new();
    for runtime in [Runtime::Runc, Runtime::Runsc] {
        let fixture = Fixture::new(runtime, |_| {}).await;
        let agent = fixture.agent();
        let mut ready_ms = Vec::new();
        let mut resume_ms = Vec::new();
        // One warm-up session makes the network and its rules outside the measurement.
        provision(&agent, &fixture.session("warm")).await;
        for round in 0..ROUNDS {
            let session = fixture.session(&format!("r{round}"));
            let began = Instant::now();
            let (_, port) = provision(&agent, &session).await;
            ready_ms.push(began.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(answer(&agent, &task(&session, "pause", json!({}))).await.event_type, "container.paused");
            let began = Instant::now();
            assert_eq!(answer(&agent, &task(&session, "resume", json!({}))).await.event_type, "container.resumed");
            while !answers_http(port).await {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            resume_ms.push(began.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(answer(&agent, &task(&session, "remove", json!({}))).await.event_type, "container.removed");
        }
        table.push((runtime, percentiles(&mut ready_ms), percentiles(&mut resume_ms)));
    }
    println!("| runtime | open → ready p50 / p95 ms | resume → first HTTP answer p50 / p95 ms |");
    println!("|---|---|---|");
    for (runtime, ready, resume) in table {
        println!("| {runtime:?} | {:.0} / {:.0} | {:.0} / {:.0} |", ready.0, ready.1, resume.0, resume.1);
    }
}

fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let rank = |p: f64| samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    (rank(0.5), rank(0.95))
}
