//! The HTTP twin of the WebSocket protocol (`/api/sessions…`): open (idempotent with an
//! `Idempotency-Key`), read, close and report activity with JSON; errors carry the WebSocket
//! protocol's codes. Also what the files API and the terminal share: who is calling, and whether
//! the session they name is theirs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bollard::Docker;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::time::Instant;
use utoipa::ToSchema;

use crate::activity::Admission;
use crate::auth::Identity;
use crate::frames::{validate_workspace_id, ErrorCode, ServerFrame, SessionStatus};
use crate::server::{authenticate, query_parameter, unauthorized, AppState};
use crate::socket::{publish_for_user, report_activity, request_open};
use protocol::events::{InputSource, SessionClose, SessionKeepalive};

/// The header that makes `POST /api/sessions` idempotent.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Set on a response replayed for a repeated `Idempotency-Key`.
pub const IDEMPOTENT_REPLAY_HEADER: &str = "idempotent-replayed";
/// How long an `Idempotency-Key` and its answer are kept.
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long Redis may take before an idempotent open answers `unavailable`.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a request repeating a key still in progress looks for the first one's answer.
const IDEMPOTENCY_POLL: Duration = Duration::from_millis(100);

/// Why a request was refused: the WebSocket protocol's codes, plus those only HTTP needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// Malformed request, invalid id, workspace, profile or path (`..`, empty segments…). 400.
    BadRequest,
    /// WebSocket only: a text frame over `max_frame_bytes`.
    FrameTooLarge,
    /// Too many requests. 429.
    RateLimited,
    /// No such session among those the caller may see (another user's looks the same), or no
    /// such file. 404.
    NotFound,
    /// The broker, the store, Redis or Docker did not answer; retry. 503.
    Unavailable,
    /// The open was sent but the engine did not answer in time: watch the session (named in
    /// `session`) rather than sending it again. 504.
    Timeout,
    /// No valid token. 401 with `WWW-Authenticate: Bearer`.
    Unauthorized,
    /// Valid token, but not allowed (another user's list without the admin role). 403.
    Forbidden,
    /// The session or the file is not in a state for this (a terminal on a paused session, a
    /// write while it stops, a name already taken, a folder not empty, a key reused). 409.
    Conflict,
    /// The upload is over the largest file the files API takes. 413.
    PayloadTooLarge,
    /// The upload would take the workspace over its quota (`workspace.quota_mib`). 507.
    QuotaExceeded,
    /// The path is a symlink (never followed), a FIFO, socket or device, or Berth's reserved
    /// `.berth`: refused by the workspace's path safety. 403.
    UnsafePath,
    /// Something failed on the server's side (file-system trouble); the message says what. 500.
    Internal,
    /// The engine refused an open over a per-user limit, named in `limit` (`sessions_per_user`,
    /// `opens_per_minute`, `daily_budget`, `monthly_budget`). 429.
    LimitExceeded,
    /// The open waited in the capacity queue too long and was given up. 503.
    QueueTimeout,
    /// The session runs on another host whose door (session agent) announces no address or does
    /// not answer, so its terminal and files cannot be reached from here; retry later. 503.
    HostUnreachable,
}

impl From<ErrorCode> for ApiErrorCode {
    fn from(code: ErrorCode) -> ApiErrorCode {
        match code {
            ErrorCode::BadRequest => ApiErrorCode::BadRequest,
            ErrorCode::FrameTooLarge => ApiErrorCode::FrameTooLarge,
            ErrorCode::RateLimited => ApiErrorCode::RateLimited,
            ErrorCode::NotFound => ApiErrorCode::NotFound,
            ErrorCode::Unavailable => ApiErrorCode::Unavailable,
            ErrorCode::Timeout => ApiErrorCode::Timeout,
            ErrorCode::LimitExceeded => ApiErrorCode::LimitExceeded,
            ErrorCode::QueueTimeout => ApiErrorCode::QueueTimeout,
        }
    }
}

impl ApiErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ApiErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ApiErrorCode::FrameTooLarge | ApiErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiErrorCode::RateLimited | ApiErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ApiErrorCode::NotFound => StatusCode::NOT_FOUND,
            ApiErrorCode::Unavailable | ApiErrorCode::QueueTimeout | ApiErrorCode::HostUnreachable => StatusCode::SERVICE_UNAVAILABLE,
            ApiErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiErrorCode::Forbidden | ApiErrorCode::UnsafePath => StatusCode::FORBIDDEN,
            ApiErrorCode::Conflict => StatusCode::CONFLICT,
            ApiErrorCode::QuotaExceeded => StatusCode::INSUFFICIENT_STORAGE,
            ApiErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Every error body of the HTTP API: `{"error": "<code>", "message": "…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// The code, the same as the WebSocket protocol's where both have it.
    #[serde(rename = "error")]
    pub code: ApiErrorCode,
    pub message: String,
    /// The session the request was about, when the caller could not know it (an open that timed
    /// out names the id it asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// With `unauthorized`: why (`missing`, `expired`, `signature`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// With `limit_exceeded`: which limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
}

impl ApiError {
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), session: None, reason: None, limit: None }
    }

    /// The HTTP form of a WebSocket error reply.
    pub(crate) fn from_frame(frame: ServerFrame) -> ApiError {
        match frame {
            ServerFrame::Error { code, message, session, limit, .. } => {
                ApiError { code: code.into(), message, session, reason: None, limit }
            }
            other => ApiError::new(ApiErrorCode::Internal, format!("unexpected reply {}", other.to_text())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code.status(), Json(self)).into_response()
    }
}

/// What the HTTP API needs beyond the WebSocket side: the idempotency keys and Docker.
pub struct ApiResources {
    idempotency: IdempotencyStore,
    docker: tokio::sync::OnceCell<Docker>,
}

impl std::fmt::Debug for ApiResources {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ApiResources").field("docker", &self.docker.initialized()).finish_non_exhaustive()
    }
}

impl ApiResources {
    /// Connects to Redis for idempotency keys (per instance when it is unreachable); Docker is
    /// connected on the first terminal, so an instance without Docker still serves everything else.
    pub async fn connect(redis_url: Option<&str>) -> ApiResources {
        ApiResources { idempotency: IdempotencyStore::connect(redis_url).await, docker: tokio::sync::OnceCell::new() }
    }

    /// The Docker engine the container agent uses (`DOCKER_HOST` or the local socket).
    pub(crate) async fn docker(&self) -> Result<&Docker, ApiError> {
        self.docker
            .get_or_try_init(container::connect_docker)
            .await
            .map_err(|error| ApiError::new(ApiErrorCode::Unavailable, format!("cannot reach Docker: {error}")))
    }
}

/// Who is calling: the JWT from `Authorization: Bearer`, a `bearer.<token>` WebSocket
/// subprotocol or `?access_token=`, exactly as for `/ws`.
///
/// The reverse proxy's session cookie (`berth_proxy`, from its token exchange) is not accepted:
/// it is scoped to `/s/{session}` or to the session's own host, so a browser never sends it to
/// `/api/…`, and a cookie here would also need the proxy's Origin check on every write. Should the
/// API ever take one, this is the one place: accept it for `session`, and only that one.
// The error is the HTTP answer itself, built once per refused request.
#[allow(clippy::result_large_err)]
pub(crate) fn caller(state: &AppState, headers: &HeaderMap, query: Option<&str>) -> Result<Identity, Response> {
    authenticate(state, headers, query).map_err(|failure| unauthorized(&failure))
}

/// The authenticated caller as a handler's argument: [`caller`] runs before the handler, and a
/// request without a valid token gets its 401 without reaching it.
pub(crate) struct Caller(pub Identity);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Caller, Response> {
        caller(state, &parts.headers, parts.uri.query()).map(Caller)
    }
}

/// A session the caller may see and control, from its record in the store.
#[derive(Debug, Clone)]
pub(crate) struct OwnedSession {
    pub(crate) id: String,
    pub(crate) record: Value,
}

impl OwnedSession {
    pub(crate) fn state(&self) -> &str {
        self.record.get("state").and_then(Value::as_str).unwrap_or("unknown")
    }

    /// The host the engine placed the session on (`None`: one-host deployments, where no host
    /// reports, and records written before hosts existed).
    pub(crate) fn host_id(&self) -> Option<&str> {
        self.record.get("host_id").and_then(Value::as_str).filter(|host| !host.is_empty())
    }

    /// The session's container: its recorded id (set from `container.ready`; a claimed warm-pool
    /// container keeps its pool name, so only the id finds it), else the name the container agent
    /// gives a session's own container.
    pub(crate) fn container(&self) -> String {
        self.record
            .get("container_id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map_or_else(|| container::spec::container_name(&self.id), str::to_owned)
    }
}

/// The session `session` if the caller owns it (or is an admin). Someone else's session is
/// answered exactly like a missing one, so ids cannot be probed.
pub(crate) async fn owned_session(state: &AppState, identity: &Identity, session: &str) -> Result<OwnedSession, ApiError> {
    let not_found = || ApiError::new(ApiErrorCode::NotFound, format!("no session {session} among yours"));
    if let Err(error) = protocol::ids::SessionId::parse(session) {
        return Err(ApiError::new(ApiErrorCode::BadRequest, error.to_string()));
    }
    let record = match state.store.session(session).await {
        Ok(Some(record)) => record,
        Ok(None) => return Err(not_found()),
        Err(error) => return Err(ApiError::new(ApiErrorCode::Unavailable, format!("cannot read the session: {error}"))),
    };
    let owner = record.get("user").and_then(Value::as_str).ok_or_else(not_found)?;
    if owner != identity.user && !identity.is_admin() {
        tracing::info!(user = %identity.user, session_id = %session, "refused access to another user's session");
        return Err(not_found());
    }
    Ok(OwnedSession { id: session.to_owned(), record })
}

/// `POST /api/sessions`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// 1-128 of `A-Za-z0-9-_.`, not starting with `.`.
    pub workspace: String,
    /// This deployment's profile; absent = this deployment's.
    #[serde(default)]
    pub profile: Option<String>,
}

/// The session an open is bound to: a new one (`joined: false`, 201) or the workspace's live
/// session (`joined: true`, 200). Use `session` from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OpenResponse {
    pub session: String,
    /// The state the engine's answer named (`materializing` for a new session).
    pub state: String,
    pub joined: bool,
    /// With `state: "queued"`: the place in the capacity queue (1 = next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
}

/// `GET /api/sessions`'s body.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionStatus>,
}

/// `DELETE /api/sessions/{id}`'s body: `session.close` was published.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CloseResponse {
    pub session: String,
}

/// `POST /api/sessions/{id}/activity`'s body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ActivityResponse {
    pub session: String,
    /// `true`: folded into an event already published within the debounce interval.
    pub debounced: bool,
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| ApiError::new(ApiErrorCode::BadRequest, format!("body: {error}")))
}

/// `POST /api/sessions`: the HTTP form of the `open` frame.
#[utoipa::path(
    post, path = "/api/sessions", tag = "sessions",
    request_body = OpenRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "1-255 visible ASCII characters. A repeated key (same user) answers what the first request answered, with `Idempotent-Replayed: true`, and publishes nothing; the same key with another body is refused (409). Kept 24 h.")),
    responses(
        (status = 201, description = "A new session was started", body = OpenResponse),
        (status = 200, description = "The open joined the workspace's live session", body = OpenResponse),
        (status = 400, description = "Malformed body, invalid workspace or profile", body = ApiError),
        (status = 401, description = "No valid token", body = ApiError),
        (status = 409, description = "The Idempotency-Key is in use by a request still running, or was used with another body", body = ApiError),
        (status = 503, description = "The broker or Redis did not answer", body = ApiError),
        (status = 504, description = "The open was sent, the engine did not answer in time; `session` names the requested id", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn open_session(
    State(state): State<Arc<AppState>>,
    Caller(identity): Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: OpenRequest = match json_body(&body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    if let Err(message) = validate_workspace_id(&request.workspace) {
        return ApiError::new(ApiErrorCode::BadRequest, message).into_response();
    }
    let profile = request.profile.clone().unwrap_or_else(|| state.config.profile_name.clone());
    let key = match headers.get(IDEMPOTENCY_KEY_HEADER).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.len() <= 255 && key.bytes().all(|byte| byte.is_ascii_graphic()) => Some(key.to_owned()),
        Some(_) => {
            return ApiError::new(ApiErrorCode::BadRequest, "Idempotency-Key must be 1-255 visible ASCII characters").into_response()
        }
    };
    let Some(key) = key else {
        return match open_once(&state, &identity, &request.workspace, &profile).await {
            OpenAttempt::NotSent(error) => error.into_response(),
            OpenAttempt::Answered(answer) => answer.into_response(),
        };
    };
    let fingerprint = json!({"workspace": request.workspace, "profile": profile}).to_string();
    idempotent_open(&state, &identity, &key, &fingerprint, &request.workspace, &profile).await
}

/// What an open's HTTP answer is, in a form that can be stored and replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredAnswer {
    status: u16,
    body: Value,
}

impl IntoResponse for StoredAnswer {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let location = self
            .body
            .get("session")
            .and_then(Value::as_str)
            .filter(|_| status.is_success())
            .map(|session| format!("/api/sessions/{session}"));
        let mut response = (status, Json(self.body)).into_response();
        if let Some(location) = location.and_then(|location| HeaderValue::from_str(&location).ok()) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        response
    }
}

enum OpenAttempt {
    /// Refused before `session.open` went out: nothing happened, the same request may be retried.
    NotSent(ApiError),
    /// `session.open` was published: the engine's answer, or the timeout.
    Answered(StoredAnswer),
}

/// Publishes one open with the logic the socket's `open` frame uses, and waits for its answer.
async fn open_once(state: &Arc<AppState>, identity: &Identity, workspace: &str, profile: &str) -> OpenAttempt {
    // The engine answers with a notification to the user: their key is bound here while it waits.
    let (connection_id, _status_frames) = match state.hub.attach(&identity.user).await {
        Ok(attached) => attached,
        Err(error) => {
            return OpenAttempt::NotSent(ApiError::new(ApiErrorCode::Unavailable, format!("cannot receive the engine's answer: {error}")))
        }
    };
    let outcome = match request_open(state, &identity.user, None, workspace, profile).await {
        Ok(opened) => Ok(opened.answer.await),
        Err(refusal) => Err(refusal),
    };
    state.hub.detach(connection_id).await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(refusal) => return OpenAttempt::NotSent(ApiError::from_frame(refusal)),
    };
    let answer = match (outcome.reply, outcome.session) {
        (ServerFrame::Ok { joined, position, .. }, Some(session)) => {
            let joined = joined.unwrap_or(false);
            let body = OpenResponse { session, state: outcome.state.unwrap_or_else(|| "unknown".to_owned()), joined, position };
            let status = if joined { StatusCode::OK } else { StatusCode::CREATED };
            stored_answer(status, &body)
        }
        (reply, _) => {
            let error = ApiError::from_frame(reply);
            stored_answer(error.code.status(), &error)
        }
    };
    OpenAttempt::Answered(answer)
}

/// `body` as a stored answer; one that does not serialize is a 500 saying so, never an empty body.
fn stored_answer(status: StatusCode, body: &impl Serialize) -> StoredAnswer {
    match serde_json::to_value(body) {
        Ok(body) => StoredAnswer { status: status.as_u16(), body },
        Err(error) => {
            tracing::error!(%error, "an open's answer did not serialize");
            let message = format!("the answer could not be encoded: {error}");
            StoredAnswer { status: StatusCode::INTERNAL_SERVER_ERROR.as_u16(), body: json!({"error": "internal", "message": message}) }
        }
    }
}

/// An entry of the idempotency store: the first request is still running, or its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
enum IdempotencyEntry {
    Running { fingerprint: String },
    Answered { fingerprint: String, answer: StoredAnswer },
}

async fn idempotent_open(
    state: &Arc<AppState>,
    identity: &Identity,
    key: &str,
    fingerprint: &str,
    workspace: &str,
    profile: &str,
) -> Response {
    let store = &state.api.idempotency;
    let storage_key = format!("berth:session-idempotency:{}:{key}", identity.user);
    let unavailable =
        |error: String| ApiError::new(ApiErrorCode::Unavailable, format!("idempotency keys unavailable: {error}")).into_response();
    // The claim outlives the longest an open can take, so a crashed instance's claim expires.
    let claim_ttl = state.config.open_answer_timeout + Duration::from_secs(30);
    let running = IdempotencyEntry::Running { fingerprint: fingerprint.to_owned() };
    let claim = match serde_json::to_string(&running) {
        Ok(claim) => claim,
        Err(error) => return unavailable(format!("cannot encode the claim: {error}")),
    };
    match store.claim(&storage_key, &claim, claim_ttl).await {
        Ok(true) => {
            match open_once(state, identity, workspace, profile).await {
                OpenAttempt::NotSent(error) => {
                    // Nothing happened: the key is free for a retry.
                    store.release(&storage_key).await;
                    error.into_response()
                }
                OpenAttempt::Answered(answer) => {
                    let entry = IdempotencyEntry::Answered { fingerprint: fingerprint.to_owned(), answer: answer.clone() };
                    match serde_json::to_string(&entry) {
                        Ok(text) => {
                            if let Err(error) = store.put(&storage_key, &text, IDEMPOTENCY_TTL).await {
                                tracing::warn!(user = %identity.user, %error, "could not record an idempotent open's answer");
                            }
                        }
                        // Never an empty record: the claim goes, and a retry opens (and joins) again.
                        Err(error) => {
                            tracing::error!(user = %identity.user, %error, "an idempotent open's answer did not serialize");
                            store.release(&storage_key).await;
                        }
                    }
                    answer.into_response()
                }
            }
        }
        Ok(false) => {
            // Someone sent this key before: answer what they got, once they got it.
            let deadline = Instant::now() + claim_ttl;
            loop {
                let entry = match store.get(&storage_key).await {
                    Ok(Some(text)) => serde_json::from_str::<IdempotencyEntry>(&text).ok(),
                    Ok(None) => None,
                    Err(error) => return unavailable(error),
                };
                let entry_fingerprint = match &entry {
                    Some(IdempotencyEntry::Running { fingerprint } | IdempotencyEntry::Answered { fingerprint, .. }) => {
                        Some(fingerprint.as_str())
                    }
                    None => None,
                };
                if entry_fingerprint.is_some_and(|found| found != fingerprint) {
                    return ApiError::new(ApiErrorCode::Conflict, "this Idempotency-Key was used with another request body")
                        .into_response();
                }
                match entry {
                    Some(IdempotencyEntry::Answered { answer, .. }) => {
                        let mut response = answer.into_response();
                        response.headers_mut().insert(IDEMPOTENT_REPLAY_HEADER, HeaderValue::from_static("true"));
                        return response;
                    }
                    // Released (the first attempt sent nothing) or expired: try it ourselves.
                    None => return Box::pin(idempotent_open(state, identity, key, fingerprint, workspace, profile)).await,
                    Some(IdempotencyEntry::Running { .. }) if Instant::now() >= deadline => {
                        return ApiError::new(ApiErrorCode::Conflict, "a request with this Idempotency-Key is still running")
                            .into_response();
                    }
                    Some(IdempotencyEntry::Running { .. }) => tokio::time::sleep(IDEMPOTENCY_POLL).await,
                }
            }
        }
        Err(error) => unavailable(error),
    }
}

/// Idempotency keys in Redis (shared by every instance), or in this instance's memory when Redis
/// was unreachable at start.
struct IdempotencyStore {
    shared: Option<ConnectionManager>,
    local: Mutex<HashMap<String, (Instant, String)>>,
}

impl IdempotencyStore {
    async fn connect(redis_url: Option<&str>) -> IdempotencyStore {
        let shared = match redis_url {
            None => None,
            Some(url) => {
                let connecting = async { redis::Client::open(url)?.get_connection_manager().await };
                match tokio::time::timeout(REDIS_TIMEOUT, connecting).await {
                    Ok(Ok(manager)) => Some(manager),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "redis unavailable; idempotency keys are kept per instance");
                        None
                    }
                    Err(_) => {
                        tracing::warn!("redis did not answer; idempotency keys are kept per instance");
                        None
                    }
                }
            }
        };
        IdempotencyStore { shared, local: Mutex::new(HashMap::new()) }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, String)>> {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        local.retain(|_, (expires, _)| *expires > now);
        local
    }

    async fn query<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Result<T, String> {
        let Some(manager) = &self.shared else { return Err("no redis".to_owned()) };
        let mut manager = manager.clone();
        match tokio::time::timeout(REDIS_TIMEOUT, command.query_async::<T>(&mut manager)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("redis did not answer in time".to_owned()),
        }
    }

    /// Sets `key` if it is free; `Ok(false)` when it is taken.
    async fn claim(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, String> {
        if self.shared.is_none() {
            let mut local = self.local();
            if local.contains_key(key) {
                return Ok(false);
            }
            local.insert(key.to_owned(), (Instant::now() + ttl, value.to_owned()));
            return Ok(true);
        }
        let mut command = redis::cmd("SET");
        command.arg(key).arg(value).arg("NX").arg("PX").arg(millis(ttl));
        self.query::<Option<String>>(command).await.map(|set| set.is_some())
    }

    async fn get(&self, key: &str) -> Result<Option<String>, String> {
        if self.shared.is_none() {
            return Ok(self.local().get(key).map(|(_, value)| value.clone()));
        }
        let mut command = redis::cmd("GET");
        command.arg(key);
        self.query::<Option<String>>(command).await
    }

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), String> {
        if self.shared.is_none() {
            self.local().insert(key.to_owned(), (Instant::now() + ttl, value.to_owned()));
            return Ok(());
        }
        let mut command = redis::cmd("SET");
        command.arg(key).arg(value).arg("PX").arg(millis(ttl));
        self.query::<String>(command).await.map(drop)
    }

    async fn release(&self, key: &str) {
        if self.shared.is_none() {
            self.local().remove(key);
            return;
        }
        let mut command = redis::cmd("DEL");
        command.arg(key);
        if let Err(error) = self.query::<i64>(command).await {
            tracing::warn!(%error, "could not release an idempotency key; it expires by itself");
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `GET /api/sessions/{id}`: one session's current state.
#[utoipa::path(
    get, path = "/api/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "The session's current state, from the store", body = SessionStatus),
        (status = 401, description = "No valid token", body = ApiError),
        (status = 404, description = "No such session among yours", body = ApiError),
        (status = 503, description = "The store did not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_session(State(state): State<Arc<AppState>>, Path(session): Path<String>, Caller(identity): Caller) -> Response {
    match owned_session(&state, &identity, &session).await {
        Ok(owned) => match SessionStatus::from_record(&owned.record) {
            Some(status) => Json(status).into_response(),
            None => ApiError::new(ApiErrorCode::NotFound, format!("no session {session} among yours")).into_response(),
        },
        Err(error) => error.into_response(),
    }
}

/// `DELETE /api/sessions/{id}`: the HTTP form of the `close` frame.
#[utoipa::path(
    delete, path = "/api/sessions/{id}", tag = "sessions",
    params(("id" = String, Path, description = "The session id"),
           ("reason" = Option<String>, Query, description = "Why, at most 256 characters (goes into `session.close`)")),
    responses(
        (status = 202, description = "`session.close` was published; the session goes stopping → closed (watch it)", body = CloseResponse),
        (status = 400, description = "Invalid id or reason", body = ApiError),
        (status = 401, description = "No valid token", body = ApiError),
        (status = 404, description = "No such session among yours", body = ApiError),
        (status = 503, description = "The broker or the store did not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn close_session(
    State(state): State<Arc<AppState>>,
    Path(session): Path<String>,
    Caller(identity): Caller,
    RawQuery(query): RawQuery,
) -> Response {
    let reason = query_parameter(query.as_deref(), "reason");
    if reason.as_ref().is_some_and(|reason| reason.len() > 256) {
        return ApiError::new(ApiErrorCode::BadRequest, "`reason` is longer than 256 characters").into_response();
    }
    if let Err(error) = owned_session(&state, &identity, &session).await {
        return error.into_response();
    }
    if let Err(refusal) = publish_for_user(&state, &identity.user, &session, &SessionClose { reason }, None).await {
        return ApiError::from_frame(refusal).into_response();
    }
    tracing::info!(user = %identity.user, session_id = %session, "session close requested over http");
    (StatusCode::ACCEPTED, Json(CloseResponse { session })).into_response()
}

/// `POST /api/sessions/{id}/activity`: the HTTP form of the `activity` frame (debounced alike).
#[utoipa::path(
    post, path = "/api/sessions/{id}/activity", tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "Counted (`session.activity` published, source `api`) or folded into the interval's event", body = ActivityResponse),
        (status = 401, description = "No valid token", body = ApiError),
        (status = 404, description = "No such session among yours", body = ApiError),
        (status = 503, description = "The broker or the store did not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn session_activity(
    State(state): State<Arc<AppState>>,
    Path(session): Path<String>,
    Caller(identity): Caller,
) -> Response {
    if let Err(error) = owned_session(&state, &identity, &session).await {
        return error.into_response();
    }
    match report_activity(&state, &identity.user, &session, InputSource::Api, None).await {
        Ok(admission) => Json(ActivityResponse { session, debounced: admission == Admission::Debounced }).into_response(),
        Err(refusal) => ApiError::from_frame(refusal).into_response(),
    }
}

/// `POST /api/sessions/{id}/keepalive`'s body.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeepaliveResponse {
    pub session: String,
}

/// `POST /api/sessions/{id}/keepalive`: the HTTP form of the `keepalive` frame ("keep working").
#[utoipa::path(
    post, path = "/api/sessions/{id}/keepalive", tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 202, description = "`session.keepalive` published (source `api`): the engine postpones the pause by the profile's idle interval, at most `max_keepalives` times in a row without input, and wakes a paused or dormant session; the answer arrives as a notification", body = KeepaliveResponse),
        (status = 401, description = "No valid token", body = ApiError),
        (status = 404, description = "No such session among yours", body = ApiError),
        (status = 503, description = "The broker or the store did not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn session_keepalive(
    State(state): State<Arc<AppState>>,
    Path(session): Path<String>,
    Caller(identity): Caller,
) -> Response {
    if let Err(error) = owned_session(&state, &identity, &session).await {
        return error.into_response();
    }
    if let Err(refusal) = publish_for_user(&state, &identity.user, &session, &SessionKeepalive { source: InputSource::Api }, None).await {
        return ApiError::from_frame(refusal).into_response();
    }
    (StatusCode::ACCEPTED, Json(KeepaliveResponse { session })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every WebSocket error code means the same on HTTP and is spelled the same.
    #[test]
    fn websocket_codes_are_http_codes() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::FrameTooLarge,
            ErrorCode::RateLimited,
            ErrorCode::NotFound,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), serde_json::to_value(ApiErrorCode::from(code)).unwrap());
        }
        let body = serde_json::to_value(ApiError::new(ApiErrorCode::QuotaExceeded, "full")).unwrap();
        assert_eq!(body, json!({"error": "quota_exceeded", "message": "full"}));
    }

    #[test]
    fn idempotency_entries_round_trip() {
        let entry =
            IdempotencyEntry::Answered { fingerprint: "f".into(), answer: StoredAnswer { status: 201, body: json!({"session": "s"}) } };
        let text = serde_json::to_string(&entry).unwrap();
        assert_eq!(serde_json::from_str::<IdempotencyEntry>(&text).unwrap(), entry);
    }
}
