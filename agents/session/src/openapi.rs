//! The HTTP API's OpenAPI 3 document, generated from the handlers' and bodies' Rust types
//! (utoipa), served at `/api/openapi.json` and committed as `agents/session/openapi.json`.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Berth session agent",
        version = "1",
        description = "The users' door over HTTP: the twin of the WebSocket protocol at `/ws` (open, list, read, close, activity), a session's files and its terminal. Every route takes the user's JWT (`Authorization: Bearer`; for WebSockets also a `bearer.<token>` subprotocol or `?access_token=`). Errors are `{\"error\": <code>, \"message\": …}` with the WebSocket protocol's codes. See agents/session/README.md."
    ),
    paths(
        crate::server::list_sessions,
        crate::api::open_session,
        crate::api::get_session,
        crate::api::close_session,
        crate::api::session_activity,
        crate::api::session_keepalive,
        crate::usage::usage,
        crate::terminal::terminal,
        crate::files::get_root,
        crate::files::get_path,
        crate::files::put_file,
        crate::files::delete_path,
        crate::files::post_path,
    ),
    components(schemas(
        crate::api::ApiError,
        crate::api::ApiErrorCode,
        crate::api::OpenRequest,
        crate::api::OpenResponse,
        crate::api::SessionList,
        crate::api::CloseResponse,
        crate::api::ActivityResponse,
        crate::api::KeepaliveResponse,
        crate::usage::UsageReport,
        crate::frames::SessionStatus,
        crate::files::FileEntry,
        crate::files::EntryKind,
        crate::files::FolderListing,
    )),
    modifiers(&BearerToken),
    tags(
        (name = "sessions", description = "The HTTP twin of the WebSocket protocol"),
        (name = "files", description = "A session's workspace files, with the workspace agent's path safety"),
        (name = "terminal", description = "A shell in the session's container over a WebSocket (xterm.js attach protocol)"),
    )
)]
pub struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".to_owned());
        openapi.components.get_or_insert_with(Default::default).add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document as committed: pretty JSON with a final newline.
pub fn document() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

/// `GET /api/openapi.json` (no token needed: it describes, it does not reveal).
pub(crate) async fn serve_document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}

#[cfg(test)]
mod tests {
    /// The committed document is the one the types generate. Regenerate with
    /// `BERTH_WRITE_OPENAPI=1 cargo test -p session --lib committed_openapi`.
    #[test]
    fn committed_openapi_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let generated = super::document();
        if std::env::var_os("BERTH_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(committed == generated, "agents/session/openapi.json is stale: regenerate it (see this test's doc)");
    }

    #[test]
    fn every_route_is_documented() {
        let document: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let paths = document["paths"].as_object().unwrap();
        for path in [
            "/api/sessions",
            "/api/sessions/{id}",
            "/api/sessions/{id}/activity",
            "/api/sessions/{id}/terminal",
            "/api/sessions/{id}/files",
            "/api/sessions/{id}/files/{path}",
        ] {
            assert!(paths.contains_key(path), "{path} is missing");
        }
        assert_eq!(document["openapi"].as_str().map(|version| version.starts_with("3.")), Some(true));
    }
}
