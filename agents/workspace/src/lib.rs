//! The workspace agent: materializes workspaces from object storage and syncs them back, verified.

use std::future::Future;

use protocol::Profile;

/// Runs `berth agent workspace` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let _ = (profile, shutdown);
    anyhow::bail!("`berth agent workspace` is not built yet")
}

/// `berth bench workspace`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench workspace` is not built yet")
}
