//! The `data` of every event in `protocol/CATALOGUE.md`, one type per event, and the event type
//! names ([`kind`]) in one place. Components build events from these types
//! ([`CloudEvent::of`], [`CloudEvent::answering`]) and read them back with [`CloudEvent::data_as`];
//! a test checks the catalogue's tables against them, so the two cannot drift.
//!
//! **Forward compatibility.** No payload denies unknown fields: an event is broadcast and read by
//! components that are upgraded one at a time, so a reader must accept the field a newer producer
//! added (the catalogue asks for `deny_unknown_fields` only on task arguments, never on event data).
//! A field marked `?` in the catalogue is left out when absent (`skip_serializing_if`) and defaults
//! when read; a field shown as possibly `null` is always sent. Field names are the wire's: the
//! patterns (`patterns/*.json`) read event data by these names.
//!
//! The host reports (`container.host_report`, `workspace.host_report`) are [`crate::host::HostReport`].
//!
//! **Identifiers.** A field that names a session, a user or a workspace is a [`SessionId`],
//! [`UserId`] or [`WorkspaceId`]: the same string on the wire, checked by its one rule when the
//! data is read, so [`CloudEvent::data_as`] refuses a malformed id by name instead of handing it
//! on. (A container inventory's entries are Docker labels: `""` is none, and so, with a warning, is
//! a label that is no valid id, so one foreign container cannot make the inventory unreadable.)

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::CloudEvent;
use crate::host::HostReport;
use crate::ids::{SessionId, UserId, WorkspaceId};
use crate::message::Task;

/// Every event type of the catalogue.
pub mod kind {
    pub const SESSION_OPEN: &str = "session.open";
    pub const SESSION_CLOSE: &str = "session.close";
    pub const SESSION_ACTIVITY: &str = "session.activity";
    pub const SESSION_KEEPALIVE: &str = "session.keepalive";
    pub const SESSION_STATS: &str = "session.stats";

    pub const SESSION_MOVE: &str = "session.move";
    pub const SESSION_FAILOVER: &str = "session.failover";
    pub const SESSION_RECOVER: &str = "session.recover";
    pub const SESSION_BUDGET_EXCEEDED: &str = "session.budget_exceeded";
    pub const SESSION_ADMITTED: &str = "session.admitted";
    pub const TIMER_FIRED: &str = "timer.fired";

    pub const WORKSPACE_MATERIALIZED: &str = "workspace.materialized";
    pub const WORKSPACE_PROGRESS: &str = "workspace.progress";
    pub const WORKSPACE_COMPLETE: &str = "workspace.complete";
    pub const WORKSPACE_SYNCED: &str = "workspace.synced";
    pub const WORKSPACE_CONFLICT: &str = "workspace.conflict";
    pub const WORKSPACE_SYNC_FAILED: &str = "workspace.sync_failed";
    pub const WORKSPACE_FAILED: &str = "workspace.failed";
    pub const WORKSPACE_REMOVED: &str = "workspace.removed";
    pub const WORKSPACE_RECOVERED: &str = "workspace.recovered";
    pub const WORKSPACE_QUOTA_EXCEEDED: &str = "workspace.quota_exceeded";
    pub const WORKSPACE_INVENTORY: &str = "workspace.inventory";
    pub const WORKSPACE_HOST_REPORT: &str = "workspace.host_report";

    pub const CONTAINER_READY: &str = "container.ready";
    pub const CONTAINER_PROBED: &str = "container.probed";
    pub const CONTAINER_FAILED: &str = "container.failed";
    pub const CONTAINER_PAUSED: &str = "container.paused";
    pub const CONTAINER_RESUMED: &str = "container.resumed";
    pub const CONTAINER_STOPPED: &str = "container.stopped";
    pub const CONTAINER_REMOVED: &str = "container.removed";
    pub const CONTAINER_EXITED: &str = "container.exited";
    pub const CONTAINER_STATS: &str = "container.stats";
    pub const CONTAINER_INVENTORY: &str = "container.inventory";
    pub const CONTAINER_CLAIMED: &str = "container.claimed";
    pub const CONTAINER_POOL_SLOT_READY: &str = "container.pool_slot_ready";
    pub const CONTAINER_POOL_SLOT_FAILED: &str = "container.pool_slot_failed";
    pub const CONTAINER_POOL_SLOT_REMOVED: &str = "container.pool_slot_removed";
    pub const CONTAINER_HOST_REPORT: &str = "container.host_report";

    /// All of them, in the catalogue's order.
    pub const ALL: [&str; 38] = [
        SESSION_OPEN,
        SESSION_CLOSE,
        SESSION_ACTIVITY,
        SESSION_KEEPALIVE,
        SESSION_STATS,
        SESSION_MOVE,
        SESSION_FAILOVER,
        SESSION_RECOVER,
        SESSION_BUDGET_EXCEEDED,
        SESSION_ADMITTED,
        TIMER_FIRED,
        WORKSPACE_MATERIALIZED,
        WORKSPACE_PROGRESS,
        WORKSPACE_COMPLETE,
        WORKSPACE_SYNCED,
        WORKSPACE_CONFLICT,
        WORKSPACE_SYNC_FAILED,
        WORKSPACE_FAILED,
        WORKSPACE_REMOVED,
        WORKSPACE_RECOVERED,
        WORKSPACE_QUOTA_EXCEEDED,
        WORKSPACE_INVENTORY,
        WORKSPACE_HOST_REPORT,
        CONTAINER_READY,
        CONTAINER_PROBED,
        CONTAINER_FAILED,
        CONTAINER_PAUSED,
        CONTAINER_RESUMED,
        CONTAINER_STOPPED,
        CONTAINER_REMOVED,
        CONTAINER_EXITED,
        CONTAINER_STATS,
        CONTAINER_INVENTORY,
        CONTAINER_CLAIMED,
        CONTAINER_POOL_SLOT_READY,
        CONTAINER_POOL_SLOT_FAILED,
        CONTAINER_POOL_SLOT_REMOVED,
        CONTAINER_HOST_REPORT,
    ];
}

/// The data of one event type.
pub trait EventData: Serialize + DeserializeOwned {
    /// The event type it goes with.
    const KIND: &'static str;
}

/// Event data that did not match its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    #[error("expected a `{expected}` event, got `{got}`")]
    WrongType { expected: &'static str, got: String },
    #[error("`{event_type}` data: {reason}")]
    Invalid { event_type: String, reason: String },
}

/// The JSON of a payload. Payloads are structs of strings, numbers, booleans, lists and options,
/// which always serialize; should one ever not, the error is logged and the data is `null`, which
/// every reader refuses loudly rather than acting on half a payload.
pub fn to_data<T: Serialize>(data: &T) -> Value {
    serde_json::to_value(data).unwrap_or_else(|error| {
        tracing::error!(%error, "event data did not serialize");
        Value::Null
    })
}

impl CloudEvent {
    /// A new event of `T`'s type carrying `data`.
    pub fn of<T: EventData>(source: &str, subject: Option<&str>, data: &T) -> CloudEvent {
        CloudEvent::new(T::KIND, source, subject, to_data(data))
    }

    /// An agent's answer to `task`: subject = the task's session, `taskid` = the task's id and
    /// `thredid` = its thred, so the engine binds it to its thred and tells it from a late one.
    pub fn answering<T: EventData>(task: &Task, source: &str, data: &T) -> CloudEvent {
        let mut event = CloudEvent::of(source, task.session.as_deref(), data).with_extension("taskid", task.id.to_string());
        if let Some(thred) = &task.thred {
            event = event.with_extension("thredid", thred.clone());
        }
        event
    }

    /// The event's data as `T`, refused when the event is of another type or the data does not fit.
    /// An event without data reads as `{}` (CloudEvents lets a producer leave it out), which fits
    /// the types whose fields are all optional.
    pub fn data_as<T: EventData>(&self) -> Result<T, DataError> {
        if self.event_type != T::KIND {
            return Err(DataError::WrongType { expected: T::KIND, got: self.event_type.clone() });
        }
        let data = if self.data.is_null() { Value::Object(serde_json::Map::new()) } else { self.data.clone() };
        serde_json::from_value(data).map_err(|error| DataError::Invalid { event_type: self.event_type.clone(), reason: error.to_string() })
    }
}

macro_rules! event_data {
    ($($type:ident => $kind:ident),* $(,)?) => {
        $(impl EventData for $type {
            const KIND: &'static str = kind::$kind;
        })*

        /// Each payload type's event type and wire field names (the catalogue check's input).
        #[cfg(test)]
        fn registered() -> Vec<(&'static str, &'static [&'static str])> {
            vec![$((kind::$kind, introspect::fields::<$type>())),*]
        }

        /// Checks a catalogue event's data against its type, so that a producer without a typed
        /// payload at hand (`berth publish`) refuses what a reader would refuse. An event type
        /// outside the catalogue (a pattern's own) is not checked here.
        pub fn check(event: &CloudEvent) -> Result<(), DataError> {
            match event.event_type.as_str() {
                $(kind::$kind => event.data_as::<$type>().map(drop),)*
                kind::CONTAINER_HOST_REPORT | kind::WORKSPACE_HOST_REPORT => serde_json::from_value::<HostReport>(event.data.clone())
                    .map(drop)
                    .map_err(|error| DataError::Invalid { event_type: event.event_type.clone(), reason: error.to_string() }),
                _ => Ok(()),
            }
        }
    };
}

event_data! {
    SessionOpen => SESSION_OPEN,
    SessionClose => SESSION_CLOSE,
    SessionActivity => SESSION_ACTIVITY,
    SessionKeepalive => SESSION_KEEPALIVE,
    SessionStats => SESSION_STATS,
    SessionMove => SESSION_MOVE,
    SessionFailover => SESSION_FAILOVER,
    SessionRecover => SESSION_RECOVER,
    SessionBudgetExceeded => SESSION_BUDGET_EXCEEDED,
    SessionAdmitted => SESSION_ADMITTED,
    TimerFired => TIMER_FIRED,
    WorkspaceMaterialized => WORKSPACE_MATERIALIZED,
    WorkspaceProgress => WORKSPACE_PROGRESS,
    WorkspaceComplete => WORKSPACE_COMPLETE,
    WorkspaceSynced => WORKSPACE_SYNCED,
    WorkspaceConflict => WORKSPACE_CONFLICT,
    WorkspaceSyncFailed => WORKSPACE_SYNC_FAILED,
    WorkspaceFailed => WORKSPACE_FAILED,
    WorkspaceRemoved => WORKSPACE_REMOVED,
    WorkspaceRecovered => WORKSPACE_RECOVERED,
    WorkspaceQuotaExceeded => WORKSPACE_QUOTA_EXCEEDED,
    WorkspaceInventory => WORKSPACE_INVENTORY,
    ContainerReady => CONTAINER_READY,
    ContainerProbed => CONTAINER_PROBED,
    ContainerFailed => CONTAINER_FAILED,
    ContainerPaused => CONTAINER_PAUSED,
    ContainerResumed => CONTAINER_RESUMED,
    ContainerStopped => CONTAINER_STOPPED,
    ContainerRemoved => CONTAINER_REMOVED,
    ContainerExited => CONTAINER_EXITED,
    ContainerStats => CONTAINER_STATS,
    ContainerInventory => CONTAINER_INVENTORY,
    ContainerClaimed => CONTAINER_CLAIMED,
    PoolSlotReady => CONTAINER_POOL_SLOT_READY,
    PoolSlotFailed => CONTAINER_POOL_SLOT_FAILED,
    PoolSlotRemoved => CONTAINER_POOL_SLOT_REMOVED,
}

// ------------------------------------------------------------------ from clients and users

/// `session.open`: starts (or joins) the session `subject` of `user`'s `workspace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOpen {
    pub user: UserId,
    pub workspace: WorkspaceId,
    /// Must be the deployment's when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClose {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where a user's input came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputSource {
    Websocket,
    Terminal,
    Api,
    /// Traffic through the session agent's reverse proxy.
    Proxy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionActivity {
    pub source: InputSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKeepalive {
    pub source: InputSource,
}

/// The console asks a running session for `container.stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStats {}

// ------------------------------------------------------------------ from the engine to itself

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMove {
    /// The drained host.
    pub from: Option<String>,
}

/// A session's host has been gone for `hosts.failover_after`: it reopens on another host from the
/// object store's last synced state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionFailover {
    /// The gone host.
    pub from: String,
    /// When the engine first saw it gone (RFC 3339).
    pub gone_since: Option<String>,
    pub failover_after_secs: u64,
    /// The session's last sync (or materialize) the engine saw answered (RFC 3339); `null` when none.
    pub last_synced_at: Option<String>,
    /// Where the gone host's copy will be saved when it returns (under the store's root).
    pub recovered_prefix: String,
    /// What the user is told.
    pub message: String,
}

/// The reconciler's finding: stranded work of a session without a live thred.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecover {
    pub user: UserId,
    pub workspace: WorkspaceId,
    /// What was found: an orphan container or a stranded directory.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The host whose inventory reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionBudgetExceeded {
    /// `daily_budget` or `monthly_budget`.
    pub budget: String,
    pub spent: f64,
    pub limit: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionAdmitted {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFired {
    pub timer: String,
    pub generation: u64,
    pub deadline_ms: i64,
}

// ------------------------------------------------------------------ from the workspace agent

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceMaterialized {
    pub files: u64,
    pub bytes: u64,
    pub pending_large_files: u64,
    pub pending_large_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceProgress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceComplete {
    pub files: u64,
    pub bytes: u64,
    pub downloaded_files: u64,
    pub downloaded_bytes: u64,
    /// `null` for a cold materialize.
    pub cache: Option<CacheReuse>,
}

/// The host's cached copy of a workspace, revalidated and reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheReuse {
    pub kept_files: u64,
    pub kept_bytes: u64,
    /// Files and links deleted locally: the store no longer has them or has another version.
    pub removed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceSynced {
    /// True only when every object was read back and confirmed.
    #[serde(rename = "final")]
    pub final_sync: bool,
    pub uploaded: u64,
    pub deleted: u64,
    pub unchanged: u64,
    pub bytes_uploaded: u64,
    pub skipped: Vec<Skipped>,
    /// Files of the `workspace.conflict` sent just before.
    pub conflicts: u64,
    /// The directory does not exist (all counts 0).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub missing: bool,
    /// How many were skipped, when `skipped` was cut to fit the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_total: Option<u64>,
}

/// An entry that can't be stored, kept locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceConflict {
    pub files: Vec<ConflictFile>,
    /// The stranded sibling directory being saved when it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_session: Option<SessionId>,
}

/// One file whose object changed in the store since this session saw it; both versions were kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictFile {
    pub path: String,
    /// Where this session's version went; `null` when nothing needed a second name.
    pub conflict_copy: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceSyncFailed {
    #[serde(rename = "final")]
    pub final_sync: bool,
    pub error: String,
    /// `remove` when a `remove` was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceFailed {
    pub stage: String,
    pub error: String,
}

/// A returning host's copy of a session that lives elsewhere (or ended) is stored under `prefix`
/// (`recovered/<host>/<session>`, under the store's root) and its directory is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRecovered {
    pub host: String,
    pub user: UserId,
    pub workspace: WorkspaceId,
    pub prefix: String,
    pub files: u64,
    pub bytes: u64,
    /// What could not be stored and was moved aside on that host.
    pub preserved: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRemoved {
    /// What could not be stored and was moved aside.
    pub preserved: Vec<String>,
    /// How many were preserved, when `preserved` was cut to fit the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserved_total: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceQuotaExceeded {
    pub used_mib: u64,
    pub quota_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceInventory {
    pub deployment: String,
    pub host: String,
    pub directories: Vec<DirectoryEntry>,
}

/// One session directory on a host; `user`, `workspace` and `profile` are `null` without a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    pub session: SessionId,
    pub user: Option<UserId>,
    pub workspace: Option<WorkspaceId>,
    pub profile: Option<String>,
    /// RFC 3339.
    pub modified: String,
    /// The last final sync was confirmed and nothing changed since.
    pub confirmed: bool,
}

// ------------------------------------------------------------------ from the container agent

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerReady {
    pub container_id: String,
    pub host: String,
    pub port: u16,
    /// The container's own address on the session network (with the machine it is on), `null`
    /// when Docker gave none: a proxy on that machine can skip Docker's port proxy.
    pub network: Option<crate::host::NetworkAddress>,
    /// An existing container of the session was taken over instead of created.
    pub adopted: bool,
    pub timings_ms: ReadyTimings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyTimings {
    pub create: u64,
    pub start: u64,
    pub ready: u64,
}

/// The work probe (see the idle rule in `engine/README.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerProbed {
    /// Cumulative CPU time the container used since it started, in nanoseconds.
    pub cpu_ns: u64,
    /// Milliseconds since the newest change in the workspace directory.
    pub write_age_ms: u64,
    /// Processes started from a terminal shell that still run.
    pub terminal_commands: u64,
    /// Running terminal shells seen.
    pub terminals: u64,
    /// Directory entries looked at, and whether the walk stopped at its limit.
    pub scanned: u64,
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerFailed {
    /// The task's action.
    pub action: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPaused {
    /// `null` when there is no container (`state: missing`).
    pub container_id: Option<String>,
    /// `paused`, `exited` or `missing`.
    pub state: String,
}

/// `null` when no container was found: done all the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerResumed {
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStopped {
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRemoved {
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerExited {
    pub container_id: String,
    pub exit_code: i64,
    pub oom_killed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerStats {
    pub cpu_percent: f64,
    pub memory_used: u64,
    pub memory_limit: u64,
    pub network_rx: u64,
    pub network_tx: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInventory {
    pub deployment: String,
    pub host: String,
    pub containers: Vec<ContainerEntry>,
}

/// One labelled container of the deployment. Its session, user and workspace come from Docker
/// labels (or a claimed pool slot's identity file), which anything may have set: none is `""` on
/// the wire, and one that is no valid id reads as none with a warning ([`label`]), so one foreign
/// container never makes the whole inventory unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerEntry {
    /// The session's id (none for a warm-pool container nobody claimed yet).
    #[serde(default, with = "label")]
    pub session: Option<SessionId>,
    /// From the container's labels, so the engine can recover an orphan's workspace.
    #[serde(default, with = "label")]
    pub user: Option<UserId>,
    #[serde(default, with = "label")]
    pub workspace: Option<WorkspaceId>,
    pub container_id: String,
    pub state: String,
    pub host_port: Option<u16>,
    /// RFC 3339.
    pub created: String,
    /// The warm-pool slot the container was made for (claimed when `session` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_slot: Option<String>,
}

/// An identifier read from a label: `""` (or `null`) is none, and so, with a warning, is text
/// that is no valid id of its kind; none is written as `""`.
pub mod label {
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::ids::IdError;

    /// `text` as an id of type `T`, or none (with a warning when `text` is not empty).
    pub fn parse<T: FromStr<Err = IdError>>(text: &str) -> Option<T> {
        if text.is_empty() {
            return None;
        }
        text.parse().map_err(|error: IdError| tracing::warn!(%error, "a container label that is no valid id is read as none")).ok()
    }

    pub fn serialize<T: AsRef<str>, S: Serializer>(id: &Option<T>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(id.as_ref().map_or("", AsRef::as_ref))
    }

    pub fn deserialize<'de, T: FromStr<Err = IdError>, D: Deserializer<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
        Ok(Option::<String>::deserialize(deserializer)?.as_deref().and_then(parse))
    }
}

/// A `claim` is done: the slot's container is the session's now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerClaimed {
    pub slot: String,
    /// The slot's container was running and answered its health check at the claim: what a
    /// `provision` would have answered (`container.ready`'s data), so the session runs as soon as
    /// its workspace is materialized. `null` (or absent, from an older agent) when it did not:
    /// `provision` then checks, or opens cold, after the materialize.
    #[serde(default)]
    pub ready: Option<ContainerReady>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSlotReady {
    pub slot: String,
    pub container_id: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSlotFailed {
    pub slot: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSlotRemoved {
    pub slot: String,
    /// A claim was recorded: the folders are the session's now and were left alone.
    pub claimed: bool,
}

/// The wire field names of a payload type, as serde's derive declares them to a deserializer.
pub(crate) mod introspect {
    use serde::de::{self, Deserialize, Deserializer, Visitor};

    struct Fields<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    pub fn fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Fields(&mut fields));
        fields
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::json;

    use super::*;

    const CATALOGUE: &str = include_str!("../CATALOGUE.md");
    const EVENT_SECTIONS: [&str; 3] = ["## Events from clients and users", "## Events from the engine to itself", "## Events from agents"];

    /// The catalogue's event tables: each type with its data's top-level fields (`?` = optional).
    fn catalogue_events() -> BTreeMap<String, BTreeSet<String>> {
        let mut events = BTreeMap::new();
        let mut in_events = false;
        for line in CATALOGUE.lines() {
            if line.starts_with("## ") {
                in_events = EVENT_SECTIONS.contains(&line);
                continue;
            }
            let Some(row) = line.strip_prefix("| `").filter(|_| in_events) else { continue };
            let mut cells = row.splitn(3, " | ");
            let (types, data) = (cells.next().unwrap_or_default(), cells.next().unwrap_or_default());
            let fields = top_level_fields(data).unwrap_or_else(|| panic!("CATALOGUE.md: the data of `{types} has no {{...}}"));
            for event_type in types.split('`').skip_while(|part| part.is_empty()).step_by(2) {
                assert!(events.insert(event_type.to_owned(), fields.clone()).is_none(), "CATALOGUE.md lists `{event_type}` twice");
            }
        }
        events
    }

    /// `{a, b?, c: {x, y}, d: [{z}]}…` → {a, b?, c, d}; `None` where there are no braces (a table
    /// cell described in words). The events and the tasks tables are both read with it.
    pub(crate) fn top_level_fields(data: &str) -> Option<BTreeSet<String>> {
        let body = data.trim_start_matches('`').strip_prefix('{')?;
        let (mut depth, mut current, mut fields) = (0usize, String::new(), BTreeSet::new());
        for c in body.chars() {
            match c {
                '{' | '[' => depth += 1,
                '}' | ']' if depth > 0 => depth -= 1,
                '}' => break,
                ',' if depth == 0 => {
                    fields.insert(std::mem::take(&mut current));
                    continue;
                }
                _ => {}
            }
            if depth == 0 {
                current.push(c);
            }
        }
        fields.insert(current);
        Some(
            fields
                .into_iter()
                .map(|field| field.split(':').next().unwrap_or_default().trim().to_owned())
                .filter(|field| !field.is_empty())
                .collect(),
        )
    }

    /// The field names the code puts on the wire for each event type.
    fn typed_events() -> BTreeMap<String, BTreeSet<String>> {
        let mut events: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (event_type, fields) in registered() {
            events.insert(event_type.to_owned(), fields.iter().map(|field| (*field).to_owned()).collect());
        }
        // One type for both host reports: each agent fills its own part.
        let report: BTreeSet<String> = introspect::fields::<HostReport>().iter().map(|field| (*field).to_owned()).collect();
        let without = |other: &str| report.iter().filter(|field| *field != other).cloned().collect::<BTreeSet<_>>();
        events.insert(kind::CONTAINER_HOST_REPORT.to_owned(), without("workspaces"));
        events.insert(kind::WORKSPACE_HOST_REPORT.to_owned(), without("capacity"));
        events
    }

    /// Fails when a payload type and `protocol/CATALOGUE.md` disagree: an event in one and not the
    /// other, or a field missing, extra or renamed. Optional fields are written `name?` there.
    #[test]
    fn catalogue_matches_the_payload_types() {
        let catalogue = catalogue_events();
        let typed = typed_events();
        let mut problems = Vec::new();
        for (event_type, listed) in &catalogue {
            let Some(fields) = typed.get(event_type) else {
                problems.push(format!("`{event_type}` is in CATALOGUE.md but has no payload type in protocol::events"));
                continue;
            };
            let listed: BTreeSet<String> = listed.iter().map(|field| field.trim_end_matches('?').to_owned()).collect();
            for missing in listed.difference(fields) {
                problems.push(format!("`{event_type}`: CATALOGUE.md lists `{missing}`, the type has no such field"));
            }
            for extra in fields.difference(&listed) {
                problems.push(format!("`{event_type}`: the type has `{extra}`, CATALOGUE.md does not list it"));
            }
        }
        for event_type in typed.keys().filter(|event_type| !catalogue.contains_key(*event_type)) {
            problems.push(format!("`{event_type}` has a payload type but is not in CATALOGUE.md"));
        }
        let kinds: BTreeSet<&str> = kind::ALL.into_iter().collect();
        for event_type in typed.keys().filter(|event_type| !kinds.contains(event_type.as_str())) {
            problems.push(format!("`{event_type}` is not in events::kind::ALL"));
        }
        for kind in kinds.iter().filter(|kind| !typed.contains_key(**kind)) {
            problems.push(format!("events::kind::ALL has `{kind}`, which has no payload type"));
        }
        assert!(problems.is_empty(), "protocol/CATALOGUE.md and protocol::events disagree:\n{}", problems.join("\n"));
    }

    /// The check itself can fail: a renamed field and an unlisted type are found.
    #[test]
    fn the_catalogue_parser_reads_nested_and_optional_fields() {
        let fields = top_level_fields("`{a, b?, c: {x, y}, d: [{z, w}], e: \"v\"}`: notes {not, these}").unwrap();
        assert_eq!(fields, ["a", "b?", "c", "d", "e"].into_iter().map(str::to_owned).collect());
        assert_eq!(top_level_fields("`{}`").unwrap(), BTreeSet::new());
        assert!(top_level_fields("no braces").is_none());
        let catalogue = catalogue_events();
        assert!(catalogue["container.stopped"].contains("container_id"), "a row of several types gives each its fields");
        assert_eq!(catalogue["session.open"], ["user", "workspace", "profile?"].into_iter().map(str::to_owned).collect());
    }

    #[test]
    fn optional_fields_stay_off_the_wire_and_nullable_ones_on_it() {
        let close = CloudEvent::of("/t", Some("s-1"), &SessionClose { reason: None });
        assert_eq!(close.data, json!({}));
        let stopped = CloudEvent::of("/t", Some("s-1"), &ContainerStopped { container_id: None });
        assert_eq!(stopped.event_type, "container.stopped");
        assert_eq!(stopped.data, json!({"container_id": null}));
        let synced = WorkspaceSynced {
            final_sync: true,
            uploaded: 1,
            deleted: 0,
            unchanged: 2,
            bytes_uploaded: 3,
            skipped: Vec::new(),
            conflicts: 0,
            missing: false,
            skipped_total: None,
        };
        assert_eq!(
            to_data(&synced),
            json!({"final": true, "uploaded": 1, "deleted": 0, "unchanged": 2, "bytes_uploaded": 3, "skipped": [], "conflicts": 0})
        );
    }

    #[test]
    fn readers_accept_new_fields_and_refuse_another_type() {
        let event = CloudEvent::new(
            "container.exited",
            "/t",
            Some("s-1"),
            json!({"container_id": "c", "exit_code": 137, "oom_killed": true, "added_later": 1}),
        );
        let exited: ContainerExited = event.data_as().unwrap();
        assert_eq!(exited, ContainerExited { container_id: "c".into(), exit_code: 137, oom_killed: true });
        assert_eq!(
            event.data_as::<ContainerStopped>().unwrap_err(),
            DataError::WrongType { expected: "container.stopped", got: "container.exited".into() }
        );
        let bad = CloudEvent::new("session.activity", "/t", Some("s-1"), json!({"source": "carrier pigeon"}));
        assert!(matches!(bad.data_as::<SessionActivity>(), Err(DataError::Invalid { .. })));
    }

    #[test]
    fn check_refuses_what_a_reader_would_and_leaves_other_types_alone() {
        let open = |data| CloudEvent::new(kind::SESSION_OPEN, "/t", Some("s-1"), data);
        assert_eq!(check(&open(json!({"user": "alice", "workspace": "w1"}))), Ok(()));
        let missing = check(&open(json!({"user": "alice"}))).unwrap_err();
        assert_eq!(missing.to_string(), "`session.open` data: missing field `workspace`");
        let report = CloudEvent::new(kind::CONTAINER_HOST_REPORT, "/t", None, json!({"host": "h1"}));
        assert!(matches!(check(&report), Err(DataError::Invalid { .. })));
        assert_eq!(check(&CloudEvent::new("count.inc", "/t", Some("k"), json!({"anything": 1}))), Ok(()));
        let without_data = CloudEvent::new(kind::SESSION_CLOSE, "/t", Some("s-1"), Value::Null);
        assert_eq!(without_data.data_as::<SessionClose>(), Ok(SessionClose { reason: None }));
        assert!(check(&CloudEvent::new(kind::SESSION_OPEN, "/t", Some("s-1"), Value::Null)).is_err());
    }

    #[test]
    fn ids_keep_their_wire_form_and_a_malformed_one_is_refused_by_name() {
        let open = SessionOpen { user: UserId::parse("alice").unwrap(), workspace: WorkspaceId::parse("w1").unwrap(), profile: None };
        let event = CloudEvent::of("/t", Some("s-1"), &open);
        assert_eq!(event.data, json!({"user": "alice", "workspace": "w1"}));
        assert_eq!(event.data_as::<SessionOpen>().unwrap(), open);
        let wildcard = CloudEvent::new(kind::SESSION_OPEN, "/t", Some("s-1"), json!({"user": "#", "workspace": "w1"}));
        assert_eq!(
            wildcard.data_as::<SessionOpen>().unwrap_err(),
            DataError::Invalid { event_type: "session.open".into(), reason: format!("user id \"#\": {}", UserId::RULE) }
        );
        let listed = json!({"deployment": "d", "host": "h", "directories": [
            {"session": "../up", "user": null, "workspace": null, "profile": null, "modified": "2026-01-01T00:00:00Z", "confirmed": false}
        ]});
        let inventory = CloudEvent::new(kind::WORKSPACE_INVENTORY, "/t", None, listed);
        let refused = inventory.data_as::<WorkspaceInventory>().unwrap_err().to_string();
        assert!(refused.starts_with("`workspace.inventory` data: session id \"../up\""), "{refused}");
    }

    #[test]
    fn a_container_label_that_is_no_valid_id_reads_as_none_and_the_rest_of_the_inventory_reads() {
        let entry = |session: &str, user: &str, workspace: &str| {
            json!({"session": session, "user": user, "workspace": workspace, "container_id": "c", "state": "running",
                   "host_port": null, "created": "2026-01-01T00:00:00Z"})
        };
        let listed = json!({"deployment": "d", "host": "h", "containers": [
            entry("s-1", "alice", "w1"),
            entry("../up", "a b", "#"),
            entry("", "", ""),
        ]});
        let inventory = CloudEvent::new(kind::CONTAINER_INVENTORY, "/t", None, listed).data_as::<ContainerInventory>().unwrap();
        fn ids(entry: &ContainerEntry) -> (Option<&str>, Option<&str>, Option<&str>) {
            (
                entry.session.as_ref().map(SessionId::as_str),
                entry.user.as_ref().map(UserId::as_str),
                entry.workspace.as_ref().map(WorkspaceId::as_str),
            )
        }
        let read: Vec<_> = inventory.containers.iter().map(ids).collect();
        assert_eq!(read, vec![(Some("s-1"), Some("alice"), Some("w1")), (None, None, None), (None, None, None)]);
        // None goes on the wire as "", as the labels always did.
        assert_eq!(to_data(&inventory.containers[1])["user"], json!(""));
        assert_eq!(to_data(&inventory.containers[0])["session"], json!("s-1"));
        assert_eq!(label::parse::<UserId>("alice").map(String::from).as_deref(), Some("alice"));
    }

    #[test]
    fn an_answer_is_bound_to_its_task() {
        let task: Task = serde_json::from_value(json!({
            "id": "01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f", "agent": "container", "action": "stop",
            "session": "s-1", "thred": "t-1", "args": {}
        }))
        .unwrap();
        let event = CloudEvent::answering(&task, "/t", &ContainerStopped { container_id: Some("c".into()) });
        assert_eq!(event.subject.as_deref(), Some("s-1"));
        assert_eq!(event.extension("thredid"), Some("t-1"));
        assert_eq!(event.extension("taskid"), Some("01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f"));
    }
}
