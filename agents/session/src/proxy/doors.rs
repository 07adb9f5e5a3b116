//! One door per host: the terminal and the files API of a session placed on another host.
//!
//! A session's terminal is a Docker exec on the engine of its host and its files are in that
//! host's workspace root, so only a session agent on that host can serve them. Every host may run
//! a session agent of its own with its host id (`BERTH_HOST`); each announces its internal address
//! in Redis (`berth:door:<deployment>:<host>` = `host:port`, refreshed every
//! [`ANNOUNCE_EVERY`] with a TTL of [`ANNOUNCE_TTL`], so a door that stops is forgotten by key
//! expiry). A request for `/api/sessions/{id}/terminal` or `/api/sessions/{id}/files…` is
//! authenticated and its session's ownership checked here first; a session whose record names
//! another host (`host_id`, the host the engine placed it on) is forwarded to that host's door
//! with the proxy's own forwarding (HTTP bodies streamed both ways, WebSocket upgrades tunnelled
//! byte for byte, backpressure kept), carrying the caller's credentials unchanged: the far door
//! authenticates and authorizes the request again itself and trusts nothing this door adds. A
//! session whose host announces no door, or whose door does not answer, gets `503` with the code
//! `host_unreachable` at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use redis::aio::ConnectionManager;

use super::directory::Upstream;
use super::forward;
use crate::api::{caller, owned_session, ApiError, ApiErrorCode, OwnedSession};
use crate::auth::Identity;
use crate::server::AppState;

/// The address another door should use for this one (`host:port`); without it, the listening
/// address is announced unless it is a wildcard (`0.0.0.0`, `[::]`), which no other host can dial.
pub const ADVERTISE_ENV: &str = "BERTH_SESSION_ADVERTISE_ADDR";
/// Set by a door on what it forwards, so that a door that would forward it again (the two disagree
/// about the session's host for a moment) answers instead: never a loop. Not a credential.
pub const FORWARDED_BY_HEADER: &str = "x-berth-door-forwarded-by";
/// How often a door refreshes its announcement.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);
/// How long an announcement lives without a refresh.
pub const ANNOUNCE_TTL: Duration = Duration::from_secs(30);
/// How long one Redis command may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The doors of the deployment, as this one sees them.
pub struct Doors {
    state: Arc<AppState>,
    /// This door's host id (`Profile::host`).
    host: String,
    redis_url: Option<String>,
    redis: tokio::sync::OnceCell<ConnectionManager>,
    client: forward::HttpClient,
}

/// What the middleware checked for a session served on this host: handlers take it instead of
/// reading the session's record a second time.
#[derive(Clone)]
pub(crate) struct Checked {
    pub(crate) identity: Identity,
    pub(crate) session: OwnedSession,
}

impl FromRequestParts<Arc<AppState>> for Checked {
    type Rejection = Response;

    /// From the middleware; on a route without it, checked here.
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Checked, Response> {
        if let Some(checked) = parts.extensions.remove::<Checked>() {
            return Ok(checked);
        }
        let identity = caller(state, &parts.headers, parts.uri.query())?;
        let Path(params) = Path::<HashMap<String, String>>::from_request_parts(parts, state).await.map_err(IntoResponse::into_response)?;
        let id = params.get("id").map(String::as_str).unwrap_or_default();
        let session = owned_session(state, &identity, id).await.map_err(IntoResponse::into_response)?;
        Ok(Checked { identity, session })
    }
}

fn door_key(deployment: &str, host: &str) -> String {
    format!("berth:door:{deployment}:{host}")
}

/// The address to announce: [`ADVERTISE_ENV`], else `listening` unless it is a wildcard.
fn announced_address(advertised: Option<String>, listening: Option<std::net::SocketAddr>) -> Option<String> {
    if let Some(advertised) = advertised.filter(|text| !text.trim().is_empty()) {
        return Some(advertised.trim().to_owned());
    }
    listening.filter(|address| !address.ip().is_unspecified()).map(|address| address.to_string())
}

/// `host:port` (an IPv6 host in brackets) as the proxy's upstream.
fn parse_address(text: &str) -> Option<Upstream> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host);
    let port = port.parse::<u16>().ok().filter(|port| *port > 0)?;
    (!host.is_empty()).then(|| Upstream { host: host.to_owned(), port })
}

impl Doors {
    /// The doors of `state`'s deployment; announces this one (when it has an address another host
    /// can dial and Redis is configured) until the instance stops.
    pub fn new(state: Arc<AppState>, listening: Option<std::net::SocketAddr>) -> Arc<Doors> {
        let host = state.config.profile.host();
        let redis_url = state.config.activity_redis_url.clone();
        let doors =
            Arc::new(Doors { state: state.clone(), host, redis_url, redis: tokio::sync::OnceCell::new(), client: forward::client() });
        let announced = announced_address(std::env::var(ADVERTISE_ENV).ok(), listening);
        match (&doors.redis_url, announced) {
            (Some(_), Some(address)) => {
                tokio::spawn(doors.clone().announce(address));
            }
            (None, _) => tracing::info!("no Redis: this door is not announced, and sessions on other hosts answer host_unreachable"),
            (Some(_), None) => tracing::warn!(
                "this door listens on a wildcard address and {ADVERTISE_ENV} is not set: not announced, so other hosts' doors cannot forward here"
            ),
        }
        doors
    }

    async fn redis(&self) -> Result<ConnectionManager, String> {
        let Some(url) = &self.redis_url else { return Err("no Redis configured for the doors".to_owned()) };
        let connecting = async {
            let client = redis::Client::open(url.as_str()).map_err(|error| error.to_string())?;
            match tokio::time::timeout(REDIS_TIMEOUT, client.get_connection_manager()).await {
                Ok(Ok(manager)) => Ok(manager),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("Redis did not answer in time".to_owned()),
            }
        };
        self.redis.get_or_try_init(|| connecting).await.cloned()
    }

    async fn query<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Result<T, String> {
        let mut redis = self.redis().await?;
        match tokio::time::timeout(REDIS_TIMEOUT, command.query_async::<T>(&mut redis)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("Redis did not answer in time".to_owned()),
        }
    }

    /// Keeps `address` announced for this host until the instance stops, then withdraws it
    /// (unless another door of the host has announced itself since).
    async fn announce(self: Arc<Self>, address: String) {
        let key = door_key(&self.state.config.profile.deployment(), &self.host);
        let mut stop = self.state.stop.clone();
        let mut announced = false;
        loop {
            let mut command = redis::cmd("SET");
            command.arg(&key).arg(&address).arg("PX").arg(u64::try_from(ANNOUNCE_TTL.as_millis()).unwrap_or(u64::MAX));
            match self.query::<String>(command).await {
                Ok(_) if !announced => {
                    announced = true;
                    tracing::info!(host = %self.host, %address, %key, "door announced");
                }
                Ok(_) => {}
                Err(error) => {
                    announced = false;
                    tracing::warn!(host = %self.host, %error, "could not announce this door; retrying");
                }
            }
            let stopped = tokio::select! {
                () = tokio::time::sleep(ANNOUNCE_EVERY) => false,
                _ = stop.wait_for(|stopped| *stopped) => true,
            };
            if stopped {
                break;
            }
        }
        let withdraw = redis::Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0");
        if let Ok(mut redis) = self.redis().await {
            let mut invocation = withdraw.key(&key);
            invocation.arg(&address);
            let _ = tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async::<i64>(&mut redis)).await;
        }
    }

    /// The announced door of `host`, `None` when it has none.
    async fn address_of(&self, host: &str) -> Result<Option<String>, String> {
        let mut command = redis::cmd("GET");
        command.arg(door_key(&self.state.config.profile.deployment(), host));
        self.query::<Option<String>>(command).await
    }

    /// Forwards the request to `host`'s door, or answers `host_unreachable`.
    async fn forward(&self, host: &str, identity: &Identity, session: &str, request: Request) -> Response {
        let unreachable = |message: String| {
            let mut error = ApiError::new(ApiErrorCode::HostUnreachable, message);
            error.session = Some(session.to_owned());
            error.into_response()
        };
        if request.headers().contains_key(FORWARDED_BY_HEADER) {
            return unreachable(format!(
                "session {session} runs on host {host}, and this door (host {}) was reached by forwarding: not forwarded twice; try again",
                self.host
            ));
        }
        let address = match self.address_of(host).await {
            Ok(Some(address)) => address,
            Ok(None) => {
                return unreachable(format!(
                    "session {session} runs on host {host}, which has no door (no session agent there announces itself): its terminal and files cannot be reached"
                ))
            }
            Err(error) => return unreachable(format!("session {session} runs on host {host}; its door cannot be looked up: {error}")),
        };
        let Some(upstream) = parse_address(&address) else {
            return unreachable(format!("session {session} runs on host {host}, whose door announced an unusable address {address:?}"));
        };
        let path_and_query =
            request.uri().path_and_query().map_or_else(|| request.uri().path().to_owned(), |value| value.as_str().to_owned());
        let forwarding = forward::Forwarding {
            upstream: upstream.clone(),
            path_and_query,
            prefix: None,
            user: identity.user.clone(),
            session: session.to_owned(),
            // The far door authenticates the caller itself, with the caller's own token.
            strip_authorization: false,
        };
        let upgrade = forward::wants_upgrade(&request);
        let mut outgoing = match forward::upstream_request(request, &forwarding) {
            Ok(outgoing) => outgoing,
            Err(message) => return unreachable(format!("session {session} runs on host {host}: {message}")),
        };
        if let Ok(value) = HeaderValue::from_str(&self.host) {
            outgoing.headers_mut().insert(FORWARDED_BY_HEADER, value);
        }
        tracing::debug!(session_id = %session, host, door = %address, upgrade, "forwarding to the session's host's door");
        // No activity here: the far door counts what it serves, like a request made to it directly.
        let forwarded =
            if upgrade { forward::tunnel(outgoing, &upstream, None).await } else { forward::http(&self.client, outgoing, None).await };
        match forwarded {
            Ok(response) => response,
            Err(forward::Unreachable(reason)) => {
                tracing::warn!(session_id = %session, host, door = %address, %reason, "the door of a session's host did not answer");
                unreachable(format!("session {session} runs on host {host}, whose door at {address} did not answer: {reason}"))
            }
        }
    }
}

/// Middleware of the terminal and files routes: the caller and the session are checked here once;
/// a session of this host goes on to the handler (with what was checked), one of another host to
/// that host's door.
pub(crate) async fn route(
    State(doors): State<Arc<Doors>>,
    Path(params): Path<HashMap<String, String>>,
    mut request: Request,
    next: Next,
) -> Response {
    let state = &doors.state;
    let identity = match caller(state, request.headers(), request.uri().query()) {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    let session = match owned_session(state, &identity, id).await {
        Ok(session) => session,
        Err(error) => return error.into_response(),
    };
    match session.host_id() {
        Some(host) if host != doors.host => {
            let host = host.to_owned();
            doors.forward(&host, &identity, id, request).await
        }
        _ => {
            request.extensions_mut().insert(Checked { identity, session });
            next.run(request).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announced_address_is_one_another_host_can_dial() {
        let wildcard = "0.0.0.0:8700".parse().ok();
        let specific = "10.0.0.2:8700".parse().ok();
        assert_eq!(announced_address(None, wildcard), None);
        assert_eq!(announced_address(None, "[::]:8700".parse().ok()), None);
        assert_eq!(announced_address(None, specific).as_deref(), Some("10.0.0.2:8700"));
        assert_eq!(announced_address(Some(" door.h2:8700 ".into()), wildcard).as_deref(), Some("door.h2:8700"));
        assert_eq!(announced_address(Some(String::new()), specific).as_deref(), Some("10.0.0.2:8700"));
    }

    #[test]
    fn announced_addresses_parse_or_are_refused() {
        assert_eq!(parse_address("10.0.0.2:8700"), Some(Upstream { host: "10.0.0.2".into(), port: 8700 }));
        assert_eq!(parse_address("[fd00::2]:8700"), Some(Upstream { host: "fd00::2".into(), port: 8700 }));
        assert_eq!(parse_address("door:0"), None);
        assert_eq!(parse_address(":8700"), None);
        assert_eq!(parse_address("door"), None);
        assert_eq!(door_key("prod", "h2"), "berth:door:prod:h2");
    }
}
