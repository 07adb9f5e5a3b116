//! The HTTP side: routes, authentication at the door, and `serve`, which runs one instance on a
//! listener until shutdown.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{rejection::WebSocketUpgradeRejection, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::Bus;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::activity::ActivityGate;
use crate::auth::{token_from_request, AuthFailure, Identity};
use crate::config::SessionConfig;
use crate::error::Result;
use crate::frames::SessionStatus;
use crate::hub::Hub;
use crate::metrics::{bump, Metrics};
use crate::notify::{ConsumerReady, NotificationConsumer};
use crate::store::SessionStore;

/// The WebSocket subprotocol the server selects when a browser offers one.
pub const SUBPROTOCOL: &str = "berth.v1";
/// Initial read buffer of each socket.
const SOCKET_READ_BUFFER_BYTES: usize = 4096;
/// How long shutdown waits for sockets to say goodbye.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What every handler shares.
pub struct AppState {
    pub config: SessionConfig,
    pub bus: Bus,
    pub hub: Arc<Hub>,
    pub store: SessionStore,
    pub metrics: Arc<Metrics>,
    /// What `GET /metrics` encodes: `metrics` and the bus's counters.
    pub metrics_registry: protocol::metrics::prometheus_client::registry::Registry,
    pub consumer_ready: ConsumerReady,
    /// Turns true when the instance shuts down.
    pub stop: watch::Receiver<bool>,
    pub activity: ActivityGate,
    /// Idempotency keys and Docker, for the HTTP API and the terminal.
    pub api: crate::api::ApiResources,
}

/// A running instance's handles, for tests and the benchmark.
#[derive(Clone)]
pub struct InstanceHandle {
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
}

/// Serves users on `listener` until `shutdown` completes: stops accepting, closes every socket
/// with 1001 (going away), removes the private queue, returns.
pub async fn serve(
    config: SessionConfig,
    bus: Bus,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (handle, running) = start(config, bus, listener, shutdown).await?;
    drop(handle);
    running.await
}

/// Like [`serve`], but returns once the instance is ready (queue bound, listening) with its
/// handles and the future that runs it.
pub async fn start(
    config: SessionConfig,
    bus: Bus,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(InstanceHandle, impl Future<Output = Result<()>> + Send)> {
    config.validate()?;
    let metrics = Arc::new(Metrics::default());
    let hub = Hub::on_exchange(bus.clone(), &config.notify_exchange, metrics.clone(), config.max_connections_per_user);
    let consumer = NotificationConsumer::start(&bus, &hub).await?;
    let (stop_sender, stop) = watch::channel(false);
    let consumer_ready = ConsumerReady::default();
    let consumer_task = tokio::spawn(consumer.run(bus.clone(), hub.clone(), consumer_ready.clone(), stop.clone()));
    let store = SessionStore::new(bus.clone(), config.store.clone());
    let activity = ActivityGate::new(config.activity_debounce, config.activity_redis_url.as_deref()).await;
    let api = crate::api::ApiResources::connect(config.activity_redis_url.as_deref()).await;
    let address = listener.local_addr().map(|address| address.to_string()).unwrap_or_default();
    let metrics_registry = metrics.registry(&bus);
    let state = Arc::new(AppState {
        config,
        bus,
        hub: hub.clone(),
        store,
        metrics: metrics.clone(),
        metrics_registry,
        consumer_ready,
        stop,
        activity,
        api,
    });
    let router = router(state.clone(), listener.local_addr().ok());
    let edge = state.config.edge.clone();
    let metrics_for_edge = metrics.clone();
    let handle = InstanceHandle { metrics: metrics.clone(), hub: hub.clone() };
    let running = async move {
        tracing::info!(%address, "session agent listening");
        // Sockets and the consumer watch the value, which stays `true` after the sender is gone.
        let graceful = async move {
            shutdown.await;
            let _ = stop_sender.send(true);
        };
        // The edge: connection cap, header and idle timeouts, graceful shutdown, upgrades.
        let outcome = crate::edge::serve_http(listener, router, edge, metrics_for_edge, graceful).await;
        // Upgraded sockets run outside the HTTP server; give them a moment to close cleanly.
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = consumer_task.await;
        tracing::info!(%address, "session agent stopped");
        outcome
    };
    Ok((handle, running))
}

fn router(state: Arc<AppState>, listening: Option<std::net::SocketAddr>) -> Router {
    let proxy = crate::proxy::Proxy::new(state.clone());
    let doors = crate::proxy::doors::Doors::new(state.clone(), listening);
    // The terminal and the files of a session on another host are that host's door's to serve.
    let on_the_sessions_host = || axum::middleware::from_fn_with_state(doors.clone(), crate::proxy::doors::route);
    let terminal_and_files = Router::new()
        .route("/api/sessions/{id}/terminal", get(crate::terminal::terminal))
        .route("/api/sessions/{id}/files", get(crate::files::get_root))
        .route("/api/sessions/{id}/files/", get(crate::files::get_root))
        .route(
            "/api/sessions/{id}/files/{*path}",
            get(crate::files::get_path).put(crate::files::put_file).delete(crate::files::delete_path).post(crate::files::post_path),
        )
        .route_layer(on_the_sessions_host());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/sessions", get(list_sessions).post(crate::api::open_session))
        .route("/api/sessions/{id}", get(crate::api::get_session).delete(crate::api::close_session))
        .route("/api/sessions/{id}/activity", post(crate::api::session_activity))
        .route("/api/sessions/{id}/keepalive", post(crate::api::session_keepalive))
        .merge(terminal_and_files)
        .route("/api/usage", get(crate::usage::usage))
        .route("/api/openapi.json", get(crate::openapi::serve_document))
        .route("/ws", get(websocket))
        .merge(crate::console::routes(state.clone()))
        .with_state(state.clone())
        .merge(crate::proxy::routes(proxy.clone()))
        // Outermost: a `{session}.{base_domain}` host belongs to the session's app, whatever the path.
        .layer(axum::middleware::from_fn_with_state(proxy, crate::proxy::route_by_host))
        // Outermost of all: a browser WebSocket from a foreign origin never reaches a route.
        .layer(axum::middleware::from_fn_with_state(state, crate::edge::check_origin))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let broker = state.bus.is_connected().await;
    let consuming = state.consumer_ready.load(Ordering::Relaxed);
    let status = if broker && consuming { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    // Reported, not required: without the append-only file a Redis restart ends live sessions
    // (their files are still recovered), which an operator should know about.
    let redis_append_only = state.activity.redis_append_only().await;
    (status, Json(json!({"broker": broker, "notifications": consuming, "redis_append_only": redis_append_only}))).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = crate::edge::metrics_refusal(&state.config.edge, &headers) {
        return refusal;
    }
    ([(header::CONTENT_TYPE, protocol::metrics::CONTENT_TYPE)], protocol::metrics::encode(&state.metrics_registry)).into_response()
}

/// `?access_token=` from a raw query string (JWTs need no percent-decoding).
pub(crate) fn query_parameter(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| pair.split_once('=').filter(|(key, _)| *key == name).map(|(_, value)| percent_decode(value)))
}

/// Decodes `%XX` escapes (and `+` as space) of a query value; malformed escapes stay as they are.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| bytes.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[index], escaped) {
            (_, Some(byte)) => {
                decoded.push(byte);
                index += 3;
            }
            (b'+', None) => {
                decoded.push(b' ');
                index += 1;
            }
            (byte, None) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

pub(crate) fn authenticate(state: &AppState, headers: &HeaderMap, query: Option<&str>) -> Result<Identity, AuthFailure> {
    let header_text = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let query_token = query_parameter(query, "access_token");
    let token = token_from_request(header_text(header::AUTHORIZATION), header_text(header::SEC_WEBSOCKET_PROTOCOL), query_token.as_deref());
    let outcome = match token {
        Some(token) => state.config.authority.verify(token),
        None => Err(AuthFailure::MissingToken),
    };
    if let Err(failure) = &outcome {
        state.metrics.record_auth_failure(failure.label());
        tracing::info!(reason = failure.label(), "refused an unauthenticated request");
    }
    outcome
}

pub(crate) fn unauthorized(failure: &AuthFailure) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({"error": "unauthorized", "reason": failure.label(), "message": failure.to_string()})),
    )
        .into_response()
}

/// `GET /ws`: authenticate first; only a verified caller gets an upgrade.
async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let identity = match authenticate(&state, &headers, query.as_deref()) {
        Ok(identity) => identity,
        Err(failure) => return unauthorized(&failure),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let slot = match state.hub.reserve_slot(&identity.user) {
        Ok(slot) => slot,
        Err(limit) => {
            bump(&state.metrics.connections_refused_limit);
            let message = format!("at most {} connections per user", limit.limit);
            return (StatusCode::TOO_MANY_REQUESTS, Json(json!({"error": "too_many_connections", "message": message}))).into_response();
        }
    };
    let hard_limit = state.config.hard_frame_limit_bytes;
    upgrade
        .protocols([SUBPROTOCOL])
        // Frames are small JSON; tungstenite's default 128 KiB read buffer per socket would cost
        // more memory than everything else a connection holds. The buffer grows for larger frames.
        .read_buffer_size(SOCKET_READ_BUFFER_BYTES)
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| crate::socket::serve_socket(socket, state, identity, slot))
}

/// `GET /api/sessions`: the caller's sessions; an admin may add `?user=<id>` or `?all=true`.
#[utoipa::path(
    get, path = "/api/sessions", tag = "sessions",
    params(("user" = Option<String>, Query, description = "Admins only: this user's sessions"),
           ("all" = Option<bool>, Query, description = "Admins only: `true` lists every user's sessions")),
    responses(
        (status = 200, description = "Newest first, at most 200", body = crate::api::SessionList),
        (status = 401, description = "No valid token", body = crate::api::ApiError),
        (status = 403, description = "`user` or `all` without the admin role", body = crate::api::ApiError),
        (status = 503, description = "The store did not answer", body = crate::api::ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn list_sessions(State(state): State<Arc<AppState>>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let identity = match authenticate(&state, &headers, query.as_deref()) {
        Ok(identity) => identity,
        Err(failure) => return unauthorized(&failure),
    };
    let requested_user = query_parameter(query.as_deref(), "user");
    let everyone = query_parameter(query.as_deref(), "all").as_deref() == Some("true");
    let asks_for_others = everyone || requested_user.as_ref().is_some_and(|user| *user != identity.user);
    if asks_for_others && !identity.is_admin() {
        return (StatusCode::FORBIDDEN, Json(json!({"error": "forbidden", "message": "only admins see other users' sessions"})))
            .into_response();
    }
    let filter_user = if everyone { None } else { Some(requested_user.as_deref().unwrap_or(&identity.user)) };
    match state.store.sessions_of(filter_user).await {
        Ok(records) => {
            let sessions: Vec<SessionStatus> = records.iter().filter_map(SessionStatus::from_record).collect();
            Json(json!({"sessions": sessions})).into_response()
        }
        Err(error) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "unavailable", "message": error.to_string()}))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_found_and_decoded() {
        assert_eq!(query_parameter(Some("user=alice%40example.org&all=true"), "user").as_deref(), Some("alice@example.org"));
        assert_eq!(query_parameter(Some("user=alice%40example.org&all=true"), "all").as_deref(), Some("true"));
        assert_eq!(query_parameter(Some("access_token=a.b.c"), "access_token").as_deref(), Some("a.b.c"));
        assert_eq!(query_parameter(Some("x=1"), "user"), None);
        assert_eq!(query_parameter(None, "user"), None);
        assert_eq!(percent_decode("a+b%2"), "a b%2");
    }
}
