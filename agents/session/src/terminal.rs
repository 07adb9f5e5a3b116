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

/// The script of a terminal's hang-up watch (see [`HangUpWatch`]): it reads its standard input
/// until end of file, then ends the terminal's processes: SIGHUP, as a closing terminal sends,
/// then SIGKILL a second later for what ignored it. It does not carry the tag itself. Needs
/// `/bin/sh`, `tr`, `grep`, `sleep` and `kill` in the image (busybox has them).
fn hang_up_watch_script(tag: &str) -> String {
    format!(
        "while read -r _; do :; done; \
         mark='{TAG_VARIABLE}={tag}'; pids=''; for p in /proc/[0-9]*; do \
         if tr '\\000' '\\n' < \"$p/environ\" 2>/dev/null | grep -qx \"$mark\"; then pids=\"$pids ${{p#/proc/}}\"; fi; done; \
         [ -z \"$pids\" ] && exit 0; kill -HUP $pids 2>/dev/null; sleep 1; kill -KILL $pids 2>/dev/null; exit 0"
    )
}

/// Waits until Docker reports `exec`'s process by its pid (or its exit), which it learns only
/// once `runc exec` has finished joining the container's cgroup: the start call returns earlier
/// (at the attach), and a pause while `runc init` is still half made wedges the container.
/// `false` if Docker does not say so within [`DOCKER_TIMEOUT`].
async fn wait_until_started(docker: &Docker, exec: &str) -> bool {
    let deadline = Instant::now() + DOCKER_TIMEOUT;
    while Instant::now() < deadline {
        match tokio::time::timeout(DOCKER_TIMEOUT, docker.inspect_exec(exec)).await {
            Ok(Ok(inspected)) if inspected.pid.is_some_and(|pid| pid > 0) || inspected.exit_code.is_some() => return true,
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            _ => return false,
        }
    }
    false
}

/// A process started in the container beside the shell, while the terminal opens, whose only
/// input is a pipe from this agent: when the terminal ends, the agent closes that pipe and the
/// watch, at end of file, ends the terminal's processes.
///
/// Why not start something when the terminal closes: an exec started while Docker freezes the
/// container joins the cgroup half made (`runc init`) and wedges the container until it is thawed
/// by hand, and a close can race a pause at any moment (the client leaves just as the session
/// idles), so no check of the container's state beforehand can rule it out. Closing a pipe starts
/// nothing: a frozen watch reads its end of file once thawed, so a terminal closed as its session
/// pauses is hung up on resume, and one whose session stops goes with the container. Why not
/// signal the exec's pid (exec inspect) from here: that needs this agent in Docker's pid namespace
/// with the right to signal the container's user, which a session agent in a container, or one
/// reaching Docker through `DOCKER_HOST`, does not have. The watch also hangs up the terminals of
/// an agent that crashed or restarted: Docker closes the pipe when the connection drops. It has no
/// TTY, so the container agent's work probe (which counts TTY execs) takes it for no terminal.
struct HangUpWatch {
    input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// Held so the attach connection stays open; the watch writes nothing.
    _output: std::pin::Pin<Box<dyn futures::Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>> + Send>>,
}

impl HangUpWatch {
    /// Starts the watch of the terminal tagged `tag`, as the terminal's user (so it may signal its
    /// processes). `None` (logged) when Docker refuses: that terminal's processes then stay until
    /// the container goes.
    async fn start(docker: &Docker, container: &str, tag: &str, user: Option<String>, session: &str) -> Option<HangUpWatch> {
        let options = CreateExecOptions::<String> {
            attach_stdin: Some(true),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            tty: Some(false),
            cmd: Some(vec!["/bin/sh".to_owned(), "-c".to_owned(), hang_up_watch_script(tag)]),
            user,
            ..Default::default()
        };
        let started = async {
            let created = docker.create_exec(container, options).await?;
            let started = docker.start_exec(&created.id, Some(StartExecOptions { detach: false, tty: false, output_capacity: None })).await;
            started.map(|started| (created.id, started))
        };
        match tokio::time::timeout(DOCKER_TIMEOUT, started).await {
            Ok(Ok((exec, StartExecResults::Attached { output, input }))) => {
                if !wait_until_started(docker, &exec).await {
                    tracing::warn!(session_id = %session, exec_id = %exec, "Docker did not report the terminal's hang-up watch running in time");
                }
                Some(HangUpWatch { input, _output: output })
            }
            Ok(Ok((_, StartExecResults::Detached))) => {
                tracing::warn!(session_id = %session, "the terminal's hang-up watch started detached; its processes will outlive it");
                None
            }
            Ok(Err(error)) => {
                tracing::warn!(session_id = %session, %error, "no hang-up watch for the terminal; its processes will outlive it");
                None
            }
            Err(_) => {
                tracing::warn!(session_id = %session, "the terminal's hang-up watch did not start in time; its processes will outlive it");
                None
            }
        }
    }

    /// Closes the watch's input (end of file; dropping the connection closes it too, should the
    /// shutdown not go through).
    async fn hang_up(mut self) {
        let _ = tokio::time::timeout(SEND_TIMEOUT, self.input.shutdown()).await;
    }
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
    // Both processes exist before the terminal is handed over, so a pause from then on finds no
    // `runc exec` of this terminal in progress; the watch is started with the shell, while the
    // container is known to run, and nothing is started in it later.
    if !wait_until_started(&docker, &exec).await {
        return ApiError::new(ApiErrorCode::Conflict, format!("session {session}'s container did not start a shell in time (paused?)"))
            .into_response();
    }
    let watch = HangUpWatch::start(&docker, &owned.container(), &tag, profile.terminal_user().map(str::to_owned), &session).await;
    tracing::info!(user = %identity.user, session_id = %session, exec_id = %exec, "terminal opened");
    upgrade.protocols([SUBPROTOCOL]).max_message_size(MAX_INPUT_FRAME_BYTES).max_frame_size(MAX_INPUT_FRAME_BYTES).on_upgrade(
        move |socket| async move {
            let terminal = Terminal { state, identity, session, docker, exec, socket };
            terminal.run(slot, shell, watch).await;
        },
    )
}

struct Terminal {
    state: Arc<AppState>,
    identity: Identity,
    session: String,
    docker: Docker,
    exec: String,
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
    async fn run(mut self, slot: ConnectionSlot, shell: Shell, watch: Option<HangUpWatch>) {
        let Shell { mut output, mut input } = shell;
        // The session's status pushes reach this instance through the user's binding, like a socket's.
        let (connection_id, mut statuses) = match self.state.hub.attach(&self.identity.user).await {
            Ok(attached) => attached,
            Err(error) => {
                tracing::warn!(session_id = %self.session, %error, "cannot watch a terminal's session");
                self.close(CLOSE_INTERNAL_ERROR, "cannot watch the session's status").await;
                drop(input);
                if let Some(watch) = watch {
                    watch.hang_up().await;
                }
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
                tracing::info!(user = %self.identity.user, session_id = %self.session, code, reason = %reason, "terminal closing");
                self.close(code, &reason).await;
                break;
            }
        }
        drop(input);
        // However the terminal ended (the client left, the shell exited, the session paused or
        // stopped): the watch ends what is left once the container runs, or goes with it.
        if let Some(watch) = watch {
            watch.hang_up().await;
        }
        self.state.hub.detach(connection_id).await;
        drop(slot);
        tracing::debug!(session_id = %self.session, exec_id = %self.exec, "terminal closed");
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

    /// The watch's script, run here by `/bin/sh` (Linux, like the container): it waits while its
    /// input is open, and at end of file ends the tagged processes and no other.
    #[test]
    fn the_hang_up_watch_ends_the_tagged_processes_at_end_of_input() {
        use std::process::{Command, Stdio};
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let spawn_sleep = |tag: &str| Command::new("sleep").arg("600").env(TAG_VARIABLE, tag).spawn().expect("sleep runs");
        let (mut tagged, mut other) = (spawn_sleep(&tag), spawn_sleep("another-terminal"));
        let mut watch =
            Command::new("/bin/sh").arg("-c").arg(hang_up_watch_script(&tag)).stdin(Stdio::piped()).spawn().expect("the watch runs");
        std::thread::sleep(Duration::from_millis(300));
        assert!(watch.try_wait().expect("watch").is_none() && tagged.try_wait().expect("sleep").is_none(), "waits while input is open");
        drop(watch.stdin.take());
        assert!(watch.wait().expect("the watch ends").success());
        let status = tagged.wait().expect("the tagged sleep ends");
        assert!(!status.success(), "ended by a signal: {status:?}");
        assert!(other.try_wait().expect("other").is_none(), "another terminal's process is left alone");
        let _ = other.kill();
        let _ = other.wait();
    }
}
