//! Prometheus `/metrics` over HTTP: one [`Registry`] per component, encoded by `prometheus-client`
//! on each scrape and served behind the profile's bearer token (`session.metrics_token_env`).
//!
//! The session agent serves its registry on its own listener; `berth engine` and the other agents
//! serve theirs on `services.metrics_addr` (`BERTH_METRICS_ADDR`) with [`serve`].

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
pub use prometheus_client;
use prometheus_client::registry::Registry;

use crate::Profile;

/// The content type of the text exposition format `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why a scrape is refused, if it is: metrics are off without a configured token, and a scrape
/// must present it as `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token configured: `/metrics` answers 404.
    Off,
    /// Missing or wrong token: 401.
    Unauthorized,
}

/// The token `/metrics` requires: the value of the variable `session.metrics_token_env` names, when
/// set and not empty.
pub fn token_of(profile: &Profile) -> Option<String> {
    token_named(profile.session.metrics_token_env.as_deref())
}

/// The value of the environment variable `variable`, when named, set and not empty.
pub fn token_named(variable: Option<&str>) -> Option<String> {
    std::env::var(variable?).ok().filter(|token| !token.trim().is_empty())
}

/// Whether a request with `authorization` (the header's value) may read the metrics.
pub fn check_bearer(expected: Option<&str>, authorization: Option<&str>) -> Result<(), Refusal> {
    let Some(expected) = expected else {
        return Err(Refusal::Off);
    };
    let given = authorization.and_then(|value| value.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(Refusal::Unauthorized),
    }
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |difference, (a, b)| difference | (a ^ b)) == 0
}

/// The registry in the text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; a collector that fails leaves what it wrote so far.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(%error, "a metrics collector failed while encoding");
    }
    text
}

struct Served {
    registry: Registry,
    token: Option<String>,
}

/// Serves `GET /metrics` from `registry` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Arc::new(Served { registry, token });
    let router = Router::new().route("/metrics", get(scrape)).with_state(state);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Binds `services.metrics_addr`, when the profile sets one.
pub async fn bind(profile: &Profile) -> std::io::Result<Option<tokio::net::TcpListener>> {
    let Some(address) = profile.services.metrics_addr.as_deref() else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics");
    Ok(Some(listener))
}

async fn scrape(State(state): State<Arc<Served>>, headers: HeaderMap) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
    match check_bearer(state.token.as_deref(), authorization) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], encode(&state.registry)).into_response(),
        Err(Refusal::Off) => (StatusCode::NOT_FOUND, "metrics are off: no session.metrics_token_env token\n").into_response(),
        Err(Refusal::Unauthorized) => (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "/metrics wants the metrics bearer token\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_is_required_and_compared_whole() {
        assert_eq!(check_bearer(None, Some("Bearer x")), Err(Refusal::Off));
        assert_eq!(check_bearer(Some("secret"), None), Err(Refusal::Unauthorized));
        assert_eq!(check_bearer(Some("secret"), Some("secret")), Err(Refusal::Unauthorized));
        assert_eq!(check_bearer(Some("secret"), Some("Bearer secre")), Err(Refusal::Unauthorized));
        assert_eq!(check_bearer(Some("secret"), Some("Bearer secrets")), Err(Refusal::Unauthorized));
        assert_eq!(check_bearer(Some("secret"), Some("Bearer secret")), Ok(()));
    }
}
