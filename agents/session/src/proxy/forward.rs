//! Forwarding one request to a session's service: plain HTTP on kept upstream connections that
//! the request's own task drives (`upstream`; bodies stream both ways, backpressure included:
//! nothing is buffered beyond hyper's frames), and WebSocket upgrades as a byte tunnel whose
//! client side is scanned for data frames.

mod upstream;

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::cookie::without_berth_cookie;
use super::directory::Upstream;
use super::wsframes::FrameScanner;

/// Turns a stream of data into activity reports, at most one per [`TUNNEL_ACTIVITY_EVERY`].
pub struct Ticker {
    last: std::sync::Mutex<Instant>,
    on_tick: Box<dyn Fn() + Send + Sync>,
}

impl Ticker {
    /// A ticker whose first report is due one interval from now (the request itself was one).
    pub fn new(on_tick: impl Fn() + Send + Sync + 'static) -> std::sync::Arc<Ticker> {
        std::sync::Arc::new(Ticker { last: std::sync::Mutex::new(Instant::now()), on_tick: Box::new(on_tick) })
    }

    pub fn tick(&self) {
        let due = {
            let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = last.elapsed() >= TUNNEL_ACTIVITY_EVERY;
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            (self.on_tick)();
        }
    }
}

/// A body that reports activity while its data flows (an upload or a download in progress is
/// use of the session, however long it takes).
struct Counted<B> {
    inner: B,
    ticker: std::sync::Arc<Ticker>,
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(context);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if frame.is_data() {
                self.ticker.tick();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The kept HTTP/1.1 connections to the sessions' services.
pub type HttpClient = std::sync::Arc<upstream::Upstreams>;

/// Client bytes are read in chunks of this size in a WebSocket tunnel.
const TUNNEL_BUFFER_BYTES: usize = 16 * 1024;
/// Streams report activity at most this often (the activity gate debounces further).
const TUNNEL_ACTIVITY_EVERY: Duration = Duration::from_secs(1);

pub fn client() -> HttpClient {
    upstream::Upstreams::new()
}

/// What the app is told about the request, and what it must not see.
#[derive(Debug, Clone)]
pub struct Forwarding {
    pub upstream: Upstream,
    pub path_and_query: String,
    /// `X-Forwarded-Prefix` when the `/s/{session}` prefix was stripped.
    pub prefix: Option<String>,
    pub user: String,
    pub session: String,
    /// The request's `Authorization` was Berth's token: it does not go to the app.
    pub strip_authorization: bool,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade"];

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).is_some()
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.split(',').any(|token| token.trim().eq_ignore_ascii_case("upgrade")))
}

/// Whether the request asks for a WebSocket (or another protocol upgrade).
pub fn wants_upgrade(request: &Request<Body>) -> bool {
    request.method() == Method::GET && is_upgrade(request.headers())
}

/// Removes hop-by-hop headers (and those `Connection` names); an upgrade keeps its own two.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == "connection" || name == "upgrade") {
            continue;
        }
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::TRANSFER_ENCODING);
    }
}

/// Turns the client's request into the one the app receives.
pub fn upstream_request(mut request: Request<Body>, forwarding: &Forwarding) -> Result<Request<Body>, String> {
    let upgrade = wants_upgrade(&request);
    let host =
        if forwarding.upstream.host.contains(':') { format!("[{}]", forwarding.upstream.host) } else { forwarding.upstream.host.clone() };
    let uri = format!("http://{host}:{}{}", forwarding.upstream.port, forwarding.path_and_query);
    let original_host = request
        .headers()
        .get(header::HOST)
        .cloned()
        .or_else(|| request.uri().authority().and_then(|authority| HeaderValue::from_str(authority.as_str()).ok()));
    *request.uri_mut() = uri.parse().map_err(|error| format!("bad upstream address: {error}"))?;
    *request.version_mut() = Version::HTTP_11;
    let headers = request.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // The app keeps its own cookies, never Berth's.
    let cookies: Vec<String> =
        headers.get_all(header::COOKIE).iter().filter_map(|value| value.to_str().ok()).filter_map(without_berth_cookie).collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&cookies.join("; ")) {
            headers.insert(header::COOKIE, value);
        }
    }
    if forwarding.strip_authorization {
        headers.remove(header::AUTHORIZATION);
    }
    let spoofed: Vec<HeaderName> = headers.keys().filter(|name| name.as_str().starts_with("x-berth-")).cloned().collect();
    for name in spoofed {
        headers.remove(name);
    }
    let text = |value: &str| HeaderValue::from_str(value).ok();
    if let Some(value) = text(&forwarding.user) {
        headers.insert("x-berth-user", value);
    }
    if let Some(value) = text(&forwarding.session) {
        headers.insert("x-berth-session", value);
    }
    if let Some(original_host) = original_host {
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, original_host.clone());
        }
        headers.insert("x-forwarded-host", original_host);
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    headers.remove("x-forwarded-prefix");
    if let Some(prefix) = forwarding.prefix.as_deref().and_then(text) {
        headers.insert("x-forwarded-prefix", prefix);
    }
    Ok(request)
}

/// The app's response as the client gets it: hop-by-hop headers removed, the body streamed.
fn downstream_response<B>(response: Response<B>, ticker: Option<std::sync::Arc<Ticker>>) -> Response<Body>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError>,
{
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let body = match ticker {
        Some(ticker) => Body::new(Counted { inner: body, ticker }),
        None => Body::new(body),
    };
    Response::from_parts(parts, body)
}

/// Why a request could not be forwarded.
#[derive(Debug)]
pub struct Unreachable(pub String);

/// Forwards a plain HTTP request; with a ticker, both bodies report activity while they flow.
// For forwarding without a fallback (the per-host doors, which land separately); the proxy's
// own requests go through `http_or`.
#[allow(dead_code)]
pub async fn http(
    client: &HttpClient,
    request: Request<Body>,
    ticker: Option<std::sync::Arc<Ticker>>,
) -> Result<Response<Body>, Unreachable> {
    http_or(client, request, None, ticker).await
}

/// [`http`], sent to `fallback` instead when the request's upstream cannot be connected to.
pub async fn http_or(
    client: &HttpClient,
    request: Request<Body>,
    fallback: Option<&Upstream>,
    ticker: Option<std::sync::Arc<Ticker>>,
) -> Result<Response<Body>, Unreachable> {
    let request = match &ticker {
        Some(ticker) => request.map(|body| Body::new(Counted { inner: body, ticker: ticker.clone() })),
        None => request,
    };
    match client.send(request, fallback.map(|fallback| (fallback.host.clone(), fallback.port))).await {
        Ok(response) => Ok(downstream_response(response, ticker)),
        Err(upstream::Failed(reason)) => Err(Unreachable(reason)),
    }
}

fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Forwards an upgrade request on a connection of its own; on `101` the two upgraded connections
/// are joined, and the ticker told whenever the client sends data frames (pings, pongs and
/// silence tell it nothing; neither does what the app sends).
// For tunnels without a fallback (the per-host doors, which land separately); the proxy's own
// go through `tunnel_or`.
#[allow(dead_code)]
pub async fn tunnel(
    request: Request<Body>,
    upstream: &Upstream,
    ticker: Option<std::sync::Arc<Ticker>>,
) -> Result<Response<Body>, Unreachable> {
    tunnel_or(request, upstream, None, ticker).await
}

/// [`tunnel`], to `fallback` instead when `upstream` cannot be connected to.
pub async fn tunnel_or(
    mut request: Request<Body>,
    upstream: &Upstream,
    fallback: Option<&Upstream>,
    ticker: Option<std::sync::Arc<Ticker>>,
) -> Result<Response<Body>, Unreachable> {
    let client_upgrade = hyper::upgrade::on(&mut request);
    // The request line in origin form, as an HTTP/1.1 server expects it.
    *request.uri_mut() = upstream::origin_form(request.uri()).map_err(|upstream::Failed(reason)| Unreachable(reason))?;
    let first_timeout = if fallback.is_some() { upstream::CONNECT_BEFORE_FALLBACK } else { upstream::CONNECT_TIMEOUT };
    let stream = match upstream::connect_stream(&(upstream.host.clone(), upstream.port), first_timeout).await {
        Ok(stream) => stream,
        Err(upstream::Failed(reason)) => match fallback {
            // The network address is not reachable from here: the published port is.
            Some(published) => upstream::connect_stream(&(published.host.clone(), published.port), upstream::CONNECT_TIMEOUT)
                .await
                .map_err(|upstream::Failed(fallback)| Unreachable(format!("{reason}; {fallback}")))?,
            None => return Err(Unreachable(reason)),
        },
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|error| Unreachable(describe(&error)))?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let mut response = sender.send_request(request).await.map_err(|error| Unreachable(describe(&error)))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(downstream_response(response, None));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let (client, app) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%error, "a proxied upgrade did not complete");
                return;
            }
        };
        pump(TokioIo::new(client), TokioIo::new(app), ticker).await;
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, Body::empty()))
}

/// Copies both ways until both sides are done; the client's bytes pass a frame scanner.
async fn pump<C, A>(client: C, app: A, ticker: Option<std::sync::Arc<Ticker>>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut app_read, mut app_write) = tokio::io::split(app);
    let from_client = async {
        let mut scanner = FrameScanner::default();
        let mut buffer = vec![0u8; TUNNEL_BUFFER_BYTES];
        loop {
            let read = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            if scanner.feed(&buffer[..read]) > 0 {
                if let Some(ticker) = &ticker {
                    ticker.tick();
                }
            }
            if app_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = app_write.shutdown().await;
    };
    let from_app = async {
        let _ = tokio::io::copy(&mut app_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(from_client, from_app);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarding() -> Forwarding {
        Forwarding {
            upstream: Upstream { host: "127.0.0.1".into(), port: 49153 },
            path_and_query: "/x?q=1".into(),
            prefix: Some("/s/abc".into()),
            user: "alice".into(),
            session: "abc".into(),
            strip_authorization: true,
        }
    }

    #[test]
    fn the_app_gets_forwarding_headers_and_none_of_berths_credentials() {
        let request = Request::builder()
            .uri("/s/abc/x?q=1")
            .header("host", "berth.example:8700")
            .header("authorization", "Bearer secret")
            .header("cookie", "app=1; berth_proxy=secret")
            .header("connection", "keep-alive, x-drop")
            .header("x-drop", "1")
            .header("x-berth-user", "mallory")
            .body(Body::empty())
            .unwrap();
        let forwarded = upstream_request(request, &forwarding()).unwrap();
        assert_eq!(forwarded.uri().to_string(), "http://127.0.0.1:49153/x?q=1");
        let headers = forwarded.headers();
        let get = |name: &str| headers.get(name).map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(get("cookie").as_deref(), Some("app=1"));
        assert_eq!(get("authorization"), None);
        assert_eq!(get("x-drop"), None);
        assert_eq!(get("connection"), None);
        assert_eq!(get("x-berth-user").as_deref(), Some("alice"));
        assert_eq!(get("host").as_deref(), Some("berth.example:8700"));
        assert_eq!(get("x-forwarded-host").as_deref(), Some("berth.example:8700"));
        assert_eq!(get("x-forwarded-prefix").as_deref(), Some("/s/abc"));
    }

    #[test]
    fn an_upgrade_keeps_its_headers() {
        let request = Request::builder()
            .uri("/s/abc/ws")
            .header("host", "h")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "k")
            .body(Body::empty())
            .unwrap();
        assert!(wants_upgrade(&request));
        let forwarded = upstream_request(request, &forwarding()).unwrap();
        assert_eq!(forwarded.headers()["upgrade"], "websocket");
        assert_eq!(forwarded.headers()["connection"], "upgrade");
        assert_eq!(forwarded.headers()["sec-websocket-key"], "k");
    }
}
