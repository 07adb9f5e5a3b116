//! The browser terminal: `GET /api/sessions/{id}/terminal` upgrades to a WebSocket attached to a
//! Docker exec with a PTY in the session's container. Bytes go both ways unchanged (binary frames
//! out; binary or text frames in, as xterm.js's attach addon sends them), one JSON text frame
//! resizes, and the socket closes with its own code when the session stops running.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{rejection::WebSocketUpgradeRejection, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::Docker;
use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::api::{ApiError, ApiErrorCode};
use crate::auth::Identity;
use crate::hub::ConnectionSlot;
use crate::metrics::bump;
use crate::proxy::doors::Checked;
use crate::server::{AppState, SUBPROTOCOL};
use crate::socket::report_activity;

/// Close codes of a terminal socket beyond RFC 6455's (the 4000-4999 private range).
pub const CLOSE_SESSION_PAUSED: u16 = 4001;
pub const CLOSE_SESSION_STOPPED: u16 = 4002;
pub const CLOSE_SESSION_CLOSED: u16 = 4003;
/// The shell exited (normal closure).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY_VIOLATION: u16 = 1008;
/// Docker failed under the terminal.
const CLOSE_INTERNAL_ERROR: u16 = 1011;
/// How long Docker may take to create or attach a shell.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write to the socket may take before the client counts as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame a terminal reads (a paste); larger ones close the socket (1009).
const MAX_INPUT_FRAME_BYTES: usize = 1024 * 1024;
/// The terminal type the shell is told.
const TERM: &str = "TERM=xterm-256color";
/// Every process of one terminal carries `BERTH_TERMINAL=<tag>` in its environment, so that the
/// processes can be found and ended when the socket closes: Docker has no way to end an exec, and
/// a shell left behind would hold one of the container's few pids for good.
const TAG_VARIABLE: &str = "BERTH_TERMINAL";
/// How often, and how long apart, ending a closed terminal's processes is tried while the
/// container is paused (an hour in all: a paused session stops long before).
const HANG_UP_ATTEMPTS: u32 = 720;
const HANG_UP_RETRY: Duration = Duration::from_secs(5);
/// Checks (`HANG_UP_RETRY` apart) a paused session's container gets to show it is paused.
const PAUSE_GRACE_ATTEMPTS: u32 = 6;

/// The shell script that ends one terminal's processes: SIGHUP, as a closing terminal sends, then
/// SIGKILL a second later for what ignored it. Needs `/bin/sh`, `tr`, `grep` and `kill` in the
/// image (busybox has them).
fn hangup_script(tag: &str) -> String {
    format!(
        "mark='{TAG_VARIABLE}={tag}'; pids=''; for p in /proc/[0-9]*; do \
         if tr '\\000' '\\n' < \"$p/environ\" 2>/dev/null | grep -qx \"$mark\"; then pids=\"$pids ${{p#/proc/}}\"; fi; done; \
         [ -z \"$pids\" ] && exit 0; kill -HUP $pids 2>/dev/null; sleep 1; kill -KILL $pids 2>/dev/null; exit 0"
    )
}

/// When a closed terminal's processes are ended. An exec started while Docker freezes the
/// container joins the frozen cgroup half made (`runc init`) and wedges every Docker call on that
/// container until it is thawed by hand, so nothing is started while the session pauses or stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HangUp {
    /// The client left (or the shell ended) while the session runs.
    Now,
    /// The session paused: once it is resumed (the processes are frozen meanwhile).
    AfterResume,
    /// The session stops or closed: the container is frozen and removed, its processes with it.
    Never,
}

impl HangUp {
    fn after_close(code: u16) -> HangUp {
        match code {
            CLOSE_SESSION_PAUSED => HangUp::AfterResume,
            CLOSE_SESSION_STOPPED | CLOSE_SESSION_CLOSED => HangUp::Never,
            _ => HangUp::Now,
        }
    }
}

/// Waits until the container has been paused and then runs again: `false` when it stopped or
/// went away instead (its processes with it), or never came back within the retry budget.
async fn wait_for_resume(docker: &Docker, container: &str) -> bool {
    let mut seen_paused = false;
    for attempt in 0..HANG_UP_ATTEMPTS {
        let inspected = tokio::time::timeout(DOCKER_TIMEOUT, docker.inspect_container(container, None)).await;
        let Ok(Ok(inspected)) = inspected else { return false };
        let state = inspected.state.unwrap_or_default();
        if state.running != Some(true) {
            return false;
        }
        let paused = state.paused == Some(true);
        seen_paused |= paused;
        // The pause may still be on its way (the engine notifies, then the container agent
        // pauses): give it half a minute to happen before taking "running" for "resumed".
        let resumed = !paused && (seen_paused || attempt >= PAUSE_GRACE_ATTEMPTS);
        if resumed {
            return true;
        }
        tokio::time::sleep(HANG_UP_RETRY).await;
    }
    false
}

/// The one control frame: `{"type":"resize","cols":120,"rows":40}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Control {
    Resize { cols: u16, rows: u16 },
}

/// A text frame that is exactly a resize request; anything else typed is input.
fn control_frame(text: &str) -> Option<Control> {
    if !text.starts_with('{') {
        return None;
    }
    serde_json::from_str(text).ok().filter(|Control::Resize { cols, rows }| *cols > 0 && *rows > 0)
}

/// How a terminal ends when its session leaves `running`, by the state it went to.
fn close_for_state(state: &str) -> Option<(u16, String)> {
    match state {
        "running" | "materializing" | "provisioning" => None,
        "idle" => Some((CLOSE_SESSION_PAUSED, "session paused (idle); send activity to wake it, then reconnect".to_owned())),
        // Stopped with its directory kept: a wake starts the container again (seconds, not ms).
        "dormant" | "waking" => {
            Some((CLOSE_SESSION_PAUSED, format!("session {state} (stopped, files kept); send activity to wake it, then reconnect")))
        }
        "stopping" | "stopped" => Some((CLOSE_SESSION_STOPPED, format!("session {state}"))),
        other => Some((CLOSE_SESSION_CLOSED, format!("session {other}"))),
    }
}

/// `GET /api/sessions/{id}/terminal`: authenticate, check the session is the caller's and
/// running, create the exec, then upgrade.
#[utoipa::path(
    get, path = "/api/sessions/{id}/terminal", tag = "terminal",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 101, description = "Switching to a WebSocket attached to a shell with a PTY in the session's container"),
        (status = 401, description = "No valid token", body = ApiError),
        (status = 404, description = "No such session among yours", body = ApiError),
        (status = 409, description = "The session is not running (paused, stopping, …)", body = ApiError),
        (status = 429, description = "Too many sockets for this user", body = ApiError),
        (status = 503, description = "Docker or the store did not answer, or (`host_unreachable`) the session runs on another host whose door does not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn terminal(
    State(state): State<Arc<AppState>>,
    Checked { identity, session: owned }: Checked,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let session = owned.id.clone();
    if owned.state() != "running" {
        let message = format!("session {session} is {}: a terminal needs it running (an idle session wakes on activity)", owned.state());
        return ApiError::new(ApiErrorCode::Conflict, message).into_response();
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let slot = match state.hub.reserve_slot(&identity.user) {
        Ok(slot) => slot,
        Err(limit) => {
            bump(&state.metrics.connections_refused_limit);
            let message = format!("at most {} connections per user", limit.limit);
            return (StatusCode::TOO_MANY_REQUESTS, Json(ApiError::new(ApiErrorCode::RateLimited, message))).into_response();
        }
    };
    let docker = match state.api.docker().await {
        Ok(docker) => docker.clone(),
        Err(error) => return error.into_response(),
    };
    // The record may lag Docker by a moment: never exec into a container paused (or pausing).
    let inspected = tokio::time::timeout(DOCKER_TIMEOUT, docker.inspect_container(&owned.container(), None)).await;
    if let Ok(Ok(inspected)) = &inspected {
        if inspected.state.as_ref().and_then(|state| state.paused) == Some(true) {
            return ApiError::new(ApiErrorCode::Conflict, format!("session {session} is paused: send activity to wake it, then connect"))
                .into_response();
        }
    }
    let profile = &state.config.profile;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let options = CreateExecOptions::<String> {
        attach_stdin: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        tty: Some(true),
        cmd: Some(profile.terminal.shell.clone()),
        user: profile.terminal_user().map(str::to_owned),
        working_dir: Some(profile.terminal_working_dir().to_owned()),
        env: Some(vec![TERM.to_owned(), format!("{TAG_VARIABLE}={tag}")]),
        ..Default::default()
    };
    // Created before the upgrade, so a container that cannot run it is a plain HTTP error.
    let Ok(created) = tokio::time::timeout(DOCKER_TIMEOUT, docker.create_exec(&owned.container(), options)).await else {
        return ApiError::new(ApiErrorCode::Unavailable, "Docker did not answer in time").into_response();
    };
    let exec = match created {
        Ok(created) => created.id,
        Err(error) => {
            let text = error.to_string();
            let code = if text.contains("is paused") || text.contains("is not running") || text.contains("No such container") {
                ApiErrorCode::Conflict
            } else {
                ApiErrorCode::Unavailable
            };
            return ApiError::new(code, format!("cannot start a shell in session {session}'s container: {text}")).into_response();
        }
    };
    // Attached before the upgrade too: the shell's first output waits in the stream meanwhile.
    let starting = docker.start_exec(&exec, Some(StartExecOptions { detach: false, tty: true, output_capacity: None }));
    // A container paused a moment ago (its record not yet saying so) would hold the attach.
    let Ok(started) = tokio::time::timeout(DOCKER_TIMEOUT, starting).await else {
        return ApiError::new(ApiErrorCode::Conflict, format!("session {session}'s container did not start a shell in time (paused?)"))
            .into_response();
    };
    let shell = match started {
        Ok(StartExecResults::Attached { output, input }) => Shell { output, input },
        Ok(StartExecResults::Detached) => return ApiError::new(ApiErrorCode::Internal, "the shell started detached").into_response(),
        Err(error) => {
            let text = error.to_string();
            let code = if text.contains("is paused") || text.contains("is not running") {
                ApiErrorCode::Conflict
            } else {
                ApiErrorCode::Unavailable
            };
            return ApiError::new(code, format!("cannot start a shell in session {session}'s container: {text}")).into_response();
        }
    };
    tracing::info!(user = %identity.user, session_id = %session, exec_id = %exec, "terminal opened");
    upgrade.protocols([SUBPROTOCOL]).max_message_size(MAX_INPUT_FRAME_BYTES).max_frame_size(MAX_INPUT_FRAME_BYTES).on_upgrade(
        move |socket| async move {
            let terminal = Terminal { state, identity, session, docker, exec, tag, container: owned.container(), socket };
            terminal.run(slot, shell).await;
        },
    )
}

struct Terminal {
    state: Arc<AppState>,
    identity: Identity,
    session: String,
    docker: Docker,
    exec: String,
    /// `BERTH_TERMINAL` of this terminal's processes.
    tag: String,
    container: String,
    socket: WebSocket,
}

/// The attached exec: the PTY's output, and its input.
struct Shell {
    output: std::pin::Pin<Box<dyn futures::Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>> + Send>>,
    input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

/// What can happen to a terminal; handled in one exhaustive match.
enum Input {
    FromClient(Option<Result<Message, axum::Error>>),
    FromShell(Option<Result<bollard::container::LogOutput, bollard::errors::Error>>),
    Status(Option<Utf8Bytes>),
    HeartbeatTick,
    TokenExpired,
    Shutdown,
}

impl Terminal {
    async fn run(mut self, slot: ConnectionSlot, shell: Shell) {
        let Shell { mut output, mut input } = shell;
        // The session's status pushes reach this instance through the user's binding, like a socket's.
        let (connection_id, mut statuses) = match self.state.hub.attach(&self.identity.user).await {
            Ok(attached) => attached,
            Err(error) => {
                tracing::warn!(session_id = %self.session, %error, "cannot watch a terminal's session");
                self.close(CLOSE_INTERNAL_ERROR, "cannot watch the session's status").await;
                drop(input);
                self.hang_up(HangUp::Now);
                return;
            }
        };
        let mut stop = self.state.stop.clone();
        let mut heartbeat = tokio::time::interval(self.state.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let token_expiry = tokio::time::sleep(self.identity.remaining_validity());
        tokio::pin!(token_expiry);
        let mut last_heard = Instant::now();
        let mut hang_up = HangUp::Now;
        loop {
            let event = tokio::select! {
                message = self.socket.recv() => Input::FromClient(message),
                chunk = output.next() => Input::FromShell(chunk),
                status = statuses.recv() => Input::Status(status),
                _ = heartbeat.tick() => Input::HeartbeatTick,
                () = &mut token_expiry => Input::TokenExpired,
                _ = stop.wait_for(|stopped| *stopped) => Input::Shutdown,
            };
            let ending: Option<(u16, String)> = match event {
                Input::FromClient(None) | Input::FromClient(Some(Err(_))) | Input::FromClient(Some(Ok(Message::Close(_)))) => break,
                Input::FromClient(Some(Ok(message))) => {
                    last_heard = Instant::now();
                    let typed = match message {
                        Message::Binary(bytes) => Some(bytes),
                        Message::Text(text) => match control_frame(text.as_str()) {
                            Some(Control::Resize { cols, rows }) => {
                                if let Err(error) =
                                    self.docker.resize_exec(&self.exec, ResizeExecOptions { width: cols, height: rows }).await
                                {
                                    tracing::debug!(session_id = %self.session, %error, "terminal resize refused");
                                }
                                None
                            }
                            None => Some(axum::body::Bytes::copy_from_slice(text.as_str().as_bytes())),
                        },
                        Message::Ping(_) | Message::Pong(_) | Message::Close(_) => None,
                    };
                    match typed {
                        Some(bytes) => match input.write_all(&bytes).await.and(input.flush().await) {
                            Ok(()) => {
                                self.count_activity();
                                None
                            }
                            Err(_) => Some((CLOSE_NORMAL, "the shell's input is closed".to_owned())),
                        },
                        None => None,
                    }
                }
                Input::FromShell(Some(Ok(chunk))) => {
                    match tokio::time::timeout(SEND_TIMEOUT, self.socket.send(Message::Binary(chunk.into_bytes()))).await {
                        Ok(Ok(())) => None,
                        _ => break,
                    }
                }
                Input::FromShell(Some(Err(error))) => {
                    tracing::warn!(session_id = %self.session, %error, "terminal output failed");
                    Some((CLOSE_INTERNAL_ERROR, "the shell's output failed".to_owned()))
                }
                Input::FromShell(None) => Some((CLOSE_NORMAL, self.exit_reason().await)),
                Input::Status(Some(frame)) => self.session_ending(frame.as_str()),
                // The status queue fell behind; the socket can no longer tell when to close.
                Input::Status(None) => Some((CLOSE_GOING_AWAY, "session status fell behind; reconnect".to_owned())),
                Input::HeartbeatTick => {
                    if last_heard.elapsed() > self.state.config.heartbeat_timeout {
                        bump(&self.state.metrics.sockets_dropped_heartbeat);
                        Some((CLOSE_GOING_AWAY, "heartbeat timeout".to_owned()))
                    } else {
                        match tokio::time::timeout(SEND_TIMEOUT, self.socket.send(Message::Ping(axum::body::Bytes::from_static(b"berth"))))
                            .await
                        {
                            Ok(Ok(())) => None,
                            _ => break,
                        }
                    }
                }
                Input::TokenExpired => Some((CLOSE_POLICY_VIOLATION, "token expired".to_owned())),
                Input::Shutdown => Some((CLOSE_GOING_AWAY, "server shutting down".to_owned())),
            };
            if let Some((code, reason)) = ending {
                hang_up = HangUp::after_close(code);
                tracing::info!(user = %self.identity.user, session_id = %self.session, code, reason = %reason, "terminal closing");
                self.close(code, &reason).await;
                break;
            }
        }
        drop(input);
        self.hang_up(hang_up);
        self.state.hub.detach(connection_id).await;
        drop(slot);
        tracing::debug!(session_id = %self.session, exec_id = %self.exec, "terminal closed");
    }

    /// Ends the terminal's processes (in the background: the container may be paused, and the
    /// script waits a second before its SIGKILL).
    fn hang_up(&self, when: HangUp) {
        if when == HangUp::Never {
            return;
        }
        let docker = self.docker.clone();
        let container = self.container.clone();
        let session = self.session.clone();
        let options = CreateExecOptions::<String> {
            cmd: Some(vec!["/bin/sh".to_owned(), "-c".to_owned(), hangup_script(&self.tag)]),
            user: self.state.config.profile.terminal_user().map(str::to_owned),
            ..Default::default()
        };
        tokio::spawn(async move {
            if when == HangUp::AfterResume && !wait_for_resume(&docker, &container).await {
                return;
            }
            // A paused container can't run it: try again until it is resumed, or gone.
            for _ in 0..HANG_UP_ATTEMPTS {
                let attempt = async {
                    let created = docker.create_exec(&container, options.clone()).await?;
                    docker
                        .start_exec(&created.id, Some(StartExecOptions { detach: true, tty: false, output_capacity: None }))
                        .await
                        .map(drop)
                };
                let Ok(started) = tokio::time::timeout(DOCKER_TIMEOUT, attempt).await else {
                    tracing::debug!(session_id = %session, "docker did not run a closed terminal's hang-up in time");
                    return;
                };
                match started {
                    Ok(()) => return,
                    Err(error) if error.to_string().contains("is paused") => tokio::time::sleep(HANG_UP_RETRY).await,
                    Err(error) => {
                        tracing::debug!(session_id = %session, %error, "could not end a closed terminal's processes");
                        return;
                    }
                }
            }
        });
    }

    /// Whether a status push says this terminal's session stopped running.
    fn session_ending(&self, frame: &str) -> Option<(u16, String)> {
        let value: serde_json::Value = serde_json::from_str(frame).ok()?;
        if value.get("type")?.as_str()? != "status" || value.get("session")?.as_str()? != self.session {
            return None;
        }
        close_for_state(value.get("state")?.as_str()?)
    }

    /// Terminal input counts as activity, debounced like the socket's; published off the input
    /// path so typing never waits for the broker.
    fn count_activity(&self) {
        let state = self.state.clone();
        let user = self.identity.user.clone();
        let session = self.session.clone();
        tokio::spawn(async move {
            if let Err(refusal) = report_activity(&state, &user, &session, protocol::events::InputSource::Terminal, None).await {
                tracing::debug!(session_id = %session, reply = %refusal.to_text(), "terminal activity not published");
            }
        });
    }

    /// `&mut`: a `&Terminal` held across an await would need the socket to be `Sync`.
    async fn exit_reason(&mut self) -> String {
        match self.docker.inspect_exec(&self.exec).await.ok().and_then(|inspected| inspected.exit_code) {
            Some(code) => format!("the shell exited ({code})"),
            None => "the shell exited".to_owned(),
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(reason) }));
        let _ = tokio::time::timeout(SEND_TIMEOUT, self.socket.send(frame)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_exact_resize_frame_is_control() {
        assert_eq!(control_frame(r#"{"type":"resize","cols":120,"rows":40}"#), Some(Control::Resize { cols: 120, rows: 40 }));
        assert_eq!(control_frame(r#"{"type":"resize","cols":0,"rows":40}"#), None);
        assert_eq!(control_frame(r#"{"type":"resize","cols":1,"rows":1,"x":1}"#), None);
        assert_eq!(control_frame("ls -l\r"), None);
        assert_eq!(control_frame("{"), None);
    }

    #[test]
    fn leaving_running_closes_with_a_code_per_state() {
        assert_eq!(close_for_state("running"), None);
        assert_eq!(close_for_state("idle").map(|(code, _)| code), Some(CLOSE_SESSION_PAUSED));
        assert_eq!(close_for_state("dormant").map(|(code, _)| code), Some(CLOSE_SESSION_PAUSED));
        assert_eq!(close_for_state("stopping").map(|(code, _)| code), Some(CLOSE_SESSION_STOPPED));
        assert_eq!(close_for_state("stopped").map(|(code, _)| code), Some(CLOSE_SESSION_STOPPED));
        assert_eq!(close_for_state("closed").map(|(code, _)| code), Some(CLOSE_SESSION_CLOSED));
        assert_eq!(close_for_state("failed").map(|(code, _)| code), Some(CLOSE_SESSION_CLOSED));
    }

    #[test]
    fn nothing_is_started_in_a_container_being_frozen() {
        assert_eq!(HangUp::after_close(CLOSE_SESSION_PAUSED), HangUp::AfterResume);
        assert_eq!(HangUp::after_close(CLOSE_SESSION_STOPPED), HangUp::Never);
        assert_eq!(HangUp::after_close(CLOSE_SESSION_CLOSED), HangUp::Never);
        assert_eq!(HangUp::after_close(CLOSE_NORMAL), HangUp::Now);
        assert_eq!(HangUp::after_close(CLOSE_POLICY_VIOLATION), HangUp::Now);
    }
}
