//! Kept HTTP/1.1 connections to the sessions' services, each driven by the request that uses it.
//!
//! A pooled client (hyper's legacy one) runs every upstream connection as a task of its own: a
//! proxied request then hops from the client connection's task to the upstream connection's task
//! and back through channels, and the response head is often written to the client before its
//! body has crossed over (two writes, two wake-ups of the client). Here the request's own task
//! polls the upstream connection: until the response head arrives, then from the response body
//! (which owns the connection while it streams). A connection whose response was read to the end
//! goes back to the pool; one dropped halfway is closed (HTTP/1.1 cannot abandon a response).
//! `berth bench proxy` compares the paths; see the crate README ("Tests and figures").

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A kept connection unused for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many unused connections are kept per upstream.
const MAX_IDLE_PER_UPSTREAM: usize = 256;
/// How long connecting to a session's service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to an address with a fallback (a container's network address, the
/// published port behind it) may take before the fallback is tried.
pub const CONNECT_BEFORE_FALLBACK: Duration = Duration::from_secs(1);
/// An address with a fallback that could not be connected to is not tried again for this long:
/// its requests go straight to the fallback.
const UNREACHABLE_FOR: Duration = Duration::from_secs(60);

type Connection = http1::Connection<TokioIo<TcpStream>, Body>;

/// One upstream connection: the request side and the connection it drives.
struct Conn {
    sender: http1::SendRequest<Body>,
    connection: Connection,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// An upstream's host (without brackets) and port.
type Key = (String, u16);

/// The kept connections, by upstream.
pub struct Upstreams {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    last_purge: Mutex<Instant>,
    /// Addresses with a fallback that could not be connected to, and when.
    unreachable: Mutex<HashMap<Key, Instant>>,
}

/// Why a request got no response from the upstream.
#[derive(Debug)]
pub struct Failed(pub String);

impl Upstreams {
    pub fn new() -> Arc<Upstreams> {
        Arc::new(Upstreams {
            idle: Mutex::new(HashMap::new()),
            last_purge: Mutex::new(Instant::now()),
            unreachable: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `request` (absolute URI `http://host:port/…`, written upstream in origin form) on a
    /// kept connection or a new one, and answers with the response, whose body drives the
    /// connection until it ends. A request that a kept connection could not take (it was closed
    /// meanwhile) goes once more on a new connection. With a `fallback`, a request whose
    /// upstream cannot be connected to goes there instead (and so do the next ones for
    /// [`UNREACHABLE_FOR`]).
    pub async fn send(self: &Arc<Self>, mut request: Request<Body>, fallback: Option<Key>) -> Result<Response<DrivenBody>, Failed> {
        let mut key = key_of(request.uri())?;
        let mut fallback = fallback;
        if let Some(published) = fallback.take_if(|_| self.unreachable_recently(&key)) {
            key = published;
        }
        if !request.headers().contains_key(header::HOST) {
            if let Some(authority) = request.uri().authority().and_then(|authority| HeaderValue::from_str(authority.as_str()).ok()) {
                request.headers_mut().insert(header::HOST, authority);
            }
        }
        *request.uri_mut() = origin_form(request.uri())?;
        if let Some(conn) = self.checkout(&key) {
            match drive(conn, request).await {
                Ok((response, conn)) => return Ok(self.driven(response, conn, key)),
                // Not written: the kept connection was closed before it took the request.
                Err(Attempt::Unsent(returned, _)) => request = *returned,
                Err(Attempt::Failed(error)) => return Err(error),
            }
        }
        let conn = match (connect(&key, if fallback.is_some() { CONNECT_BEFORE_FALLBACK } else { CONNECT_TIMEOUT }).await, fallback) {
            (Ok(conn), _) => conn,
            (Err(Failed(reason)), Some(published)) => {
                tracing::info!(upstream = %format!("{}:{}", key.0, key.1), %reason, "unreachable from here; using the published port");
                self.unreachable.lock().unwrap_or_else(PoisonError::into_inner).insert(key, Instant::now());
                key = published;
                connect(&key, CONNECT_TIMEOUT).await?
            }
            (Err(failed), None) => return Err(failed),
        };
        match drive(conn, request).await {
            Ok((response, conn)) => Ok(self.driven(response, conn, key)),
            Err(Attempt::Unsent(_, error)) | Err(Attempt::Failed(error)) => Err(error),
        }
    }

    fn driven(self: &Arc<Self>, response: Response<Incoming>, conn: Option<Conn>, key: Key) -> Response<DrivenBody> {
        let pool = conn.is_some().then(|| (self.clone(), key));
        response.map(|body| DrivenBody { body, conn, pool, ended: false })
    }

    /// Whether `key` could not be connected to within [`UNREACHABLE_FOR`].
    fn unreachable_recently(&self, key: &Key) -> bool {
        let mut unreachable = self.unreachable.lock().unwrap_or_else(PoisonError::into_inner);
        unreachable.retain(|_, since| since.elapsed() < UNREACHABLE_FOR);
        unreachable.contains_key(key)
    }

    /// The most recently used live connection to `key`, if any.
    fn checkout(&self, key: &Key) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = idle.get_mut(key)?;
        while let Some(Idle { mut conn, since }) = kept.pop() {
            if since.elapsed() < IDLE_TIMEOUT && conn.alive() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, key: Key, conn: Conn) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = idle.entry(key).or_default();
        if kept.len() < MAX_IDLE_PER_UPSTREAM {
            kept.push(Idle { conn, since: now });
        }
        // Connections to services no longer used are closed within about two idle timeouts.
        let mut last_purge = self.last_purge.lock().unwrap_or_else(PoisonError::into_inner);
        if now.duration_since(*last_purge) >= IDLE_TIMEOUT {
            *last_purge = now;
            idle.retain(|_, kept| {
                kept.retain(|entry| now.duration_since(entry.since) < IDLE_TIMEOUT);
                !kept.is_empty()
            });
        }
    }
}

impl Conn {
    /// Whether the connection can take a request: polled once, so a close the peer sent while it
    /// sat unused is seen now.
    fn alive(&mut self) -> bool {
        let mut context = Context::from_waker(std::task::Waker::noop());
        if Pin::new(&mut self.connection).poll(&mut context).is_ready() {
            return false;
        }
        !self.sender.is_closed()
    }
}

/// The upstream of an absolute `http://host:port/…` URI.
fn key_of(uri: &Uri) -> Result<Key, Failed> {
    let authority = uri.authority().ok_or_else(|| Failed(format!("no upstream address in {uri}")))?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok((host, authority.port_u16().unwrap_or(80)))
}

/// `/path?query` of a URI: what an HTTP/1.1 server expects on the request line.
pub fn origin_form(uri: &Uri) -> Result<Uri, Failed> {
    let path = uri.path_and_query().map(|path| path.as_str()).unwrap_or("/");
    path.parse().map_err(|error| Failed(format!("bad upstream path {path:?}: {error}")))
}

async fn connect(key: &Key, timeout: Duration) -> Result<Conn, Failed> {
    let stream = connect_within(key, timeout).await?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(|error| Failed(super::describe(&error)))?;
    Ok(Conn { sender, connection })
}

/// A TCP connection to `key` within `timeout`, for a tunnel.
pub async fn connect_stream(key: &Key, timeout: Duration) -> Result<TcpStream, Failed> {
    connect_within(key, timeout).await
}

async fn connect_within((host, port): &Key, timeout: Duration) -> Result<TcpStream, Failed> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), *port))).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(Failed(format!("cannot connect to {host}:{port}: {error}"))),
        Err(_) => return Err(Failed(format!("no connection to {host}:{port} within {timeout:?}"))),
    };
    // Requests and answers are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// How sending on one connection went wrong.
enum Attempt {
    /// The connection did not take the request, which comes back to be sent elsewhere (boxed:
    /// a request head is large next to the other variant).
    Unsent(Box<Request<Body>>, Failed),
    Failed(Failed),
}

/// Sends `request` on `conn`, polling the connection until the response head arrives; the
/// connection comes back unless it ended with the head (`Connection: close` and a short body).
async fn drive(mut conn: Conn, request: Request<Body>) -> Result<(Response<Incoming>, Option<Conn>), Attempt> {
    let mut closed = false;
    // Ready for a request (a kept connection is, once polled; a new one after its first poll).
    let ready = std::future::poll_fn(|context| loop {
        match conn.sender.poll_ready(context) {
            Poll::Ready(outcome) => return Poll::Ready(outcome),
            Poll::Pending if closed => return Poll::Ready(Ok(())),
            Poll::Pending => {}
        }
        match Pin::new(&mut conn.connection).poll(context) {
            Poll::Ready(_) => closed = true,
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    if let Err(error) = ready {
        return Err(Attempt::Unsent(Box::new(request), Failed(super::describe(&error))));
    }
    if closed {
        return Err(Attempt::Unsent(Box::new(request), Failed("the connection closed".to_owned())));
    }
    let Conn { mut sender, mut connection } = conn;
    let mut sending = std::pin::pin!(sender.try_send_request(request));
    let mut connection_done = false;
    let outcome = std::future::poll_fn(|context| loop {
        if let Poll::Ready(outcome) = sending.as_mut().poll(context) {
            return Poll::Ready(outcome.map_err(Some));
        }
        if connection_done {
            // The connection ended and told the request nothing: it never will.
            return Poll::Ready(Err(None));
        }
        match Pin::new(&mut connection).poll(context) {
            Poll::Ready(_) => connection_done = true,
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    match outcome {
        // What the body still has is buffered in it; the connection is gone.
        Ok(response) if connection_done => Ok((response, None)),
        Ok(response) => Ok((response, Some(Conn { sender, connection }))),
        Err(Some(mut error)) => {
            let failed = Failed(super::describe(error.error()));
            match error.take_message() {
                Some(request) => Err(Attempt::Unsent(Box::new(request), failed)),
                None => Err(Attempt::Failed(failed)),
            }
        }
        Err(None) => Err(Attempt::Failed(Failed("the connection closed before the response".to_owned()))),
    }
}

/// A response body from upstream that drives its connection while it is read, and gives the
/// connection back to the pool when it goes, if it was read to the end (the server stops at
/// `is_end_stream` without asking for the end, so both count).
pub struct DrivenBody {
    body: Incoming,
    conn: Option<Conn>,
    pool: Option<(Arc<Upstreams>, Key)>,
    ended: bool,
}

impl HttpBody for DrivenBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(context) {
                this.ended = frame.is_none();
                return Poll::Ready(frame);
            }
            // The body waits for bytes only the connection reads: poll it, then the body again.
            let Some(conn) = &mut this.conn else { return Poll::Pending };
            match Pin::new(&mut conn.connection).poll(context) {
                // Ended: the body has all it will get (or its error) on the next poll.
                Poll::Ready(_) => {
                    this.conn = None;
                    this.pool = None;
                }
                Poll::Pending => {
                    let polled = Pin::new(&mut this.body).poll_frame(context);
                    if let Poll::Ready(frame) = &polled {
                        this.ended = frame.is_none();
                    }
                    return polled;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for DrivenBody {
    fn drop(&mut self) {
        // Read to the end, the connection can serve the next request; halfway, it closes here.
        if self.ended || self.body.is_end_stream() {
            if let (Some(conn), Some((pool, key))) = (self.conn.take(), self.pool.take()) {
                pool.checkin(key, conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering every request on a connection with `answer`, then closing the
    /// connection if `close_after` says so; counts the connections it accepted.
    async fn server(answer: &'static [u8], close_after: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 4096];
                    let mut served = 0;
                    let mut pending = Vec::new();
                    while served < close_after {
                        let Ok(read) = stream.read(&mut buffer).await else { return };
                        if read == 0 {
                            return;
                        }
                        pending.extend_from_slice(&buffer[..read]);
                        while let Some(end) = pending.windows(4).position(|window| window == b"\r\n\r\n") {
                            let head: Vec<u8> = pending.drain(..end + 4).collect();
                            // The request line in origin form, with the Host it was given.
                            let expected = head.starts_with(b"GET /x?y=1 HTTP/1.1\r\n")
                                && head.windows(6).any(|window| window.eq_ignore_ascii_case(b"host: "));
                            let answer = if expected { answer } else { &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nbad"[..] };
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            served += 1;
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    fn get(address: std::net::SocketAddr) -> Request<Body> {
        Request::builder().uri(format!("http://{address}/x?y=1")).body(Body::empty()).unwrap()
    }

    async fn text(response: Response<DrivenBody>) -> String {
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_serves_the_next_request() {
        let (address, accepted) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", usize::MAX).await;
        let upstreams = Upstreams::new();
        for _ in 0..3 {
            let response = upstreams.send(get(address), None).await.unwrap();
            assert_eq!(text(response).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_read_up_to_its_length_gives_its_connection_back() {
        // As hyper's server reads it: frames until `is_end_stream`, never the final `None`.
        let (address, accepted) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", usize::MAX).await;
        let upstreams = Upstreams::new();
        for _ in 0..3 {
            let mut response = upstreams.send(get(address), None).await.unwrap();
            let mut read = Vec::new();
            while !response.body().is_end_stream() {
                let frame = response.body_mut().frame().await.unwrap().unwrap();
                read.extend_from_slice(&frame.into_data().unwrap());
            }
            assert_eq!(read, b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_closed_is_replaced() {
        // Keep-alive by the headers, closed by the server right after each answer.
        let (address, accepted) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 1).await;
        let upstreams = Upstreams::new();
        for _ in 0..3 {
            let response = upstreams.send(get(address), None).await.unwrap();
            assert_eq!(text(response).await, "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_response_dropped_halfway_closes_its_connection() {
        let (address, accepted) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial", usize::MAX).await;
        let upstreams = Upstreams::new();
        let mut response = upstreams.send(get(address), None).await.unwrap();
        let first = response.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "partial");
        drop(response);
        let response = upstreams.send(get(address), None).await.unwrap();
        drop(response);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_request_line_is_in_origin_form() {
        assert_eq!(origin_form(&"http://10.0.0.1:8080/a/b?c=d".parse().unwrap()).unwrap(), "/a/b?c=d");
        assert_eq!(origin_form(&"http://10.0.0.1:8080".parse().unwrap()).unwrap(), "/");
        assert_eq!(key_of(&"http://[::1]:9/".parse().unwrap()).unwrap(), ("::1".to_owned(), 9));
        let unreachable = Upstreams::new().send(Request::builder().uri("/relative").body(Body::empty()).unwrap(), None).await;
        assert!(unreachable.is_err());
    }

    #[tokio::test]
    async fn an_address_that_cannot_be_connected_to_falls_back_and_is_skipped_afterwards() {
        let (published, accepted) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", usize::MAX).await;
        // A port nobody listens on: bound, then given back.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let fallback = Some(("127.0.0.1".to_owned(), published.port()));
        let upstreams = Upstreams::new();
        let response = upstreams.send(get(closed), fallback.clone()).await.unwrap();
        assert_eq!(text(response).await, "ok", "answered through the fallback");
        assert!(upstreams.unreachable_recently(&("127.0.0.1".to_owned(), closed.port())));
        let response = upstreams.send(get(closed), fallback).await.unwrap();
        assert_eq!(text(response).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the second request took the kept connection to the fallback");
        let failed = upstreams.send(get(closed), None).await.err().expect("no fallback: refused");
        assert!(failed.0.contains("cannot connect"), "{}", failed.0);
    }
}
