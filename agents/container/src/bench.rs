//! `berth bench provision`: task publish to `container.ready`, next to Docker's own time.

use protocol::Profile;

pub async fn run(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench provision` is not built yet")
}
