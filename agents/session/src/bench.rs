//! `berth bench session`.

use protocol::Profile;

pub async fn run(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench session` is not built yet")
}
