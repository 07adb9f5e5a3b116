//! The session crate's one error type, with the kind that decides how a caller reacts.

use std::path::PathBuf;

/// Everything that can go wrong in the session agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("broker: {0}")]
    Bus(#[from] protocol::bus::BusError),
    #[error("cannot listen on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
    #[error("jwt key file {path}: {source}")]
    KeyFile { path: PathBuf, source: std::io::Error },
    #[error("jwt key from {origin} is unusable: {reason}")]
    BadKey { origin: String, reason: String },
    #[error("cannot mint tokens: {0}")]
    CannotMint(String),
    #[error("invalid ttl {text:?}: {reason}")]
    BadTtl { text: String, reason: String },
    #[error("invalid session configuration: {0}")]
    Config(String),
    #[error("the store did not answer: {0}")]
    StoreUnavailable(String),
    #[error("the store refused the request ({kind}): {message}")]
    StoreRefused { kind: String, message: String },
    #[error("the store's reply is malformed: {0}")]
    StoreReply(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
