//! A host's heartbeat (`container.host_report`, `workspace.host_report`): what each of its host-affine agents (container, workspace)
//! tells the engine every [`topology::HOST_REPORT_INTERVAL`]. The engine keeps the latest report
//! of each in Redis with a TTL of [`topology::HOST_GONE_AFTER_REPORTS`] intervals, so a host that
//! stops reporting is gone when its report expires: Redis key expiry is the membership protocol.

use serde::{Deserialize, Serialize};

use crate::event::CloudEvent;
use crate::message::AgentKind;
use crate::profile::{is_deployment_id, Profile};
use crate::topology;

/// The body of one host report. Like every event's data (see [`crate::events`]), it accepts and
/// ignores a field it does not know: agents and the engine are upgraded one at a time, and an
/// older engine refusing a newer agent's reports would mark a live host gone. A missing field or
/// a wrong type is still refused, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// The host id ([`Profile::host`]).
    pub host: String,
    pub deployment: String,
    /// Which of the host's agents reports: `container` (capacity) or `workspace` (cache).
    pub agent: AgentKind,
    /// How often this agent reports; the engine marks the host gone after
    /// [`topology::HOST_GONE_AFTER_REPORTS`] of these without a report.
    pub interval_secs: u64,
    /// The container agent's: what the host gives sessions and what they hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<HostCapacity>,
    /// The workspace agent's: the workspaces (`user/workspace`) with a copy on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspaces: Option<Vec<String>>,
}

/// A host's capacity as its container agent sees it. `memory_mib` and `cpu_millis` are the
/// budget (the profile's `limits.host_memory_mib`/`host_cpus`, or the machine's size); committed
/// is what its session containers hold by the profile's per-session limits. Unknown fields are
/// ignored, as in [`HostReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCapacity {
    pub memory_mib: u64,
    pub cpu_millis: u64,
    pub committed_memory_mib: u64,
    pub committed_cpu_millis: u64,
    pub free_memory_mib: u64,
    pub free_cpu_millis: u64,
    pub sessions: u64,
}

impl HostCapacity {
    /// The capacity of a host with `sessions` session containers under `profile`.
    pub fn of(profile: &Profile, sessions: u64) -> HostCapacity {
        let (memory_mib, cpu_millis) = budget(profile);
        let committed_memory_mib = sessions * profile.container.memory_mib;
        let committed_cpu_millis = sessions * cpu_millis_of(profile.container.cpus);
        HostCapacity {
            memory_mib,
            cpu_millis,
            committed_memory_mib,
            committed_cpu_millis,
            free_memory_mib: memory_mib.saturating_sub(committed_memory_mib),
            free_cpu_millis: cpu_millis.saturating_sub(committed_cpu_millis),
            sessions,
        }
    }
}

impl HostReport {
    /// The event that carries it (no subject: it is about a host, not a session). Its data goes
    /// through `events::to_data`, which logs a failed encoding (a `null` every reader refuses).
    pub fn to_event(&self, source: &str) -> CloudEvent {
        CloudEvent::new(&topology::host_report_type(self.agent), source, None, crate::events::to_data(self))
    }

    /// Reads and checks a host report's data; the error names what is wrong.
    pub fn from_event(event: &CloudEvent) -> Result<HostReport, String> {
        let report: HostReport = serde_json::from_value(event.data.clone()).map_err(|error| format!("{}: {error}", event.event_type))?;
        if !is_deployment_id(&report.host) {
            return Err(format!("host report: host {:?} is not a host id (1-40 lowercase letters, digits or `-`)", report.host));
        }
        if !topology::is_host_affine(report.agent) {
            return Err(format!("host report: the {} agent is not a host's agent", report.agent));
        }
        if event.event_type != topology::host_report_type(report.agent) {
            return Err(format!("{}: reports the {} agent", event.event_type, report.agent));
        }
        if report.interval_secs == 0 || report.interval_secs > 3600 {
            return Err("host report: interval_secs must be 1-3600".to_owned());
        }
        Ok(report)
    }

    /// How long the engine keeps this report: the host is gone when it expires.
    pub fn gone_after_ms(&self) -> u64 {
        self.interval_secs * 1000 * u64::from(topology::HOST_GONE_AFTER_REPORTS)
    }
}

/// The memory (MiB) and CPU (millis) a host gives sessions: the profile's `limits.host_memory_mib`
/// and `limits.host_cpus`, or, where those are 0, the machine's size, read now.
pub fn budget(profile: &Profile) -> (u64, u64) {
    let limits = &profile.limits;
    let memory_mib = if limits.host_memory_mib > 0 { limits.host_memory_mib } else { machine_memory_mib() };
    let cpus = if limits.host_cpus > 0.0 { limits.host_cpus } else { machine_cpus() };
    (memory_mib, cpu_millis_of(cpus))
}

/// CPUs as thousandths (0.5 → 500).
pub fn cpu_millis_of(cpus: f64) -> u64 {
    (cpus * 1000.0).round().max(0.0) as u64
}

/// `MemTotal` of `/proc/meminfo` in MiB (1 GiB when it cannot be read: a safe, small default).
fn machine_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

fn machine_cpus() -> f64 {
    std::thread::available_parallelism().map(|count| count.get() as f64).unwrap_or(1.0)
}

/// The report interval: `BERTH_HOST_REPORT_INTERVAL_SECS` (tests report faster), else
/// [`topology::HOST_REPORT_INTERVAL`].
pub fn report_interval_from_env() -> Result<std::time::Duration, String> {
    let interval = crate::profile::seconds_from_env(REPORT_INTERVAL_ENV)?.unwrap_or(topology::HOST_REPORT_INTERVAL);
    Ok(interval.clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600)))
}

/// The variable that sets the report interval in seconds.
pub const REPORT_INTERVAL_ENV: &str = "BERTH_HOST_REPORT_INTERVAL_SECS";

/// A session container's own address on its session network (`container.ready`'s `network`),
/// with the machine it is on: only a process on that machine can use it (the same private
/// address on another machine may be another tenant's container), so the session proxy takes it
/// only when `host` and `boot_id` are its own, and the published port otherwise. It is event data
/// (`container.ready`), so unknown fields are ignored: a proxy refusing a newer agent's address
/// would silently fall back to the published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAddress {
    pub ip: std::net::IpAddr,
    pub port: u16,
    /// The container agent's host id ([`Profile::host`]).
    pub host: String,
    /// The machine's kernel boot id ([`boot_id`]): two machines left on the default host id
    /// (`local`) still differ here.
    pub boot_id: String,
}

impl NetworkAddress {
    /// Whether a process on host `host`, under the kernel booted as `boot_id`, is on this
    /// address's machine.
    pub fn is_on(&self, host: &str, boot_id: Option<&str>) -> bool {
        self.host == host && !self.boot_id.is_empty() && boot_id == Some(self.boot_id.as_str())
    }
}

/// This machine's kernel boot id (`/proc/sys/kernel/random/boot_id`, read once): the same for
/// every process and container on one running kernel, different on any other machine or boot.
/// `None` where the kernel does not say.
pub fn boot_id() -> Option<&'static str> {
    static BOOT_ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
            Some(text.trim().to_owned()).filter(|id| !id.is_empty())
        })
        .as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> HostReport {
        HostReport {
            host: "h2".to_owned(),
            deployment: "dev".to_owned(),
            agent: AgentKind::Container,
            interval_secs: 5,
            capacity: Some(HostCapacity {
                memory_mib: 8192,
                cpu_millis: 4000,
                committed_memory_mib: 512,
                committed_cpu_millis: 1000,
                free_memory_mib: 7680,
                free_cpu_millis: 3000,
                sessions: 1,
            }),
            workspaces: None,
        }
    }

    #[test]
    fn reports_round_trip_and_bad_ones_are_named() {
        let event = report().to_event("/test");
        assert_eq!(HostReport::from_event(&event), Ok(report()));
        assert_eq!(report().gone_after_ms(), 15_000);
        let mut bad = report();
        bad.host = "H.2".to_owned();
        assert!(HostReport::from_event(&bad.to_event("/test")).unwrap_err().contains("not a host id"));
        bad = report();
        bad.agent = AgentKind::Session;
        assert!(HostReport::from_event(&bad.to_event("/test")).unwrap_err().contains("not a host's agent"));
        let mut claimed = report().to_event("/test");
        claimed.event_type = "workspace.host_report".to_owned();
        assert!(HostReport::from_event(&claimed).unwrap_err().contains("reports the container agent"));
    }

    #[test]
    fn a_newer_agents_fields_are_ignored_and_missing_or_mistyped_ones_refused() {
        // A newer agent's report, with a field this engine does not know at the top and in the
        // capacity, is read as the fields it does know.
        let mut event = report().to_event("/test");
        event.data["gpus"] = serde_json::json!(2);
        event.data["capacity"]["free_disk_mib"] = serde_json::json!(1024);
        assert_eq!(HostReport::from_event(&event), Ok(report()));
        let mut missing = report().to_event("/test");
        missing.data.as_object_mut().unwrap().remove("interval_secs");
        let error = HostReport::from_event(&missing).unwrap_err();
        assert!(error.starts_with("container.host_report: ") && error.contains("missing field `interval_secs`"), "{error}");
        let mut mistyped = report().to_event("/test");
        mistyped.data["capacity"]["sessions"] = serde_json::json!("one");
        let error = HostReport::from_event(&mistyped).unwrap_err();
        assert!(error.starts_with("container.host_report: ") && error.contains("invalid type: string \"one\", expected u64"), "{error}");
    }

    #[test]
    fn a_network_address_is_usable_only_on_its_own_machine() {
        let boot = boot_id().expect("Linux says its boot id");
        let address = NetworkAddress { ip: "172.18.0.5".parse().unwrap(), port: 8080, host: "h1".to_owned(), boot_id: boot.to_owned() };
        assert!(address.is_on("h1", Some(boot)));
        assert!(!address.is_on("h2", Some(boot)), "another host id");
        assert!(!address.is_on("h1", Some("another-boot")), "another machine left on the same host id");
        assert!(!address.is_on("h1", None), "a machine that does not say");
        let unknown = NetworkAddress { boot_id: String::new(), ..address.clone() };
        assert!(!unknown.is_on("h1", Some("")), "an agent that could not read it");
        let text = serde_json::json!({"ip": "172.18.0.5", "port": 8080, "host": "h1", "boot_id": boot});
        assert_eq!(serde_json::from_value::<NetworkAddress>(text).unwrap(), address);
        let newer = serde_json::json!({"ip": "172.18.0.5", "port": 8080, "host": "h1", "boot_id": boot, "ipv6": "fd00::5"});
        assert_eq!(serde_json::from_value::<NetworkAddress>(newer).unwrap(), address, "a newer agent's field is ignored");
    }
}
