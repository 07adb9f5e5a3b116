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
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
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

/// What every [`crate::Bus`] counts. Clones share the counters.
#[derive(Debug, Clone)]
pub struct BusMetrics {
    handled: Family<HandledLabels, Counter>,
    handle_seconds: Family<QueueLabel, Histogram, fn() -> Histogram>,
    published: Family<ExchangeLabel, Counter>,
    publish_failures: Family<ExchangeLabel, Counter>,
    connections: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    queue: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExchangeLabel {
    exchange: String,
}

fn handling_time_buckets() -> Histogram {
    // 1 ms to ~16 s: a message is handled in milliseconds, a materialize can take seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl BusMetrics {
    pub fn new() -> BusMetrics {
        BusMetrics {
            handled: Family::default(),
            handle_seconds: Family::new_with_constructor(handling_time_buckets),
            published: Family::default(),
            publish_failures: Family::default(),
            connections: Counter::default(),
        }
    }

    /// Registers the counters in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "handled",
            "messages handled, by queue and outcome (ack, retry, retry_unavailable, dead_letter)",
            self.handled.clone(),
        );
        registry.register("handle_seconds", "time a handler took, by queue", self.handle_seconds.clone());
        registry.register("published", "messages published and confirmed, by exchange", self.published.clone());
        registry.register("publish_failures", "publishes given up after their deadline, by exchange", self.publish_failures.clone());
        registry.register("connections", "connections opened to the broker (more than one: reconnects)", self.connections.clone());
    }

    pub(crate) fn handled(&self, queue: &str, outcome: &'static str, took: std::time::Duration) {
        self.handled.get_or_create(&HandledLabels { queue: queue.to_owned(), outcome }).inc();
        self.handle_seconds.get_or_create(&QueueLabel { queue: queue.to_owned() }).observe(took.as_secs_f64());
    }

    pub(crate) fn published(&self, exchange: &str) {
        self.published.get_or_create(&ExchangeLabel { exchange: exchange.to_owned() }).inc();
    }

    pub(crate) fn publish_failed(&self, exchange: &str) {
        self.publish_failures.get_or_create(&ExchangeLabel { exchange: exchange.to_owned() }).inc();
    }

    pub(crate) fn connected(&self) {
        self.connections.inc();
    }
}

impl Default for BusMetrics {
    fn default() -> BusMetrics {
        BusMetrics::new()
    }
}

/// A running `/metrics` listener, stopped with [`Exporter::stop`].
pub struct Exporter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Exporter {
    /// Serves `registry` on the profile's `services.metrics_addr`, when it names one.
    pub async fn start(profile: &Profile, registry: Registry) -> std::io::Result<Option<Exporter>> {
        let Some(listener) = bind(profile).await? else {
            return Ok(None);
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve(listener, registry, token_of(profile), shutdown));
        Ok(Some(Exporter { stop, task }))
    }

    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(served) => served,
            Err(joined) => Err(std::io::Error::other(format!("the /metrics task ended abnormally: {joined}"))),
        }
    }
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
        Err(Refusal::Unauthorized) => {
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "/metrics wants the metrics bearer token\n").into_response()
        }
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
