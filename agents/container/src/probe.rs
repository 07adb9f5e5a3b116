//! Readiness probes against a published port: an HTTP GET or a TCP connection that stays open.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one probe attempt may take before it counts as a failure.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Docker's userland proxy accepts on the host port even before the service listens, then closes
/// the connection once it fails to reach the container: a connection still open after this long
/// means something really listens.
const TCP_SETTLE: Duration = Duration::from_millis(150);

/// Does `GET path` on `host:port` get an answer from a service that is up?
///
/// Any status below 500 counts: a 404 or 401 proves the service is listening and handling
/// requests (the dev image, busybox httpd, answers 404 for `/` until the workspace has an index),
/// while servers that are still starting answer 502/503, and a proxy with nothing behind it
/// closes the connection without a status.
pub async fn http_ready(host: &str, port: u16, path: &str) -> bool {
    tokio::time::timeout(ATTEMPT_TIMEOUT, http_status(host, port, path))
        .await
        .ok()
        .flatten()
        .is_some_and(|status| (100..500).contains(&status))
}

/// The status code of `GET path`, if an HTTP answer came.
pub async fn http_status(host: &str, port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect((host, port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: berth-probe\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = Vec::with_capacity(64);
    let mut buffer = [0_u8; 64];
    // Read until the status line is complete; the rest of the answer does not matter.
    while !head.contains(&b'\n') && head.len() < 1024 {
        let read = stream.read(&mut buffer).await.ok()?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    parse_status_line(&head)
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Does `host:port` accept a connection that the other side keeps open?
pub async fn tcp_ready(host: &str, port: u16) -> bool {
    let Ok(Ok(mut stream)) = tokio::time::timeout(ATTEMPT_TIMEOUT, TcpStream::connect((host, port))).await else {
        return false;
    };
    let mut byte = [0_u8; 1];
    match tokio::time::timeout(TCP_SETTLE, stream.read(&mut byte)).await {
        // Silence: the service holds the connection open, waiting for us to speak.
        Err(_elapsed) => true,
        // The service spoke first (SSH, SMTP…).
        Ok(Ok(read)) => read > 0,
        Ok(Err(_)) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a clear test failure
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 302 Found\r\nLocation: /x\r\n"), Some(302));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[tokio::test]
    async fn probes_see_a_listener_and_its_absence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buffer = [0_u8; 256];
                    if let Ok(read) = socket.read(&mut buffer).await {
                        let status = if buffer[..read].starts_with(b"GET /starting") { "503 Service Unavailable" } else { "200 OK" };
                        let _ = socket.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes()).await;
                    }
                });
            }
        });
        assert!(http_ready("127.0.0.1", port, "/").await);
        assert!(!http_ready("127.0.0.1", port, "/starting").await);
        assert!(tcp_ready("127.0.0.1", port).await);
        server.abort();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(!http_ready("127.0.0.1", closed_port, "/").await);
        assert!(!tcp_ready("127.0.0.1", closed_port).await);
    }
}
