//! The files API (`/api/sessions/{id}/files/{path}`): read, list, upload, delete, make folders
//! and rename in a session's workspace directory, with the workspace agent's own path-safe
//! operations (`workspace::Confined`: everything opened from the directory's descriptor with
//! `openat2` and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so no symlink is ever followed and
//! nothing outside the directory is reached).
//!
//! The directory is the session's on this machine, found as the workspace agent finds it
//! (`workspace::locate`: `Profile::session_dir(session)`, or inside the session's own mounted
//! image): the session agent serving files runs on the host of the workspace agent (as `berth dev`
//! and the compose stack do); a session placed on another host is that host's door's to serve
//! (`crate::proxy::doors` forwards it there before these handlers run).
//! Changes land in the directory the container sees and are synced like any other change.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use workspace::{Confined, Ownership, Placement, Removal, WorkspacePath};

use crate::api::{ApiError, ApiErrorCode, OwnedSession};
use crate::proxy::doors::Checked;
use crate::server::{query_parameter, AppState};

/// The name at the top of a workspace that Berth keeps for its tree metadata (never synced).
const RESERVED_TOP_LEVEL: &str = ".berth";
/// How much of a download is read at a time.
const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Session states in which the workspace may be written: materialized, not yet being saved.
const WRITABLE_STATES: [&str; 4] = ["running", "idle", "dormant", "waking"];

/// What an entry is, never following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    /// A FIFO, socket or device: listed, never opened.
    Special,
}

/// One entry of a listing, or what an upload, `mkdir` or `rename` left in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileEntry {
    /// The name (lossy UTF-8 for a name that is not UTF-8).
    pub name: String,
    /// The path relative to the workspace.
    pub path: String,
    pub kind: EntryKind,
    /// Bytes (a symlink's is its target's length).
    pub size: u64,
    /// Last modification, RFC 3339 UTC.
    pub mtime: String,
    /// Permission bits as octal text (`644`, `755`).
    pub mode: String,
    /// A symlink's target text, never resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A folder's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FolderListing {
    /// The folder relative to the workspace (`""` for the top).
    pub path: String,
    pub entries: Vec<FileEntry>,
}

fn entry_of(name: &std::ffi::OsStr, path: &str, metadata: &std::fs::Metadata, target: Option<&std::path::Path>) -> FileEntry {
    let file_type = metadata.file_type();
    let kind = if file_type.is_symlink() {
        EntryKind::Symlink
    } else if file_type.is_dir() {
        EntryKind::Directory
    } else if file_type.is_file() {
        EntryKind::File
    } else {
        EntryKind::Special
    };
    let mtime = chrono::DateTime::from_timestamp(metadata.mtime(), u32::try_from(metadata.mtime_nsec()).unwrap_or(0))
        .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    FileEntry {
        name: name.to_string_lossy().into_owned(),
        path: path.to_owned(),
        kind,
        size: metadata.len(),
        mtime,
        mode: format!("{:o}", metadata.permissions().mode() & 0o777),
        target: target.map(|target| target.to_string_lossy().into_owned()),
    }
}

fn special_kind(metadata: &std::fs::Metadata) -> &'static str {
    let file_type = metadata.file_type();
    if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

/// A path from the URL (already percent-decoded by the router), checked like an object key: no
/// `..` or `.`, no empty segments, no control characters or backslashes. One trailing `/` is
/// allowed (folders).
fn workspace_path(raw: &str) -> Result<WorkspacePath, ApiError> {
    let trimmed = raw.strip_suffix('/').unwrap_or(raw);
    WorkspacePath::parse(trimmed).map_err(|reason| ApiError::new(ApiErrorCode::BadRequest, format!("invalid path: {reason}")))
}

fn refuse_reserved(path: &WorkspacePath) -> Result<(), ApiError> {
    if path.as_str().split('/').next() == Some(RESERVED_TOP_LEVEL) {
        return Err(ApiError::new(
            ApiErrorCode::UnsafePath,
            format!("{RESERVED_TOP_LEVEL} at the top of a workspace is reserved for Berth's tree metadata"),
        ));
    }
    Ok(())
}

/// The HTTP form of what the workspace's file operations refuse.
fn file_error(error: workspace::Error) -> ApiError {
    match error {
        workspace::Error::UnsafeNames(message) => ApiError::new(ApiErrorCode::UnsafePath, message),
        workspace::Error::QuotaExceeded { bytes, quota } => {
            ApiError::new(ApiErrorCode::QuotaExceeded, format!("the workspace would hold {bytes} bytes, over its quota of {quota} bytes"))
        }
        workspace::Error::Io { action, path, source } => {
            let message = format!("{action} {}: {source}", path.display());
            let code = match (source.kind(), source.raw_os_error()) {
                (std::io::ErrorKind::NotFound, _) => ApiErrorCode::NotFound,
                // An image-backed workspace is a file system of exactly its quota.
                (_, Some(libc_code)) if libc_code == libc::ENOSPC || libc_code == libc::EDQUOT => ApiErrorCode::QuotaExceeded,
                (_, Some(libc_code)) if [libc::ENOTEMPTY, libc::EISDIR, libc::ENOTDIR, libc::EEXIST].contains(&libc_code) => {
                    ApiErrorCode::Conflict
                }
                (_, Some(libc_code)) if libc_code == libc::EINVAL => ApiErrorCode::BadRequest,
                (_, Some(libc_code)) if libc_code == libc::ELOOP => ApiErrorCode::UnsafePath,
                _ => ApiErrorCode::Internal,
            };
            ApiError::new(code, message)
        }
        other => ApiError::new(ApiErrorCode::Internal, other.to_string()),
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|error| ApiError::new(ApiErrorCode::Internal, format!("file work failed: {error}")))?
}

/// The session's directory: the caller owns the session.
struct Workspace {
    session: OwnedSession,
    location: workspace::Location,
}

impl Workspace {
    /// The directory of the session the doors' middleware checked (`crate::proxy::doors`).
    fn open(state: &AppState, checked: Checked) -> Workspace {
        let location = workspace::locate(&state.config.profile, &checked.session.id);
        Workspace { session: checked.session, location }
    }

    async fn confined(&self) -> Result<Arc<Confined>, ApiError> {
        let directory = self.location.directory.clone();
        let volume = self.location.volume.clone();
        let session = self.session.id.clone();
        blocking(move || {
            // An image whose mount is not in place leaves an empty folder: never serve that.
            if let Some(volume) = &volume {
                if !workspace::is_attached(volume).map_err(file_error)? {
                    return Err(ApiError::new(
                        ApiErrorCode::Conflict,
                        format!("session {session}'s workspace file system is not mounted on this host"),
                    ));
                }
            }
            open_confined(&directory, &session)
        })
        .await
    }

    fn staging(&self) -> PathBuf {
        self.location.staging.clone()
    }

    fn writable(&self) -> Result<(), ApiError> {
        let state = self.session.state();
        if WRITABLE_STATES.contains(&state) {
            return Ok(());
        }
        Err(ApiError::new(
            ApiErrorCode::Conflict,
            format!("session {} is {state}: its files can be changed while it is running or idle", self.session.id),
        ))
    }
}

fn open_confined(directory: &std::path::Path, session: &str) -> Result<Arc<Confined>, ApiError> {
    match Confined::open(directory) {
        Ok(confined) => Ok(Arc::new(confined)),
        Err(workspace::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Err(ApiError::new(
            ApiErrorCode::Conflict,
            format!("session {session} has no workspace on this host (not materialized yet, or already removed)"),
        )),
        Err(error) => Err(file_error(error)),
    }
}

fn owner(state: &AppState) -> Option<Ownership> {
    state.config.profile.container.user.as_deref().and_then(Ownership::parse)
}

/// `GET /api/sessions/{id}/files`: the top folder's listing.
#[utoipa::path(
    get, path = "/api/sessions/{id}/files", tag = "files",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "The workspace's top folder", body = FolderListing),
        (status = 404, description = "No such session among yours", body = ApiError),
        (status = 409, description = "The session has no workspace on this host", body = ApiError),
        (status = 503, description = "`host_unreachable`: the session runs on another host whose door does not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_root(State(state): State<Arc<AppState>>, checked: Checked) -> Response {
    let workspace = Workspace::open(&state, checked);
    match list(&workspace, None).await {
        Ok(listing) => Json(listing).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn list(workspace: &Workspace, folder: Option<WorkspacePath>) -> Result<FolderListing, ApiError> {
    let confined = workspace.confined().await?;
    blocking(move || {
        let entries = confined.list_folder(folder.as_ref()).map_err(file_error)?;
        let prefix = folder.as_ref().map(|folder| format!("{folder}/")).unwrap_or_default();
        let entries = entries
            .iter()
            .map(|entry| {
                entry_of(&entry.name, &format!("{prefix}{}", entry.name.to_string_lossy()), &entry.metadata, entry.link_target.as_deref())
            })
            .collect();
        Ok(FolderListing { path: folder.map(|folder| folder.to_string()).unwrap_or_default(), entries })
    })
    .await
}

/// `GET /api/sessions/{id}/files/{path}`: a file's bytes, or a folder's listing.
#[utoipa::path(
    get, path = "/api/sessions/{id}/files/{path}", tag = "files",
    params(("id" = String, Path, description = "The session id"), ("path" = String, Path, description = "Relative path inside the workspace")),
    responses(
        (status = 200, description = "A regular file's bytes (`application/octet-stream`, with `Content-Length`), or a folder's listing (JSON)", body = FolderListing,
         content_type = "application/json"),
        (status = 400, description = "Invalid path (`..`, `.`, empty segments, control characters)", body = ApiError),
        (status = 403, description = "A symlink (never followed), a FIFO, socket or device", body = ApiError),
        (status = 404, description = "No such session among yours, or nothing at that path", body = ApiError),
        (status = 409, description = "The session has no workspace on this host", body = ApiError),
        (status = 503, description = "`host_unreachable`: the session runs on another host whose door does not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn get_path(
    State(state): State<Arc<AppState>>,
    Path((_, raw_path)): Path<(String, String)>,
    checked: Checked,
) -> Response {
    let workspace = Workspace::open(&state, checked);
    match read(&workspace, &raw_path).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn read(workspace: &Workspace, raw_path: &str) -> Result<Response, ApiError> {
    let path = workspace_path(raw_path)?;
    let confined = workspace.confined().await?;
    let opened = {
        let path = path.clone();
        let confined = confined.clone();
        blocking(move || {
            let Some(metadata) = confined.entry_metadata(&path).map_err(file_error)? else {
                return Err(ApiError::new(ApiErrorCode::NotFound, format!("nothing at {path}")));
            };
            let file_type = metadata.file_type();
            if file_type.is_symlink() {
                return Err(ApiError::new(ApiErrorCode::UnsafePath, format!("{path} is a symlink: never followed")));
            }
            if file_type.is_dir() {
                return Ok(None);
            }
            if !file_type.is_file() {
                return Err(ApiError::new(ApiErrorCode::UnsafePath, format!("{path} is {}: not a regular file", special_kind(&metadata))));
            }
            // `open_file` checks again on the opened file, so a swap since is refused too.
            confined.open_file(&path).map(Some).map_err(file_error)
        })
        .await?
    };
    let Some((file, metadata)) = opened else {
        return Ok(Json(list(workspace, Some(path)).await?).into_response());
    };
    let length = metadata.len();
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = file;
        loop {
            let mut buffer = vec![0u8; READ_CHUNK_BYTES];
            match file.read(&mut buffer) {
                Ok(0) => return,
                Ok(read) => {
                    buffer.truncate(read);
                    if sender.blocking_send(Ok(Bytes::from(buffer))).is_err() {
                        return;
                    }
                }
                Err(error) => {
                    let _ = sender.blocking_send(Err(error));
                    return;
                }
            }
        }
    });
    let chunks = futures::stream::unfold(receiver, |mut receiver| async move { receiver.recv().await.map(|chunk| (chunk, receiver)) });
    let mut response = Response::new(Body::from_stream(chunks));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}

/// `PUT /api/sessions/{id}/files/{path}`: uploads a file (streamed), creating its folders.
#[utoipa::path(
    put, path = "/api/sessions/{id}/files/{path}", tag = "files",
    params(("id" = String, Path, description = "The session id"), ("path" = String, Path, description = "Relative path inside the workspace")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's bytes, streamed"),
    responses(
        (status = 201, description = "Created", body = FileEntry),
        (status = 200, description = "Replaced an existing file (its mode is kept)", body = FileEntry),
        (status = 400, description = "Invalid path", body = ApiError),
        (status = 403, description = "The path, or a folder on the way, is a symlink, a special file or the reserved `.berth`", body = ApiError),
        (status = 409, description = "A folder is at that path, or the session is not running or idle", body = ApiError),
        (status = 413, description = "Larger than the largest upload", body = ApiError),
        (status = 507, description = "Would take the workspace over its quota", body = ApiError),
        (status = 503, description = "`host_unreachable`: the session runs on another host whose door does not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn put_file(
    State(state): State<Arc<AppState>>,
    Path((_, raw_path)): Path<(String, String)>,
    headers: HeaderMap,
    checked: Checked,
    body: Body,
) -> Response {
    let workspace = Workspace::open(&state, checked);
    match upload(&state, &workspace, &raw_path, &headers, body).await {
        Ok((status, entry)) => (status, Json(entry)).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn upload(
    state: &AppState,
    workspace: &Workspace,
    raw_path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, FileEntry), ApiError> {
    let path = workspace_path(raw_path)?;
    refuse_reserved(&path)?;
    workspace.writable()?;
    let confined = workspace.confined().await?;
    let quota = state.config.profile.workspace.quota_mib.saturating_mul(1024 * 1024);
    let max_upload = state.config.max_upload_bytes;
    // What is there now, and how much room the quota leaves for the new content.
    let (existing_mode, room) = {
        let confined = confined.clone();
        let path = path.clone();
        blocking(move || {
            let existing = confined.entry_metadata(&path).map_err(file_error)?;
            let existing_mode = match &existing {
                None => None,
                Some(metadata) if metadata.file_type().is_symlink() => {
                    return Err(ApiError::new(ApiErrorCode::UnsafePath, format!("{path} is a symlink: never written through")));
                }
                Some(metadata) if metadata.is_dir() => return Err(ApiError::new(ApiErrorCode::Conflict, format!("{path} is a folder"))),
                Some(metadata) if !metadata.is_file() => {
                    return Err(ApiError::new(
                        ApiErrorCode::UnsafePath,
                        format!("{path} is {}: not a regular file", special_kind(metadata)),
                    ));
                }
                Some(metadata) => Some(metadata.permissions().mode() & 0o777),
            };
            let used = workspace::scan(confined.root_path()).map_err(file_error)?.file_bytes();
            let replaced = existing.as_ref().map_or(0, std::fs::Metadata::len);
            Ok((existing_mode, quota.saturating_sub(used.saturating_sub(replaced))))
        })
        .await?
    };
    let limit_error = |size: u64| {
        if size > max_upload {
            ApiError::new(ApiErrorCode::PayloadTooLarge, format!("uploads are at most {max_upload} bytes"))
        } else {
            ApiError::new(ApiErrorCode::QuotaExceeded, format!("the workspace's quota ({quota} bytes) leaves room for {room} bytes"))
        }
    };
    let allowed = max_upload.min(room);
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()).and_then(|value| value.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|declared| *declared > allowed) {
        return Err(limit_error(declared));
    }
    // Written in the staging folder outside the workspace, then linked into place whole: the
    // container and the sync never see half a file.
    let staging = workspace.staging();
    let owner = owner(state);
    let (chunks, mut received) = tokio::sync::mpsc::channel::<Bytes>(4);
    let writer = tokio::task::spawn_blocking(move || {
        let mut staged = workspace::StagedFile::create(&staging).map_err(file_error)?;
        while let Some(chunk) = received.blocking_recv() {
            if let Err(error) = staged.write(&chunk) {
                staged.discard();
                return Err(file_error(error));
            }
        }
        staged.finish(owner).map_err(file_error)
    });
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                written = written.saturating_add(chunk.len() as u64);
                if written > allowed {
                    failure = Some(limit_error(written));
                    break;
                }
                if chunks.send(chunk).await.is_err() {
                    // The writer failed; its error is the answer.
                    break;
                }
            }
            Err(error) => {
                failure = Some(ApiError::new(ApiErrorCode::BadRequest, format!("the upload broke off: {error}")));
                break;
            }
        }
    }
    drop(chunks);
    let staged = writer.await.map_err(|error| ApiError::new(ApiErrorCode::Internal, format!("file work failed: {error}")))?;
    if let Some(failure) = failure {
        if let Ok(staged) = &staged {
            let _ = std::fs::remove_file(&staged.path);
        }
        return Err(failure);
    }
    let staged = staged?;
    let status = if existing_mode.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    let mode = existing_mode.unwrap_or(0o644);
    let entry = blocking(move || {
        if let Err(error) = confined.place(&staged.path, &path, Placement::ReplaceExisting, owner, mode) {
            let _ = std::fs::remove_file(&staged.path);
            return Err(file_error(error));
        }
        described(&confined, &path)
    })
    .await?;
    tracing::info!(session_id = %workspace.session.id, path = %entry.path, bytes = written, "file uploaded over http");
    Ok((status, entry))
}

/// What is at `path` now, for the answer of a write.
fn described(confined: &Confined, path: &WorkspacePath) -> Result<FileEntry, ApiError> {
    let metadata = confined
        .entry_metadata(path)
        .map_err(file_error)?
        .ok_or_else(|| ApiError::new(ApiErrorCode::NotFound, format!("{path} is gone")))?;
    Ok(entry_of(std::ffi::OsStr::new(path.file_name()), path.as_str(), &metadata, None))
}

/// `DELETE /api/sessions/{id}/files/{path}`: removes a file, symlink (not what it points to) or
/// folder (`?recursive=true` when it is not empty).
#[utoipa::path(
    delete, path = "/api/sessions/{id}/files/{path}", tag = "files",
    params(("id" = String, Path, description = "The session id"), ("path" = String, Path, description = "Relative path inside the workspace"),
           ("recursive" = Option<bool>, Query, description = "`true` removes a folder with everything in it")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Invalid path", body = ApiError),
        (status = 403, description = "A folder on the way is a symlink, or the path is the reserved `.berth`", body = ApiError),
        (status = 404, description = "No such session among yours, or nothing at that path", body = ApiError),
        (status = 409, description = "A folder that is not empty (without `recursive=true`), or the session is not running or idle", body = ApiError),
        (status = 503, description = "`host_unreachable`: the session runs on another host whose door does not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn delete_path(
    State(state): State<Arc<AppState>>,
    Path((session, raw_path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    checked: Checked,
) -> Response {
    let workspace = Workspace::open(&state, checked);
    let removal =
        if query_parameter(query.as_deref(), "recursive").as_deref() == Some("true") { Removal::Recursive } else { Removal::EmptyFolder };
    let outcome = async {
        let path = workspace_path(&raw_path)?;
        refuse_reserved(&path)?;
        workspace.writable()?;
        let confined = workspace.confined().await?;
        blocking(move || {
            if confined.entry_metadata(&path).map_err(file_error)?.is_none() {
                return Err(ApiError::new(ApiErrorCode::NotFound, format!("nothing at {path}")));
            }
            confined.remove_entry(&path, removal).map_err(|error| match file_error(error) {
                refusal if refusal.code == ApiErrorCode::Conflict => ApiError::new(
                    ApiErrorCode::Conflict,
                    format!("{path} is a folder that is not empty: add ?recursive=true to remove it with everything in it"),
                ),
                refusal => refusal,
            })
        })
        .await
    };
    match outcome.await {
        Ok(()) => {
            tracing::info!(session_id = %session, path = %raw_path, "file removed over http");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(error) => error.into_response(),
    }
}

/// `POST /api/sessions/{id}/files/{path}?op=mkdir` makes a folder (and its parents);
/// `?op=rename&to=<path>` moves the entry there, never replacing anything.
#[utoipa::path(
    post, path = "/api/sessions/{id}/files/{path}", tag = "files",
    params(("id" = String, Path, description = "The session id"), ("path" = String, Path, description = "Relative path inside the workspace"),
           ("op" = String, Query, description = "`mkdir` or `rename`"),
           ("to" = Option<String>, Query, description = "With `rename`: the new relative path (percent-encoded)")),
    responses(
        (status = 201, description = "`mkdir`: created (200 when the folder was there already); `rename`: moved", body = FileEntry),
        (status = 200, description = "`mkdir` of a folder that exists", body = FileEntry),
        (status = 400, description = "Invalid path, `op` or `to`", body = ApiError),
        (status = 403, description = "A symlink on the way, or the reserved `.berth`", body = ApiError),
        (status = 404, description = "No such session among yours, or nothing to rename", body = ApiError),
        (status = 409, description = "The target name is taken, a file is in the folder's place, or the session is not running or idle", body = ApiError),
        (status = 503, description = "`host_unreachable`: the session runs on another host whose door does not answer", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn post_path(
    State(state): State<Arc<AppState>>,
    Path((_, raw_path)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    checked: Checked,
) -> Response {
    let workspace = Workspace::open(&state, checked);
    let owner = owner(&state);
    let outcome = match query_parameter(query.as_deref(), "op").as_deref() {
        Some("mkdir") => make_folder(&workspace, &raw_path, owner).await,
        Some("rename") => match query_parameter(query.as_deref(), "to") {
            Some(to) => rename(&workspace, &raw_path, &to, owner).await,
            None => Err(ApiError::new(ApiErrorCode::BadRequest, "`op=rename` needs `to=<new path>`")),
        },
        _ => Err(ApiError::new(ApiErrorCode::BadRequest, "`op` must be `mkdir` or `rename`")),
    };
    match outcome {
        Ok((status, entry)) => (status, Json(entry)).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn make_folder(workspace: &Workspace, raw_path: &str, owner: Option<Ownership>) -> Result<(StatusCode, FileEntry), ApiError> {
    let path = workspace_path(raw_path)?;
    refuse_reserved(&path)?;
    workspace.writable()?;
    let confined = workspace.confined().await?;
    blocking(move || {
        let status = match confined.entry_metadata(&path).map_err(file_error)? {
            None => StatusCode::CREATED,
            Some(metadata) if metadata.file_type().is_symlink() => {
                return Err(ApiError::new(ApiErrorCode::UnsafePath, format!("{path} is a symlink: never followed")));
            }
            Some(metadata) if metadata.is_dir() => StatusCode::OK,
            Some(_) => return Err(ApiError::new(ApiErrorCode::Conflict, format!("{path} exists and is not a folder"))),
        };
        confined.create_folder(&path, owner).map_err(file_error)?;
        Ok((status, described(&confined, &path)?))
    })
    .await
}

async fn rename(
    workspace: &Workspace,
    raw_from: &str,
    raw_to: &str,
    owner: Option<Ownership>,
) -> Result<(StatusCode, FileEntry), ApiError> {
    let from = workspace_path(raw_from)?;
    let to = workspace_path(raw_to).map_err(|error| ApiError::new(error.code, format!("`to`: {}", error.message)))?;
    refuse_reserved(&from)?;
    refuse_reserved(&to)?;
    workspace.writable()?;
    let confined = workspace.confined().await?;
    blocking(move || {
        if confined.entry_metadata(&from).map_err(file_error)?.is_none() {
            return Err(ApiError::new(ApiErrorCode::NotFound, format!("nothing at {from}")));
        }
        if !confined.rename_entry(&from, &to, owner).map_err(file_error)? {
            return Err(ApiError::new(ApiErrorCode::Conflict, format!("{to} already exists: nothing is replaced")));
        }
        Ok((StatusCode::CREATED, described(&confined, &to)?))
    })
    .await
}
