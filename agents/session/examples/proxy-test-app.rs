//! The workspace app of the proxy tests and `berth bench proxy` (image `berth-test/proxy-app`,
//! built by scripts/test-images.sh): serves at `/` on port 8080 (`PORT`) and
//!
//! - `GET /large?bytes=N` streams N bytes, byte i being `i % 251`, in 64 KiB chunks;
//! - `POST /upload` reads the body as it comes and answers `{"bytes", "sum"}` (sum of the bytes mod 2^32);
//! - `GET /ws` is a WebSocket echo (text and binary);
//! - anything else answers `{"method", "path", "query", "headers"}`: what the app was sent.

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, Request};
use axum::http::HeaderMap;
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Map, Value};

const CHUNK: usize = 64 * 1024;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT").ok().and_then(|port| port.parse::<u16>().ok()).unwrap_or(8080);
    let app =
        Router::new().route("/large", get(large)).route("/upload", post(upload)).route("/ws", get(echo_socket)).fallback(any(echo_request));
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    axum::serve(listener, app).await
}

async fn large(Query(query): Query<std::collections::HashMap<String, String>>) -> Body {
    let total: u64 = query.get("bytes").and_then(|bytes| bytes.parse().ok()).unwrap_or(1 << 20);
    let chunks = futures::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let length = (total - sent).min(CHUNK as u64) as usize;
        let chunk: Vec<u8> = (0..length as u64).map(|offset| ((sent + offset) % 251) as u8).collect();
        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), sent + length as u64))
    });
    Body::from_stream(chunks)
}

async fn upload(body: Body) -> Json<Value> {
    let mut stream = body.into_data_stream();
    let (mut bytes, mut sum) = (0u64, 0u32);
    while let Some(Ok(chunk)) = stream.next().await {
        bytes += chunk.len() as u64;
        sum = chunk.iter().fold(sum, |sum, byte| sum.wrapping_add(u32::from(*byte)));
    }
    Json(json!({"bytes": bytes, "sum": sum}))
}

async fn echo_socket(upgrade: WebSocketUpgrade, headers: HeaderMap) -> axum::response::Response {
    let _ = headers;
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            let reply = match message {
                Message::Text(text) => Message::Text(text),
                Message::Binary(bytes) => Message::Binary(bytes),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn echo_request(request: Request) -> Json<Value> {
    let mut headers = Map::new();
    for (name, value) in request.headers() {
        let value = Value::String(value.to_str().unwrap_or("<binary>").to_owned());
        match headers.get_mut(name.as_str()) {
            Some(Value::Array(values)) => values.push(value),
            Some(existing) => *existing = Value::Array(vec![existing.clone(), value]),
            None => {
                headers.insert(name.as_str().to_owned(), value);
            }
        }
    }
    Json(json!({
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "query": request.uri().query(),
        "headers": headers,
    }))
}
