//! One WebSocket connection after authentication: the snapshot, then one loop over everything
//! that can happen to it (a client frame, a status to push, a heartbeat tick, shutdown).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use protocol::events::{EventData, InputSource, SessionActivity, SessionClose, SessionKeepalive, SessionOpen};
use protocol::ids::{UserId, WorkspaceId};
use protocol::{CloudEvent, Notification};
use serde_json::Value;
use tokio::time::Instant;

use crate::activity::Admission;
use crate::auth::Identity;
use crate::frames::{parse_client_frame, ClientRequest, ErrorCode, ServerFrame, SessionStatus};
use crate::hub::{ConnectionId, ConnectionSlot};
use crate::metrics::bump;
use crate::server::AppState;
use crate::throttle::RateLimiter;

/// How long a request waits for the broker to confirm its event before answering `unavailable`.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one write to a socket may take before the client counts as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// WebSocket close codes (RFC 6455 §7.4.1).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_POLICY_VIOLATION: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// What can happen to a connection; handled in one exhaustive match.
enum Input {
    FromClient(Option<Result<Message, axum::Error>>),
    OpenAnswered(Box<OpenOutcome>),
    ToClient(Option<Utf8Bytes>),
    HeartbeatTick,
    TokenExpired,
    Shutdown,
}

/// How an `open` ends: its reply, and the session it got (which the caller may then act on) in
/// the state the engine's answer named.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OpenOutcome {
    pub(crate) reply: ServerFrame,
    pub(crate) session: Option<String>,
    pub(crate) state: Option<String>,
}

/// An `open` whose `session.open` is published: the session id it asked for, and the wait for
/// the engine's answer. Shared by the socket's `open` frame and `POST /api/sessions`.
pub(crate) struct RequestedOpen {
    pub(crate) requested: String,
    pub(crate) answer: Pin<Box<dyn Future<Output = OpenOutcome> + Send>>,
}

/// An `open` whose `session.open` is published, waiting for the engine's answer.
type PendingOpen = Pin<Box<dyn Future<Output = Box<OpenOutcome>> + Send>>;

/// A request's reply: at once, or once the engine has answered (`open`).
enum Reply {
    Now(Box<ServerFrame>),
    Later(PendingOpen),
}

/// The state of one authenticated connection.
struct Connection {
    state: Arc<AppState>,
    identity: Identity,
    connection_id: ConnectionId,
    socket: WebSocket,
    rate_limiter: RateLimiter,
    /// Sessions this connection has been allowed to act on, with their owners, so that repeated
    /// activity does not ask the store every time.
    authorized_sessions: HashMap<String, String>,
    last_heard: Instant,
    /// While set, the socket's further requests wait unread, so replies keep the requests' order;
    /// status pushes and heartbeats go on.
    pending_open: Option<PendingOpen>,
}

/// Serves one upgraded socket until it closes. The slot is held for the connection's lifetime.
pub async fn serve_socket(socket: WebSocket, state: Arc<AppState>, identity: Identity, slot: ConnectionSlot) {
    let metrics = state.metrics.clone();
    metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    bump(&metrics.connections_total);
    let mut socket = socket;
    match state.hub.attach(&identity.user).await {
        Ok((connection_id, outbound)) => {
            tracing::debug!(user = %identity.user, connection_id, "socket connected");
            let now = Instant::now();
            let rate_limiter = RateLimiter::new(state.config.max_messages_per_second, now);
            let mut connection = Connection {
                state: state.clone(),
                identity,
                connection_id,
                socket,
                rate_limiter,
                authorized_sessions: HashMap::new(),
                last_heard: now,
                pending_open: None,
            };
            connection.run(outbound).await;
            state.hub.detach(connection_id).await;
            tracing::debug!(user = %connection.identity.user, connection_id, "socket closed");
        }
        Err(error) => {
            tracing::warn!(user = %identity.user, %error, "cannot route notifications for a new socket; closing it");
            let _ = send_bounded(&mut socket, close_message(CLOSE_TRY_AGAIN_LATER, "notifications unavailable, retry")).await;
        }
    }
    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
    drop(slot);
}

/// A write that a client which stopped reading cannot block forever: without the bound, a full
/// TCP buffer would stall the connection's loop, and with it the heartbeat that should drop it.
async fn send_bounded(socket: &mut WebSocket, message: Message) -> Result<(), SocketGone> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(SocketGone),
    }
}

/// The client closed, broke the connection, or stopped reading.
struct SocketGone;

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(reason) }))
}

impl Connection {
    async fn run(&mut self, mut outbound: tokio::sync::mpsc::Receiver<Utf8Bytes>) {
        // The user's key is bound before the snapshot is read, so no status can fall between them.
        self.send_snapshot().await;
        let mut stop = self.state.stop.clone();
        let mut heartbeat = tokio::time::interval(self.state.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        // A socket lives no longer than the token that opened it; the client reconnects with a
        // fresh one (and gets a fresh snapshot).
        let token_expiry = tokio::time::sleep(self.identity.remaining_validity());
        tokio::pin!(token_expiry);
        loop {
            let input = if let Some(pending_open) = self.pending_open.as_mut() {
                // Biased: the engine's answer is sent before the status push that came with it.
                tokio::select! {
                    biased;
                    outcome = pending_open => Input::OpenAnswered(outcome),
                    frame = outbound.recv() => Input::ToClient(frame),
                    _ = heartbeat.tick() => Input::HeartbeatTick,
                    () = &mut token_expiry => Input::TokenExpired,
                    _ = stop.wait_for(|stopped| *stopped) => Input::Shutdown,
                }
            } else {
                tokio::select! {
                    message = self.socket.recv() => Input::FromClient(message),
                    frame = outbound.recv() => Input::ToClient(frame),
                    _ = heartbeat.tick() => Input::HeartbeatTick,
                    () = &mut token_expiry => Input::TokenExpired,
                    _ = stop.wait_for(|stopped| *stopped) => Input::Shutdown,
                }
            };
            let keep_going = match input {
                Input::FromClient(None) => false,
                Input::FromClient(Some(Err(error))) => {
                    self.close_after_read_error(&error).await;
                    false
                }
                Input::FromClient(Some(Ok(message))) => {
                    self.last_heard = Instant::now();
                    self.on_client_message(message).await
                }
                Input::OpenAnswered(outcome) => {
                    self.pending_open = None;
                    if let Some(session) = outcome.session {
                        self.authorized_sessions.insert(session, self.identity.user.clone());
                    }
                    self.send_frame(&outcome.reply).await
                }
                Input::ToClient(Some(text)) => self.send_text(text).await,
                Input::ToClient(None) => {
                    let _ = send_bounded(&mut self.socket, close_message(CLOSE_TRY_AGAIN_LATER, "fell behind; reconnect to resync")).await;
                    false
                }
                Input::HeartbeatTick => self.on_heartbeat().await,
                Input::TokenExpired => {
                    tracing::info!(user = %self.identity.user, connection_id = self.connection_id, "token expired; closing socket");
                    let _ = send_bounded(&mut self.socket, close_message(CLOSE_POLICY_VIOLATION, "token expired")).await;
                    false
                }
                Input::Shutdown => {
                    let _ = send_bounded(&mut self.socket, close_message(CLOSE_GOING_AWAY, "server shutting down")).await;
                    false
                }
            };
            if !keep_going {
                return;
            }
        }
    }

    async fn send_snapshot(&mut self) {
        let frame = match self.state.store.sessions_of(Some(&self.identity.user)).await {
            Ok(records) => {
                let sessions: Vec<SessionStatus> = records.iter().filter_map(SessionStatus::from_record).collect();
                for status in &sessions {
                    self.authorized_sessions.insert(status.session.clone(), status.user.clone());
                }
                ServerFrame::Snapshot {
                    user: self.identity.user.clone(),
                    roles: self.identity.roles.clone(),
                    sessions: Some(sessions),
                    error: None,
                }
            }
            Err(error) => {
                tracing::warn!(user = %self.identity.user, %error, "no snapshot for a new socket");
                ServerFrame::Snapshot {
                    user: self.identity.user.clone(),
                    roles: self.identity.roles.clone(),
                    sessions: None,
                    error: Some(format!("current state unavailable: {error}")),
                }
            }
        };
        self.send_frame(&frame).await;
    }

    async fn send_text(&mut self, text: Utf8Bytes) -> bool {
        match send_bounded(&mut self.socket, Message::Text(text)).await {
            Ok(()) => {
                bump(&self.state.metrics.frames_sent);
                true
            }
            Err(_) => false,
        }
    }

    async fn send_frame(&mut self, frame: &ServerFrame) -> bool {
        if matches!(frame, ServerFrame::Error { .. }) {
            bump(&self.state.metrics.frames_refused);
        }
        self.send_text(Utf8Bytes::from(frame.to_text())).await
    }

    /// A frame over the hard limit cannot be read at all; say why before closing.
    async fn close_after_read_error(&mut self, error: &axum::Error) {
        let text = error.to_string();
        // tungstenite reports an oversized message as a capacity error ("Space limit exceeded").
        let too_big = text.contains("Space limit") || text.contains("too long") || text.contains("too big");
        let code = if too_big { CLOSE_TOO_BIG } else { CLOSE_PROTOCOL_ERROR };
        tracing::debug!(user = %self.identity.user, %error, "closing after a read error");
        if too_big {
            bump(&self.state.metrics.frames_refused);
        }
        let _ = send_bounded(&mut self.socket, close_message(code, if too_big { "frame too large" } else { "protocol error" })).await;
    }

    async fn on_heartbeat(&mut self) -> bool {
        // While an open waits, the socket is not read, so its pongs cannot be heard: no verdict.
        if self.pending_open.is_none() && self.last_heard.elapsed() > self.state.config.heartbeat_timeout {
            tracing::info!(user = %self.identity.user, connection_id = self.connection_id, "no pong in time; dropping socket");
            bump(&self.state.metrics.sockets_dropped_heartbeat);
            let _ = send_bounded(&mut self.socket, close_message(CLOSE_GOING_AWAY, "heartbeat timeout")).await;
            return false;
        }
        send_bounded(&mut self.socket, Message::Ping(axum::body::Bytes::from_static(b"berth"))).await.is_ok()
    }

    async fn on_client_message(&mut self, message: Message) -> bool {
        match message {
            Message::Text(text) => {
                bump(&self.state.metrics.frames_received);
                match self.on_text(text.as_str()).await {
                    Reply::Now(reply) => self.send_frame(&reply).await,
                    Reply::Later(pending_open) => {
                        self.pending_open = Some(pending_open);
                        true
                    }
                }
            }
            Message::Binary(_) => {
                bump(&self.state.metrics.frames_received);
                self.send_frame(&ServerFrame::error(None, ErrorCode::BadRequest, "binary frames are not accepted; send JSON text")).await
            }
            Message::Ping(_) | Message::Pong(_) => true,
            Message::Close(_) => false,
        }
    }

    /// Answers one text frame. Every path returns a reply, now or once the engine answered.
    async fn on_text(&mut self, text: &str) -> Reply {
        match self.request(text).await {
            Ok(reply) => reply,
            Err(refusal) => Reply::Now(Box::new(refusal)),
        }
    }

    async fn request(&mut self, text: &str) -> Result<Reply, ServerFrame> {
        let limits = &self.state.config;
        if text.len() > limits.max_frame_bytes {
            return Err(ServerFrame::error(
                None,
                ErrorCode::FrameTooLarge,
                format!("frame is {} bytes; the limit is {}", text.len(), limits.max_frame_bytes),
            ));
        }
        // Parsing a frame within the size limit costs microseconds; doing it before the rate check
        // lets even a refused request be matched to its reply by id.
        let parsed = parse_client_frame(text);
        let id = parsed.request_id;
        if !self.rate_limiter.try_acquire(Instant::now()) {
            return Err(ServerFrame::error(
                id,
                ErrorCode::RateLimited,
                format!("more than {} frames per second; this one was not processed", limits.max_messages_per_second),
            ));
        }
        let request = parsed.request.map_err(|message| ServerFrame::error(id.clone(), ErrorCode::BadRequest, message))?;
        let reply = match request {
            ClientRequest::Open { workspace, profile } => return self.open(id, &workspace, &profile).await.map(Reply::Later),
            ClientRequest::Close { session, reason } => self.close(id, &session, reason).await,
            ClientRequest::Activity { session } => self.activity(id, &session).await,
            ClientRequest::Keepalive { session } => self.keepalive(id, &session).await,
            ClientRequest::Subscribe { session } => self.subscribe(id, &session).await,
            ClientRequest::Ping => ServerFrame::ok(id),
        };
        Ok(Reply::Now(Box::new(reply)))
    }

    /// Publishes `session.open` for a new session id and returns the wait for the engine's first
    /// notification caused by it: the engine binds the open to the workspace's live session if
    /// there is one (at most one per profile, user and workspace), and that notification names it.
    async fn open(&mut self, id: Option<String>, workspace: &str, profile: &str) -> Result<PendingOpen, ServerFrame> {
        let opened = request_open(&self.state, &self.identity.user, id, workspace, profile).await?;
        // The requested id is this socket's either way: a `close` for it before the answer is fine.
        self.authorized_sessions.insert(opened.requested, self.identity.user.clone());
        let answer = opened.answer;
        Ok(Box::pin(async move { Box::new(answer.await) }))
    }

    async fn close(&mut self, id: Option<String>, session: &str, reason: Option<String>) -> ServerFrame {
        if let Err(frame) = self.authorize(id.clone(), session).await {
            return frame;
        }
        if let Err(frame) = self.publish(session, &SessionClose { reason }, id.clone()).await {
            return frame;
        }
        tracing::info!(user = %self.identity.user, session_id = %session, "session close requested");
        ServerFrame::ok_session(id, session)
    }

    async fn activity(&mut self, id: Option<String>, session: &str) -> ServerFrame {
        if let Err(frame) = self.authorize(id.clone(), session).await {
            return frame;
        }
        match report_activity(&self.state, &self.identity.user, session, InputSource::Websocket, id.clone()).await {
            Ok(admission) => {
                let debounced = admission == Admission::Debounced;
                ServerFrame::Ok {
                    id,
                    session: Some(session.to_owned()),
                    status: None,
                    debounced: Some(debounced),
                    joined: None,
                    state: None,
                    position: None,
                }
            }
            Err(frame) => frame,
        }
    }

    /// "Keep working": a `session.keepalive`, never debounced (the engine bounds how many count).
    async fn keepalive(&mut self, id: Option<String>, session: &str) -> ServerFrame {
        if let Err(frame) = self.authorize(id.clone(), session).await {
            return frame;
        }
        if let Err(frame) = self.publish(session, &SessionKeepalive { source: InputSource::Websocket }, id.clone()).await {
            return frame;
        }
        ServerFrame::ok_session(id, session)
    }

    async fn subscribe(&mut self, id: Option<String>, session: &str) -> ServerFrame {
        let record = match self.state.store.session(session).await {
            Ok(record) => record,
            Err(error) => return ServerFrame::error(id, ErrorCode::Unavailable, format!("cannot read the session: {error}")),
        };
        let status = record.as_ref().and_then(SessionStatus::from_record);
        let owner = match (&status, self.authorized_sessions.get(session)) {
            (Some(status), _) => status.user.clone(),
            // Opened on this connection but not yet recorded by the store.
            (None, Some(owner)) => owner.clone(),
            (None, None) => return not_found(id, session),
        };
        if owner != self.identity.user && !self.identity.is_admin() {
            return not_found(id, session);
        }
        if owner != self.identity.user {
            if let Err(error) = self.state.hub.watch(self.connection_id, session, &owner).await {
                return ServerFrame::error(id, ErrorCode::Unavailable, format!("cannot subscribe: {error}"));
            }
        }
        self.authorized_sessions.insert(session.to_owned(), owner);
        ServerFrame::Ok { id, session: Some(session.to_owned()), status, debounced: None, joined: None, state: None, position: None }
    }

    /// The caller may act on `session` if it is theirs, or if they are an admin. Someone else's
    /// session is answered exactly like a missing one, so ids cannot be probed.
    async fn authorize(&mut self, id: Option<String>, session: &str) -> Result<String, ServerFrame> {
        if let Some(owner) = self.authorized_sessions.get(session) {
            return Ok(owner.clone());
        }
        let record = match self.state.store.session(session).await {
            Ok(Some(record)) => record,
            Ok(None) => return Err(not_found(id, session)),
            Err(error) => return Err(ServerFrame::error(id, ErrorCode::Unavailable, format!("cannot check the session's owner: {error}"))),
        };
        let Some(owner) = record.get("user").and_then(Value::as_str).map(str::to_owned) else {
            return Err(not_found(id, session));
        };
        if owner != self.identity.user && !self.identity.is_admin() {
            tracing::info!(user = %self.identity.user, session_id = %session, "refused access to another user's session");
            return Err(not_found(id, session));
        }
        self.authorized_sessions.insert(session.to_owned(), owner.clone());
        Ok(owner)
    }

    /// Publishes an event about `session` carrying the token's user, never the frame's.
    async fn publish<T: EventData>(&mut self, session: &str, data: &T, id: Option<String>) -> Result<(), ServerFrame> {
        publish_for_user(&self.state, &self.identity.user, session, data, id).await
    }
}

/// Publishes `session.open` for a new session id (UUID v7) and returns the wait for the engine's
/// first notification caused by it: the engine binds the open to the workspace's live session if
/// there is one (at most one per profile, user and workspace), and that notification names it.
/// The user's notifications must be bound on this instance (a socket of theirs is attached).
pub(crate) async fn request_open(
    state: &Arc<AppState>,
    user: &str,
    id: Option<String>,
    workspace: &str,
    profile: &str,
) -> Result<RequestedOpen, ServerFrame> {
    if profile != state.config.profile_name {
        return Err(ServerFrame::error(
            id,
            ErrorCode::BadRequest,
            format!("this deployment runs profile {:?}, not {profile:?}", state.config.profile_name),
        ));
    }
    // Both were checked already (the token's subject, the frame's workspace); parsed again here,
    // where the event is built, so the event can only carry ids that its readers accept.
    let bad_request = |error: protocol::ids::IdError| ServerFrame::error(id.clone(), ErrorCode::BadRequest, error.to_string());
    let data = SessionOpen {
        user: UserId::parse(user).map_err(bad_request)?,
        workspace: WorkspaceId::parse(workspace).map_err(bad_request)?,
        profile: Some(profile.to_owned()),
    };
    let session = uuid::Uuid::now_v7().to_string();
    let event = user_event(state, user, &session, &data);
    // Registered before publishing: the engine's answer can beat the broker's confirm.
    let awaited = state.hub.await_notification(user, &event.id);
    publish_event(state, &event, id.clone()).await?;
    tracing::info!(user = %user, session_id = %session, event_id = %event.id, workspace, "session open requested");
    let timeout = state.config.open_answer_timeout;
    let state = state.clone();
    let user = user.to_owned();
    let requested = session.clone();
    let answer = Box::pin(async move {
        let answer = awaited.wait(timeout).await;
        let outcome = open_outcome(id, &session, answer.as_ref(), timeout);
        match &outcome.reply {
            ServerFrame::Ok { joined: Some(true), session: Some(joined), .. } => {
                bump(&state.metrics.opens_joined);
                tracing::info!(user = %user, session_id = %joined, requested = %session, "open joined the workspace's live session");
            }
            ServerFrame::Error { code: ErrorCode::LimitExceeded | ErrorCode::QueueTimeout | ErrorCode::BadRequest, limit, .. } => {
                tracing::info!(user = %user, session_id = %session, ?limit, "the engine refused an open");
            }
            ServerFrame::Error { .. } => {
                bump(&state.metrics.opens_timed_out);
                tracing::warn!(user = %user, session_id = %session, ?timeout, "the engine did not answer an open in time");
            }
            _ => {}
        }
        outcome
    });
    Ok(RequestedOpen { requested, answer })
}

/// Turns one piece of user input on `session` into
/// a `session.activity` event, debounced (see the crate's README); the caller has authorized it.
pub(crate) async fn report_activity(
    state: &AppState,
    user: &str,
    session: &str,
    source: InputSource,
    id: Option<String>,
) -> Result<Admission, ServerFrame> {
    if state.activity.admit(session).await == Admission::Debounced {
        bump(&state.metrics.activity_debounced);
        return Ok(Admission::Debounced);
    }
    if let Err(frame) = publish_for_user(state, user, session, &SessionActivity { source }, id).await {
        state.activity.forget(session).await;
        return Err(frame);
    }
    bump(&state.metrics.activity_events_published);
    Ok(Admission::Publish)
}

pub(crate) async fn publish_for_user<T: EventData>(
    state: &AppState,
    user: &str,
    session: &str,
    data: &T,
    id: Option<String>,
) -> Result<(), ServerFrame> {
    publish_event(state, &user_event(state, user, session, data), id).await
}

/// An event about `session` carrying the token's user.
pub(crate) fn user_event<T: EventData>(state: &AppState, user: &str, session: &str, data: &T) -> CloudEvent {
    CloudEvent::of(&state.config.event_source, Some(session), data).with_extension("userid", user)
}

async fn publish_event(state: &AppState, event: &CloudEvent, id: Option<String>) -> Result<(), ServerFrame> {
    let event_type = &event.event_type;
    let published = state.bus.publish_event_to(&state.config.events_exchange, event);
    match tokio::time::timeout(PUBLISH_TIMEOUT, published).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(ServerFrame::error(id, ErrorCode::Unavailable, format!("could not publish {event_type}: {error}"))),
        Err(_) => Err(ServerFrame::error(id, ErrorCode::Unavailable, format!("the broker did not confirm {event_type} in time"))),
    }
}

/// The reply to an `open` that asked for session `requested`, from the engine's first
/// notification caused by it (`None`: none came within `timeout`). The notification names the
/// session the open is bound to: `requested` for a fresh start, the live session of the workspace
/// when it joined one (then also `detail.joined: true`).
fn open_outcome(id: Option<String>, requested: &str, answer: Option<&Notification>, timeout: Duration) -> OpenOutcome {
    let Some(notification) = answer else {
        let message = format!(
            "session.open was sent, but the engine did not answer within {} s; the session will show up in status updates",
            timeout.as_secs_f64()
        );
        return OpenOutcome {
            reply: ServerFrame::Error { id, code: ErrorCode::Timeout, message, session: Some(requested.to_owned()), limit: None },
            session: None,
            state: None,
        };
    };
    let session = notification.session.clone().unwrap_or_else(|| requested.to_owned());
    // The engine refused the open: it answers with the session closed and a code.
    let refusal = match notification.detail.get("code").and_then(Value::as_str) {
        Some("limit_exceeded") => Some(ErrorCode::LimitExceeded),
        Some("queue_timeout") => Some(ErrorCode::QueueTimeout),
        Some("bad_request") => Some(ErrorCode::BadRequest),
        _ => None,
    };
    if let (Some(code), "closed") = (refusal, notification.state.as_str()) {
        let limit = notification.detail.get("limit").and_then(Value::as_str).map(str::to_owned);
        let message =
            notification.detail.get("error").and_then(Value::as_str).filter(|error| !error.is_empty()).map(str::to_owned).unwrap_or_else(
                || match (code, &limit) {
                    (ErrorCode::LimitExceeded, Some(limit)) => format!("the open is over your {limit} limit"),
                    (ErrorCode::QueueTimeout, _) => "the open waited too long for capacity and was given up".to_owned(),
                    _ => "the engine refused the open".to_owned(),
                },
            );
        return OpenOutcome {
            reply: ServerFrame::Error { id, code, message, session: Some(session), limit },
            session: None,
            state: Some("closed".to_owned()),
        };
    }
    let queued = notification.state == "queued";
    let position = notification.detail.get("position").and_then(Value::as_u64).filter(|_| queued);
    let joined = session != requested || notification.detail.get("joined").and_then(Value::as_bool) == Some(true);
    OpenOutcome {
        reply: ServerFrame::Ok {
            id,
            session: Some(session.clone()),
            status: None,
            debounced: None,
            joined: Some(joined),
            state: queued.then(|| "queued".to_owned()),
            position,
        },
        session: Some(session),
        state: Some(notification.state.clone()),
    }
}

fn not_found(id: Option<String>, session: &str) -> ServerFrame {
    ServerFrame::error(id, ErrorCode::NotFound, format!("no session {session} among yours"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const REQUESTED: &str = "01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f";
    const LIVE: &str = "01936f0e-0000-7c4e-9a51-3d2a1b0c9e8f";

    fn answer(session: Option<&str>, detail: Value) -> Notification {
        Notification {
            id: uuid::Uuid::now_v7(),
            user: "alice".into(),
            session: session.map(str::to_owned),
            state: "materializing".into(),
            detail,
            cause: Some("e1".into()),
        }
    }

    #[track_caller]
    fn check(answer: Option<Notification>, expected: Value) {
        let outcome = open_outcome(Some("o1".into()), REQUESTED, answer.as_ref(), Duration::from_secs(15));
        let reply: Value = serde_json::from_str(&outcome.reply.to_text()).unwrap();
        assert_eq!(reply, expected);
        let expected_session = expected.get("session").filter(|_| expected["type"] == "ok").and_then(Value::as_str).map(str::to_owned);
        assert_eq!(outcome.session, expected_session);
    }

    #[test]
    fn open_replies_name_the_session_the_engine_bound_the_open_to() {
        check(Some(answer(Some(REQUESTED), json!({}))), json!({"type": "ok", "id": "o1", "session": REQUESTED, "joined": false}));
        check(Some(answer(Some(LIVE), json!({"joined": true}))), json!({"type": "ok", "id": "o1", "session": LIVE, "joined": true}));
        // Either sign of a join is enough.
        check(Some(answer(Some(LIVE), json!({}))), json!({"type": "ok", "id": "o1", "session": LIVE, "joined": true}));
        check(
            Some(answer(Some(REQUESTED), json!({"joined": true}))),
            json!({"type": "ok", "id": "o1", "session": REQUESTED, "joined": true}),
        );
        check(Some(answer(None, Value::Null)), json!({"type": "ok", "id": "o1", "session": REQUESTED, "joined": false}));
        let timeout = open_outcome(Some("o1".into()), REQUESTED, None, Duration::from_secs(15));
        assert_eq!(timeout.session, None);
        let reply: Value = serde_json::from_str(&timeout.reply.to_text()).unwrap();
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str(), reply["session"].as_str()),
            (Some("error"), Some("timeout"), Some(REQUESTED))
        );
        let message = reply["message"].as_str().unwrap();
        assert!(message.contains("was sent") && message.contains("15 s") && message.contains("status updates"), "{message}");
    }

    #[test]
    fn refusals_and_queueing_are_typed() {
        let mut refused = answer(
            Some(REQUESTED),
            json!({"code": "limit_exceeded", "limit": "sessions_per_user", "error": "at most 1 session", "preserved": []}),
        );
        refused.state = "closed".into();
        let outcome = open_outcome(Some("o1".into()), REQUESTED, Some(&refused), Duration::from_secs(15));
        let reply: Value = serde_json::from_str(&outcome.reply.to_text()).unwrap();
        assert_eq!(
            reply,
            json!({"type": "error", "id": "o1", "code": "limit_exceeded", "limit": "sessions_per_user", "message": "at most 1 session", "session": REQUESTED})
        );
        assert_eq!(outcome.session, None);
        refused.detail = json!({"code": "queue_timeout", "error": ""});
        let reply: Value =
            serde_json::from_str(&open_outcome(None, REQUESTED, Some(&refused), Duration::from_secs(15)).reply.to_text()).unwrap();
        assert_eq!(reply["code"], "queue_timeout");
        // An ordinary close is no refusal.
        refused.detail = json!({"code": ""});
        let reply: Value =
            serde_json::from_str(&open_outcome(None, REQUESTED, Some(&refused), Duration::from_secs(15)).reply.to_text()).unwrap();
        assert_eq!(reply["type"], "ok");
        let mut queued = answer(Some(REQUESTED), json!({"queued": true, "position": 3}));
        queued.state = "queued".into();
        check(Some(queued), json!({"type": "ok", "id": "o1", "session": REQUESTED, "joined": false, "state": "queued", "position": 3}));
    }
}
