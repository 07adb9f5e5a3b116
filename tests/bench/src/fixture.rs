//! Benchmark fixtures shared by `berth bench workspace` and `berth bench e2e`: deterministic files
//! seeded into an object store, a raw `object_store` download of them (the baseline), and clean-up.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, PutPayload};
use protocol::Profile;

use workspace::OpenedStore;

/// `count` files totalling about `total_bytes`: `large_count` of them above the profile's large-file
/// threshold, the rest equal small files below it.
pub fn layout(profile: &Profile, count: usize, large_count: usize, total_bytes: usize) -> Vec<(String, usize)> {
    let threshold = usize::try_from(profile.workspace.large_file_threshold_kib * 1024).unwrap_or(usize::MAX);
    let large_size = (total_bytes / 2 / large_count.max(1)).max(threshold + 1);
    let small_size = (total_bytes.saturating_sub(large_size * large_count)) / (count - large_count).max(1);
    (0..count)
        .map(|index| {
            let size = if index < large_count { large_size } else { small_size.min(threshold.saturating_sub(1)) };
            (format!("folder-{}/file-{index:04}.bin", index % 10), size)
        })
        .collect()
}

/// The full object prefix of one workspace: the store's root, then the profile's prefix.
pub fn object_prefix(profile: &Profile, store: &OpenedStore, user: &str, workspace: &str) -> anyhow::Result<ObjectPath> {
    let relative = ObjectPath::parse(profile.workspace_prefix(user, workspace))?;
    Ok(store.root.parts().chain(relative.parts()).collect())
}

/// Puts `files` (relative path, size) under `prefix`, with deterministic content.
pub async fn seed(store: &OpenedStore, prefix: &ObjectPath, files: Vec<(String, usize)>) -> anyhow::Result<()> {
    futures::stream::iter(files.into_iter().enumerate())
        .map(|(index, (name, size))| {
            let key: ObjectPath = prefix.parts().chain(ObjectPath::from(name.as_str()).parts()).collect();
            let content = Bytes::from(filler(index as u64, size));
            let store = store.store.clone();
            async move { store.put(&key, PutPayload::from(content)).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

fn filler(seed: u64, size: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut content = Vec::with_capacity(size);
    while content.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        content.extend_from_slice(&state.to_le_bytes());
    }
    content.truncate(size);
    content
}

/// Downloads every object under `prefix` with `parallelism` requests at a time: the baseline.
pub async fn raw_download(store: &OpenedStore, prefix: &ObjectPath, parallelism: usize) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let listing: Vec<ObjectMeta> = store.store.list(Some(prefix)).try_collect().await?;
    let sizes: Vec<u64> = futures::stream::iter(listing)
        .map(|meta| {
            let store = store.store.clone();
            async move { Ok::<_, object_store::Error>(store.get(&meta.location).await?.bytes().await?.len() as u64) }
        })
        .buffer_unordered(parallelism)
        .try_collect()
        .await?;
    Ok((started.elapsed(), sizes.iter().sum()))
}

/// Deletes every object under `prefix`.
pub async fn delete_prefix(store: &OpenedStore, prefix: &ObjectPath) {
    let keys: Vec<ObjectPath> = store.store.list(Some(prefix)).map_ok(|meta| meta.location).try_collect().await.unwrap_or_default();
    futures::stream::iter(keys)
        .for_each_concurrent(16, |key| {
            let store = store.store.clone();
            async move {
                let _ = store.delete(&key).await;
            }
        })
        .await;
}
