//! The session agent's configuration, built from a run-profile (or by hand in tests).

use std::time::Duration;

use protocol::Profile;

use crate::auth::{KeyMaterial, TokenAuthority};
use crate::error::{Error, Result};

/// How long an `open` waits for the engine's first notification about it (the session it
/// started, or the live one it joined) before answering `timeout`.
pub const OPEN_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// The largest file one `PUT /api/sessions/{id}/files/…` takes; the workspace quota applies too.
pub const MAX_UPLOAD_BYTES: u64 = 1024 * 1024 * 1024;

/// Where persistence requests go: `berth.tasks` / `persistence` in a deployment; tests point this
/// at their own responder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRoute {
    pub exchange: String,
    pub routing_key: String,
    /// How long to wait for the persistence agent's reply.
    pub timeout: Duration,
}

impl StoreRoute {
    pub fn persistence_agent() -> StoreRoute {
        StoreRoute {
            exchange: protocol::topology::TASKS_EXCHANGE.to_owned(),
            routing_key: protocol::AgentKind::Persistence.as_str().to_owned(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Everything `serve` needs. No `Default`: build it from a profile or spell it out.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The deployment's profile name: `open` frames must name it.
    pub profile_name: String,
    pub authority: TokenAuthority,
    /// At most one `session.activity` per session per this interval.
    pub activity_debounce: Duration,
    /// Redis shared by the instances so the debounce interval holds across all of them; `None`
    /// (or Redis unreachable at start) debounces per instance.
    pub activity_redis_url: Option<String>,
    /// Text frames above this size are refused with an error; the connection stays.
    pub max_frame_bytes: usize,
    /// Frames above this size cannot even be read: the connection is closed with 1009.
    pub hard_frame_limit_bytes: usize,
    pub max_messages_per_second: u32,
    pub max_connections_per_user: usize,
    /// The server pings every socket this often.
    pub heartbeat_interval: Duration,
    /// A socket that sent nothing (not even a pong) for this long is dropped.
    pub heartbeat_timeout: Duration,
    pub store: StoreRoute,
    /// How long an `open` waits for the engine's answer ([`OPEN_ANSWER_TIMEOUT`]).
    pub open_answer_timeout: Duration,
    /// CloudEvents `source` of the events this instance publishes.
    pub event_source: String,
    /// Where events go: `berth.events` in a deployment; tests use their own exchange so that
    /// their events never reach a real engine's queue.
    pub events_exchange: String,
    /// Where notifications come from: `berth.notify` in a deployment; tests that run an engine on
    /// isolated exchanges point this at the engine's.
    pub notify_exchange: String,
    /// The reverse proxy's settings (`[session.proxy]`) and cookie key.
    pub proxy: crate::proxy::ProxyConfig,
    /// The deployment's profile: where session directories are (the files API serves them from
    /// this machine, like the workspace agent), the workspace quota, what a terminal runs.
    pub profile: Profile,
    /// The largest upload the files API takes ([`MAX_UPLOAD_BYTES`]).
    pub max_upload_bytes: u64,
    /// The door itself (`crate::edge`): origins, connection cap, timeouts, the metrics token.
    pub edge: crate::edge::EdgeConfig,
}

impl SessionConfig {
    /// The configuration a deployment runs with: limits and audience from the profile, the key from
    /// the environment or the machine's secret file.
    pub fn from_profile(profile: &Profile) -> Result<SessionConfig> {
        let key = KeyMaterial::from_profile(profile)?;
        SessionConfig::with_key(profile, &key)
    }

    /// Like [`SessionConfig::from_profile`] with an explicit key.
    pub fn with_key(profile: &Profile, key: &KeyMaterial) -> Result<SessionConfig> {
        let settings = &profile.session;
        let config = SessionConfig {
            profile_name: profile.name.clone(),
            authority: TokenAuthority::new(key, &settings.jwt_audience)?,
            activity_debounce: Duration::from_secs(settings.activity_debounce_secs),
            activity_redis_url: Some(profile.services.redis_url.clone()),
            max_frame_bytes: settings.max_frame_bytes,
            hard_frame_limit_bytes: settings.max_frame_bytes.saturating_mul(4).max(4096),
            max_messages_per_second: settings.max_messages_per_second,
            max_connections_per_user: settings.max_connections_per_user,
            heartbeat_interval: Duration::from_secs(20),
            heartbeat_timeout: Duration::from_secs(60),
            store: StoreRoute::persistence_agent(),
            open_answer_timeout: OPEN_ANSWER_TIMEOUT,
            event_source: "/berth/session".to_owned(),
            events_exchange: protocol::topology::EVENTS_EXCHANGE.to_owned(),
            notify_exchange: protocol::topology::NOTIFY_EXCHANGE.to_owned(),
            proxy: crate::proxy::ProxyConfig::new(&settings.proxy, key),
            profile: profile.clone(),
            max_upload_bytes: MAX_UPLOAD_BYTES,
            edge: crate::edge::EdgeConfig::from_settings(settings),
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_frame_bytes == 0 || self.hard_frame_limit_bytes < self.max_frame_bytes {
            return Err(Error::Config("hard_frame_limit_bytes must be at least max_frame_bytes, which must be positive".to_owned()));
        }
        if self.max_messages_per_second == 0 || self.max_connections_per_user == 0 {
            return Err(Error::Config("message rate and connections per user must be positive".to_owned()));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(Error::Config("heartbeat_timeout must exceed a positive heartbeat_interval".to_owned()));
        }
        self.edge.validate()?;
        if self.open_answer_timeout.is_zero() {
            return Err(Error::Config("open_answer_timeout must be positive".to_owned()));
        }
        Ok(())
    }
}
