//! The bootstrap job and `berth dev`: everything a deployment needs before (and around) its services.

use std::future::Future;

use protocol::Profile;

/// Whether bootstrap may destroy stored records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    Keep,
    DropRecords,
}

/// `berth bootstrap`.
pub async fn run(profile: &Profile, reset: Reset) -> anyhow::Result<()> {
    let _ = (profile, reset);
    anyhow::bail!("`berth bootstrap` is not built yet")
}

/// `berth dev`: engine and all agents in one process.
pub async fn dev(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let _ = (profile, shutdown);
    anyhow::bail!("`berth dev` is not built yet")
}

/// `berth bench e2e`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench e2e` is not built yet")
}
