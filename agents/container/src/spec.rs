//! Pure translation of a run-profile and a session into Docker's container and network settings,
//! plus the hardening checks a profile must pass before any container is made from it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use bollard::container::{Config, NetworkingConfig};
use bollard::models::{EndpointSettings, HostConfig, HostConfigLogConfig, PortBinding};
use protocol::profile::{canonical_capability, ContainerSettings, HealthCheck};
use protocol::Profile;

use crate::error::{Error, Result};

/// Label present on everything Berth creates in Docker.
pub const MANAGED_LABEL: &str = "berth.managed";
pub const SESSION_LABEL: &str = "berth.session";
pub const USER_LABEL: &str = "berth.user";
pub const PROFILE_LABEL: &str = "berth.profile";
pub const WORKSPACE_LABEL: &str = "berth.workspace";
/// The thred that provisioned the container, so Docker's own events can be routed back to it.
pub const THRED_LABEL: &str = "berth.thred";
/// The deployment (`Profile::deployment`) that owns a container or network: two deployments with
/// the same profile name may share one Docker engine, and each acts only on what carries its own.
pub const DEPLOYMENT_LABEL: &str = "berth.deployment";
/// The warm-pool slot a container was created for (`berth.pool.slot`); such a container never
/// carries a session label: its claim lives in the engine's state and the slot's identity file.
pub const POOL_SLOT_LABEL: &str = "berth.pool.slot";

/// Host address the service port is published on unless `BERTH_PUBLISH_ADDRESS` says otherwise:
/// never reachable from outside the machine.
pub const PUBLISH_HOST: &str = "127.0.0.1";
/// The address session ports are published on and reported in `container.ready`, for a host
/// whose sessions the session agent reaches from another machine: that host's address on the
/// private network between the machines (never a public one: the service port has no auth of its
/// own). Unset: [`PUBLISH_HOST`].
pub const PUBLISH_ADDRESS_ENV: &str = "BERTH_PUBLISH_ADDRESS";

/// The address session ports are published on ([`PUBLISH_ADDRESS_ENV`], read once).
pub fn publish_host() -> &'static str {
    static ADDRESS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ADDRESS.get_or_init(|| match std::env::var(PUBLISH_ADDRESS_ENV) {
        Ok(text) if text.trim().parse::<std::net::IpAddr>().is_ok() => text.trim().to_owned(),
        _ => PUBLISH_HOST.to_owned(),
    })
}

/// Refuses a `BERTH_PUBLISH_ADDRESS` that is not an IP address (checked at start, so a typo is an
/// error rather than a silent fallback to loopback).
pub fn check_publish_address() -> Result<(), String> {
    match std::env::var(PUBLISH_ADDRESS_ENV) {
        Ok(text) if text.trim().parse::<std::net::IpAddr>().is_err() => Err(format!("{PUBLISH_ADDRESS_ENV}={text:?} is not an IP address")),
        _ => Ok(()),
    }
}
/// Docker's log driver for session containers, always with `max-size` and `max-file`.
pub const LOG_DRIVER: &str = "json-file";
/// Docker's option that stops containers on one bridge from talking to each other.
pub const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";

/// Who a container is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionIdentity {
    pub session: String,
    pub user: String,
    pub workspace: String,
    pub thred: Option<String>,
}

/// The Docker name of a session's container: one name per session makes provisioning idempotent.
pub fn container_name(session: &str) -> String {
    format!("berth-{session}")
}

/// The deployment's session network: the profile's `container.network` plus the deployment id,
/// so two deployments on one Docker engine never share a bridge.
pub fn network_name(profile: &Profile) -> String {
    format!("{}-{}", profile.container.network, profile.deployment())
}

/// Whether labels say "a Berth container of this profile and this deployment".
pub fn is_deployment_container(labels: &HashMap<String, String>, profile: &Profile) -> bool {
    labels.get(MANAGED_LABEL).map(String::as_str) == Some("true")
        && labels.get(PROFILE_LABEL) == Some(&profile.name)
        && labels.get(DEPLOYMENT_LABEL) == Some(&profile.deployment())
}

/// Session ids become container names and directory names ([`protocol::ids::SessionId`]).
pub fn validate_session_id(session: &str) -> Result<(), String> {
    protocol::ids::SessionId::parse(session).map(drop).map_err(|error| error.to_string())
}

/// Checks a profile's container settings beyond `Profile::validate` (which already refuses
/// privileged containers and the Docker socket by name): a profile built in code skips loading, and
/// a socket can hide behind another name.
pub fn check_container_hardening(profile: &Profile) -> Result<()> {
    let refuse = |field: &str, reason: String| Error::UnsafeProfile { field: field.to_owned(), reason };
    profile.validate().map_err(|error| refuse("profile", error.to_string()))?;
    let container = &profile.container;
    if container.privileged {
        return Err(refuse("container.privileged", "privileged workspace containers are never allowed".to_owned()));
    }
    for mount in &container.mounts {
        let host_path = Path::new(mount.split(':').next().unwrap_or_default());
        if !host_path.is_absolute() {
            return Err(refuse("container.mounts", format!("{mount:?}: the host side must be an absolute path")));
        }
        // The allow-list is checked again on the resolved path: a symlink under an allowed root
        // must not lead anywhere else (the Docker socket, /var, ...).
        let resolved = std::fs::canonicalize(host_path)
            .map_err(|error| refuse("container.mounts", format!("{mount:?}: cannot resolve the host path: {error}")))?;
        let resolved_text = resolved.to_string_lossy().into_owned();
        if !protocol::profile::is_mountable_host_path(&resolved) || is_unix_socket(&resolved) || resolved_text.contains("docker.sock") {
            return Err(refuse(
                "container.mounts",
                format!(
                    "{mount:?} resolves to {resolved_text}, outside the mountable host roots {:?} (or a socket): it would expose the host or the Docker socket",
                    protocol::profile::MOUNTABLE_HOST_ROOTS
                ),
            ));
        }
    }
    for capability in &container.cap_add {
        if canonical_capability(capability).is_none() {
            return Err(refuse("container.cap_add", format!("{capability:?} is not on the allow-list")));
        }
    }
    if let Some(user) = &container.user {
        let name = user.split(':').next().unwrap_or_default();
        if name == "0" || name == "root" {
            return Err(refuse("container.user", "when a user is named it must not be root".to_owned()));
        }
    }
    let network = container.network.as_str();
    if matches!(network, "host" | "none" | "bridge" | "default") || network.starts_with("container:") || network.is_empty() {
        return Err(refuse(
            "container.network",
            format!("{network:?}: sessions need their own bridge network with inter-container traffic disabled"),
        ));
    }
    Ok(())
}

#[cfg(unix)]
fn is_unix_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|metadata| metadata.file_type().is_socket())
}

#[cfg(not(unix))]
fn is_unix_socket(_path: &Path) -> bool {
    false
}

/// The labels put on a session's container.
pub fn session_labels(profile: &Profile, identity: &SessionIdentity, extra_labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = extra_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.insert(MANAGED_LABEL.to_owned(), "true".to_owned());
    labels.insert(SESSION_LABEL.to_owned(), identity.session.clone());
    labels.insert(USER_LABEL.to_owned(), identity.user.clone());
    labels.insert(PROFILE_LABEL.to_owned(), profile.name.clone());
    labels.insert(WORKSPACE_LABEL.to_owned(), identity.workspace.clone());
    labels.insert(DEPLOYMENT_LABEL.to_owned(), profile.deployment());
    if let Some(thred) = &identity.thred {
        labels.insert(THRED_LABEL.to_owned(), thred.clone());
    }
    labels
}

/// `8080/tcp`: the key Docker uses for a container port.
pub fn service_port_key(settings: &ContainerSettings) -> String {
    format!("{}/tcp", settings.service_port)
}

/// The whole create request for a session's container.
pub fn container_config(
    profile: &Profile,
    identity: &SessionIdentity,
    session_dir: &Path,
    extra_labels: &BTreeMap<String, String>,
) -> Config<String> {
    // The session's identity is written last so that a profile cannot impersonate another session.
    let mut environment: BTreeMap<String, String> = profile.container.env.clone();
    environment.insert("BERTH_SESSION".to_owned(), identity.session.clone());
    environment.insert("BERTH_USER".to_owned(), identity.user.clone());
    environment.insert("BERTH_WORKSPACE".to_owned(), identity.workspace.clone());
    environment.insert("BERTH_PROFILE".to_owned(), profile.name.clone());
    let binds = vec![format!("{}:{}:rw", session_dir.display(), profile.container.workspace_mount)];
    config_with(profile, environment, binds, session_labels(profile, identity, extra_labels))
}

/// The Docker name of a warm-pool slot's container, before and after a claim (a claim renames
/// nothing: the claim index leads a session's tasks to it).
pub fn pool_container_name(slot: &str) -> String {
    format!("berth-pool-{slot}")
}

/// The labels of a warm-pool container: this deployment's, the slot's, and no session, user or
/// workspace (labels can't change after creation; the claim lives in the engine's state and in
/// the slot's identity file on the host).
pub fn pool_labels(profile: &Profile, slot: &str, extra_labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = extra_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.insert(MANAGED_LABEL.to_owned(), "true".to_owned());
    labels.insert(PROFILE_LABEL.to_owned(), profile.name.clone());
    labels.insert(DEPLOYMENT_LABEL.to_owned(), profile.deployment());
    labels.insert(POOL_SLOT_LABEL.to_owned(), slot.to_owned());
    labels
}

/// The create request for a warm-pool slot's container: the same limits and hardening as a
/// session's, its slot directory as the workspace, and the slot's identity folder read-only at
/// `POOL_IDENTITY_MOUNT` (where a claim writes the session's identity: the environment is fixed
/// at creation and holds no session).
pub fn pool_container_config(profile: &Profile, slot: &str, extra_labels: &BTreeMap<String, String>) -> Config<String> {
    let mut environment: BTreeMap<String, String> = profile.container.env.clone();
    environment.insert("BERTH_PROFILE".to_owned(), profile.name.clone());
    environment.insert(
        "BERTH_IDENTITY_FILE".to_owned(),
        format!("{}/{}", protocol::profile::POOL_IDENTITY_MOUNT, protocol::profile::POOL_IDENTITY_FILE),
    );
    let binds = vec![
        format!("{}:{}:rw", profile.pool_slot_dir(slot).display(), profile.container.workspace_mount),
        format!("{}:{}:ro", profile.pool_identity_dir(slot).display(), protocol::profile::POOL_IDENTITY_MOUNT),
    ];
    config_with(profile, environment, binds, pool_labels(profile, slot, extra_labels))
}

fn config_with(
    profile: &Profile,
    environment: BTreeMap<String, String>,
    mut binds: Vec<String>,
    labels: HashMap<String, String>,
) -> Config<String> {
    let settings = &profile.container;
    let port_key = service_port_key(settings);
    let network = network_name(profile);
    let memory_bytes = i64::try_from(settings.memory_mib.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
    binds.extend(settings.mounts.iter().cloned());
    let host_config = HostConfig {
        memory: Some(memory_bytes),
        // Equal to memory: no swap, so the memory limit is a real limit and OOM is visible.
        memory_swap: Some(memory_bytes),
        nano_cpus: Some((settings.cpus * 1e9).round() as i64),
        pids_limit: Some(docker_pids_limit(settings)),
        cap_drop: Some(vec!["ALL".to_owned()]),
        // Canonical names only: the allow-list was checked case-insensitively.
        cap_add: Some(settings.cap_add.iter().filter_map(|name| canonical_capability(name)).map(str::to_owned).collect()),
        security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
        tmpfs: Some(tmpfs_mounts(settings)),
        // Always read-only: a "writable root" is the profile's sized `writable_paths` (overlay2's
        // own size option needs XFS with project quotas, which Docker hosts rarely have).
        readonly_rootfs: Some(true),
        log_config: Some(HostConfigLogConfig {
            typ: Some(LOG_DRIVER.to_owned()),
            config: Some(HashMap::from([
                ("max-size".to_owned(), format!("{}m", settings.log_max_size_mib)),
                ("max-file".to_owned(), settings.log_max_files.to_string()),
            ])),
        }),
        runtime: Some(settings.runtime.docker_name().to_owned()),
        binds: Some(binds),
        network_mode: Some(network.clone()),
        port_bindings: Some(HashMap::from([(
            port_key.clone(),
            // No host port: Docker picks a free one, and we read it back after start.
            Some(vec![PortBinding { host_ip: Some(publish_host().to_owned()), host_port: None }]),
        )])),
        ipc_mode: Some("private".to_owned()),
        privileged: Some(false),
        publish_all_ports: Some(false),
        ..Default::default()
    };
    Config {
        image: Some(settings.image.clone()),
        user: settings.user.clone(),
        env: Some(environment.into_iter().map(|(name, value)| format!("{name}={value}")).collect()),
        exposed_ports: Some(HashMap::from([(port_key, HashMap::new())])),
        labels: Some(labels),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig { endpoints_config: HashMap::from([(network, EndpointSettings::default())]) }),
        ..Default::default()
    }
}

/// Host processes and threads a gVisor sandbox needs before the workspace runs anything (the
/// sentry's and the gofer's threads: about 40 at idle on the ptrace platform).
pub const RUNSC_SANDBOX_PIDS: i64 = 64;
/// Host threads one workspace process costs under gVisor's ptrace platform (about 9 measured).
pub const RUNSC_PIDS_PER_PROCESS: i64 = 10;

/// The pids limit Docker enforces on the host. Under runc it is the profile's: the kernel counts
/// the workspace's own processes. Under runsc the kernel sees the sandbox's threads instead (this
/// gVisor build has no pids limit of its own), so the host limit covers the sandbox plus
/// `pids_limit` workspace processes; a fork bomb past it ends that sandbox, and only that one.
pub fn docker_pids_limit(settings: &ContainerSettings) -> i64 {
    match settings.runtime {
        protocol::profile::Runtime::Runc => settings.pids_limit,
        protocol::profile::Runtime::Runsc => RUNSC_SANDBOX_PIDS.saturating_add(settings.pids_limit.saturating_mul(RUNSC_PIDS_PER_PROCESS)),
    }
}

/// `/tmp` (scratch, never executable) and the profile's writable paths, each a sized tmpfs. The
/// writable paths belong to the container's user when it is numeric, so it can write there.
pub fn tmpfs_mounts(settings: &ContainerSettings) -> HashMap<String, String> {
    let mut mounts = HashMap::from([("/tmp".to_owned(), format!("rw,noexec,nosuid,nodev,size={}m,mode=1777", settings.tmpfs_size_mib))]);
    let owner = settings.user.as_deref().and_then(|user| {
        let (uid, gid) = user.split_once(':').unwrap_or((user, user));
        (uid.parse::<u32>().is_ok() && gid.parse::<u32>().is_ok()).then(|| format!(",uid={uid},gid={gid},mode=0755"))
    });
    for (path, size_mib) in &settings.writable_paths {
        let owner = owner.clone().unwrap_or_else(|| ",mode=1777".to_owned());
        mounts.insert(path.clone(), format!("rw,nosuid,nodev,size={size_mib}m{owner}"));
    }
    mounts
}

/// Whether readiness needs the image's own HEALTHCHECK.
pub fn uses_docker_health(settings: &ContainerSettings) -> bool {
    settings.health == HealthCheck::Docker
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure
mod tests {
    use super::*;

    fn dev_profile() -> Profile {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../run-profiles/dev/profile.toml"));
        Profile::parse(&std::fs::read_to_string(path).unwrap(), path).unwrap()
    }

    #[test]
    fn pool_containers_carry_the_slot_and_no_session() {
        let profile = dev_profile();
        let config = pool_container_config(&profile, "slot-1", &BTreeMap::new());
        let labels = config.labels.clone().unwrap();
        assert_eq!(labels.get(POOL_SLOT_LABEL).map(String::as_str), Some("slot-1"));
        assert!(is_deployment_container(&labels, &profile));
        for absent in [SESSION_LABEL, USER_LABEL, WORKSPACE_LABEL, THRED_LABEL] {
            assert!(!labels.contains_key(absent), "{absent}");
        }
        let env = config.env.clone().unwrap();
        assert!(!env.iter().any(|entry| entry.starts_with("BERTH_SESSION=") || entry.starts_with("BERTH_USER=")), "{env:?}");
        let host = config.host_config.unwrap();
        let binds = host.binds.unwrap();
        assert!(binds.contains(&format!("{}:/workspace:rw", profile.pool_slot_dir("slot-1").display())), "{binds:?}");
        assert!(binds.contains(&format!("{}:/run/berth:ro", profile.pool_identity_dir("slot-1").display())), "{binds:?}");
        // The same limits and hardening as a session's container.
        assert_eq!(host.memory, Some(128 * 1024 * 1024));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.readonly_rootfs, Some(true));
    }

    fn identity() -> SessionIdentity {
        SessionIdentity { session: "s-1".into(), user: "alice".into(), workspace: "w1".into(), thred: Some("t-1".into()) }
    }

    #[track_caller]
    fn check_session(session: &str, accepted: bool) {
        assert_eq!(validate_session_id(session).is_ok(), accepted, "{session:?}");
    }

    #[test]
    fn session_ids_are_safe_names() {
        check_session("s-1", true);
        check_session("0193a1b2-aaaa-7bbb-8ccc-123456789abc", true);
        check_session("", false);
        check_session("..", false);
        check_session("../etc", false);
        check_session("a/b", false);
        check_session("-rm", false);
        check_session(&"a".repeat(121), false);
    }

    #[track_caller]
    fn check_hardening(edit: impl FnOnce(&mut Profile), fragment: Option<&str>) {
        let mut profile = dev_profile();
        edit(&mut profile);
        match (check_container_hardening(&profile), fragment) {
            (Ok(()), None) => {}
            (Err(error), Some(fragment)) => assert!(error.to_string().contains(fragment), "{error} lacks {fragment:?}"),
            (outcome, expected) => panic!("got {outcome:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn hostile_profiles_are_refused() {
        check_hardening(|_| {}, None);
        check_hardening(|p| p.container.privileged = true, Some("privileged"));
        check_hardening(|p| p.container.mounts = vec!["/var/run/docker.sock:/var/run/docker.sock".into()], Some("Docker socket"));
        check_hardening(|p| p.container.mounts = vec!["/run:/host-run".into()], Some("container.mounts"));
        check_hardening(|p| p.container.mounts = vec!["/:/host".into()], Some("container.mounts"));
        check_hardening(|p| p.container.mounts = vec!["/proc/1:/p".into()], Some("container.mounts"));
        check_hardening(|p| p.container.mounts = vec!["relative:/x:ro".into()], Some("container.mounts"));
        check_hardening(|p| p.container.mounts = vec!["/var:/v:ro".into()], Some("container.mounts"));
        check_hardening(|p| p.container.cap_add = vec!["sys_admin".into()], Some("cap_add"));
        check_hardening(|p| p.container.cap_add = vec!["DAC_READ_SEARCH".into()], Some("cap_add"));
        check_hardening(|p| p.container.cap_add = vec!["chown".into()], None);
        check_hardening(|p| p.container.user = Some("0:0".into()), Some("container.user"));
        check_hardening(|p| p.container.network = "host".into(), Some("container.network"));
        check_hardening(|p| p.container.cap_add = vec!["SYS_ADMIN".into()], Some("cap_add"));
    }

    #[test]
    fn container_config_sets_every_limit() {
        let profile = dev_profile();
        let extra = BTreeMap::from([("berth.test".to_owned(), "x".to_owned())]);
        let config = container_config(&profile, &identity(), Path::new("/tmp/ws/s-1"), &extra);
        let host = config.host_config.as_ref().unwrap();
        assert_eq!(host.memory, Some(128 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(64));
        assert_eq!(host.cap_drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(host.tmpfs.as_ref().unwrap()["/tmp"], "rw,noexec,nosuid,nodev,size=16m,mode=1777");
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.runtime.as_deref(), Some("runc"));
        let log = host.log_config.as_ref().unwrap();
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        assert_eq!(log.config.as_ref().unwrap()["max-size"], "10m");
        assert_eq!(log.config.as_ref().unwrap()["max-file"], "3");
        assert_eq!(host.binds.as_ref().unwrap()[0], "/tmp/ws/s-1:/workspace:rw");
        let labels = config.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_LABEL], "true");
        assert_eq!(labels[THRED_LABEL], "t-1");
        assert_eq!(labels[DEPLOYMENT_LABEL], "root-0");
        assert!(is_deployment_container(labels, &profile));
        assert_eq!(host.network_mode.as_deref(), Some("berth-sessions-root-0"));
        assert_eq!(labels["berth.test"], "x");
        let env = config.env.as_ref().unwrap();
        assert!(env.contains(&"BERTH_SESSION=s-1".to_owned()), "{env:?}");
    }

    #[test]
    fn deployments_sharing_a_profile_name_get_their_own_labels_and_network() {
        let mut staging = dev_profile();
        staging.services.deployment = Some("staging".into());
        let production = dev_profile();
        assert_ne!(network_name(&staging), network_name(&production));
        let staging_labels = session_labels(&staging, &identity(), &BTreeMap::new());
        assert!(is_deployment_container(&staging_labels, &staging));
        assert!(!is_deployment_container(&staging_labels, &production), "another deployment's container is not ours");
        let mut unlabelled = staging_labels.clone();
        unlabelled.remove(DEPLOYMENT_LABEL);
        assert!(!is_deployment_container(&unlabelled, &staging), "a container without the deployment label is not ours");
    }

    #[test]
    fn a_writable_root_is_read_only_plus_sized_writable_paths_and_capabilities_are_canonical() {
        let mut profile = dev_profile();
        profile.container.read_only_root = false;
        profile.container.writable_paths = BTreeMap::from([("/home/user".to_owned(), 32)]);
        profile.container.cap_add = vec!["cap_chown".into(), "Net_Bind_Service".into()];
        profile.container.runtime = protocol::profile::Runtime::Runsc;
        check_container_hardening(&profile).unwrap();
        let config = container_config(&profile, &identity(), Path::new("/w"), &BTreeMap::new());
        let host = config.host_config.unwrap();
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.tmpfs.as_ref().unwrap()["/home/user"], "rw,nosuid,nodev,size=32m,uid=1000,gid=1000,mode=0755");
        assert_eq!(host.cap_add.unwrap(), vec!["CHOWN".to_owned(), "NET_BIND_SERVICE".to_owned()]);
        assert_eq!(host.runtime.as_deref(), Some("runsc"));
        assert_eq!(host.pids_limit, Some(64 + 64 * 10), "gVisor's sandbox threads count on the host");
    }

    #[test]
    fn profile_env_cannot_spoof_the_session() {
        let mut profile = dev_profile();
        profile.container.env.insert("BERTH_SESSION".into(), "someone-else".into());
        let config = container_config(&profile, &identity(), Path::new("/w"), &BTreeMap::new());
        let env = config.env.unwrap();
        assert!(env.contains(&"BERTH_SESSION=s-1".to_owned()));
        assert!(!env.iter().any(|entry| entry.contains("someone-else")));
    }
}
