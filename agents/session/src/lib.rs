//! The session agent: authenticated WebSockets for users.

use std::future::Future;

use protocol::Profile;

/// Runs `berth agent session` until `shutdown` completes.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let _ = (profile, shutdown);
    anyhow::bail!("`berth agent session` is not built yet")
}

/// `berth bench session`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let _ = profile;
    anyhow::bail!("`berth bench session` is not built yet")
}

/// `berth token`: mints a development token for `user`.
pub fn mint_token(profile: &Profile, user: &str, roles: &[String], ttl: &str) -> anyhow::Result<String> {
    let _ = (profile, user, roles, ttl);
    anyhow::bail!("`berth token` is not built yet")
}
