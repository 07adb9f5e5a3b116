//! The persistence agent: generic operations (`protocol::store`) executed on MongoDB or on the
//! embedded SQLite default, chosen by `BERTH_STORE_URL`; session records and the audit trail.
//!
//! [`Store`] is the one trait both backends implement; [`agent`] consumes `berth.agent.persistence`
//! (fire-and-forget tasks and request/reply queries) and maps errors to ack, retry or dead-letter.

pub mod agent;
pub mod document;
pub mod mongo;
pub mod sqlite;

use std::future::Future;

use protocol::store::{ErrorKind, Operation};
use protocol::Profile;
use serde_json::Value;
use uuid::Uuid;

pub use agent::Agent;
pub use mongo::MongoStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("unsupported store url {url:?}: expected sqlite:///absolute/path, sqlite::memory: or mongodb://…")]
    UnsupportedUrl { url: String },
    #[error("cannot prepare the store at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("amqp: {0}")]
    Bus(#[from] protocol::bus::BusError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kind a client sees; decides whether a fire-and-forget task is retried or dead-lettered.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::BadRequest(_) | Error::UnsupportedUrl { .. } => ErrorKind::BadRequest,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::Unavailable(_) | Error::Io { .. } | Error::Bus(_) => ErrorKind::Unavailable,
            Error::Sqlite(error) => sqlite::error_kind(error),
            Error::Mongo(error) => mongo::error_kind(error),
        }
    }
}

/// Which backend a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MongoDb,
}

/// The fields of one index on a collection (in order; a compound index when more than one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSpec {
    pub collection: &'static str,
    pub fields: &'static [&'static str],
}

/// The indexes behind the queries Berth makes: a user's sessions, sessions by state, a session's
/// history, the patterns by name.
pub const BERTH_INDEXES: &[IndexSpec] = &[
    IndexSpec { collection: "sessions", fields: &["user"] },
    IndexSpec { collection: "sessions", fields: &["state"] },
    IndexSpec { collection: "sessions", fields: &["created"] },
    IndexSpec { collection: "events", fields: &["session", "at"] },
    IndexSpec { collection: "events", fields: &["event_id"] },
    IndexSpec { collection: "patterns", fields: &["name"] },
];

/// How long an applied task id is remembered for deduplication.
pub const APPLIED_TASK_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A document store executing the generic operations. Every write is applied at most once per
/// `task_id`: a redelivered task gets the first answer again without being applied twice.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    fn backend(&self) -> Backend;

    /// Whether a `group` is applied all or nothing (false only on a standalone MongoDB server,
    /// where groups that replay safely are applied in order and completed by redelivery).
    fn groups_are_atomic(&self) -> bool {
        true
    }

    /// Executes one operation. `task_id` deduplicates writes and is the default id of a `put`.
    async fn execute(&self, task_id: Option<Uuid>, operation: Operation) -> Result<Value>;

    /// Creates one index if it does not exist.
    async fn create_index(&self, collection: &str, fields: &[&str]) -> Result<()>;

    /// Removes one collection and its indexes (tests, benchmarks).
    async fn drop_collection(&self, collection: &str) -> Result<()>;

    /// Removes every collection and the deduplication records (`berth bootstrap --reset` only).
    async fn drop_all(&self) -> Result<()>;

    /// Forgets applied task ids older than `retention`; returns how many were forgotten.
    async fn prune_applied_tasks(&self, retention: std::time::Duration) -> Result<u64>;

    /// Creates Berth's indexes ([`BERTH_INDEXES`]). Idempotent.
    async fn ensure_indexes(&self) -> Result<()> {
        for index in BERTH_INDEXES {
            self.create_index(index.collection, index.fields).await?;
        }
        Ok(())
    }
}

/// Opens the store a URL names: `sqlite:///abs/path.sqlite`, `sqlite::memory:` or `mongodb://…`
/// (the database is the URL's path, `berth` if none).
pub async fn open_store(url: &str) -> Result<Box<dyn Store>> {
    if url.starts_with("sqlite:") {
        return Ok(Box::new(SqliteStore::open(url).await?));
    }
    if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
        return Ok(Box::new(MongoStore::open(url).await?));
    }
    Err(Error::UnsupportedUrl { url: protocol::bus::redact(url) })
}

/// Checks an operation before any backend sees it: the protocol's rules plus regular expressions
/// that must compile (both backends then agree on what is a bad matcher).
pub fn check_operation(operation: &Operation) -> Result<()> {
    operation.validate().map_err(Error::BadRequest)?;
    check_regexes(operation)
}

fn check_regexes(operation: &Operation) -> Result<()> {
    let filter = match operation {
        Operation::Find(args) => &args.filter,
        Operation::Update(args) => &args.filter,
        Operation::Delete(args) => &args.filter,
        Operation::Count(args) => &args.filter,
        Operation::Group(group) => return group.operations.iter().try_for_each(check_regexes),
        Operation::Put(_) | Operation::Upsert(_) | Operation::Get(_) | Operation::Replace(_) => return Ok(()),
    };
    for condition in &filter.conditions {
        if let protocol::store::Condition::Regex(pattern) = &condition.condition {
            regex::Regex::new(pattern).map_err(|error| Error::BadRequest(format!("`{}`: bad regex: {error}", condition.field)))?;
        }
    }
    Ok(())
}

/// The default id of the `index`th put in a group applied under `task_id`, stable across deliveries.
pub fn grouped_task_id(task_id: Uuid, index: usize) -> Uuid {
    Uuid::new_v5(&task_id, format!("group/{index}").as_bytes())
}

/// Names the group member an error came from.
pub(crate) fn in_group(index: usize, member: &Operation, error: Error) -> Error {
    let context = |message: String| format!("group operation {index} ({}): {message}", member.action());
    match error {
        Error::BadRequest(message) => Error::BadRequest(context(message)),
        Error::NotFound(message) => Error::NotFound(context(message)),
        Error::Conflict(message) => Error::Conflict(context(message)),
        other => other,
    }
}

/// Runs `berth agent persistence` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    agent::run(&profile, shutdown).await
}
