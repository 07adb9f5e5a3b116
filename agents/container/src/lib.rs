//! The container agent: hardened, limited workspace containers through Docker.

use std::future::Future;

use protocol::Profile;

/// Runs `berth agent container` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let _ = (profile, shutdown);
    anyhow::bail!("`berth agent container` is not built yet")
}

/// `berth bench provision`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench provision` is not built yet")
}
