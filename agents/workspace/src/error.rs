//! The workspace agent's one error type, with the kind that decides retry, answer or dead-letter.

use std::path::PathBuf;

/// Everything that can go wrong while materializing, syncing or removing a workspace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The task itself is malformed: retrying can never help.
    #[error("bad task: {0}")]
    BadTask(String),
    /// The object-store URL or its settings are unusable.
    #[error("object store configuration: {0}")]
    StoreConfig(String),
    /// The object store failed (network, server, missing bucket).
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// An object key or a local name that would land outside the workspace, or is otherwise unsafe.
    #[error("refused unsafe name(s): {0}")]
    UnsafeNames(String),
    /// The workspace is over the profile's size quota.
    #[error("workspace holds {bytes} bytes, over the quota of {quota} bytes")]
    QuotaExceeded { bytes: u64, quota: u64 },
    /// Local file-system trouble.
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    /// What was written could not be confirmed by reading it back.
    #[error("not confirmed by read-back: {0}")]
    Unconfirmed(String),
    /// The saved manifest could not be read or written.
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// `remove` was asked for before a confirmed final sync covered the directory.
    #[error("refusing to remove the workspace: {0}")]
    RemoveRefused(String),
    /// The session lives on another host now (its fence in the store says so): this host's task
    /// for it waited while the host was gone and must not write the moved session's workspace.
    #[error("superseded: {0}")]
    Superseded(String),
    /// The session's own file system (`workspace.filesystem = "image"`) could not be made,
    /// mounted or found mounted; nothing was read or written through it.
    #[error("workspace file system: {0}")]
    Filesystem(String),
    /// Over one of the agent's caps (files per workspace, path depth): refused, nothing changed.
    #[error("over a limit: {0}")]
    OverLimit(String),
    /// Publishing the answer failed: the broker is away.
    #[error("publishing the answer: {0}")]
    Publish(String),
    /// A blocking helper panicked or was cancelled.
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { action, path: path.into(), source }
    }

    /// Whether a dependency is down: the object store is unreachable, timing out or answering 5xx,
    /// or the broker is away. Such a task waits and is retried without counting as an attempt.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Store(error) => store_unavailable(error),
            Error::Publish(_) => true,
            _ => false,
        }
    }

    /// Whether trying the same thing again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store(error) => !matches!(
                error,
                object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotImplemented
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            Error::Io { .. } | Error::Unconfirmed(_) | Error::Publish(_) | Error::Join(_) | Error::Filesystem(_) => true,
            Error::BadTask(_)
            | Error::StoreConfig(_)
            | Error::UnsafeNames(_)
            | Error::QuotaExceeded { .. }
            | Error::OverLimit(_)
            | Error::Manifest { .. }
            | Error::RemoveRefused(_)
            | Error::Superseded(_) => false,
        }
    }
}

/// Connection failures and timeouts are `HttpError`s somewhere in the error's source chain;
/// a 5xx answer after the client's own retries is only visible in the message (`object_store`
/// doesn't export the type that carries the status).
fn store_unavailable(error: &object_store::Error) -> bool {
    use object_store::client::HttpErrorKind;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(http) = current.downcast_ref::<object_store::client::HttpError>() {
            if matches!(http.kind(), HttpErrorKind::Connect | HttpErrorKind::Timeout | HttpErrorKind::Interrupted | HttpErrorKind::Request)
            {
                return true;
            }
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::TimedOut
            ) {
                return true;
            }
        }
        let text = current.to_string();
        if text.contains("status code: 5") || text.contains("Service Unavailable") {
            return true;
        }
        source = current.source();
    }
    false
}
