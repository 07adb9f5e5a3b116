//! The WebSocket protocol: JSON text frames from the client (requests) and from the server
//! (replies, status pushes, the snapshot on connect). Parsing never fails silently: every request,
//! even an unreadable one, gets an `ok` or an `error` reply naming what was wrong.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A validated client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    /// Start a workspace session; answered with the new session id.
    Open { workspace: String, profile: String },
    /// Close one of the caller's sessions.
    Close { session: String, reason: Option<String> },
    /// The user did something in the session's UI (keystroke, click, scroll).
    Activity { session: String },
    /// "Keep working": postpone the idle ladder once (bounded by the profile's `max_keepalives`
    /// in a row without input); a paused or dormant session wakes.
    Keepalive { session: String },
    /// Send the current status of a session now and its status pushes from now on.
    Subscribe { session: String },
    /// Application-level liveness check for clients that cannot send WebSocket pings.
    Ping,
}

/// One client frame: the request id to echo (if any) and the request or why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFrame {
    pub request_id: Option<String>,
    pub request: Result<ClientRequest, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    workspace: String,
    profile: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    session: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionBody {
    session: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// Parses one text frame. The request id is recovered even when the rest is wrong, so the error
/// reply can be matched to its request.
pub fn parse_client_frame(text: &str) -> ParsedFrame {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(error) => return ParsedFrame { request_id: None, request: Err(format!("frame is not valid JSON: {error}")) },
    };
    let Value::Object(mut object) = value else {
        return ParsedFrame { request_id: None, request: Err("frame must be a JSON object".to_owned()) };
    };
    let request_id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if !id.is_empty() && id.len() <= 128 => Some(id),
        Some(_) => return ParsedFrame { request_id: None, request: Err("`id` must be a string of 1 to 128 characters".to_owned()) },
    };
    let request = parse_request(object);
    ParsedFrame { request_id, request }
}

fn parse_request(mut object: Map<String, Value>) -> Result<ClientRequest, String> {
    let frame_type = match object.remove("type") {
        Some(Value::String(frame_type)) => frame_type,
        Some(_) => return Err("`type` must be a string".to_owned()),
        None => return Err("`type` is missing (open, close, activity, keepalive, subscribe or ping)".to_owned()),
    };
    let body = Value::Object(object);
    // The path names the member at fault ("`close` frame: `session`: invalid type: null, ...").
    let field_error = |error: serde_path_to_error::Error<serde_json::Error>| {
        let reason = printable(&error.inner().to_string());
        match error.path().to_string().as_str() {
            "." => format!("`{frame_type}` frame: {reason}"),
            path => format!("`{frame_type}` frame: `{}`: {reason}", printable(path)),
        }
    };
    match frame_type.as_str() {
        "open" => {
            let open: OpenBody = serde_path_to_error::deserialize(body).map_err(field_error)?;
            validate_workspace_id(&open.workspace)?;
            Ok(ClientRequest::Open { workspace: open.workspace, profile: open.profile })
        }
        "close" => {
            let close: CloseBody = serde_path_to_error::deserialize(body).map_err(field_error)?;
            validate_session_id(&close.session)?;
            if close.reason.as_ref().is_some_and(|reason| reason.len() > 256) {
                return Err("`reason` is longer than 256 characters".to_owned());
            }
            Ok(ClientRequest::Close { session: close.session, reason: close.reason })
        }
        "activity" => {
            let activity: SessionBody = serde_path_to_error::deserialize(body).map_err(field_error)?;
            validate_session_id(&activity.session)?;
            Ok(ClientRequest::Activity { session: activity.session })
        }
        "keepalive" => {
            let keepalive: SessionBody = serde_path_to_error::deserialize(body).map_err(field_error)?;
            validate_session_id(&keepalive.session)?;
            Ok(ClientRequest::Keepalive { session: keepalive.session })
        }
        "subscribe" => {
            let subscribe: SessionBody = serde_path_to_error::deserialize(body).map_err(field_error)?;
            validate_session_id(&subscribe.session)?;
            Ok(ClientRequest::Subscribe { session: subscribe.session })
        }
        "ping" => {
            let _: EmptyBody = serde_path_to_error::deserialize(body).map_err(field_error)?;
            Ok(ClientRequest::Ping)
        }
        other => Err(format!("unknown frame `type` {other:?} (expected open, close, activity, keepalive, subscribe or ping)")),
    }
}

/// `text` with control characters, bidi controls and zero-width marks escaped: member names come
/// from the client, and printed raw they would garble the reply and the log line.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            let garbling =
                c.is_control() || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}');
            if garbling {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Workspace ids become part of object-store prefixes ([`protocol::ids::WorkspaceId`]).
pub(crate) fn validate_workspace_id(workspace: &str) -> Result<(), String> {
    protocol::ids::WorkspaceId::parse(workspace).map(drop).map_err(|error| format!("`workspace`: {error}"))
}

/// Session ids name containers and directories ([`protocol::ids::SessionId`]).
fn validate_session_id(session: &str) -> Result<(), String> {
    protocol::ids::SessionId::parse(session).map(drop).map_err(|error| format!("`session`: {error}"))
}

/// Why a request was refused: a closed set clients can switch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is malformed or names something invalid.
    BadRequest,
    /// The frame is over `max_frame_bytes`.
    FrameTooLarge,
    /// Over `max_messages_per_second`; the frame was not processed.
    RateLimited,
    /// No such session among those the caller may see (another user's session looks the same).
    NotFound,
    /// The broker or the store did not answer; retry later.
    Unavailable,
    /// The request was carried out (its event published) but its answer did not come in time:
    /// the outcome will show in status pushes. Do not simply retry (an `open` would be sent twice).
    Timeout,
    /// The engine refused an `open` over a per-user limit; `limit` names it (`sessions_per_user`,
    /// `opens_per_minute`, `daily_budget`, `monthly_budget`).
    LimitExceeded,
    /// The open waited in the capacity queue too long and was given up.
    QueueTimeout,
}

/// The state of one session as clients see it, from a notification or a stored record.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SessionStatus {
    pub session: String,
    pub user: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub detail: Value,
}

impl SessionStatus {
    /// From an engine notification: host, port, progress and error are lifted out of `detail`.
    pub fn from_notification(notification: &protocol::Notification) -> Option<SessionStatus> {
        let session = notification.session.clone()?;
        let lift = |name: &str| notification.detail.get(name).filter(|value| !value.is_null()).cloned();
        Some(SessionStatus {
            session,
            user: notification.user.clone(),
            state: notification.state.clone(),
            workspace: lift("workspace").and_then(|value| value.as_str().map(str::to_owned)),
            progress: lift("progress"),
            host: lift("host"),
            port: lift("port"),
            error: lift("error"),
            detail: notification.detail.clone(),
        })
    }

    /// From a `sessions` record of the store.
    pub fn from_record(record: &Value) -> Option<SessionStatus> {
        let text = |name: &str| record.get(name).and_then(Value::as_str).map(str::to_owned);
        let lift = |name: &str| record.get(name).filter(|value| !value.is_null()).cloned();
        Some(SessionStatus {
            session: text("id")?,
            user: text("user")?,
            state: text("state").unwrap_or_else(|| "unknown".to_owned()),
            workspace: text("workspace"),
            progress: lift("progress"),
            host: lift("host"),
            port: lift("port"),
            error: lift("error"),
            detail: Value::Null,
        })
    }
}

/// Everything the server sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The request succeeded. `session` names the session after `open` (the new one, or the live
    /// one it joined: `joined`); `status` comes with `subscribe`; `debounced` tells whether an
    /// `activity` was folded into an earlier event.
    Ok {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<SessionStatus>,
        #[serde(skip_serializing_if = "Option::is_none")]
        debounced: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        joined: Option<bool>,
        /// After `open`: `queued` when the session waits for host capacity (then `position`).
        #[serde(skip_serializing_if = "Option::is_none")]
        state: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        position: Option<u64>,
    },
    /// The request was refused (or, with `timeout`, not answered in time).
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: ErrorCode,
        message: String,
        /// The session the request was about, when the client could not know it (an `open` that
        /// timed out names the id it asked for).
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// With `limit_exceeded`: which limit.
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
    },
    /// A session changed state.
    Status(SessionStatus),
    /// Sent once right after the connection is accepted: who you are and the current state of your
    /// sessions (`sessions` is absent and `error` set when the store could not be reached).
    Snapshot {
        user: String,
        roles: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sessions: Option<Vec<SessionStatus>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// What a socket gets instead of a frame that did not serialize.
const UNENCODABLE_FRAME: &str = r#"{"type":"error","code":"unavailable","message":"the server could not encode its answer"}"#;

impl ServerFrame {
    pub fn ok(id: Option<String>) -> ServerFrame {
        ServerFrame::Ok { id, session: None, status: None, debounced: None, joined: None, state: None, position: None }
    }

    /// `ok` naming a session.
    pub fn ok_session(id: Option<String>, session: &str) -> ServerFrame {
        ServerFrame::Ok { id, session: Some(session.to_owned()), status: None, debounced: None, joined: None, state: None, position: None }
    }

    pub fn error(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        ServerFrame::Error { id, code, message: message.into(), session: None, limit: None }
    }

    /// The frame as sent. A frame is strings and JSON values, which always serialize; were one
    /// not to, the socket gets an `unavailable` error frame, never an empty one.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|error| {
            tracing::error!(%error, "a server frame did not serialize; sending an error frame instead");
            UNENCODABLE_FRAME.to_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &str = "01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f";

    #[track_caller]
    fn check(text: &str, expected_id: Option<&str>, expected: Result<ClientRequest, &str>) {
        let parsed = parse_client_frame(text);
        assert_eq!(parsed.request_id.as_deref(), expected_id, "{text}");
        match (parsed.request, expected) {
            (Ok(actual), Ok(expected)) => assert_eq!(actual, expected),
            (Err(actual), Err(fragment)) => assert!(actual.contains(fragment), "{actual:?} lacks {fragment:?}"),
            (actual, expected) => panic!("{text}: got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn client_frame_table() {
        check(
            r#"{"type":"open","id":"r1","workspace":"w1","profile":"dev"}"#,
            Some("r1"),
            Ok(ClientRequest::Open { workspace: "w1".into(), profile: "dev".into() }),
        );
        check(
            &format!(r#"{{"type":"close","session":"{SESSION}"}}"#),
            None,
            Ok(ClientRequest::Close { session: SESSION.into(), reason: None }),
        );
        check(
            &format!(r#"{{"type":"activity","id":"a","session":"{SESSION}"}}"#),
            Some("a"),
            Ok(ClientRequest::Activity { session: SESSION.into() }),
        );
        check(
            &format!(r#"{{"type":"subscribe","id":"s","session":"{SESSION}"}}"#),
            Some("s"),
            Ok(ClientRequest::Subscribe { session: SESSION.into() }),
        );
        check(r#"{"type":"ping","id":"p"}"#, Some("p"), Ok(ClientRequest::Ping));
        check("{", None, Err("not valid JSON"));
        check("[1]", None, Err("must be a JSON object"));
        check(r#"{"id":"x"}"#, Some("x"), Err("`type` is missing"));
        check(r#"{"id":"x","type":"dance"}"#, Some("x"), Err("unknown frame `type` \"dance\""));
        check(r#"{"id":"x","type":"open","workspace":"w1"}"#, Some("x"), Err("missing field `profile`"));
        check(r#"{"id":"x","type":"open","workspace":"../etc","profile":"dev"}"#, Some("x"), Err("`workspace`"));
        check(r#"{"id":"x","type":"open","workspace":"w","profile":"dev","user":"bob"}"#, Some("x"), Err("unknown field `user`"));
        check(r#"{"id":"x","type":"close","session":"../nope"}"#, Some("x"), Err("`session`: session id"));
        check(r#"{"id":7,"type":"ping"}"#, None, Err("`id` must be a string"));
        // Found by tests/frame_properties.rs: the member at fault is named, and shown escaped.
        check(
            &format!(r#"{{"id":"x","type":"close","session":"{SESSION}","session":null}}"#),
            Some("x"),
            Err("`close` frame: `session`: invalid type: null, expected a string"),
        );
        check(r#"{"id":"x","type":"ping","\u202e":1}"#, Some("x"), Err("`ping` frame: `\\u{202e}`: unknown field `\\u{202e}`"));
    }

    #[test]
    fn server_frames_are_tagged() {
        let text = ServerFrame::error(Some("r1".into()), ErrorCode::NotFound, "no such session").to_text();
        assert_eq!(text, r#"{"type":"error","id":"r1","code":"not_found","message":"no such session"}"#);
        let text = ServerFrame::ok_session(Some("r2".into()), "s").to_text();
        assert_eq!(text, r#"{"type":"ok","id":"r2","session":"s"}"#);
        let text = ServerFrame::Ok {
            id: Some("r3".into()),
            session: Some("s".into()),
            status: None,
            debounced: None,
            joined: Some(true),
            state: None,
            position: None,
        }
        .to_text();
        assert_eq!(text, r#"{"type":"ok","id":"r3","session":"s","joined":true}"#);
        let timeout =
            ServerFrame::Error { id: None, code: ErrorCode::Timeout, message: "late".into(), session: Some("s".into()), limit: None };
        assert_eq!(timeout.to_text(), r#"{"type":"error","code":"timeout","message":"late","session":"s"}"#);
    }
}
