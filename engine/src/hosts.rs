//! `berth host drain <id>` and `berth host undrain <id>`: the operator's switches on a host, kept in
//! the engine's Redis (`Keys::draining`). A drained host takes no new session and the engine moves
//! its sessions off it (`session.move`: frozen, final-synced and removed there, reopened on
//! another host from the object store); an undrained one takes sessions again.

use protocol::Profile;
use redis::AsyncCommands;

use crate::service::Keys;
use crate::{EngineConfig, Result};

/// Marks `host` drained for the engines of `profile`'s deployment (idempotent: a second drain
/// keeps the first one's time).
pub async fn drain(profile: &Profile, host: &str) -> Result<()> {
    check_host(host)?;
    let keys = Keys::new(&EngineConfig::standard().redis_prefix);
    let client = redis::Client::open(profile.services.redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("ZADD")
        .arg(keys.draining())
        .arg("NX")
        .arg(chrono::Utc::now().timestamp_millis())
        .arg(host)
        .query_async(&mut redis)
        .await?;
    Ok(())
}

/// Lets `host` take sessions again.
pub async fn undrain(profile: &Profile, host: &str) -> Result<()> {
    check_host(host)?;
    let keys = Keys::new(&EngineConfig::standard().redis_prefix);
    let client = redis::Client::open(profile.services.redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let _: () = redis.zrem(keys.draining(), host).await?;
    Ok(())
}

fn check_host(host: &str) -> Result<()> {
    if protocol::profile::is_deployment_id(host) {
        return Ok(());
    }
    Err(crate::Error::NotAHost(host.to_owned()))
}
