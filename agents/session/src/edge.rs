//! The door itself, before any route: which browser origins may open WebSockets, how many TCP
//! connections the instance holds at once, how long a client may take to send a request head or
//! sit idle, and the token `/metrics` wants.
//!
//! The HTTP server is hyper's HTTP/1.1 connection builder (axum's `serve` exposes none of these
//! knobs) with upgrades, so WebSockets work as before.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use protocol::metrics::Refusal;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::metrics::{bump, Metrics};
use crate::server::AppState;

/// How long shutdown waits for HTTP requests in flight (upgraded sockets are drained apart).
const HTTP_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused connection gets to read its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const BUSY_RESPONSE: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: 71\r\nretry-after: 1\r\n\r\n{\"error\":\"server_busy\",\"message\":\"too many connections, retry shortly\"}";

/// The edge's settings (`[session]` `allowed_origins`, `max_connections`,
/// `header_read_timeout_secs`, `idle_timeout_secs`, `metrics_token_env`).
#[derive(Clone)]
pub struct EdgeConfig {
    /// Origins besides the agent's own that may open WebSockets, compared without a trailing `/`
    /// and without case.
    pub allowed_origins: Vec<String>,
    /// TCP connections held at once, upgraded sockets included.
    pub max_connections: usize,
    /// A request head must arrive within this; an idle keep-alive connection is closed after it.
    pub header_read_timeout: Duration,
    /// A connection still speaking HTTP on which no byte moved for this long is closed.
    pub idle_timeout: Duration,
    /// The bearer token `/metrics` requires; `None`: `/metrics` answers 404.
    pub metrics_token: Option<String>,
}

impl std::fmt::Debug for EdgeConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EdgeConfig")
            .field("allowed_origins", &self.allowed_origins)
            .field("max_connections", &self.max_connections)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("metrics_token", &self.metrics_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl EdgeConfig {
    pub fn from_settings(settings: &protocol::profile::SessionSettings) -> EdgeConfig {
        let metrics_token = protocol::metrics::token_named(settings.metrics_token_env.as_deref());
        EdgeConfig {
            allowed_origins: settings.allowed_origins.iter().map(|origin| normalize_origin(origin)).collect(),
            max_connections: settings.max_connections,
            header_read_timeout: Duration::from_secs(settings.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(settings.idle_timeout_secs),
            metrics_token,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_connections == 0 || self.header_read_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err(Error::Config("max_connections, header_read_timeout and idle_timeout must be positive".to_owned()));
        }
        Ok(())
    }
}

fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// May a browser page from `origin` open a WebSocket on a request to `host`? Its own origin (the
/// `Host` the request names: the console, apps under `/s/{id}/` or on their own host) and the
/// listed ones may; `null` (sandboxed or file pages) only if listed.
pub fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    let origin = normalize_origin(origin);
    if allowed.contains(&origin) {
        return true;
    }
    let authority = origin.split_once("://").map(|(_, authority)| authority);
    matches!((authority, host), (Some(authority), Some(host)) if !authority.is_empty() && authority.eq_ignore_ascii_case(host.trim()))
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).and_then(|value| value.to_str().ok()).is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
}

/// Middleware, outermost: a WebSocket upgrade whose `Origin` is foreign gets 403 before any route
/// (so `/ws`, the terminal and proxied sockets alike). Without `Origin` (not a browser) it passes.
pub(crate) async fn check_origin(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if is_websocket_upgrade(headers) {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let host = headers.get(header::HOST).and_then(|value| value.to_str().ok());
            let origin = origin.to_str().unwrap_or("");
            if !origin_allowed(origin, host, &state.config.edge.allowed_origins) {
                bump(&state.metrics.origins_refused);
                tracing::info!(origin, path = %request.uri().path(), "refused a WebSocket from a foreign origin");
                let message = format!("WebSockets from origin {origin:?} are not allowed here (session.allowed_origins)");
                return (StatusCode::FORBIDDEN, Json(json!({"error": "forbidden_origin", "message": message}))).into_response();
            }
        }
    }
    next.run(request).await
}

/// `/metrics`' door: `None` to serve, or the refusal (404 without a configured token, 401 without
/// the right one).
pub(crate) fn metrics_refusal(edge: &EdgeConfig, headers: &HeaderMap) -> Option<Response> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
    match protocol::metrics::check_bearer(edge.metrics_token.as_deref(), authorization) {
        Ok(()) => None,
        Err(Refusal::Off) => Some(
            (StatusCode::NOT_FOUND, Json(json!({"error": "not_found", "message": "metrics are off: no session.metrics_token_env token"})))
                .into_response(),
        ),
        Err(Refusal::Unauthorized) => Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({"error": "unauthorized", "message": "/metrics wants the metrics bearer token"})),
            )
                .into_response(),
        ),
    }
}

/// A TCP stream holding one of the instance's connection permits for as long as it lives (an
/// upgraded socket keeps it), and noting when bytes last moved.
struct Tracked {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    epoch: Instant,
    last_io_millis: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        self.last_io_millis.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
        }
        polled
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` until `shutdown`, at most `max_connections` at once; then lets requests
/// in flight finish (bounded) and returns. Upgraded sockets outlive this and are drained by the
/// caller.
pub(crate) async fn serve_http(
    listener: TcpListener,
    router: Router,
    edge: EdgeConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let permits = Arc::new(Semaphore::new(edge.max_connections));
    let (stop_sender, stop) = watch::channel(false);
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    let epoch = Instant::now();
    let mut last_busy_log: Option<Instant> = None;
    let mut busy_since_log = 0u64;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Status frames are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            bump(&metrics.connections_refused_busy);
            busy_since_log += 1;
            if last_busy_log.is_none_or(|logged| logged.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!(
                    limit = edge.max_connections,
                    refused = busy_since_log,
                    "at the connection cap: refusing new connections with 503 server_busy"
                );
                last_busy_log = Some(Instant::now());
                busy_since_log = 0;
            }
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let last_io_millis = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
        let io = Tracked { stream, _permit: permit, epoch, last_io_millis: last_io_millis.clone() };
        let service = TowerToHyperService::new(router.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(edge.header_read_timeout).keep_alive(true);
        let idle_timeout = edge.idle_timeout;
        let mut stop = stop.clone();
        let alive = alive.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
            tokio::pin!(connection);
            let mut stopping = false;
            loop {
                let last = Duration::from_millis(last_io_millis.load(Ordering::Relaxed));
                let idle_deadline = epoch + last + idle_timeout;
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(error) = served {
                            tracing::debug!(%error, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    changed = stop.changed(), if !stopping => {
                        let _ = changed;
                        stopping = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    () = tokio::time::sleep_until(idle_deadline) => {
                        let last = Duration::from_millis(last_io_millis.load(Ordering::Relaxed));
                        if Instant::now() >= epoch + last + idle_timeout {
                            tracing::debug!(?idle_timeout, "closing an idle HTTP connection");
                            break;
                        }
                    }
                }
            }
            drop(alive);
        });
    }
    drop(listener);
    let _ = stop_sender.send(true);
    drop(alive);
    if tokio::time::timeout(HTTP_DRAIN_TIMEOUT, all_done.recv()).await.is_err() {
        tracing::warn!("HTTP requests still running after the drain timeout; leaving them");
    }
    Ok(())
}

/// Tells a connection over the cap why it is closed, reading (and dropping) what it sent so the
/// close does not reset the connection before the answer arrives.
async fn refuse_busy(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(BUSY_RESPONSE.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_answer_is_well_formed() {
        let (head, body) = BUSY_RESPONSE.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "server_busy");
    }

    #[test]
    fn origins_are_own_or_listed() {
        let allowed = vec![normalize_origin("https://Console.example.org/")];
        assert!(origin_allowed("https://console.example.org", Some("berth.example.org"), &allowed));
        assert!(origin_allowed("http://127.0.0.1:8080", Some("127.0.0.1:8080"), &allowed));
        assert!(origin_allowed("https://S1.apps.example.org", Some("s1.apps.example.org"), &allowed));
        assert!(!origin_allowed("https://evil.example", Some("berth.example.org"), &allowed));
        assert!(!origin_allowed("null", Some("berth.example.org"), &allowed));
        assert!(!origin_allowed("https://evil.example", None, &allowed));
        assert!(!origin_allowed("https://127.0.0.1:8081", Some("127.0.0.1:8080"), &allowed));
    }
}
