//! The authenticated reverse proxy to each session's service: `/s/{session}/…` and, with a base
//! domain, `{session}.{base_domain}`. Only the owner (or an admin) passes; a browser exchanges its
//! token once for a cookie scoped to that session; a paused session is woken by the request and the
//! request held until it runs; requests and client WebSocket frames count as activity, except on
//! the profile's background paths. See the crate's README ("Proxy"). `doors` forwards the
//! terminal and files of a session on another host to that host's door with the same forwarding.

mod cookie;
mod directory;
pub mod doors;
mod forward;
mod paths;
mod verified;
mod wsframes;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use protocol::events::{EventData, InputSource, SessionActivity};
use protocol::profile::ProxySettings;
use protocol::CloudEvent;
use serde_json::{json, Value};

use cookie::{cookie_values, set_cookie_header, CookieGrant, CookieScope};
pub use cookie::{CookieKey, COOKIE_NAME, COOKIE_SECRET_ENV};
use directory::{is_ended, Directory, Entry, Here, Route};
use paths::{is_background, query_without, session_of_host, split_session_path, upstream_path_and_query, PathPattern};

use crate::activity::Admission;
use crate::auth::{token_from_request, unix_now, AuthFailure, Identity};
use crate::metrics::bump;
use crate::server::AppState;

/// The query parameter of the first hop: `GET /s/{session}/?berth_token=<token>` sets the cookie
/// and redirects to the same address without it.
pub const TOKEN_PARAMETER: &str = "berth_token";
/// A wake is published again if the session is still idle this long after the last one.
const WAKE_REPEAT: Duration = Duration::from_secs(5);
/// How long publishing an event may wait for the broker's confirm.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// What a request through the proxy tells the engine.
const PROXY_ACTIVITY: SessionActivity = SessionActivity { source: InputSource::Proxy };
/// A held request reads the store again after this long without news (a lost notification).
const RECHECK_AFTER: Duration = Duration::from_secs(2);
/// How often unused sessions are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The proxy's part of the configuration: the profile's `[session.proxy]` and the cookie key.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub settings: ProxySettings,
    pub cookie_key: CookieKey,
}

impl ProxyConfig {
    pub fn new(settings: &ProxySettings, key: &crate::auth::KeyMaterial) -> ProxyConfig {
        ProxyConfig { settings: settings.clone(), cookie_key: CookieKey::from_key_material(key) }
    }
}

/// The proxy of one instance.
pub struct Proxy {
    state: Arc<AppState>,
    background: Vec<PathPattern>,
    directory: Arc<Directory>,
    client: forward::HttpClient,
    /// User tokens verified once (a keep-alive program sends the same one every time).
    tokens: verified::Verified<Identity>,
    /// Cookies verified once.
    cookies: verified::Verified<CookieGrant>,
}

/// How the request named its session.
#[derive(Debug, Clone)]
enum Routing {
    /// `/s/{session}{rest}`.
    Path { session: String, rest: String },
    /// `{session}.{base_domain}`.
    Host { session: String },
}

impl Routing {
    fn session(&self) -> &str {
        match self {
            Routing::Path { session, .. } | Routing::Host { session } => session,
        }
    }

    fn cookie_scope(&self) -> CookieScope<'_> {
        match self {
            Routing::Path { session, .. } => CookieScope::Path(session),
            Routing::Host { .. } => CookieScope::Host,
        }
    }
}

/// How the caller proved who they are.
enum Credential {
    Bearer(Identity),
    Cookie(CookieGrant),
}

impl Credential {
    fn identity(&self) -> &Identity {
        match self {
            Credential::Bearer(identity) => identity,
            Credential::Cookie(grant) => &grant.identity,
        }
    }
}

impl Proxy {
    /// The proxy for `state`'s instance; forgets unused sessions until the instance stops.
    pub fn new(state: Arc<AppState>) -> Arc<Proxy> {
        let settings = &state.config.proxy.settings;
        let background = settings.background_paths.iter().map(|pattern| PathPattern::new(pattern)).collect();
        let directory = Directory::new(state.hub.clone(), state.store.clone(), Here::this_machine(state.config.profile.host()));
        let proxy = Arc::new(Proxy {
            state: state.clone(),
            background,
            directory: directory.clone(),
            client: forward::client(),
            tokens: verified::Verified::new(),
            cookies: verified::Verified::new(),
        });
        let mut stop = state.stop.clone();
        tokio::spawn(async move {
            loop {
                let stopped = tokio::select! {
                    () = tokio::time::sleep(SWEEP_EVERY) => false,
                    _ = stop.wait_for(|stopped| *stopped) => true,
                };
                if stopped {
                    return;
                }
                directory.sweep().await;
            }
        });
        proxy
    }

    fn settings(&self) -> &ProxySettings {
        &self.state.config.proxy.settings
    }

    async fn serve(self: &Arc<Self>, routing: Routing, request: Request) -> Response {
        let session = routing.session().to_owned();
        let browser = wants_html(request.headers());
        if uuid::Uuid::parse_str(&session).is_err() {
            return not_found(&session, browser);
        }
        let query = request.uri().query().map(str::to_owned);
        if let Some(token) = query_parameter(query.as_deref(), TOKEN_PARAMETER) {
            if matches!(*request.method(), Method::GET | Method::HEAD) {
                let path = request.uri().path().to_owned();
                drop(request);
                return self.first_hop(&routing, &path, query.as_deref(), &token, browser).await;
            }
        }
        let credential = match self.credential(&session, request.headers()) {
            Ok(credential) => credential,
            Err(failure) => return unauthorized(&failure, browser),
        };
        let state_changing = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) || forward::wants_upgrade(&request);
        if matches!(credential, Credential::Cookie(_)) && state_changing && !same_origin(request.headers()) {
            tracing::info!(session_id = %session, "refused a cookie request from another origin");
            return answer(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a request with the session cookie must come from the session's own origin (Origin header)",
                browser,
                json!({}),
            );
        }
        let identity = credential.identity().clone();
        let entry = match self.authorize(&identity, &session, browser).await {
            Ok(entry) => entry,
            Err(response) => return response,
        };
        let original_path = request.uri().path().to_owned();
        let (rest, prefix) = match &routing {
            Routing::Path { rest, .. } => (Some(rest.as_str()), self.settings().strip_prefix.then(|| format!("/s/{session}"))),
            Routing::Host { .. } => (None, None),
        };
        let strip = self.settings().strip_prefix && matches!(routing, Routing::Path { .. });
        let path_and_query = upstream_path_and_query(&original_path, rest.or(Some(&original_path)), query.as_deref(), strip);
        let background = is_background(&self.background, &path_and_query);
        let route = match self.ready(&entry, &session, &identity, background, browser).await {
            Ok(route) => route,
            Err(response) => return response,
        };
        if !background {
            self.note_activity(&entry, &session, &identity.user);
        }
        let strip_authorization = match &credential {
            Credential::Bearer(_) => true,
            Credential::Cookie(_) => self.bearer_is_berths(request.headers()),
        };
        let forwarding = forward::Forwarding {
            upstream: route.upstream.clone(),
            path_and_query,
            prefix,
            user: identity.user.clone(),
            session: session.clone(),
            strip_authorization,
        };
        let upgrade = forward::wants_upgrade(&request);
        let outgoing = match forward::upstream_request(request, &forwarding) {
            Ok(outgoing) => outgoing,
            Err(message) => return answer(StatusCode::BAD_GATEWAY, "bad_gateway", &message, browser, json!({})),
        };
        let ticker = (!background).then(|| {
            let (proxy, entry) = (self.clone(), entry.clone());
            let (session, user) = (session.clone(), identity.user.clone());
            forward::Ticker::new(move || proxy.note_activity(&entry, &session, &user))
        });
        let forwarded = if upgrade {
            forward::tunnel_or(outgoing, &route.upstream, route.fallback.as_ref(), ticker).await
        } else {
            forward::http_or(&self.client, outgoing, route.fallback.as_ref(), ticker).await
        };
        let mut response = match forwarded {
            Ok(response) => response,
            Err(forward::Unreachable(reason)) => {
                tracing::warn!(session_id = %session, %reason, "a session's service did not answer the proxy");
                let message = format!("the session's service did not answer: {reason}");
                return answer(StatusCode::BAD_GATEWAY, "bad_gateway", &message, browser, json!({"session": session}));
            }
        };
        if let Credential::Cookie(grant) = &credential {
            self.renew_cookie(&routing, grant, response.headers_mut());
        }
        response
    }

    /// The first hop: a valid token for a session the caller may open becomes the cookie, and
    /// the browser is sent to the same address without the token.
    async fn first_hop(&self, routing: &Routing, path: &str, query: Option<&str>, token: &str, browser: bool) -> Response {
        let session = routing.session();
        let identity = match self.verify_token(token) {
            Ok(identity) => identity,
            Err(failure) => return unauthorized(&failure, browser),
        };
        if let Err(response) = self.authorize(&identity, session, browser).await {
            return response;
        }
        let Some(set_cookie) = self.cookie_for(routing, &identity) else {
            return answer(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not sign the session cookie", browser, json!({}));
        };
        let location = match query_without(query, TOKEN_PARAMETER) {
            Some(query) => format!("{path}?{query}"),
            None => path.to_owned(),
        };
        tracing::info!(user = %identity.user, session_id = %session, "exchanged a token for a proxy cookie");
        let mut response = StatusCode::SEE_OTHER.into_response();
        let headers = response.headers_mut();
        insert_text(headers, header::LOCATION, &location);
        insert_text(headers, header::SET_COOKIE, &set_cookie);
        // The token was in this address: keep it out of caches and of the next page's Referer.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        response
    }

    /// A `Set-Cookie` value for `routing`'s session, valid for the profile's lifetime and never past
    /// the token's.
    fn cookie_for(&self, routing: &Routing, identity: &Identity) -> Option<String> {
        let settings = self.settings();
        let ttl = Duration::from_secs(settings.cookie_ttl_secs);
        let (value, expires_at) = self.state.config.proxy.cookie_key.issue(identity, routing.session(), ttl, identity.expires_at)?;
        Some(set_cookie_header(&value, routing.cookie_scope(), expires_at.saturating_sub(unix_now()), settings.secure_cookies))
    }

    /// A cookie past half its lifetime is renewed on the response (never past its token's expiry).
    fn renew_cookie(&self, routing: &Routing, grant: &CookieGrant, headers: &mut HeaderMap) {
        let ttl = self.settings().cookie_ttl_secs;
        let left = grant.expires_at.saturating_sub(unix_now());
        if left * 2 >= ttl || grant.expires_at >= grant.cap {
            return;
        }
        let identity = Identity { expires_at: grant.cap, ..grant.identity.clone() };
        if let Some(set_cookie) = self.cookie_for(routing, &identity) {
            if let Ok(value) = HeaderValue::from_str(&set_cookie) {
                headers.append(header::SET_COOKIE, value);
            }
        }
    }

    fn verify_token(&self, token: &str) -> Result<Identity, AuthFailure> {
        let verified = self.check_token(token);
        if let Err(failure) = &verified {
            self.state.metrics.record_auth_failure(failure.label());
        }
        verified
    }

    /// A user token's identity: from the cache while it has not expired, else verified in full.
    fn check_token(&self, token: &str) -> Result<Identity, AuthFailure> {
        if let Some(identity) = self.tokens.get(token) {
            return Ok(identity);
        }
        let identity = self.state.config.authority.verify(token)?;
        self.tokens.put(token, identity.clone(), identity.expires_at);
        Ok(identity)
    }

    /// A cookie's grant for `session`: from the cache while it has not expired, else verified.
    fn check_cookie(&self, value: &str, session: &str) -> Option<CookieGrant> {
        if let Some(grant) = self.cookies.get(value) {
            return (grant.session == session).then_some(grant);
        }
        let grant = self.state.config.proxy.cookie_key.verify(value, session)?;
        self.cookies.put(value, grant.clone(), grant.expires_at);
        Some(grant)
    }

    /// The caller: a valid cookie for this session, else `Authorization: Bearer`.
    fn credential(&self, session: &str, headers: &HeaderMap) -> Result<Credential, AuthFailure> {
        let cookies = cookie_values(headers);
        if let Some(grant) = cookies.iter().find_map(|value| self.check_cookie(value, session)) {
            return Ok(Credential::Cookie(grant));
        }
        let authorization = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
        if let Some(token) = token_from_request(authorization, None, None) {
            return self.verify_token(token).map(Credential::Bearer);
        }
        let failure = if cookies.is_empty() { AuthFailure::MissingToken } else { AuthFailure::Expired };
        self.state.metrics.record_auth_failure(failure.label());
        Err(failure)
    }

    fn bearer_is_berths(&self, headers: &HeaderMap) -> bool {
        let authorization = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
        token_from_request(authorization, None, None).is_some_and(|token| self.check_token(token).is_ok())
    }

    /// The session if `identity` may use it; anyone else's is answered like a missing one.
    async fn authorize(&self, identity: &Identity, session: &str, browser: bool) -> Result<Arc<Entry>, Response> {
        match self.directory.lookup(session).await {
            Ok(Some(entry)) if entry.owner == identity.user || identity.is_admin() => Ok(entry),
            Ok(Some(_)) => {
                tracing::info!(user = %identity.user, session_id = %session, "refused proxy access to another user's session");
                Err(not_found(session, browser))
            }
            Ok(None) => Err(not_found(session, browser)),
            Err(error) => {
                let message = format!("cannot check the session: {error}");
                Err(answer(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &message, browser, json!({})))
            }
        }
    }

    /// Waits until the session runs (waking it if paused), within `start_wait_secs`.
    async fn ready(&self, entry: &Entry, session: &str, identity: &Identity, background: bool, browser: bool) -> Result<Route, Response> {
        let wait = Duration::from_secs(self.settings().start_wait_secs);
        let deadline = tokio::time::Instant::now() + wait;
        let mut views = entry.subscribe();
        loop {
            let view = views.borrow_and_update().clone();
            match view.state.as_str() {
                "running" => {
                    if let Some(upstream) = view.upstream {
                        return Ok(upstream);
                    }
                }
                // Paused, or dormant (stopped with its directory kept): a wake is the user's call.
                state @ ("idle" | "dormant") if background => {
                    let message = "the session is paused; background requests do not wake it";
                    let mut response =
                        answer(StatusCode::SERVICE_UNAVAILABLE, "idle", message, browser, json!({"session": session, "state": state}));
                    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
                    return Err(response);
                }
                "idle" | "dormant" if entry.claim_wake(WAKE_REPEAT) => {
                    tracing::debug!(session_id = %session, "waking a paused session for a request");
                    if let Err(message) = self.publish(session, &identity.user, &PROXY_ACTIVITY).await {
                        return Err(answer(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &message, browser, json!({"session": session})));
                    }
                }
                // A wake was asked for moments ago: wait for it like everyone else.
                "idle" | "dormant" => {}
                state if is_ended(state) => {
                    let message = format!("session {session} is closed ({state}); open the workspace again");
                    return Err(answer(StatusCode::GONE, "session_closed", &message, browser, json!({"session": session, "state": state})));
                }
                state @ ("stopping" | "saving" | "sync_backoff" | "removing_container" | "removing_workspace") => {
                    let message = format!("session {session} is closing ({state}); open the workspace again");
                    return Err(answer(
                        StatusCode::GONE,
                        "session_closing",
                        &message,
                        browser,
                        json!({"session": session, "state": state}),
                    ));
                }
                // Queued, materializing, provisioning, their backoffs: wait for it to run.
                _ => {}
            }
            let recheck = (tokio::time::Instant::now() + RECHECK_AFTER).min(deadline);
            match tokio::time::timeout_at(recheck, views.changed()).await {
                Ok(Ok(())) => continue,
                Err(_) if recheck < deadline => {
                    self.directory.refresh(entry, session).await;
                    continue;
                }
                Ok(Err(_)) | Err(_) => {
                    let state = views.borrow().state.clone();
                    let message = format!("session {session} did not start running within {} s (it is {state}); try again", wait.as_secs());
                    let mut response = answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_ready",
                        &message,
                        browser,
                        json!({"session": session, "state": state}),
                    );
                    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                    return Err(response);
                }
            }
        }
    }

    /// Real use of the session: one debounced `session.activity` per interval (published in the
    /// background, so the request does not wait for the broker).
    /// Within the gate's interval after the proxy's own published activity, the gate would only
    /// debounce: that is counted here without a task.
    fn note_activity(self: &Arc<Self>, entry: &Arc<Entry>, session: &str, user: &str) {
        if entry.activity_published_within(self.state.config.activity_debounce) {
            bump(&self.state.metrics.activity_debounced);
            return;
        }
        let (proxy, entry) = (self.clone(), entry.clone());
        let (session, user) = (session.to_owned(), user.to_owned());
        tokio::spawn(async move {
            let asked_at = tokio::time::Instant::now();
            if proxy.state.activity.admit(&session).await == Admission::Debounced {
                bump(&proxy.state.metrics.activity_debounced);
                return;
            }
            match proxy.publish(&session, &user, &PROXY_ACTIVITY).await {
                Ok(()) => {
                    entry.activity_published_at(asked_at);
                    bump(&proxy.state.metrics.activity_events_published)
                }
                Err(message) => {
                    tracing::warn!(session_id = %session, %message, "proxy activity not published");
                    proxy.state.activity.forget(&session).await;
                }
            }
        });
    }

    async fn publish<T: EventData>(&self, session: &str, user: &str, data: &T) -> Result<(), String> {
        let config = &self.state.config;
        let event_type = T::KIND;
        let event = CloudEvent::of(&config.event_source, Some(session), data).with_extension("userid", user);
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.state.bus.publish_event_to(&config.events_exchange, &event)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("could not publish {event_type}: {error}")),
            Err(_) => Err(format!("the broker did not confirm {event_type} in time")),
        }
    }
}

/// The proxy's routes: `/s/{session}/…` and the token exchange.
pub fn routes(proxy: Arc<Proxy>) -> Router {
    Router::new().route("/s/{*rest}", any(by_path)).route("/api/sessions/{id}/cookie", post(exchange)).with_state(proxy)
}

/// Middleware in front of every route: a request for `{session}.{base_domain}` goes to the proxy
/// whatever its path (the app owns that host).
pub async fn route_by_host(State(proxy): State<Arc<Proxy>>, request: Request, next: Next) -> Response {
    let session = proxy.settings().base_domain.as_deref().and_then(|base_domain| {
        let host = request.headers().get(header::HOST).and_then(|value| value.to_str().ok()).or_else(|| request.uri().host())?;
        session_of_host(&host.to_ascii_lowercase(), base_domain).map(str::to_owned)
    });
    match session {
        Some(session) => proxy.serve(Routing::Host { session }, request).await,
        None => next.run(request).await,
    }
}

async fn by_path(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let Some((session, rest)) = split_session_path(&path) else {
        return not_found("", wants_html(request.headers()));
    };
    let Some(rest) = rest else {
        // `/s/{session}` → `/s/{session}/`, so relative links in the app resolve under the prefix.
        let location = match request.uri().query() {
            Some(query) => format!("{path}/?{query}"),
            None => format!("{path}/"),
        };
        let mut response = StatusCode::PERMANENT_REDIRECT.into_response();
        insert_text(response.headers_mut(), header::LOCATION, &location);
        return response;
    };
    let routing = Routing::Path { session: session.to_owned(), rest: rest.to_owned() };
    proxy.serve(routing, request).await
}

/// `POST /api/sessions/{id}/cookie` with `Authorization: Bearer`: sets the path cookie for that
/// session and says where to go (the console's way in without a token in any address).
async fn exchange(
    State(proxy): State<Arc<Proxy>>,
    axum::extract::Path(session): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
    let identity = match token_from_request(authorization, None, None).map(|token| proxy.verify_token(token)) {
        Some(Ok(identity)) => identity,
        Some(Err(failure)) => return unauthorized(&failure, false),
        None => return unauthorized(&AuthFailure::MissingToken, false),
    };
    if uuid::Uuid::parse_str(&session).is_err() {
        return not_found(&session, false);
    }
    if let Err(response) = proxy.authorize(&identity, &session, false).await {
        return response;
    }
    let routing = Routing::Path { session: session.clone(), rest: "/".to_owned() };
    let Some(set_cookie) = proxy.cookie_for(&routing, &identity) else {
        return answer(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not sign the session cookie", false, json!({}));
    };
    let ttl = proxy.settings().cookie_ttl_secs;
    let expires_at = (unix_now() + ttl).min(identity.expires_at);
    let host_url = proxy.settings().base_domain.as_ref().map(|domain| format!("//{session}.{domain}/?{TOKEN_PARAMETER}=<token>"));
    let body = json!({"session": session, "path": format!("/s/{session}/"), "expires_at": expires_at, "host_url": host_url});
    let mut response = (StatusCode::OK, axum::Json(body)).into_response();
    insert_text(response.headers_mut(), header::SET_COOKIE, &set_cookie);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn insert_text(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// A raw query's parameter (tokens need no percent-decoding).
fn query_parameter(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.split_once('=').filter(|(key, _)| *key == name).map(|(_, value)| value.to_owned()))
        .filter(|value| !value.is_empty())
}

/// `Origin`'s host and port are the request's `Host`: a page of this very origin sent it.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).and_then(|value: &HeaderValue| value.to_str().ok());
    let (Some(origin), Some(host)) = (text(header::ORIGIN), text(header::HOST)) else { return false };
    origin.split_once("://").is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|value| value.to_str().ok()).is_some_and(|accept| accept.contains("text/html"))
}

fn not_found(session: &str, browser: bool) -> Response {
    let message = format!("no session {session} among yours");
    answer(StatusCode::NOT_FOUND, "not_found", &message, browser, json!({}))
}

fn unauthorized(failure: &AuthFailure, browser: bool) -> Response {
    let message = match failure {
        AuthFailure::MissingToken => {
            "sign in: open the session from the Berth console, add ?berth_token=<token> once, or send Authorization: Bearer <token>"
                .to_owned()
        }
        AuthFailure::Expired => "the session cookie or token expired (or belongs to another session): open the session again".to_owned(),
        other => other.to_string(),
    };
    let mut response = answer(StatusCode::UNAUTHORIZED, "unauthorized", &message, browser, json!({"reason": failure.label()}));
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// An answer of the proxy itself: a small HTML page for browsers, JSON otherwise.
fn answer(status: StatusCode, code: &str, message: &str, browser: bool, extra: Value) -> Response {
    let mut response = if browser {
        let escaped = html_escape(message);
        let title = html_escape(status.canonical_reason().unwrap_or("Berth"));
        let page = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head><body><h1>{title}</h1><p>{escaped}</p><p><small>Berth ({code})</small></p></body></html>\n"
        );
        (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
    } else {
        let mut body = json!({"error": code, "message": message});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        (status, axum::Json(body)).into_response()
    };
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_queries() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("berth.example:8700"));
        assert!(!same_origin(&headers));
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://berth.example:8700"));
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(!same_origin(&headers));
        headers.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&headers));
        assert_eq!(query_parameter(Some("a=1&berth_token=t.o.k"), TOKEN_PARAMETER).as_deref(), Some("t.o.k"));
        assert_eq!(query_parameter(Some("berth_token="), TOKEN_PARAMETER), None);
    }

    #[test]
    fn answers_suit_the_client() {
        let html = answer(StatusCode::GONE, "session_closed", "a <b>", true, json!({}));
        assert_eq!(html.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let json_answer = answer(StatusCode::GONE, "session_closed", "x", false, json!({"state": "closed"}));
        assert_eq!(json_answer.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(html_escape("<a&\">"), "&lt;a&amp;&quot;&gt;");
    }
}
