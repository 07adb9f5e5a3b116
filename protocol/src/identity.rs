//! Bus identities: every component connects to RabbitMQ as a user of its own, with the least
//! permissions it needs, and every publish carries the broker-validated `user_id` of its
//! connection. This module holds the identities, what each may configure, write and read (the
//! [`permissions`] table bootstrap applies), which identity may send which event type
//! ([`check_sender`], applied by the engine), and where each identity's password is kept.
//!
//! Why `user_id`: RabbitMQ refuses a publish whose `user_id` property differs from the connection's
//! user (unless the user is an impersonator, which no Berth identity is), so a consumer can trust
//! it as the sender without any signature of its own.

use std::path::{Path, PathBuf};

/// One identity on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// The operator's identity from `services.amqp_url` (`guest` locally): declares the topology and
    /// creates the other users. No component runs as it.
    Admin,
    Engine,
    Container,
    Workspace,
    Persistence,
    Session,
    /// Clients (`berth publish`, scripts, benchmarks): may publish `session.open`, `.close`,
    /// `.activity` and `.stats` on `berth.events`, nothing else.
    Client,
}

impl Identity {
    /// Every identity bootstrap creates (all but [`Identity::Admin`], which exists already).
    pub const CREATED: [Identity; 6] =
        [Identity::Engine, Identity::Container, Identity::Workspace, Identity::Persistence, Identity::Session, Identity::Client];

    pub fn as_str(self) -> &'static str {
        match self {
            Identity::Admin => "admin",
            Identity::Engine => "engine",
            Identity::Container => "container",
            Identity::Workspace => "workspace",
            Identity::Persistence => "persistence",
            Identity::Session => "session",
            Identity::Client => "client",
        }
    }

    /// The RabbitMQ user of a created identity (`berth-engine`, …); the admin's is whatever
    /// `services.amqp_url` names.
    pub fn username(self) -> Option<&'static str> {
        match self {
            Identity::Admin => None,
            Identity::Engine => Some("berth-engine"),
            Identity::Container => Some("berth-container"),
            Identity::Workspace => Some("berth-workspace"),
            Identity::Persistence => Some("berth-persistence"),
            Identity::Session => Some("berth-session"),
            Identity::Client => Some("berth-client"),
        }
    }

    /// The created identity whose RabbitMQ user is `username`.
    pub fn of_username(username: &str) -> Option<Identity> {
        Identity::CREATED.into_iter().find(|identity| identity.username() == Some(username))
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Who sent a delivery, from its broker-validated `user_id` property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// One of Berth's created identities.
    Identity(Identity),
    /// A broker user that is not one of Berth's identities (the admin, `guest`, someone else).
    Other(String),
    /// No `user_id` on the message: the broker cannot vouch for anyone.
    Unstated,
}

impl Sender {
    /// The sender named by a `user_id` property.
    pub fn of_user_id(user_id: Option<&str>) -> Sender {
        match user_id {
            None | Some("") => Sender::Unstated,
            Some(name) => Identity::of_username(name).map_or_else(|| Sender::Other(name.to_owned()), Sender::Identity),
        }
    }

    /// The `user_id` it stands for (`None` for [`Sender::Unstated`]).
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Sender::Identity(identity) => identity.username(),
            Sender::Other(name) => Some(name),
            Sender::Unstated => None,
        }
    }
}

impl std::fmt::Display for Sender {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sender::Identity(identity) => write!(formatter, "the {identity} identity ({})", identity.username().unwrap_or("?")),
            Sender::Other(name) => write!(formatter, "broker user `{name}` (not a Berth identity)"),
            Sender::Unstated => formatter.write_str("an unstated sender (no user_id)"),
        }
    }
}

/// Session events a client (and the session agent, for its users) may send.
pub const CLIENT_SESSION_EVENTS: [&str; 5] = ["session.open", "session.close", "session.activity", "session.keepalive", "session.stats"];

/// The identities the engine accepts an event of `event_type` from: `container.*` only from the
/// container agent, `workspace.*` only from the workspace agent, `timer.fired` and the engine's own
/// `session.*` (recover, budget_exceeded, admitted) only from the engine, the client session events
/// from clients, the session agent and the engine; any other type (a pattern's own) only from the
/// engine.
pub fn allowed_senders(event_type: &str) -> &'static [Identity] {
    if event_type.starts_with("container.") {
        &[Identity::Container]
    } else if event_type.starts_with("workspace.") {
        &[Identity::Workspace]
    } else if CLIENT_SESSION_EVENTS.contains(&event_type) {
        &[Identity::Client, Identity::Session, Identity::Engine]
    } else {
        &[Identity::Engine]
    }
}

/// `Ok` when `sender` may send `event_type`; otherwise the reason to dead-letter it with.
pub fn check_sender(event_type: &str, sender: &Sender) -> Result<(), String> {
    let allowed = allowed_senders(event_type);
    match sender {
        Sender::Identity(identity) if allowed.contains(identity) => Ok(()),
        _ => {
            let names: Vec<&str> = allowed.iter().filter_map(|identity| identity.username()).collect();
            Err(format!("`{event_type}` refused from {sender}: only {} may send it", names.join(", ")))
        }
    }
}

/// `Ok` when an agent of `kind` may act on a task from `sender`; otherwise the reason to
/// dead-letter it with. Tasks come from the engine; the persistence agent also answers the session
/// agent's store requests; a broker user that is not a Berth identity is the operator's (only the
/// admin creates users: tests and benchmarks drive agents that way). Any other identity, and a
/// message without `user_id`, is refused: the default exchange would otherwise let any component
/// drop a task straight into an agent's queue.
pub fn check_task_sender(kind: crate::message::AgentKind, sender: &Sender) -> Result<(), String> {
    match sender {
        Sender::Identity(Identity::Engine) | Sender::Other(_) => Ok(()),
        Sender::Identity(Identity::Session) if kind == crate::message::AgentKind::Persistence => Ok(()),
        _ => Err(format!("a {} task refused from {sender}: only berth-engine sends tasks", kind.as_str())),
    }
}

/// What one RabbitMQ user may do in a vhost: the configure/write/read regexes of
/// `rabbitmqctl set_permissions`, and topic permissions (routing keys) per topic exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
    pub topics: Vec<TopicPermission>,
}

/// Routing keys a user may publish (`write`) and bind (`read`) on one topic exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermission {
    pub exchange: &'static str,
    pub write: String,
    pub read: String,
}

/// Matches nothing (RabbitMQ's convention for "no permission").
const NOTHING: &str = "^$";

/// `names` of the standard topology, and the same names of an isolated test or benchmark world
/// (`berth-test.<tag>.<name>`, see the engine's `EngineConfig::isolated`), as one anchored regex.
fn deployment_names(names: &[&str]) -> String {
    let alternatives: Vec<String> = names.iter().map(|name| regex_escape(name)).collect();
    in_deployment(&alternatives)
}

/// Regex `alternatives` under the deployment's prefixes.
fn in_deployment(alternatives: &[String]) -> String {
    format!("^(berth|berth-test\\.[^.]+)\\.({})$", alternatives.join("|"))
}

/// A work queue and its delay queues (`<queue>.retry.<delay>`).
fn work_queue(name: &str) -> String {
    format!("{}(\\.retry\\.[0-9a-z]+)?", regex_escape(name))
}

fn regex_escape(text: &str) -> String {
    text.replace('.', "\\.")
}

/// Every name of an isolated test or benchmark world.
const ISOLATED: &str = "^berth-test\\..*$";

/// Server-named private queues and their delay queues (see `topology::retry_queue`).
const PRIVATE_QUEUES: &str = "^(berth\\.)?amq\\.gen-.*$";

fn any_of(regexes: &[String]) -> String {
    let stripped: Vec<&str> = regexes.iter().map(|regex| regex.trim_start_matches('^').trim_end_matches('$')).collect();
    format!("^({})$", stripped.join("|"))
}

/// The permission table (also in `protocol/CATALOGUE.md`). `amq.default` is the default exchange:
/// writing it is how retries are parked in delay queues and replies sent to `reply_to`.
/// Publishing a routing key on a topic exchange needs topic `write`, binding one needs topic `read`;
/// a topic exchange without a topic permission for the user allows every key, so every identity
/// that may write or read `berth.events` or `berth.notify` gets one for each.
pub fn permissions(identity: Identity) -> Permissions {
    let own_queue = |name: &str| in_deployment(&[work_queue(name)]);
    let default_exchange = "^amq\\.default$".to_owned();
    let reply_to = "^amq\\.rabbitmq\\.reply-to$".to_owned();
    let none = || NOTHING.to_owned();
    let events = |write: String, read: String| TopicPermission { exchange: crate::topology::EVENTS_EXCHANGE, write, read };
    let notify = |write: String, read: String| TopicPermission { exchange: crate::topology::NOTIFY_EXCHANGE, write, read };
    // A host's container and workspace agents declare their own host queue
    // (`berth.agent.<kind>.<host>`) and bind it: binding needs write on the queue and read on
    // `berth.tasks` (a direct exchange: the broker cannot narrow which routing key is bound).
    let agent_queues =
        |kind: &str| in_deployment(&[format!("{}(\\.[0-9a-z-]+)?(\\.retry\\.[0-9a-z]+)?", regex_escape(&format!("agent.{kind}")))]);
    let agent = |kind: &str, family: &str| Permissions {
        configure: agent_queues(kind),
        write: any_of(&[deployment_names(&["events", "dead"]), default_exchange.clone(), agent_queues(kind)]),
        read: any_of(&[agent_queues(kind), deployment_names(&["tasks"])]),
        topics: vec![events(format!("^{family}\\..+$"), none()), notify(none(), none())],
    };
    match identity {
        // Bootstrap's identity: the broker's own administrator, not restricted here.
        Identity::Admin => Permissions { configure: ".*".to_owned(), write: ".*".to_owned(), read: ".*".to_owned(), topics: Vec::new() },
        // Isolated worlds (`berth-test.<tag>.*`): an engine under test declares its own exchanges
        // and queue, which no production name matches.
        Identity::Engine => Permissions {
            configure: any_of(&[own_queue("engine"), ISOLATED.to_owned()]),
            write: any_of(&[deployment_names(&["events", "tasks", "notify", "dead"]), default_exchange, ISOLATED.to_owned()]),
            read: any_of(&[own_queue("engine"), reply_to, ISOLATED.to_owned()]),
            topics: vec![events("^(timer|session)\\..+$".to_owned(), none()), notify("^user\\..+$".to_owned(), none())],
        },
        Identity::Container => agent("container", "container"),
        Identity::Workspace => agent("workspace", "workspace"),
        Identity::Persistence => Permissions {
            configure: own_queue("agent.persistence"),
            write: any_of(&[deployment_names(&["dead"]), default_exchange]),
            read: own_queue("agent.persistence"),
            topics: vec![events(none(), none()), notify(none(), none())],
        },
        // The users' door: publishes its users' session events and asks the store (persistence
        // tasks, request/reply); reads notifications per user and the console's live events
        // through private queues.
        Identity::Session => Permissions {
            configure: PRIVATE_QUEUES.to_owned(),
            write: any_of(&[deployment_names(&["events", "tasks", "dead"]), PRIVATE_QUEUES.to_owned(), default_exchange]),
            read: any_of(&[deployment_names(&["events", "notify"]), PRIVATE_QUEUES.to_owned(), reply_to]),
            topics: vec![
                events(client_session_events(), "^(workspace\\.progress|container\\.stats)$".to_owned()),
                // One user per binding: a wildcard (`user.#`) would read everyone's.
                notify(none(), "^user\\.[^#*]+$".to_owned()),
            ],
        },
        Identity::Client => Permissions {
            configure: none(),
            write: deployment_names(&["events"]),
            read: none(),
            topics: vec![events(client_session_events(), none()), notify(none(), none())],
        },
    }
}

fn client_session_events() -> String {
    let names: Vec<String> = CLIENT_SESSION_EVENTS.iter().map(|name| regex_escape(name)).collect();
    format!("^({})$", names.join("|"))
}

/// Where each created identity's password is kept: `BERTH_AMQP_SECRETS_DIR`, else
/// `$HOME/.local/state/berth/amqp-secrets` (one file per RabbitMQ user, mode 0600; bootstrap
/// writes a missing one).
pub fn secrets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_AMQP_SECRETS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/state/berth/amqp-secrets")
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no password for the {identity} identity at {path} ({source}): run `berth bootstrap` (it creates the bus users and their passwords) or set BERTH_AMQP_SECRETS_DIR")]
    MissingPassword { identity: Identity, path: PathBuf, source: std::io::Error },
    #[error("the password file {path} of the {identity} identity is empty or not one line of printable ASCII")]
    BadPassword { identity: Identity, path: PathBuf },
    #[error("services.amqp_url `{url}` is not amqp://[user:password@]host[:port][/vhost]")]
    BadUrl { url: String },
}

/// The admin's user when `services.amqp_url` names none (compose: its password is generated into
/// the secrets directory and given to the broker as its default user).
pub const ADMIN_USER: &str = "berth-admin";

/// The password file of `identity` in `dir`.
pub fn password_path(dir: &Path, identity: Identity) -> PathBuf {
    dir.join(identity.username().unwrap_or(ADMIN_USER))
}

/// Reads `identity`'s password from `dir`.
pub fn read_password(dir: &Path, identity: Identity) -> Result<String, IdentityError> {
    let path = password_path(dir, identity);
    let text = std::fs::read_to_string(&path).map_err(|source| IdentityError::MissingPassword { identity, path: path.clone(), source })?;
    let password = text.trim_end_matches('\n');
    if password.is_empty() || !password.chars().all(|c| c.is_ascii_graphic()) {
        return Err(IdentityError::BadPassword { identity, path });
    }
    Ok(password.to_owned())
}

/// The parts of an AMQP URL around its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    pub scheme: String,
    /// The user named in the URL (`guest` when none is: lapin's and RabbitMQ's default).
    pub user: String,
    named_user: bool,
    password: Option<String>,
    /// `host[:port]`.
    pub authority: String,
    /// The encoded vhost path (`%2f`, `berth-e2e-…`), empty for the default vhost.
    pub vhost_path: String,
}

impl AmqpUrl {
    pub fn parse(url: &str) -> Result<AmqpUrl, IdentityError> {
        let bad = || IdentityError::BadUrl { url: crate::bus::redact(url) };
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        if scheme != "amqp" && scheme != "amqps" {
            return Err(bad());
        }
        let (location, vhost_path) = match rest.split_once('/') {
            Some((location, path)) => (location, path.split('?').next().unwrap_or_default()),
            None => (rest, ""),
        };
        let (credentials, authority) = match location.rsplit_once('@') {
            Some((credentials, authority)) => (Some(credentials), authority),
            None => (None, location),
        };
        if authority.is_empty() {
            return Err(bad());
        }
        let (user, password) = match credentials {
            None => ("guest".to_owned(), None),
            Some(credentials) => match credentials.split_once(':') {
                Some((user, password)) => (percent_decode(user), Some(password.to_owned())),
                None => (percent_decode(credentials), None),
            },
        };
        let named_user = credentials.is_some();
        Ok(AmqpUrl {
            scheme: scheme.to_owned(),
            user,
            named_user,
            password,
            authority: authority.to_owned(),
            vhost_path: vhost_path.to_owned(),
        })
    }

    /// The vhost name (`/` for the default one).
    pub fn vhost(&self) -> String {
        let decoded = percent_decode(&self.vhost_path);
        if decoded.is_empty() {
            "/".to_owned()
        } else {
            decoded
        }
    }

    /// The host without the port.
    pub fn host(&self) -> &str {
        match self.authority.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => &self.authority,
        }
    }

    /// Whether the URL names a user.
    pub fn has_credentials(&self) -> bool {
        self.named_user
    }

    /// The URL's own password, decoded (`guest` when the URL names none, as lapin assumes).
    pub fn password(&self) -> String {
        self.password.as_deref().map_or_else(|| "guest".to_owned(), percent_decode)
    }

    /// The same broker and vhost as another user.
    pub fn with_credentials(&self, user: &str, password: &str) -> String {
        let vhost = if self.vhost_path.is_empty() { String::new() } else { format!("/{}", self.vhost_path) };
        format!("{}://{}:{}@{}{vhost}", self.scheme, percent_encode(user), percent_encode(password), self.authority)
    }
}

/// The URL `identity` connects with: the same broker and vhost as `amqp_url`, as the identity's own
/// user with the password from [`secrets_dir`]. The admin is `amqp_url`'s own user; a URL naming no
/// user means [`ADMIN_USER`] with its password from [`secrets_dir`] (compose generates it there).
pub fn url_for(amqp_url: &str, identity: Identity) -> Result<String, IdentityError> {
    let parsed = AmqpUrl::parse(amqp_url)?;
    let Some(username) = identity.username() else {
        if parsed.has_credentials() {
            return Ok(amqp_url.to_owned());
        }
        let password = read_password(&secrets_dir(), identity)?;
        return Ok(parsed.with_credentials(ADMIN_USER, &password));
    };
    let password = read_password(&secrets_dir(), identity)?;
    Ok(parsed.with_credentials(username, &password))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match (bytes[index], hex(index + 1), hex(index + 2)) {
            (b'%', Some(high), Some(low)) => {
                decoded.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                index += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(
            |byte| {
                if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                    (byte as char).to_string()
                } else {
                    format!("%{byte:02X}")
                }
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(event_type: &str, sender: Sender, accepted: bool) {
        assert_eq!(check_sender(event_type, &sender).is_ok(), accepted, "{event_type} from {sender}");
    }

    #[test]
    fn each_event_family_is_accepted_only_from_its_identity() {
        check("container.ready", Sender::Identity(Identity::Container), true);
        check("container.ready", Sender::Identity(Identity::Workspace), false);
        check("container.ready", Sender::Identity(Identity::Client), false);
        check("container.ready", Sender::Other("guest".into()), false);
        check("container.ready", Sender::Unstated, false);
        check("workspace.synced", Sender::Identity(Identity::Workspace), true);
        check("workspace.synced", Sender::Identity(Identity::Container), false);
        check("timer.fired", Sender::Identity(Identity::Engine), true);
        check("timer.fired", Sender::Identity(Identity::Session), false);
        check("session.open", Sender::Identity(Identity::Client), true);
        check("session.open", Sender::Identity(Identity::Session), true);
        check("session.open", Sender::Identity(Identity::Engine), true);
        check("session.open", Sender::Identity(Identity::Container), false);
        check("session.recover", Sender::Identity(Identity::Client), false);
        check("session.admitted", Sender::Identity(Identity::Session), false);
        check("session.admitted", Sender::Identity(Identity::Engine), true);
        check("count.inc", Sender::Identity(Identity::Client), false);
        check("count.inc", Sender::Identity(Identity::Engine), true);
    }

    #[test]
    fn agents_take_tasks_from_the_engine_and_the_operator_only() {
        use crate::message::AgentKind;
        assert!(check_task_sender(AgentKind::Container, &Sender::Identity(Identity::Engine)).is_ok());
        assert!(check_task_sender(AgentKind::Container, &Sender::Other("guest".into())).is_ok());
        assert!(check_task_sender(AgentKind::Persistence, &Sender::Identity(Identity::Session)).is_ok());
        for forger in [Identity::Session, Identity::Workspace, Identity::Client, Identity::Container] {
            assert!(check_task_sender(AgentKind::Container, &Sender::Identity(forger)).is_err(), "{forger}");
        }
        assert!(check_task_sender(AgentKind::Workspace, &Sender::Unstated).is_err());
        assert_eq!(
            check_task_sender(AgentKind::Container, &Sender::Identity(Identity::Workspace)).unwrap_err(),
            "a container task refused from the workspace identity (berth-workspace): only berth-engine sends tasks"
        );
    }

    #[test]
    fn a_refusal_names_the_type_the_sender_and_who_may_send_it() {
        let reason = check_sender("container.ready", &Sender::Identity(Identity::Workspace)).unwrap_err();
        assert_eq!(reason, "`container.ready` refused from the workspace identity (berth-workspace): only berth-container may send it");
    }

    #[test]
    fn user_ids_map_to_identities() {
        assert_eq!(Sender::of_user_id(Some("berth-engine")), Sender::Identity(Identity::Engine));
        assert_eq!(Sender::of_user_id(Some("guest")), Sender::Other("guest".into()));
        assert_eq!(Sender::of_user_id(None), Sender::Unstated);
        for identity in Identity::CREATED {
            assert_eq!(Identity::of_username(identity.username().unwrap()), Some(identity));
        }
    }

    #[test]
    fn urls_keep_broker_and_vhost_and_swap_credentials() {
        let url = AmqpUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!((url.user.as_str(), url.vhost(), url.host()), ("guest", "/".to_owned(), "127.0.0.1"));
        assert_eq!(url.with_credentials("berth-engine", "ab12"), "amqp://berth-engine:ab12@127.0.0.1:5672/%2f");
        let bare = AmqpUrl::parse("amqp://rabbitmq").unwrap();
        assert_eq!((bare.user.as_str(), bare.vhost(), bare.password()), ("guest", "/".to_owned(), "guest".to_owned()));
        assert_eq!(bare.with_credentials("berth-client", "x/y"), "amqp://berth-client:x%2Fy@rabbitmq");
        let test_vhost = AmqpUrl::parse("amqp://a%40b:p%3Aw@h:1/berth-e2e-1?heartbeat=10").unwrap();
        assert_eq!(
            (test_vhost.user.as_str(), test_vhost.password(), test_vhost.vhost()),
            ("a@b", "p:w".to_owned(), "berth-e2e-1".to_owned())
        );
        assert!(AmqpUrl::parse("redis://x").is_err());
    }

    #[test]
    fn permissions_name_the_deployment_and_isolated_worlds() {
        let engine = permissions(Identity::Engine);
        assert_eq!(engine.configure, "^((berth|berth-test\\.[^.]+)\\.(engine(\\.retry\\.[0-9a-z]+)?)|berth-test\\..*)$");
        let client = permissions(Identity::Client);
        assert_eq!(client.write, "^(berth|berth-test\\.[^.]+)\\.(events)$");
        assert_eq!(client.topics[0].write, "^(session\\.open|session\\.close|session\\.activity|session\\.keepalive|session\\.stats)$");
    }
}
