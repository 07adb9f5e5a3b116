//! Writes and deletes that never replace an object version this session did not see.
//!
//! A write names the version it expects to replace: none (`PutMode::Create`, the key must be
//! free) or the ETag/version the manifest recorded (`PutMode::Update`). Where the store can't do
//! that itself (`NotImplemented`: `file://` for updates, S3 with `aws_conditional_put=disabled`)
//! the agent reads the object's current version immediately before an unconditional write:
//! check-then-act, with the window of one request. Multipart uploads can't be conditional in
//! `object_store`, so they check just before the upload is completed. Deletes always check, then
//! delete. A version that doesn't match is a [`Written::Conflict`]: nothing was replaced.

use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload, PutResult, UpdateVersion};

use crate::error::Result;

/// The object version a write expects to find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// The key must be free.
    Absent,
    /// The key must hold this version (as the manifest recorded it).
    Version { e_tag: Option<String>, version: Option<String> },
}

impl Expected {
    /// Whether the object as it is now (`None`: no object) is the expected one.
    pub fn matches(&self, current: Option<&ObjectMeta>) -> bool {
        match (self, current) {
            (Expected::Absent, None) => true,
            (Expected::Absent, Some(_)) | (Expected::Version { .. }, None) => false,
            (Expected::Version { e_tag, version }, Some(meta)) => {
                let same_e_tag = match (e_tag, &meta.e_tag) {
                    (Some(expected), Some(found)) => expected == found,
                    // A store that gives no ETag can't be checked by it.
                    _ => true,
                };
                let same_version = match (version, &meta.version) {
                    (Some(expected), Some(found)) => expected == found,
                    _ => true,
                };
                same_e_tag && same_version
            }
        }
    }

    fn put_mode(&self) -> PutMode {
        match self {
            Expected::Absent => PutMode::Create,
            Expected::Version { e_tag: None, version: None } => PutMode::Overwrite,
            Expected::Version { e_tag, version } => PutMode::Update(UpdateVersion { e_tag: e_tag.clone(), version: version.clone() }),
        }
    }
}

/// What a conditional write did.
#[derive(Debug)]
pub enum Written {
    Done(PutResult),
    /// Someone else wrote or deleted the object since this session saw it; nothing was replaced.
    Conflict,
}

/// The object's current metadata, `None` when there is none.
pub async fn head(store: &dyn ObjectStore, key: &ObjectPath) -> Result<Option<ObjectMeta>> {
    match store.head(key).await {
        Ok(meta) => Ok(Some(meta)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Puts `payload` at `key` only if the key holds the `expected` version.
pub async fn put(store: &dyn ObjectStore, key: &ObjectPath, payload: PutPayload, expected: &Expected) -> Result<Written> {
    let mode = expected.put_mode();
    let unconditional = matches!(mode, PutMode::Overwrite);
    match store.put_opts(key, payload.clone(), PutOptions::from(mode)).await {
        Ok(result) => return Ok(Written::Done(result)),
        Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) if !unconditional => {
            return Ok(Written::Conflict)
        }
        Err(object_store::Error::NotImplemented) if !unconditional => {}
        Err(error) => return Err(error.into()),
    }
    // The store can't make this write conditional: compare, then write at once.
    if !expected.matches(head(store, key).await?.as_ref()) {
        return Ok(Written::Conflict);
    }
    Ok(Written::Done(store.put_opts(key, payload, PutOptions::from(PutMode::Overwrite)).await?))
}

/// Deletes `key` only if it holds the `expected` version. `Ok(true)`: gone (deleted now, or
/// already); `Ok(false)`: someone else changed it, so it was kept.
pub async fn delete(store: &dyn ObjectStore, key: &ObjectPath, expected: &Expected) -> Result<bool> {
    let Some(current) = head(store, key).await? else { return Ok(true) };
    if !expected.matches(Some(&current)) {
        return Ok(false);
    }
    match store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
        Err(error) => Err(error.into()),
    }
}
