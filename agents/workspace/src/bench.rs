//! `berth bench workspace`: materialize throughput next to a raw download, and incremental sync time.

use protocol::Profile;

pub async fn run(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench workspace` is not built yet")
}
