//! A small HTTP/1.1 load generator for `berth bench proxy`: keep-alive connections, each sending
//! one request after the other for a fixed time, every latency recorded. The same code measures
//! the container's port directly and the proxy, so the two figures compare like with like.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// Where requests go and what they carry.
#[derive(Debug, Clone)]
pub struct Target {
    pub address: SocketAddr,
    pub path: String,
    /// Extra headers (`Authorization`, `Host`).
    pub headers: Vec<(String, String)>,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub errors: usize,
    /// What the first failed request got (status or error), to say why.
    pub first_error: Option<String>,
}

impl LoadResult {
    pub fn requests_per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

fn request(target: &Target) -> anyhow::Result<Request<Body>> {
    let mut request = Request::builder().uri(target.path.as_str()).header("host", target.address.to_string());
    for (name, value) in &target.headers {
        request = request.header(HeaderName::from_bytes(name.as_bytes())?, HeaderValue::from_str(value)?);
    }
    Ok(request.body(Body::empty())?)
}

async fn connection(target: &Target) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Body>> {
    let stream = tokio::net::TcpStream::connect(target.address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One request on a fresh connection; the time to the first byte of the body (headers included).
pub async fn first_byte(target: &Target) -> anyhow::Result<(u16, Duration)> {
    let started = Instant::now();
    let mut sender = connection(target).await?;
    let mut response = sender.send_request(request(target)?).await?;
    let status = response.status().as_u16();
    let _ = response.body_mut().frame().await;
    Ok((status, started.elapsed()))
}

/// `connections` keep-alive connections sending requests for `duration`.
pub async fn run(target: &Target, connections: usize, duration: Duration) -> anyhow::Result<LoadResult> {
    let started = Instant::now();
    let deadline = started + duration;
    let workers = (0..connections).map(|_| {
        let target = target.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut first_error = None;
            let mut sender = connection(&target).await?;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let outcome = async {
                    sender.ready().await?;
                    let response = sender.send_request(request(&target)?).await?;
                    let status = response.status();
                    let body = response.into_body().collect().await?.to_bytes();
                    anyhow::Ok((status, body))
                }
                .await;
                match outcome {
                    Ok((status, _)) if status.is_success() => latencies.push(sent.elapsed()),
                    Ok((status, body)) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{status}: {}", String::from_utf8_lossy(&body)));
                    }
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| error.to_string());
                        sender = connection(&target).await?;
                    }
                }
            }
            anyhow::Ok((latencies, errors, first_error))
        })
    });
    let mut result = LoadResult { elapsed: Duration::ZERO, latencies: Vec::new(), errors: 0, first_error: None };
    for worker in futures::future::join_all(workers).await {
        let (latencies, errors, first_error) = worker??;
        result.latencies.extend(latencies);
        result.errors += errors;
        result.first_error = result.first_error.or(first_error);
    }
    result.elapsed = started.elapsed();
    Ok(result)
}
