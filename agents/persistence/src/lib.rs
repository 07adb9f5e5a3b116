//! The persistence agent: generic operations on MongoDB or SQLite.

use std::future::Future;

use protocol::Profile;

/// Runs `berth agent persistence` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let _ = (profile, shutdown);
    anyhow::bail!("`berth agent persistence` is not built yet")
}

/// `berth bench store`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench store` is not built yet")
}
