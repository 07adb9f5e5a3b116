//! `berth bench store`.

use protocol::Profile;

pub async fn run(profile: &Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench store` is not built yet")
}
