//! `berth bench e2e`: open-to-ready of whole sessions next to Docker's and the object store's own time.

use protocol::Profile;

/// `berth bench e2e`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench e2e` is not built yet")
}
