//! Run-profiles: one TOML file per deployment (`run-profiles/<name>/profile.toml`) with environment
//! overrides for the service addresses. Strict: unknown keys are refused with their name, and
//! `validate` refuses what Berth never does (privileged containers, the Docker socket in a workspace).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The only profile format version this build reads.
pub const PROFILE_VERSION: u32 = 1;
/// Where profiles live unless `BERTH_PROFILES_DIR` says otherwise.
pub const DEFAULT_PROFILES_DIR: &str = "run-profiles";

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("profile {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("profile {path}: `{field}`: {reason}")]
    Invalid { path: PathBuf, field: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub version: u32,
    pub name: String,
    /// Pattern names (files `patterns/<name>.json`) this profile runs.
    pub patterns: Vec<String>,
    pub services: Services,
    pub container: ContainerSettings,
    pub workspace: WorkspaceSettings,
    pub timers: Timers,
    pub session: SessionSettings,
    pub terminal: TerminalSettings,
    pub limits: Limits,
    /// The warm pool (absent = none: every open is cold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolSettings>,
    /// Many hosts (absent = the defaults of [`HostsSettings`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<HostsSettings>,
    #[serde(default)]
    pub users: Vec<SeedUser>,
    /// Where the file was read from (not part of the file).
    #[serde(skip)]
    pub path: PathBuf,
}

/// Addresses of the services; each can be overridden from the environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Services {
    /// `BERTH_AMQP_URL`
    pub amqp_url: String,
    /// `BERTH_REDIS_URL`
    pub redis_url: String,
    /// `BERTH_STORE_URL`: `sqlite://path` or `mongodb://…`
    pub store_url: String,
    /// `BERTH_OBJECT_STORE_URL`: `file:///dir`, `s3://bucket/prefix`, `az://…`, `gs://…`
    pub object_store_url: String,
    /// `BERTH_WORKSPACE_ROOT`: host directory holding one folder per session.
    pub workspace_root: PathBuf,
    /// `BERTH_SESSION_ADDR`: where the session agent listens.
    pub session_addr: String,
    /// `BERTH_DEPLOYMENT`: the id every container, network, directory and private queue of this
    /// deployment carries, so two deployments sharing a Docker engine or a host never touch each
    /// other's. Absent: derived from the broker vhost and the Redis database (see
    /// [`Profile::deployment`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// `BERTH_HOST`: this machine's host id (its container and workspace agents take the tasks of
    /// sessions placed on it from `berth.agent.<kind>.<host>`). Absent: `local`
    /// ([`Profile::host`]); the engine and the other agents ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `BERTH_METRICS_ADDR`: where `berth engine` and the container, workspace and persistence
    /// agents serve Prometheus `/metrics` (behind `session.metrics_token_env`'s token). Absent: not
    /// served. The session agent serves its own on `session_addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSettings {
    pub image: String,
    pub memory_mib: u64,
    /// CPUs as a fraction (0.5 = half a core), applied as nano-CPUs.
    pub cpus: f64,
    pub pids_limit: i64,
    /// Capabilities added back after dropping ALL.
    #[serde(default)]
    pub cap_add: Vec<String>,
    #[serde(default)]
    pub read_only_root: bool,
    /// `uid[:gid]` to run as; absent = the image's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Where the workspace directory is mounted inside the container.
    pub workspace_mount: String,
    pub tmpfs_size_mib: u64,
    /// The port the workspace serves on inside the container.
    pub service_port: u16,
    pub health: HealthCheck,
    pub ready_timeout_secs: u64,
    /// Bridge network (created with inter-container traffic disabled).
    pub network: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra bind mounts `host:container[:ro]`. The Docker socket is refused.
    #[serde(default)]
    pub mounts: Vec<String>,
    /// Present only so that a profile asking for it is refused by name.
    #[serde(default)]
    pub privileged: bool,
    /// The OCI runtime: `runc` (Docker's default) or `runsc` (gVisor, registered with dockerd).
    pub runtime: Runtime,
    /// The container log (Docker's `json-file` driver) rotates at this size...
    pub log_max_size_mib: u64,
    /// ...keeping at most this many files, so a tenant's log takes at most size × files on disk.
    pub log_max_files: u32,
    /// With `read_only_root = false`: the paths (absolute, inside the container) that stay
    /// writable, each its own tmpfs of the given MiB. The rest of the root stays read-only, so a
    /// writable root is always bounded (the overlay2 `size` option needs XFS with project quotas).
    #[serde(default)]
    pub writable_paths: BTreeMap<String, u64>,
    /// Destinations a session may reach although they are the host, link-local or private
    /// (`cidr`, and optionally one TCP/UDP `port`); everything else of those is refused.
    pub egress_allow: Vec<EgressAllow>,
}

/// The OCI runtime a session container runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Runc,
    /// gVisor: a user-space kernel between the workspace and the host's.
    Runsc,
}

impl Runtime {
    /// The name dockerd knows the runtime by.
    pub fn docker_name(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Runsc => "runsc",
        }
    }
}

/// One destination exempt from the egress rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressAllow {
    /// IPv4 `a.b.c.d/len` (a plain address means `/32`).
    pub cidr: String,
    /// Only this TCP and UDP port; absent = every port and protocol.
    #[serde(default)]
    pub port: Option<u16>,
}

/// Capabilities a profile may add back after dropping ALL, by canonical name (without `CAP_`).
/// An allow-list, so a capability this list does not name (`SYS_ADMIN`, `DAC_READ_SEARCH`,
/// `NET_RAW`, `SYS_PTRACE`, any future one) is refused.
pub const ADDABLE_CAPABILITIES: [&str; 10] =
    ["AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID", "SYS_CHROOT"];

/// The canonical name of an addable capability, whatever its case or `CAP_` prefix; `None` when
/// the allow-list does not name it.
pub fn canonical_capability(name: &str) -> Option<&'static str> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    ADDABLE_CAPABILITIES.into_iter().find(|allowed| *allowed == bare)
}

/// Host directories under which extra mounts may lie (read-only, shared reference data). An
/// allow-list: `/var`, `/run/containerd`, a home directory or anything else is refused.
pub const MOUNTABLE_HOST_ROOTS: [&str; 2] = ["/srv/berth", "/opt/berth"];

/// Whether `host_path` (absolute, no `.`/`..`) lies strictly under one of [`MOUNTABLE_HOST_ROOTS`].
/// Lexical only: the container agent checks the resolved path again before mounting it.
pub fn is_mountable_host_path(host_path: &Path) -> bool {
    let clean = host_path.is_absolute() && host_path.components().skip(1).all(|c| matches!(c, std::path::Component::Normal(_)));
    clean && MOUNTABLE_HOST_ROOTS.iter().any(|root| host_path.starts_with(root) && host_path != Path::new(root))
}

/// Parses an egress allow-list `cidr` (IPv4 only: session networks have no IPv6).
pub fn parse_ipv4_cidr(text: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (address, length) = text.split_once('/').unwrap_or((text, "32"));
    let address: std::net::Ipv4Addr =
        address.parse().map_err(|_| format!("{text:?} is not an IPv4 address or CIDR (session networks have no IPv6)"))?;
    let length: u8 = length.parse().ok().filter(|length| *length <= 32).ok_or_else(|| format!("{text:?}: prefix length must be 0-32"))?;
    let mask = if length == 0 { 0 } else { u32::MAX << (32 - u32::from(length)) };
    if u32::from(address) & !mask != 0 {
        return Err(format!("{text:?} has host bits set (did you mean {}/{length}?)", std::net::Ipv4Addr::from(u32::from(address) & mask)));
    }
    Ok((address, length))
}

/// How readiness is decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum HealthCheck {
    /// An HTTP GET of this path on the service port gets any answer below 500 (a 404 from a
    /// server that is up still means up; 5xx means the service is not ready).
    Http(String),
    /// The service port accepts a TCP connection.
    Tcp,
    /// The image's own HEALTHCHECK reports healthy.
    Docker,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSettings {
    /// Object-store prefix template; `{profile}`, `{user}` and `{workspace}` are substituted.
    pub prefix: String,
    /// Folders created in every new workspace.
    #[serde(default)]
    pub skeleton: Vec<String>,
    /// Files at least this large stream in after `workspace.materialized`.
    pub large_file_threshold_kib: u64,
    /// Downloads or uploads at the same time.
    pub parallelism: usize,
    pub quota_mib: u64,
    /// What holds a session's workspace on the host (see `agents/workspace/README.md`).
    pub filesystem: WorkspaceFilesystem,
    /// Disk this host may keep for closed workspaces (the local cache a reopen revalidates
    /// instead of downloading everything), least recently closed evicted first; 0 = no cache.
    #[serde(default)]
    pub cache_mib: u64,
}

/// What holds a session's workspace directory on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceFilesystem {
    /// An ext4 image of its own per session, loop-mounted: `quota_mib` is a hard limit (`ENOSPC`
    /// inside the container). Needs an agent that may mount (root on the host).
    Image,
    /// A plain directory on the host's file system: `quota_mib` is checked at materialize and
    /// sync only. For agents that can't mount (an unprivileged container).
    Directory,
}

/// Session timers, all in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timers {
    /// Pause after this long without activity.
    pub idle_after_secs: u64,
    /// Stop after this long idle.
    pub stop_after_idle_secs: u64,
    /// Hard cap on a session's age.
    pub max_age_secs: u64,
    /// Autosave interval while running (0 = off).
    pub autosave_secs: u64,
    /// The middle tier of the idle ladder: this long after pausing, the container is stopped with
    /// its directory kept (memory freed; a wake starts it again on the same directory, no
    /// materialize). 0 = stay paused until `stop_after_idle_secs`; otherwise shorter than it.
    pub dormant_after_idle_secs: u64,
    /// The idle rule's CPU threshold: a running session whose container used less than this share
    /// of one CPU (percent), averaged over the interval since the last work probe, is not working.
    pub idle_cpu_percent: f64,
    /// A warning notification this long before the pause, the container stop and the close, so a
    /// user can keep working (0 = none); shorter than each of those intervals.
    pub idle_warning_secs: u64,
    /// Keep-alives (`session.keepalive`) honoured in a row without user input; each postpones the
    /// pause by `idle_after_secs`, so a forgotten script cannot hold a session forever (0 = none).
    pub max_keepalives: u32,
}

/// What one tenant may take, and what the host commits to live sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Live sessions (queued ones included) one user may have at once.
    pub max_sessions_per_user: u32,
    /// New sessions one user may open in a minute (joining a live session is not counted).
    pub max_opens_per_user_per_minute: u32,
    /// Memory the host commits to live sessions (each holds `container.memory_mib`);
    /// 0 = the host's memory as detected at start.
    pub host_memory_mib: u64,
    /// CPUs the host commits to live sessions (each holds `container.cpus`); 0 = the host's CPUs.
    pub host_cpus: f64,
    /// How long an open waits in the queue for capacity before it is refused.
    pub queue_timeout_secs: u64,
    /// Price of one hour of a session that holds capacity, and of one that idles (paused), in the
    /// unit of the budgets; 0 = free. Usage is metered whatever the prices.
    pub price_per_running_hour: f64,
    pub price_per_idle_hour: f64,
    /// What one user may spend per UTC day and per UTC month; 0 = no budget. Past 80 % the user's
    /// sessions are warned; once spent, running sessions stop (saved first) and opens are refused.
    pub daily_budget: f64,
    pub monthly_budget: f64,
}

/// The warm pool: containers created ahead of demand, each with its own slot directory, kept
/// paused until `session.open` claims one (see `run-profiles/README.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// Free slots the engine keeps ready, within the host's capacity; 0 = no pool.
    pub size: u32,
    /// A free slot unclaimed this long is replaced by a fresh one; 0 = kept until claimed.
    pub max_idle_secs: u64,
}

/// What the engine does about hosts (`[hosts]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostsSettings {
    /// A humantime duration (`"5m"`, `"90s"`): a session on a host gone this long is reopened on
    /// another host from the object store's last synced state.
    pub failover_after: String,
    /// A humantime duration (`"7d"`): how long after its last failover the engine remembers which
    /// sessions it moved off a host, so that copies the host returns with are saved apart. Absent =
    /// [`DEFAULT_FORGET_AFTER`]. Longer than `failover_after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forget_after: Option<String>,
}

/// [`HostsSettings::failover_after`] when the profile has no `[hosts]`: long enough that an agent
/// restart or a short network cut never moves a session, short enough that a dead machine's users
/// are back within minutes.
pub const DEFAULT_FAILOVER_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// [`HostsSettings::forget_after`] when not set: a week, as long as the engine keeps ended threds.
/// A host back later than that still cannot write over a moved session (the fence in the store
/// refuses its syncs); its copies are then left on it for an operator instead of saved apart.
pub const DEFAULT_FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The folder of the warm pool's slots, under the deployment root (outside every session's).
pub const POOL_DIR: &str = ".berth-pool";
/// Where a pool container finds its session's identity once claimed (read-only inside it).
pub const POOL_IDENTITY_MOUNT: &str = "/run/berth";
/// The file in [`POOL_IDENTITY_MOUNT`] (and in the slot's identity folder on the host).
pub const POOL_IDENTITY_FILE: &str = "session.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// Expected `aud` of user tokens.
    pub jwt_audience: String,
    /// Name of the environment variable holding the HS256 secret or a PEM public key.
    pub jwt_key_env: String,
    /// At most one `session.activity` per session per this many seconds.
    pub activity_debounce_secs: u64,
    pub max_frame_bytes: usize,
    pub max_messages_per_second: u32,
    pub max_connections_per_user: usize,
    /// Browser origins (`https://console.example.org`) allowed to open WebSockets (`/ws`, the
    /// terminal, proxied sockets) besides the agent's own (an `Origin` whose host is the request's
    /// `Host`); a request without `Origin` (a non-browser client) always passes.
    pub allowed_origins: Vec<String>,
    /// At most this many TCP connections at once, upgraded sockets included; one more is answered
    /// 503 `server_busy` and closed.
    pub max_connections: usize,
    /// A connection must send a request's whole head within this many seconds, and an idle
    /// keep-alive connection is closed after it.
    pub header_read_timeout_secs: u64,
    /// A connection on which no byte moved for this many seconds while it is still HTTP (not yet
    /// upgraded) is closed.
    pub idle_timeout_secs: u64,
    /// Name of the environment variable holding the bearer token `/metrics` requires; absent, or
    /// the variable unset or empty: `/metrics` answers 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token_env: Option<String>,
    /// The reverse proxy to each session's service (`[session.proxy]`).
    pub proxy: ProxySettings,
}

/// The authenticated reverse proxy to each session's service port: `/s/{session}/…` and, with a
/// base domain, `{session}.{base_domain}` (see agents/session/README.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// `true`: the app sees `/x` for `/s/{session}/x` (and `X-Forwarded-Prefix: /s/{session}`);
    /// `false`: it sees the whole path.
    pub strip_prefix: bool,
    /// When set, `{session}.{base_domain}` is proxied too, at `/` (host routing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_domain: Option<String>,
    /// Lifetime of the cookie a token exchange sets (renewed while used, never past the token's).
    pub cookie_ttl_secs: u64,
    /// Cookies carry `Secure` (sent over HTTPS only); off only for plain-HTTP development.
    pub secure_cookies: bool,
    /// How long a request to a session that is starting or waking waits for it to run.
    pub start_wait_secs: u64,
    /// Paths (as the app sees them) of background traffic: requests and WebSocket frames on them
    /// never count as activity and never wake a paused session. `*` matches within one segment,
    /// `**` across segments.
    #[serde(default)]
    pub background_paths: Vec<String>,
}

/// The browser terminal (`GET /api/sessions/{id}/terminal`): what runs in the container's PTY.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalSettings {
    /// The command started in the PTY, as argv (`["/bin/sh"]`, `["/bin/bash", "-l"]`).
    pub shell: Vec<String>,
    /// Who the shell runs as (`uid[:gid]` or a name the image knows); absent = `container.user`,
    /// else the image's user.
    #[serde(default)]
    pub user: Option<String>,
    /// Where the shell starts (absolute, inside the container); absent = `container.workspace_mount`.
    #[serde(default)]
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedUser {
    pub id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// How an environment override sets its `[services]` field.
pub type SetService = fn(&mut Services, String);

/// Environment variables that override `[services]`, each with how it sets its field.
pub const SERVICE_OVERRIDES: [(&str, SetService); 9] = [
    ("BERTH_AMQP_URL", |services, value| services.amqp_url = value),
    ("BERTH_REDIS_URL", |services, value| services.redis_url = value),
    ("BERTH_STORE_URL", |services, value| services.store_url = value),
    ("BERTH_OBJECT_STORE_URL", |services, value| services.object_store_url = value),
    ("BERTH_WORKSPACE_ROOT", |services, value| services.workspace_root = PathBuf::from(value)),
    ("BERTH_SESSION_ADDR", |services, value| services.session_addr = value),
    ("BERTH_DEPLOYMENT", |services, value| services.deployment = Some(value)),
    ("BERTH_HOST", |services, value| services.host = Some(value)),
    ("BERTH_METRICS_ADDR", |services, value| services.metrics_addr = Some(value)),
];

impl Profile {
    /// Loads `<profiles dir>/<name>/profile.toml`, applies environment overrides and validates.
    pub fn load_named(name: &str) -> Result<Profile, ProfileError> {
        Profile::load(&profiles_dir().join(name).join("profile.toml"))
    }

    /// Loads a profile file, applies environment overrides and validates.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read { path: path.to_owned(), source })?;
        let mut profile = Profile::parse(&text, path)?;
        profile.apply_overrides(|name| std::env::var(name).ok());
        Ok(profile)
    }

    /// Parses and validates profile text (no environment).
    pub fn parse(text: &str, path: &Path) -> Result<Profile, ProfileError> {
        // The key path leads the message: TOML's own error shows a line, which for a value
        // spread over lines (or a table given as an array) may not show the key at fault.
        let mut profile: Profile = serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|error| {
            let key = error.path().to_string();
            let message = error.into_inner().to_string();
            let message = if key.is_empty() || key == "." { message } else { format!("`{key}`: {message}") };
            ProfileError::Parse { path: path.to_owned(), message }
        })?;
        profile.path = path.to_owned();
        profile.validate()?;
        Ok(profile)
    }

    /// Applies `BERTH_*` overrides from `lookup` (the environment, or a table in tests).
    pub fn apply_overrides(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        for (variable, set_field) in SERVICE_OVERRIDES {
            if let Some(value) = lookup(variable) {
                set_field(&mut self.services, value);
            }
        }
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> ProfileError {
        ProfileError::Invalid { path: self.path.clone(), field: field.to_owned(), reason: reason.into() }
    }

    /// How long a host stays gone before its sessions are reopened elsewhere (`hosts.failover_after`).
    pub fn failover_after(&self) -> std::time::Duration {
        self.hosts.as_ref().and_then(|hosts| humantime::parse_duration(&hosts.failover_after).ok()).unwrap_or(DEFAULT_FAILOVER_AFTER)
    }

    /// How long after a host's last failover the engine remembers the sessions it moved off it
    /// (`hosts.forget_after`).
    pub fn forget_after(&self) -> std::time::Duration {
        self.hosts
            .as_ref()
            .and_then(|hosts| hosts.forget_after.as_deref())
            .and_then(|text| humantime::parse_duration(text).ok())
            .unwrap_or(DEFAULT_FORGET_AFTER)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if let Some(hosts) = &self.hosts {
            match humantime::parse_duration(&hosts.failover_after) {
                Ok(after) if after >= std::time::Duration::from_secs(1) => {}
                Ok(_) => return Err(self.invalid("hosts.failover_after", "must be at least 1s")),
                Err(error) => return Err(self.invalid("hosts.failover_after", format!("not a duration ({error}), e.g. \"5m\""))),
            }
            if let Some(text) = &hosts.forget_after {
                match humantime::parse_duration(text) {
                    Ok(forget) if forget > self.failover_after() => {}
                    Ok(_) => return Err(self.invalid("hosts.forget_after", "must be longer than hosts.failover_after")),
                    Err(error) => return Err(self.invalid("hosts.forget_after", format!("not a duration ({error}), e.g. \"7d\""))),
                }
            }
        }
        if self.version != PROFILE_VERSION {
            return Err(self.invalid("version", format!("this build reads version {PROFILE_VERSION}, got {}", self.version)));
        }
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(self.invalid("name", "must be letters, digits, `-` or `_`"));
        }
        let container = &self.container;
        if container.privileged {
            return Err(self.invalid("container.privileged", "privileged workspace containers are never allowed"));
        }
        for mount in &container.mounts {
            if mount.contains("docker.sock") || mount.split(':').next().is_some_and(|host| host == "/var/run" || host == "/run") {
                return Err(self.invalid("container.mounts", format!("mounting the Docker socket is never allowed ({mount})")));
            }
            let parts: Vec<&str> = mount.split(':').collect();
            if parts.len() != 3 || parts[2] != "ro" || !parts[1].starts_with('/') {
                return Err(
                    self.invalid("container.mounts", format!("expected host:container:ro (extra mounts are read-only), got {mount:?}"))
                );
            }
            if !is_mountable_host_path(Path::new(parts[0])) {
                return Err(self.invalid(
                    "container.mounts",
                    format!("{mount:?}: the host side must lie under {} (an allow-list)", MOUNTABLE_HOST_ROOTS.join(" or ")),
                ));
            }
        }
        for capability in &container.cap_add {
            if canonical_capability(capability).is_none() {
                return Err(self.invalid(
                    "container.cap_add",
                    format!("{capability:?} is not one of the capabilities a workspace may get back: {}", ADDABLE_CAPABILITIES.join(", ")),
                ));
            }
        }
        if container.log_max_size_mib == 0 || container.log_max_size_mib > 1024 {
            return Err(self.invalid("container.log_max_size_mib", "must be 1-1024: a container log is always bounded"));
        }
        if container.log_max_files == 0 || container.log_max_files > 20 {
            return Err(self.invalid("container.log_max_files", "must be 1-20"));
        }
        if !container.read_only_root && container.writable_paths.is_empty() {
            return Err(self.invalid(
                "container.writable_paths",
                "with read_only_root = false, name the paths that stay writable and their size in MiB (the rest is read-only): a writable root is bounded",
            ));
        }
        let mut in_memory_mib = container.tmpfs_size_mib;
        for (path, size_mib) in &container.writable_paths {
            let clean =
                Path::new(path).is_absolute() && Path::new(path).components().skip(1).all(|c| matches!(c, std::path::Component::Normal(_)));
            let system = ["/proc", "/sys", "/dev", "/tmp"].iter().any(|tree| Path::new(path).starts_with(tree));
            if !clean || path == "/" || system || *path == container.workspace_mount {
                return Err(self.invalid(
                    "container.writable_paths",
                    format!("{path:?} must be an absolute path other than /, /tmp, the workspace mount and /proc, /sys, /dev"),
                ));
            }
            if *size_mib == 0 {
                return Err(self.invalid("container.writable_paths", format!("{path:?}: the size in MiB must be positive")));
            }
            in_memory_mib = in_memory_mib.saturating_add(*size_mib);
        }
        if !container.writable_paths.is_empty() && in_memory_mib >= container.memory_mib {
            return Err(self.invalid(
                "container.writable_paths",
                format!(
                    "tmpfs_size_mib plus writable_paths is {in_memory_mib} MiB, which must stay below memory_mib (tmpfs lives in memory)"
                ),
            ));
        }
        for (index, allowed) in container.egress_allow.iter().enumerate() {
            if let Err(reason) = parse_ipv4_cidr(&allowed.cidr) {
                return Err(self.invalid(&format!("container.egress_allow[{index}].cidr"), reason));
            }
            if allowed.port == Some(0) {
                return Err(self.invalid(&format!("container.egress_allow[{index}].port"), "must be 1-65535"));
            }
        }
        if container.memory_mib < 6 {
            return Err(self.invalid("container.memory_mib", "must be at least 6 (Docker's minimum)"));
        }
        if !(container.cpus > 0.0 && container.cpus <= 64.0) {
            return Err(self.invalid("container.cpus", "must be more than 0 and at most 64"));
        }
        if container.pids_limit <= 0 {
            return Err(self.invalid("container.pids_limit", "must be positive: a workspace always has a pids limit"));
        }
        if !container.workspace_mount.starts_with('/') {
            return Err(self.invalid("container.workspace_mount", "must be an absolute path"));
        }
        if let HealthCheck::Http(path) = &container.health {
            if !path.starts_with('/') {
                return Err(self.invalid("container.health.http", "must be a path starting with `/`"));
            }
        }
        if container.ready_timeout_secs == 0 {
            return Err(self.invalid("container.ready_timeout_secs", "must be positive"));
        }
        for folder in &self.workspace.skeleton {
            let path = Path::new(folder);
            if folder.is_empty() || path.is_absolute() || path.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(self.invalid("workspace.skeleton", format!("{folder:?} must be a relative path inside the workspace")));
            }
        }
        if !self.workspace.prefix.contains("{user}") || !self.workspace.prefix.contains("{workspace}") {
            return Err(self.invalid("workspace.prefix", "must contain {user} and {workspace} so users never share a prefix"));
        }
        if self.workspace.parallelism == 0 {
            return Err(self.invalid("workspace.parallelism", "must be positive"));
        }
        if self.timers.idle_after_secs == 0 || self.timers.stop_after_idle_secs == 0 || self.timers.max_age_secs == 0 {
            return Err(self.invalid("timers", "idle_after_secs, stop_after_idle_secs and max_age_secs must be positive"));
        }
        let timers = &self.timers;
        if timers.dormant_after_idle_secs >= timers.stop_after_idle_secs {
            return Err(self.invalid("timers.dormant_after_idle_secs", "must be 0 (no stopped tier) or shorter than stop_after_idle_secs"));
        }
        if !(timers.idle_cpu_percent > 0.0 && timers.idle_cpu_percent.is_finite()) {
            return Err(self.invalid("timers.idle_cpu_percent", "must be a positive percentage of one CPU"));
        }
        let warned = [timers.idle_after_secs, timers.stop_after_idle_secs, timers.dormant_after_idle_secs];
        if timers.idle_warning_secs > 0 && warned.iter().any(|&interval| interval > 0 && timers.idle_warning_secs >= interval) {
            return Err(self.invalid(
                "timers.idle_warning_secs",
                "must be 0 or shorter than idle_after_secs, dormant_after_idle_secs and stop_after_idle_secs",
            ));
        }
        let session_counts = [
            ("session.max_frame_bytes", self.session.max_frame_bytes),
            ("session.max_messages_per_second", self.session.max_messages_per_second as usize),
            ("session.max_connections_per_user", self.session.max_connections_per_user),
            ("session.max_connections", self.session.max_connections),
            ("session.header_read_timeout_secs", self.session.header_read_timeout_secs as usize),
            ("session.idle_timeout_secs", self.session.idle_timeout_secs as usize),
        ];
        if let Some((field, _)) = session_counts.iter().find(|(_, count)| *count == 0) {
            return Err(self.invalid(field, "must be positive"));
        }
        let proxy = &self.session.proxy;
        if proxy.cookie_ttl_secs == 0 || proxy.start_wait_secs == 0 {
            return Err(self.invalid("session.proxy", "cookie_ttl_secs and start_wait_secs must be positive"));
        }
        if let Some(domain) = &proxy.base_domain {
            let label_ok = |label: &str| {
                !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            };
            if !domain.split('.').all(label_ok) {
                return Err(
                    self.invalid("session.proxy.base_domain", format!("{domain:?} must be a lowercase host name (no port, no scheme)"))
                );
            }
        }
        if let Some(pattern) = proxy.background_paths.iter().find(|pattern| !pattern.starts_with('/')) {
            return Err(self.invalid("session.proxy.background_paths", format!("{pattern:?} must start with `/`")));
        }
        if self.terminal.shell.is_empty() || self.terminal.shell.iter().any(|part| part.is_empty() || part.contains('\0')) {
            return Err(self.invalid("terminal.shell", "must name a command: a non-empty list of non-empty arguments"));
        }
        if self.terminal.working_dir.as_ref().is_some_and(|folder| !folder.starts_with('/')) {
            return Err(self.invalid("terminal.working_dir", "must be an absolute path inside the container"));
        }
        if self.patterns.is_empty() {
            return Err(self.invalid("patterns", "a profile runs at least one pattern"));
        }
        let limits = &self.limits;
        if limits.max_sessions_per_user == 0 || limits.max_opens_per_user_per_minute == 0 || limits.queue_timeout_secs == 0 {
            return Err(
                self.invalid("limits", "max_sessions_per_user, max_opens_per_user_per_minute and queue_timeout_secs must be positive")
            );
        }
        if !(limits.host_cpus >= 0.0 && limits.host_cpus.is_finite()) {
            return Err(self.invalid("limits.host_cpus", "must be 0 (the host's CPUs) or a positive number"));
        }
        for (field, value) in [
            ("limits.price_per_running_hour", limits.price_per_running_hour),
            ("limits.price_per_idle_hour", limits.price_per_idle_hour),
            ("limits.daily_budget", limits.daily_budget),
            ("limits.monthly_budget", limits.monthly_budget),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(self.invalid(field, "must be 0 or a positive number"));
            }
        }
        if let Some(host) = &self.services.host {
            if !is_deployment_id(host) {
                return Err(self.invalid("services.host", "must be 1-40 lowercase letters, digits or `-`, starting with a letter or digit"));
            }
        }
        if let Some(pool) = &self.pool {
            if pool.size > 1000 {
                return Err(self.invalid("pool.size", "at most 1000 slots"));
            }
            // A slot's directory is renamed into the session's at a claim; an image-backed
            // session directory is a mount point, which can't be renamed.
            if pool.size > 0 && self.workspace.filesystem == WorkspaceFilesystem::Image {
                return Err(self.invalid("pool.size", "the warm pool needs workspace.filesystem = \"directory\""));
            }
        }
        if let Some(deployment) = &self.services.deployment {
            if !is_deployment_id(deployment) {
                return Err(
                    self.invalid("services.deployment", "must be 1-40 lowercase letters, digits or `-`, starting with a letter or digit")
                );
            }
        }
        Ok(())
    }

    /// This deployment's id: `services.deployment` (`BERTH_DEPLOYMENT`) when set, else derived from
    /// the broker's vhost and the Redis database, which two deployments never share
    /// (`root-0` for vhost `/` and database 0; `staging-3` for vhost `staging` and database 3).
    pub fn deployment(&self) -> String {
        if let Some(deployment) = &self.services.deployment {
            return deployment.clone();
        }
        derived_deployment(&self.services.amqp_url, &self.services.redis_url)
    }

    /// This machine's host id: `services.host`, or [`crate::topology::DEFAULT_HOST`].
    pub fn host(&self) -> String {
        self.services.host.clone().unwrap_or_else(|| crate::topology::DEFAULT_HOST.to_owned())
    }

    /// The host directory holding everything of this deployment: one folder per session, and the
    /// agents' bookkeeping next to them (`.berth-manifests`, `.berth-staging`, …).
    pub fn deployment_root(&self) -> PathBuf {
        self.services.workspace_root.join(self.deployment())
    }

    /// The object-store prefix of one user's workspace.
    pub fn workspace_prefix(&self, user: &str, workspace: &str) -> String {
        self.workspace.prefix.replace("{profile}", &self.name).replace("{user}", user).replace("{workspace}", workspace)
    }

    /// The host directory of one session's workspace.
    pub fn session_dir(&self, session: &str) -> PathBuf {
        self.deployment_root().join(session)
    }

    /// Free slots the warm pool keeps (0 when the profile has none).
    pub fn pool_size(&self) -> u32 {
        self.pool.as_ref().map_or(0, |pool| pool.size)
    }

    /// The workspace directory of a warm-pool slot before a claim: empty, on the same file system
    /// as the session directories, so a claim renames it into `session_dir` without copying.
    pub fn pool_slot_dir(&self, slot: &str) -> PathBuf {
        self.deployment_root().join(POOL_DIR).join(slot)
    }

    /// The host folder a pool container sees read-only at [`POOL_IDENTITY_MOUNT`].
    pub fn pool_identity_dir(&self, slot: &str) -> PathBuf {
        self.deployment_root().join(POOL_DIR).join(format!("{slot}.identity"))
    }

    /// Who a terminal's shell runs as: `terminal.user`, else `container.user` (`None`: the image's).
    pub fn terminal_user(&self) -> Option<&str> {
        self.terminal.user.as_deref().or(self.container.user.as_deref())
    }

    /// Where a terminal's shell starts: `terminal.working_dir`, else the workspace mount.
    pub fn terminal_working_dir(&self) -> &str {
        self.terminal.working_dir.as_deref().unwrap_or(&self.container.workspace_mount)
    }
}

/// Whether `text` can be a deployment id: it appears in Docker labels, network and directory names.
pub fn is_deployment_id(text: &str) -> bool {
    let first_ok = text.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok && text.len() <= 40 && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// `<vhost>-<redis db>`, lowercased, with anything else replaced by `-`; vhost `/` is `root`.
fn derived_deployment(amqp_url: &str, redis_url: &str) -> String {
    let after_scheme = amqp_url.split_once("://").map_or(amqp_url, |(_, rest)| rest);
    let vhost_encoded = after_scheme.split_once('/').map_or("", |(_, path)| path);
    let vhost = vhost_encoded.replace("%2f", "/").replace("%2F", "/");
    let vhost = if vhost.is_empty() || vhost == "/" { "root".to_owned() } else { vhost };
    let redis_after_scheme = redis_url.split_once("://").map_or(redis_url, |(_, rest)| rest);
    let database = redis_after_scheme
        .split_once('/')
        .map(|(_, path)| path.split('?').next().unwrap_or_default())
        .filter(|path| !path.is_empty())
        .unwrap_or("0");
    let raw = format!("{vhost}-{database}").to_ascii_lowercase();
    let cleaned: String = raw.chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' }).collect();
    let trimmed = cleaned.trim_matches('-');
    let mut id: String = trimmed.chars().take(40).collect();
    if id.is_empty() {
        id = "root-0".to_owned();
    }
    id
}

/// `BERTH_ORPHAN_GRACE_SECS`: how old an unowned container or directory must be before the engine
/// recovers it and the container agent removes it by id (60 s unless set). Fault tests and small
/// deployments lower it; production keeps the default.
pub const ORPHAN_GRACE_ENV: &str = "BERTH_ORPHAN_GRACE_SECS";
/// `BERTH_INVENTORY_INTERVAL_SECS`: how often the container and workspace agents publish their
/// inventories (60 s unless set; they also publish once at start).
pub const INVENTORY_INTERVAL_ENV: &str = "BERTH_INVENTORY_INTERVAL_SECS";

/// A whole number of seconds from the environment variable `variable`: `None` when unset, an error
/// naming the variable when it is not a number.
pub fn seconds_from_env(variable: &str) -> Result<Option<std::time::Duration>, String> {
    seconds_from(variable, std::env::var(variable).ok())
}

fn seconds_from(variable: &str, value: Option<String>) -> Result<Option<std::time::Duration>, String> {
    let Some(text) = value else { return Ok(None) };
    match text.trim().parse::<u64>() {
        Ok(seconds) => Ok(Some(std::time::Duration::from_secs(seconds))),
        Err(_) => Err(format!("{variable}={text:?}: expected a whole number of seconds")),
    }
}

/// The directory holding run-profiles: `BERTH_PROFILES_DIR`, else `./run-profiles`.
pub fn profiles_dir() -> PathBuf {
    std::env::var_os("BERTH_PROFILES_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_PROFILES_DIR))
}

/// The directory holding patterns: `BERTH_PATTERNS_DIR`, else `./patterns`.
pub fn patterns_dir() -> PathBuf {
    std::env::var_os("BERTH_PATTERNS_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("patterns"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_text() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../run-profiles/dev/profile.toml")).unwrap()
    }

    #[track_caller]
    fn check(edit: impl Fn(String) -> String, expected: Result<(), &str>) {
        let outcome = Profile::parse(&edit(dev_text()), Path::new("p.toml")).map(|_| ()).map_err(|e| e.to_string());
        match (outcome, expected) {
            (Ok(()), Ok(())) => {}
            (Err(actual), Err(fragment)) => assert!(actual.contains(fragment), "{actual:?} does not contain {fragment:?}"),
            (actual, expected) => panic!("got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn failover_after_is_a_duration_of_at_least_a_second() {
        fn with(value: &'static str) -> impl Fn(String) -> String {
            move |text: String| format!("{text}\n[hosts]\nfailover_after = \"{value}\"\n")
        }
        check(with("90s"), Ok(()));
        check(with("soon"), Err("`hosts.failover_after`: not a duration"));
        check(with("200ms"), Err("`hosts.failover_after`: must be at least 1s"));
        check(|text| format!("{text}\n[hosts]\nfailover_afterr = \"1m\"\n"), Err("unknown field `failover_afterr`"));
        let parsed = Profile::parse(&with("90s")(dev_text()), Path::new("p.toml")).unwrap();
        assert_eq!(parsed.failover_after(), std::time::Duration::from_secs(90));
        assert_eq!(Profile::parse(&dev_text(), Path::new("p.toml")).unwrap().failover_after(), DEFAULT_FAILOVER_AFTER);
    }

    #[test]
    fn forget_after_is_a_duration_longer_than_failover_after() {
        fn with(value: &'static str) -> impl Fn(String) -> String {
            move |text: String| format!("{text}\n[hosts]\nfailover_after = \"90s\"\nforget_after = \"{value}\"\n")
        }
        check(with("2d"), Ok(()));
        check(with("later"), Err("`hosts.forget_after`: not a duration"));
        check(with("90s"), Err("`hosts.forget_after`: must be longer than hosts.failover_after"));
        let parsed = Profile::parse(&with("2d")(dev_text()), Path::new("p.toml")).unwrap();
        assert_eq!(parsed.forget_after(), std::time::Duration::from_secs(2 * 24 * 3600));
        assert_eq!(Profile::parse(&dev_text(), Path::new("p.toml")).unwrap().forget_after(), DEFAULT_FORGET_AFTER);
    }

    #[test]
    fn profile_validation_table() {
        check(|text| text, Ok(()));
        check(|text| format!("bogus = 1\n{text}"), Err("unknown field `bogus`"));
        check(|text| text.replace("version = 1", "version = 2"), Err("`version`: this build reads version 1, got 2"));
        check(|text| text.replace("[container]", "[container]\nprivileged = true"), Err("`container.privileged`"));
        check(
            |text| text.replace("[container]", "[container]\nmounts = [\"/var/run/docker.sock:/var/run/docker.sock\"]"),
            Err("mounting the Docker socket is never allowed"),
        );
        check(|text| text.replace("cap_add = []", "cap_add = [\"SYS_ADMIN\"]"), Err("`container.cap_add`"));
        check(|text| text.replace("[container]", "[container]\nshiny = true"), Err("unknown field `shiny`"));
        check(|text| text.replace("[services]", "[services]\ndeployment = \"staging\""), Ok(()));
        check(|text| text.replace("[services]", "[services]\ndeployment = \"Staging/1\""), Err("`services.deployment`"));
        check(|text| text.replace("shell = [\"/bin/sh\"]", "shell = []"), Err("`terminal.shell`"));
        // Found by tests/properties.rs: the field at fault is named, not only its table.
        check(|text| text.replace("max_frame_bytes = 65536", "max_frame_bytes = 0"), Err("`session.max_frame_bytes`: must be positive"));
        check(
            |text| text.replace("max_connections_per_user = 8", "max_connections_per_user = 0"),
            Err("`session.max_connections_per_user`"),
        );
        check(|text| text.replace("memory_mib = 128", "memory_mib = \"lots\""), Err("`container.memory_mib`: TOML parse error"));
        check(|text| text.replace("read_only_root = true", "read_only_root = false"), Err("with read_only_root = false"));
        check(|text| text.replace("shell = [\"/bin/sh\"]", "shell = [\"/bin/sh\"]\nworking_dir = \"work\""), Err("`terminal.working_dir`"));
        check(|text| text.replace("shell = [\"/bin/sh\"]", "shell = [\"/bin/sh\"]\nenv = 1"), Err("unknown field `env`"));
        let pool = |size: &'static str| move |text: String| text.replace("[pool]\nsize = 0", &format!("[pool]\nsize = {size}"));
        check(pool("2"), Err("`pool.size`: the warm pool needs workspace.filesystem = \"directory\""));
        check(|text| pool("2")(text).replace("filesystem = \"image\"", "filesystem = \"directory\""), Ok(()));
        check(|text| pool("1001")(text).replace("filesystem = \"image\"", "filesystem = \"directory\""), Err("`pool.size`: at most 1000"));
        check(|text| text.replace("max_idle_secs = 0\n", ""), Err("missing field `max_idle_secs`"));
        check(|text| text.replace("[pool]\nsize = 0\nmax_idle_secs = 0\n", ""), Ok(()));
    }

    #[test]
    fn capabilities_and_mounts_are_allow_lists() {
        let caps = |list: String| move |text: String| text.replace("cap_add = []", &format!("cap_add = {list}"));
        check(caps(r#"["chown", "CAP_NET_BIND_SERVICE", " setuid "]"#.to_owned()), Ok(()));
        for refused in ["sys_admin", "Cap_Sys_Admin", "DAC_READ_SEARCH", "NET_RAW", "ALL", "SYS_PTRACE", "BOGUS"] {
            check(caps(format!("[{refused:?}]")), Err("`container.cap_add`"));
        }
        assert_eq!(canonical_capability("cap_chown"), Some("CHOWN"));
        let mounts = |list: String| move |text: String| text.replace("[container]", &format!("[container]\nmounts = {list}"));
        check(mounts(r#"["/srv/berth/reference:/reference:ro"]"#.to_owned()), Ok(()));
        for refused in
            ["/var:/host-var:ro", "/run/containerd:/c:ro", "/srv/berth:/all:ro", "/srv/berth/../../etc:/e:ro", "/home/alice:/h:ro"]
        {
            check(mounts(format!("[{refused:?}]")), Err("`container.mounts`"));
        }
        check(mounts(r#"["/srv/berth/reference:/reference"]"#.to_owned()), Err("read-only"));
        check(mounts(r#"["/srv/berth/reference:/reference:rw"]"#.to_owned()), Err("read-only"));
    }

    #[test]
    fn logs_roots_runtimes_and_egress_are_bounded_and_named() {
        check(|text| text.replace("log_max_size_mib = 10", "log_max_size_mib = 0"), Err("`container.log_max_size_mib`"));
        check(|text| text.replace("log_max_files = 3", "log_max_files = 0"), Err("`container.log_max_files`"));
        check(|text| text.replace("log_max_files = 3\n", ""), Err("missing field `log_max_files`"));
        check(|text| text.replace("runtime = \"runc\"", "runtime = \"runsc\""), Ok(()));
        check(|text| text.replace("runtime = \"runc\"", "runtime = \"kata\""), Err("unknown variant `kata`"));
        check(|text| text.replace("read_only_root = true", "read_only_root = false"), Err("`container.writable_paths`"));
        let writable = |paths: &'static str| {
            move |text: String| text.replace("read_only_root = true", &format!("read_only_root = false\nwritable_paths = {paths}"))
        };
        check(writable(r#"{ "/home/user" = 32 }"#), Ok(()));
        check(writable(r#"{ "/home/user" = 200 }"#), Err("below memory_mib"));
        check(writable(r#"{ "/proc/x" = 2 }"#), Err("`container.writable_paths`"));
        check(writable(r#"{ "/home/user" = 0 }"#), Err("must be positive"));
        let egress = |list: &'static str| move |text: String| text.replace("egress_allow = []", &format!("egress_allow = {list}"));
        check(egress(r#"[{ cidr = "10.255.255.53", port = 53 }, { cidr = "192.168.0.0/16" }]"#), Ok(()));
        check(egress(r#"[{ cidr = "10.1.2.3/8" }]"#), Err("`container.egress_allow[0].cidr`: \"10.1.2.3/8\" has host bits set"));
        check(egress(r#"[{ cidr = "fd00:ec2::254" }]"#), Err("no IPv6"));
        check(egress(r#"[{ cidr = "10.0.0.1", port = 0 }]"#), Err("`container.egress_allow[0].port`"));
        check(egress(r#"[{ cidr = "10.0.0.1", proto = "tcp" }]"#), Err("unknown field `proto`"));
    }

    #[test]
    fn seconds_overrides_are_whole_seconds_or_refused_by_name() {
        assert_eq!(seconds_from("X", None), Ok(None));
        assert_eq!(seconds_from("X", Some(" 5 ".into())), Ok(Some(std::time::Duration::from_secs(5))));
        assert!(seconds_from("BERTH_ORPHAN_GRACE_SECS", Some("5s".into())).is_err_and(|e| e.contains("BERTH_ORPHAN_GRACE_SECS")));
    }

    #[test]
    fn deployment_ids_derive_from_vhost_and_redis_database() {
        let derive = |amqp: &str, redis: &str| derived_deployment(amqp, redis);
        assert_eq!(derive("amqp://guest:guest@127.0.0.1:5672/%2f", "redis://127.0.0.1:6379/0"), "root-0");
        assert_eq!(derive("amqp://u:p@h:5672/staging", "redis://h:6379/3"), "staging-3");
        assert_eq!(derive("amqp://h", "redis://h"), "root-0");
        assert_eq!(derive("amqp://h/Team_A", "redis://h:6379/12?protocol=resp3"), "team-a-12");
        for id in ["root-0", "staging-3", "team-a-12"] {
            assert!(is_deployment_id(id), "{id}");
        }
        let mut profile = Profile::parse(&dev_text(), Path::new("p.toml")).unwrap();
        assert_eq!(profile.deployment(), "root-0");
        assert_eq!(profile.session_dir("s1"), PathBuf::from("/tmp/berth/dev/workspaces/root-0/s1"));
        profile.apply_overrides(|name| (name == "BERTH_DEPLOYMENT").then(|| "prod".to_owned()));
        assert_eq!(profile.deployment(), "prod");
    }

    #[test]
    fn overrides_and_derived_paths() {
        let mut profile = Profile::parse(&dev_text(), Path::new("p.toml")).unwrap();
        profile.apply_overrides(|name| (name == "BERTH_AMQP_URL").then(|| "amqp://elsewhere".to_owned()));
        assert_eq!(profile.services.amqp_url, "amqp://elsewhere");
        assert!(profile.workspace_prefix("alice", "w1").contains("alice/w1"));
    }
}
