//! The session agent: the users' door. Authenticated WebSockets (JWT verified before the upgrade)
//! carrying live session status, commands (open, close, activity, subscribe) and a small HTTP API
//! (`/healthz`, `/readyz`, `/metrics`, `/api/sessions`). See the crate's README for the protocol.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod activity;
pub mod api;
pub mod auth;
pub mod config;
pub mod console;
pub mod edge;
pub mod error;
pub mod files;
pub mod frames;
pub mod hub;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod proxy;
pub mod server;
mod socket;
pub mod store;
mod terminal;
pub mod throttle;
pub mod usage;

use std::future::Future;

use protocol::{Bus, BusConfig, Profile};

pub use auth::{Identity, KeyMaterial, TokenAuthority};
pub use config::{SessionConfig, StoreRoute};
pub use error::{Error, Result};
pub use server::{serve, start, InstanceHandle};

/// Runs `berth agent session` until `shutdown` completes: listens on `services.session_addr`
/// (`BERTH_SESSION_ADDR`) with the key and limits of the profile.
pub async fn run(profile: Profile, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let key = KeyMaterial::from_profile(&profile)?;
    let config = SessionConfig::with_key(&profile, &key)?;
    tracing::info!(key_from = %key.origin, algorithm = ?config.authority.algorithm(), audience = %profile.session.jwt_audience, "verifying user tokens");
    let bus = Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Session, "berth-session")?).await?;
    bus.declare_topology().await?;
    let address = &profile.services.session_addr;
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|source| Error::Listen { address: address.clone(), source })?;
    // The HTTP server wants a `'static` shutdown future; relay the caller's through a channel.
    let (trigger, triggered) = tokio::sync::oneshot::channel::<()>();
    let serving = serve(config, bus.clone(), listener, async move {
        let _ = triggered.await;
    });
    let mut serving = std::pin::pin!(serving);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut trigger = Some(trigger);
    let served = loop {
        tokio::select! {
            served = &mut serving => break served,
            () = &mut shutdown, if trigger.is_some() => {
                if let Some(trigger) = trigger.take() {
                    let _ = trigger.send(());
                }
            }
        }
    };
    bus.close().await;
    Ok(served?)
}

/// `berth token`: mints a development token for `user` with the profile's key and audience.
pub fn mint_token(profile: &Profile, user: &str, roles: &[String], ttl: &str) -> anyhow::Result<String> {
    let key = KeyMaterial::from_profile(profile)?;
    let authority = TokenAuthority::new(&key, &profile.session.jwt_audience)?;
    let ttl = auth::parse_ttl(ttl)?;
    Ok(authority.mint(user, roles, ttl)?)
}

#[cfg(test)]
mod tests {
    /// `berth dev` spawns `run` on the multi-threaded runtime: its future must be `Send`.
    #[allow(dead_code)]
    fn run_future_is_send(profile: protocol::Profile) {
        fn assert_send<T: Send>(_: &T) {}
        let running = super::run(profile, async {});
        assert_send(&running);
    }
}
