//! The engine: data-defined patterns, a pure state-machine core, threds and timers in Redis.
//!
//! - [`pattern`]: the pattern file format, its JSON Schema and validation into compiled patterns.
//! - [`expr`]: CEL guards and values.
//! - [`core`]: the pure `start`/`step` functions (no IO, no clock).
//! - [`service`]: `berth engine`: consume, bind, step, commit (outbox) in Redis, publish, ack.
//! - [`timers`]: timers as Redis keys with a TTL plus a swept deadline index.

pub mod admission;
pub mod core;
pub mod exporter;
pub mod expr;
pub mod hosts;
pub mod metrics;
pub mod pattern;
pub mod placement;
pub mod service;
pub mod timers;
pub mod usage;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use protocol::Profile;

pub use crate::core::{start, step, Disposition, Effect, EventInput, Step, StepError, Thred};
pub use crate::metrics::{Metrics, MetricsSnapshot};
pub use crate::pattern::{load_pattern_file, parse_pattern, Pattern, PatternError};
pub use crate::service::{Engine, EngineConfig};

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error("profile `{profile}` runs pattern `{pattern}` but {file} names itself `{found}`")]
    PatternName { profile: String, pattern: String, file: PathBuf, found: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("bus: {0}")]
    Bus(#[from] protocol::bus::BusError),
    #[error("corrupt record in redis at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("thred {thred} changed under us (another engine committed first)")]
    Conflict { thred: String },
    #[error("{0:?} is not a host id (1-40 lowercase letters, digits or `-`)")]
    NotAHost(String),
    /// A record that does not serialize is never written as an empty one.
    #[error("cannot encode the {what}: {source}")]
    Encode { what: &'static str, source: serde_json::Error },
    /// A background task (timers, admitter, …) ended while the engine was running.
    #[error("engine stopped: {0}")]
    Stopped(protocol::supervise::Ended),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// What becomes of the event that hit this error: an outage of Redis or the broker waits and
    /// retries without using up the attempt limit; a conflict retries; corrupt state never heals.
    pub fn outcome(&self) -> protocol::Outcome {
        match self {
            Error::Redis(_) | Error::Bus(_) => protocol::Outcome::RetryUnavailable,
            Error::Conflict { .. } => protocol::Outcome::Retry,
            Error::Corrupt { .. }
            | Error::Encode { .. }
            | Error::Pattern(_)
            | Error::PatternName { .. }
            | Error::NotAHost(_)
            | Error::Stopped(_) => protocol::Outcome::DeadLetter(self.to_string()),
        }
    }
}

/// Loads and validates the patterns a profile runs: `patterns_dir()/<name>.json`.
pub fn load_profile_patterns(profile: &Profile) -> Result<Vec<Pattern>> {
    let directory = protocol::profile::patterns_dir();
    let mut patterns = Vec::new();
    for name in &profile.patterns {
        let file = directory.join(format!("{name}.json"));
        let pattern = load_pattern_file(&file)?;
        if &pattern.name != name {
            return Err(Error::PatternName { profile: profile.name.clone(), pattern: name.clone(), file, found: pattern.name });
        }
        patterns.push(pattern);
    }
    Ok(patterns)
}

/// Turns on the Redis keyspace notifications timers rely on (`notify-keyspace-events` gains `E`
/// and `x`, other flags kept). The engine does this itself at start; bootstrap may call it too.
pub async fn configure_redis(profile: &Profile) -> Result<()> {
    let client = redis::Client::open(profile.services.redis_url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    timers::enable_keyspace_notifications(&mut connection).await
}

/// Whether Redis keeps its data across a restart: the append-only file (`appendonly yes`), RDB
/// snapshots (`save` with rules), or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisPersistence {
    AppendOnly,
    SnapshotsOnly,
    Off,
}

impl RedisPersistence {
    /// Reads `appendonly` and `save` from the server's configuration.
    pub async fn of(redis: &mut impl redis::aio::ConnectionLike) -> Result<RedisPersistence> {
        let appendonly: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(redis).await?;
        let save: Vec<String> = redis::cmd("CONFIG").arg("GET").arg("save").query_async(redis).await?;
        let on = |reply: &[String], off: &str| reply.get(1).is_some_and(|value| !value.trim().is_empty() && value != off);
        Ok(if on(&appendonly, "no") {
            RedisPersistence::AppendOnly
        } else if on(&save, "") {
            RedisPersistence::SnapshotsOnly
        } else {
            RedisPersistence::Off
        })
    }
}

/// Runs `berth engine` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let patterns = load_profile_patterns(&profile)?;
    let mut config = EngineConfig::standard();
    if let Some(grace) = protocol::profile::seconds_from_env(protocol::profile::ORPHAN_GRACE_ENV).map_err(anyhow::Error::msg)? {
        config.orphan_grace_secs = grace.as_secs();
    }
    let redis_url = profile.services.redis_url.clone();
    let metrics_listener = protocol::metrics::bind(&profile).await?;
    let metrics_token = protocol::metrics::token_of(&profile);
    let engine = Engine::connect(profile, patterns, config).await?;
    let (stop_exporter, exporter_stopped) = tokio::sync::oneshot::channel::<()>();
    let exporter = metrics_listener.map(|listener| {
        let stopped = async move {
            let _ = exporter_stopped.await;
        };
        let engine = engine.clone();
        tokio::spawn(async move { exporter::serve(&engine, &redis_url, listener, metrics_token, stopped).await })
    });
    let served = engine.serve(shutdown).await;
    drop(stop_exporter);
    if let Some(exporter) = exporter {
        exporter.await??;
    }
    Ok(served?)
}

/// `berth patterns check`: validates files, prints every error, returns the exit code.
pub fn check_files_cli(files: &[PathBuf]) -> ExitCode {
    if files.is_empty() {
        eprintln!("error: name at least one pattern file");
        return ExitCode::FAILURE;
    }
    let mut failed = false;
    for file in files {
        // `berth patterns check patterns/*.json` also matches the schema, which is no pattern.
        if file.file_name().is_some_and(|name| name.to_string_lossy().ends_with(".schema.json")) {
            println!("skipped: {} (a JSON Schema, not a pattern)", file.display());
            continue;
        }
        match load_pattern_file(file) {
            Ok(pattern) => println!("ok: {}: {pattern}", file.display()),
            Err(error) => {
                failed = true;
                eprintln!("error: {error}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
