//! The web console at `/`: a page (embedded assets, vendored xterm.js) built on the door — the
//! WebSocket protocol, the terminal, the files API, the proxy — plus what only the console needs:
//! a sign-in cookie (a pasted token, or `berth dev`'s one-click link exchanged once), sign out,
//! a live socket with a session's workspace progress and container stats, and the admin overview.
//!
//! The cookie (`berth_console`, HttpOnly, `SameSite=Strict`, `Path=/`) holds the user token the
//! browser signed in with; the page reads a short-lived copy of it from `GET /console/me` (a
//! same-origin request with a custom header, so no other site can trigger or read it) and uses it
//! as the bearer of the door's own routes, which keep their header/subprotocol authentication.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::bus::Outcome;
use protocol::CloudEvent;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, OnceCell};

use crate::auth::{token_from_request, unix_now, Identity};
use crate::server::{AppState, SUBPROTOCOL};

/// The console's cookie.
pub const COOKIE_NAME: &str = "berth_console";
/// How long a console sign-in lasts when this deployment can mint tokens (HS256).
const SIGNED_IN_FOR: Duration = Duration::from_secs(12 * 3600);
/// The lifetime of the copy of the token the page holds; it asks again before it runs out.
const PAGE_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// How often an open workspace view asks for container stats.
const STATS_INTERVAL: Duration = Duration::from_secs(2);
/// The header every same-origin console request carries (browsers never add it to a cross-site
/// navigation or form, and adding it cross-site needs a CORS preflight that is never granted).
const CONSOLE_HEADER: &str = "x-berth-console";
/// The event the console publishes while a workspace view is open; the `workspace-session`
/// pattern turns it into a `stats` task while the session runs.
pub const STATS_REQUEST_EVENT: &str = protocol::events::kind::SESSION_STATS;
/// How long the latest progress of a session is kept for views that open later.
const PROGRESS_KEPT_FOR: Duration = Duration::from_secs(600);
/// How often, and how far apart, a live socket looks for a session record not stored yet.
const RECORD_ATTEMPTS: u32 = 20;
const RECORD_RETRY: Duration = Duration::from_millis(250);
/// The engine's Redis prefix in a deployment (`engine::EngineConfig::production`).
const ENGINE_REDIS_PREFIX: &str = "berth:engine";
/// The pattern whose queue the admin view shows.
const SESSION_PATTERN: &str = "workspace-session";

/// The embedded files: path under `/console/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../console/app.js")),
    ("style.css", "text/css; charset=utf-8", include_bytes!("../console/style.css")),
    ("favicon.svg", "image/svg+xml", include_bytes!("../console/favicon.svg")),
    ("vendor/xterm/xterm.mjs", "text/javascript; charset=utf-8", include_bytes!("../console/vendor/xterm/xterm.mjs")),
    ("vendor/xterm/xterm.css", "text/css; charset=utf-8", include_bytes!("../console/vendor/xterm/xterm.css")),
    ("vendor/addon-fit/addon-fit.mjs", "text/javascript; charset=utf-8", include_bytes!("../console/vendor/addon-fit/addon-fit.mjs")),
    ("vendor/xterm/LICENSE", "text/plain; charset=utf-8", include_bytes!("../console/vendor/xterm/LICENSE")),
    ("vendor/addon-fit/LICENSE", "text/plain; charset=utf-8", include_bytes!("../console/vendor/addon-fit/LICENSE")),
    ("vendor/addon-attach/LICENSE", "text/plain; charset=utf-8", include_bytes!("../console/vendor/addon-attach/LICENSE")),
];
const INDEX_HTML: &str = include_str!("../console/index.html");
/// Scripts and styles from this origin only; sockets to this origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// One workspace progress or container stats event, for the live sockets.
#[derive(Debug, Clone)]
struct LiveEvent {
    session: String,
    frame: Value,
}

/// The console's state next to the agent's.
pub struct Console {
    app: Arc<AppState>,
    /// Sign-in links already exchanged (SHA-256 of the token → its expiry): a link works once.
    used_links: Mutex<HashMap<String, u64>>,
    /// `workspace.progress` and `container.stats` from `berth.events`, started with the first
    /// live socket.
    live: OnceCell<broadcast::Sender<LiveEvent>>,
    /// The latest progress per session, so a view opened mid-materialize sees it at once
    /// (forgotten after [`PROGRESS_KEPT_FOR`]).
    last_progress: Mutex<HashMap<String, (std::time::Instant, Value)>>,
}

/// The console's routes, merged into the agent's router.
pub fn routes(app: Arc<AppState>) -> Router<Arc<AppState>> {
    let console =
        Arc::new(Console { app, used_links: Mutex::new(HashMap::new()), live: OnceCell::new(), last_progress: Mutex::new(HashMap::new()) });
    // Listening from the start: a workspace's first progress comes moments after its open.
    tokio::spawn({
        let console = console.clone();
        async move {
            if let Err(error) = console.live_events().await {
                tracing::warn!(%error, "console live events unavailable; retried with the first live socket");
            }
        }
    });
    Router::new()
        .route("/", get(index))
        .route("/console/signin", get(signin_link).post(signin_token))
        .route("/console/signout", post(signout))
        .route("/console/me", get(me))
        .route("/console/live/{id}", get(live))
        .route("/console/admin", get(admin))
        .route("/console/{*file}", get(asset))
        .with_state(console)
}

async fn index() -> Response {
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

async fn asset(Path(file): Path<String>) -> Response {
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(name, _, _)| *name == file) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let mut response = ([(header::CONTENT_TYPE, *content_type)], *bytes).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = (status, Json(json!({"error": code, "message": message}))).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A page for the one-click link's failures (a browser followed it, so answer in HTML).
fn error_page(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>Berth: sign-in</title><link rel=stylesheet href=/console/style.css>\
         <main class=narrow><h1>Berth</h1><p role=alert>{}</p><p><a href=/>Sign in with a token</a></p></main>",
        html_escape(message)
    );
    let mut response = (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `Origin`, when the browser sent one, is this very origin (`Host`).
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).and_then(|value: &HeaderValue| value.to_str().ok());
    let Some(origin) = text(header::ORIGIN) else { return true };
    let Some(host) = text(header::HOST) else { return false };
    origin.split_once("://").is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

fn is_console_request(headers: &HeaderMap) -> bool {
    headers.contains_key(CONSOLE_HEADER) && same_origin(headers)
}

impl Console {
    fn secure_cookies(&self) -> bool {
        self.app.config.profile.session.proxy.secure_cookies
    }

    fn set_cookie(&self, token: &str, max_age_secs: u64) -> String {
        let secure = if self.secure_cookies() { "; Secure" } else { "" };
        format!("{COOKIE_NAME}={token}; Path=/; Max-Age={max_age_secs}; HttpOnly; SameSite=Strict{secure}")
    }

    fn clear_cookie(&self) -> String {
        self.set_cookie("", 0)
    }

    /// The signed-in identity and token from the cookie, if it is still valid.
    fn signed_in(&self, headers: &HeaderMap) -> Option<(Identity, String)> {
        cookie_values(headers)
            .into_iter()
            .find_map(|token| self.app.config.authority.verify(token).ok().map(|identity| (identity, token.to_owned())))
    }

    /// The token the cookie keeps for `identity`: a fresh long one when this deployment can
    /// mint, else the one presented (it expires when it does).
    fn cookie_token(&self, identity: &Identity, presented: &str) -> (String, u64) {
        match self.app.config.authority.mint(&identity.user, &identity.roles, SIGNED_IN_FOR) {
            Ok(token) => (token, SIGNED_IN_FOR.as_secs()),
            Err(_) => (presented.to_owned(), identity.expires_at.saturating_sub(unix_now())),
        }
    }

    /// Whether this link token may still be exchanged (and marks it used): claimed in Redis
    /// (`SET NX` until the token expires) so a link works once across every instance, and in
    /// memory too, which is all there is when Redis cannot be reached.
    async fn claim_link(&self, token: &str, expires_at: u64) -> bool {
        let digest = hex(&Sha256::digest(token.as_bytes()));
        let now = unix_now();
        {
            let mut used = self.used_links.lock().unwrap_or_else(PoisonError::into_inner);
            used.retain(|_, expiry| *expiry + 60 >= now);
            if used.contains_key(&digest) {
                return false;
            }
            used.insert(digest.clone(), expires_at);
        }
        let url = self.app.config.activity_redis_url.clone().unwrap_or_else(|| self.app.config.profile.services.redis_url.clone());
        let seconds = expires_at.saturating_sub(now).max(1) + 60;
        let claim = async {
            let client = redis::Client::open(url.as_str())?;
            let mut connection = client.get_multiplexed_async_connection().await?;
            let claimed: Option<String> = redis::cmd("SET")
                .arg(format!("berth:console-link:{digest}"))
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(seconds)
                .query_async(&mut connection)
                .await?;
            Ok::<_, redis::RedisError>(claimed.is_some())
        };
        match tokio::time::timeout(Duration::from_secs(3), claim).await {
            Ok(Ok(claimed)) => claimed,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot claim a sign-in link in Redis; claimed on this instance only");
                true
            }
            Err(_) => {
                tracing::warn!("Redis did not answer a sign-in link claim in time; claimed on this instance only");
                true
            }
        }
    }

    /// The live event stream, started on first use: a private queue on the events exchange bound
    /// to `workspace.progress` and `container.stats`.
    async fn live_events(self: &Arc<Self>) -> Result<broadcast::Receiver<LiveEvent>, String> {
        let console = self.clone();
        let sender = self
            .live
            .get_or_try_init(|| async move {
                let app = &console.app;
                let keys = vec!["workspace.progress".to_owned(), "container.stats".to_owned()];
                let (sender, _) = broadcast::channel(256);
                let handler = {
                    let sender = sender.clone();
                    let console = Arc::downgrade(&console);
                    move |incoming: protocol::bus::Incoming| {
                        if let Some(console) = console.upgrade() {
                            console.take_event(&sender, &incoming.body);
                        }
                        async { Outcome::Ack }
                    }
                };
                let bus = app.bus.clone();
                let exchange = app.config.events_exchange.clone();
                let mut stop = app.stop.clone();
                // A private queue dies with the broker connection; `consume_private` declares a
                // fresh one after every interruption, so live progress and stats come back.
                tokio::spawn(async move {
                    let stopped = async move {
                        let _ = stop.wait_for(|stopping| *stopping).await;
                    };
                    if let Err(error) = bus.consume_private(&exchange, &keys, 64, handler, stopped).await {
                        tracing::warn!(%error, "console live events stopped");
                    }
                });
                Ok::<_, String>(sender)
            })
            .await?;
        Ok(sender.subscribe())
    }

    fn take_event(&self, sender: &broadcast::Sender<LiveEvent>, body: &[u8]) {
        let Ok(event) = CloudEvent::parse(body, protocol::event::DEFAULT_MAX_EVENT_BYTES) else { return };
        let Some(session) = event.subject.clone() else { return };
        let kind = match event.event_type.as_str() {
            "workspace.progress" => "progress",
            "container.stats" => "stats",
            _ => return,
        };
        let frame = json!({"type": kind, "session": session, "data": event.data});
        if kind == "progress" {
            let now = std::time::Instant::now();
            let mut kept = self.last_progress.lock().unwrap_or_else(PoisonError::into_inner);
            kept.retain(|_, (at, _)| now.duration_since(*at) < PROGRESS_KEPT_FOR);
            kept.insert(session.clone(), (now, frame.clone()));
        }
        let _ = sender.send(LiveEvent { session, frame });
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Every `berth_console` value in the request's `Cookie` headers.
fn cookie_values(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, value)| *name == COOKIE_NAME && !value.is_empty())
        .map(|(_, value)| value)
        .collect()
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Debug, Deserialize)]
struct LiveQuery {
    /// `1`: a workspace view is open, ask for container stats.
    stats: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LinkQuery {
    link: Option<String>,
}

/// `GET /console/signin?link=<token>`: `berth dev`'s one-click sign-in. The short-lived token is
/// exchanged once for the cookie and the browser is sent to `/`, so it leaves the address bar.
async fn signin_link(State(console): State<Arc<Console>>, Query(query): Query<LinkQuery>) -> Response {
    let Some(link) = query.link.filter(|link| !link.is_empty()) else {
        return error_page(StatusCode::BAD_REQUEST, "This sign-in link is incomplete.");
    };
    let identity = match console.app.config.authority.verify(&link) {
        Ok(identity) => identity,
        Err(failure) => {
            tracing::info!(reason = failure.label(), "refused a console sign-in link");
            return error_page(
                StatusCode::UNAUTHORIZED,
                "This sign-in link is not valid any more (links last a few minutes). Ask for a new one, or paste a token.",
            );
        }
    };
    if !console.claim_link(&link, identity.expires_at).await {
        return error_page(StatusCode::UNAUTHORIZED, "This sign-in link was already used. Ask for a new one, or paste a token.");
    }
    let (token, max_age) = console.cookie_token(&identity, &link);
    tracing::info!(user = %identity.user, "console sign-in by link");
    let mut response = StatusCode::SEE_OTHER.into_response();
    response.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/"));
    response.headers_mut().insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    with_cookie(response, &console.set_cookie(&token, max_age))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSignIn {
    token: String,
}

/// `POST /console/signin` `{"token": "…"}`: a pasted token becomes the cookie.
async fn signin_token(State(console): State<Arc<Console>>, headers: HeaderMap, body: Option<Json<TokenSignIn>>) -> Response {
    if !is_console_request(&headers) {
        return error(StatusCode::FORBIDDEN, "forbidden", "sign in from the console page");
    }
    let Some(Json(TokenSignIn { token })) = body else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "send {\"token\": \"…\"}");
    };
    let token = token.trim().trim_start_matches("Bearer ").trim().to_owned();
    let identity = match console.app.config.authority.verify(&token) {
        Ok(identity) => identity,
        Err(failure) => {
            let message = match failure.label() {
                "expired" => "That token has expired. Ask for a new one.",
                "missing" => "Paste a token first.",
                _ => "That token is not valid for this Berth.",
            };
            return error(StatusCode::UNAUTHORIZED, "unauthorized", message);
        }
    };
    let max_age = identity.expires_at.saturating_sub(unix_now());
    tracing::info!(user = %identity.user, "console sign-in by token");
    let body = Json(json!({"user": identity.user, "roles": identity.roles}));
    with_cookie(body.into_response(), &console.set_cookie(&token, max_age))
}

/// `POST /console/signout`: the cookie is cleared.
async fn signout(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if !is_console_request(&headers) {
        return error(StatusCode::FORBIDDEN, "forbidden", "sign out from the console page");
    }
    with_cookie(StatusCode::NO_CONTENT.into_response(), &console.clear_cookie())
}

/// `GET /console/me`: who is signed in, and a short-lived token for the door's routes.
async fn me(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if !is_console_request(&headers) {
        return error(StatusCode::FORBIDDEN, "forbidden", "only the console page may ask");
    }
    // Not signed in is an answer, not an error (a 401 would be a console error in the browser).
    let Some((identity, token)) = console.signed_in(&headers) else {
        let response = with_cookie(Json(json!({"signed_in": false})).into_response(), &console.clear_cookie());
        return response;
    };
    let remaining = identity.remaining_validity();
    let page_ttl = PAGE_TOKEN_TTL.min(remaining);
    let (page_token, expires_at) = match console.app.config.authority.mint(&identity.user, &identity.roles, page_ttl) {
        Ok(minted) if page_ttl.as_secs() > 0 => (minted, unix_now() + page_ttl.as_secs()),
        _ => (token, identity.expires_at),
    };
    let config = &console.app.config;
    let body = json!({
        "signed_in": true,
        "user": identity.user,
        "roles": identity.roles,
        "admin": identity.is_admin(),
        "token": page_token,
        "expires_at": expires_at,
        "signed_in_until": identity.expires_at,
        "profile": config.profile_name,
        "profiles": [config.profile_name],
        "timers": {
            "idle_after_secs": config.profile.timers.idle_after_secs,
            "stop_after_idle_secs": config.profile.timers.stop_after_idle_secs,
        },
    });
    let mut response = Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The caller of a console API route: `Authorization: Bearer` or a `bearer.` subprotocol.
fn bearer_identity(console: &Console, headers: &HeaderMap) -> Option<Identity> {
    let text = |name| headers.get(name).and_then(|value: &HeaderValue| value.to_str().ok());
    let token = token_from_request(text(header::AUTHORIZATION), text(header::SEC_WEBSOCKET_PROTOCOL), None)?;
    console.app.config.authority.verify(token).ok()
}

/// `GET /console/live/{id}[?stats=1]` (WebSocket, `bearer.<token>` subprotocol): the session's
/// workspace progress and, with `stats=1` (a workspace view), its container's stats every two
/// seconds while the socket is open.
async fn live(
    State(console): State<Arc<Console>>,
    Path(session): Path<String>,
    Query(query): Query<LiveQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let stats = if query.stats.as_deref() == Some("1") { Stats::Requested } else { Stats::NotRequested };
    let Some(identity) = bearer_identity(&console, &headers) else {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "send a bearer token");
    };
    if uuid::Uuid::parse_str(&session).is_err() {
        return error(StatusCode::NOT_FOUND, "not_found", "no such session among yours");
    }
    // A view opens the moment the open is answered, which can be before the session's record
    // is stored: a missing record is looked for again for a few seconds.
    let mut owner = None;
    for attempt in 0..RECORD_ATTEMPTS {
        match console.app.store.session(&session).await {
            Ok(Some(record)) => {
                owner = record.get("user").and_then(Value::as_str).map(str::to_owned);
                break;
            }
            Ok(None) if attempt + 1 < RECORD_ATTEMPTS => tokio::time::sleep(RECORD_RETRY).await,
            Ok(None) => {}
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the session records cannot be read right now"),
        }
    }
    if owner.as_deref() != Some(identity.user.as_str()) && !identity.is_admin() {
        return error(StatusCode::NOT_FOUND, "not_found", "no such session among yours");
    }
    let events = match console.live_events().await {
        Ok(events) => events,
        Err(error_text) => {
            tracing::warn!(error = %error_text, "console live events unavailable");
            return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "live updates are unavailable right now");
        }
    };
    let user = identity.user.clone();
    let lifetime = identity.remaining_validity();
    upgrade.protocols([SUBPROTOCOL]).on_upgrade(move |socket| run_live(console, socket, session, user, events, lifetime, stats))
}

/// Whether a live socket asks for container stats (a workspace view) or only shows progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stats {
    Requested,
    NotRequested,
}

async fn run_live(
    console: Arc<Console>,
    mut socket: WebSocket,
    session: String,
    user: String,
    mut events: broadcast::Receiver<LiveEvent>,
    lifetime: Duration,
    stats: Stats,
) {
    let last = console.last_progress.lock().unwrap_or_else(PoisonError::into_inner).get(&session).map(|(_, frame)| frame.clone());
    if let Some(frame) = last {
        if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
            return;
        }
    }
    let mut ticker = tokio::time::interval(STATS_INTERVAL);
    let ends = tokio::time::sleep(lifetime);
    tokio::pin!(ends);
    let mut stop = console.app.stop.clone();
    let stopped = async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = ticker.tick(), if stats == Stats::Requested => request_stats(&console.app, &user, &session).await,
            received = events.recv() => match received {
                Ok(event) if event.session == session => {
                    if socket.send(Message::Text(event.frame.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            () = &mut ends => {
                let _ = socket.send(Message::Close(Some(axum::extract::ws::CloseFrame { code: 1008, reason: "token expired".into() }))).await;
                return;
            }
            () = &mut stopped => {
                let _ = socket.send(Message::Close(Some(axum::extract::ws::CloseFrame { code: 1001, reason: "shutting down".into() }))).await;
                return;
            }
        }
    }
}

/// Publishes `session.stats`; the engine asks the container agent while the session runs and
/// the answer (`container.stats`) comes back on the live events.
async fn request_stats(app: &AppState, user: &str, session: &str) {
    let event = crate::socket::user_event(app, user, session, &protocol::events::SessionStats {});
    match tokio::time::timeout(Duration::from_secs(5), app.bus.publish_event_to(&app.config.events_exchange, &event)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(session_id = %session, %error, "could not ask for stats"),
        Err(_) => tracing::debug!(session_id = %session, "the broker did not confirm a stats request in time"),
    }
}

/// States after which a session holds nothing.
fn is_over(state: &str) -> bool {
    matches!(state, "closed" | "stopped" | "failed" | "recovered")
}

/// `GET /console/admin` (admin role): every session, host capacity, the queue, per-user counts.
async fn admin(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    let Some(identity) = bearer_identity(&console, &headers) else {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "send a bearer token");
    };
    if !identity.is_admin() {
        return error(StatusCode::FORBIDDEN, "forbidden", "the admin view needs the admin role");
    }
    let app = &console.app;
    let sessions = match app.store.sessions_of(None).await {
        Ok(records) => records,
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the session records cannot be read right now"),
    };
    let mut per_user: HashMap<String, (u64, u64)> = HashMap::new();
    for record in &sessions {
        let user = record.get("user").and_then(Value::as_str).unwrap_or("?").to_owned();
        let state = record.get("state").and_then(Value::as_str).unwrap_or("");
        let counts = per_user.entry(user).or_default();
        counts.1 += 1;
        if !is_over(state) {
            counts.0 += 1;
        }
    }
    let mut users: Vec<Value> =
        per_user.into_iter().map(|(user, (live, total))| json!({"user": user, "live": live, "total": total})).collect();
    users.sort_by(|a, b| a["user"].as_str().cmp(&b["user"].as_str()));
    let (committed, queue) = engine_counts(app).await;
    let limits = &app.config.profile.limits;
    let (memory_total, cpu_millis_total) = protocol::host::budget(&app.config.profile);
    let body = json!({
        "sessions": sessions,
        "users": users,
        "capacity": {
            "memory_mib_used": committed.as_ref().map(|(memory, _)| *memory),
            "memory_mib_total": memory_total,
            "cpu_millis_used": committed.as_ref().map(|(_, cpu)| *cpu),
            "cpu_millis_total": cpu_millis_total,
            "per_session": {"memory_mib": app.config.profile.container.memory_mib, "cpus": app.config.profile.container.cpus},
        },
        "queue": queue,
        "limits": {"max_sessions_per_user": limits.max_sessions_per_user, "max_opens_per_user_per_minute": limits.max_opens_per_user_per_minute},
    });
    let mut response = Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The engine's committed capacity (memory MiB, CPU millis) and its queue, from Redis; `None`
/// and an empty queue when Redis cannot be read.
async fn engine_counts(app: &AppState) -> (Option<(i64, i64)>, Vec<Value>) {
    let url = app.config.activity_redis_url.clone().unwrap_or_else(|| app.config.profile.services.redis_url.clone());
    let read = async {
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        // Committed per host (`capacity:<host>`) once hosts report, in `capacity` before: the sum.
        let mut keys = vec![format!("{ENGINE_REDIS_PREFIX}:capacity")];
        {
            let pattern = format!("{ENGINE_REDIS_PREFIX}:capacity:*");
            let mut per_host = redis::AsyncCommands::scan_match::<_, String>(&mut connection, pattern).await?;
            while let Some(key) = per_host.next_item().await {
                keys.push(key);
            }
        }
        let mut capacity: HashMap<String, i64> = HashMap::new();
        for key in keys {
            let held: HashMap<String, i64> = redis::cmd("HGETALL").arg(&key).query_async(&mut connection).await?;
            for (field, value) in held {
                *capacity.entry(field).or_insert(0) += value;
            }
        }
        let queued: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(format!("{ENGINE_REDIS_PREFIX}:queue:{SESSION_PATTERN}"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut connection)
            .await?;
        Ok::<_, redis::RedisError>((capacity, queued))
    };
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok((capacity, queued))) => {
            let committed = (capacity.get("memory").copied().unwrap_or(0).max(0), capacity.get("cpu").copied().unwrap_or(0).max(0));
            let queue = queued
                .into_iter()
                .enumerate()
                .map(|(index, (thred, since_ms))| json!({"position": index + 1, "thred": thred, "since_ms": since_ms as u64}))
                .collect();
            (Some(committed), queue)
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "console cannot read the engine's capacity");
            (None, Vec::new())
        }
        Err(_) => (None, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_origins() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, "a=1; berth_console=tok; b=2".parse().unwrap());
        headers.append(header::COOKIE, "berth_console=".parse().unwrap());
        assert_eq!(cookie_values(&headers), ["tok"]);
        headers.insert(header::HOST, "127.0.0.1:8700".parse().unwrap());
        assert!(same_origin(&headers), "no Origin: not a cross-site request");
        headers.insert(header::ORIGIN, "http://127.0.0.1:8700".parse().unwrap());
        assert!(same_origin(&headers));
        assert!(!is_console_request(&headers), "the console header is required");
        headers.insert(CONSOLE_HEADER, "1".parse().unwrap());
        assert!(is_console_request(&headers));
        headers.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!is_console_request(&headers));
    }

    #[test]
    fn every_asset_is_embedded_and_typed() {
        for (name, content_type, bytes) in ASSETS {
            assert!(!bytes.is_empty(), "{name}");
            assert!(content_type.contains('/'), "{name}");
        }
        assert!(INDEX_HTML.contains("/console/app.js"));
    }
}
