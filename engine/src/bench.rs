//! `berth bench engine`.

use protocol::Profile;

pub async fn run(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench engine` is not built yet")
}
