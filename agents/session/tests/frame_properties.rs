//! Property tests of the WebSocket frames (`parse_client_frame`), plus the size limit over a real
//! socket: any text frame parses to a typed request or a typed error, never a panic; the request
//! id is echoed whenever the frame gave a well-formed one; an error names the field at fault and
//! carries no debug noise; an oversized frame is refused by its size before it is parsed (its id
//! is not even read).
//!
//! 256 cases per property unless `PROPTEST_CASES` says otherwise. No failure files are written
//! (`failure_persistence: None`): a failure prints its shrunk input and the seed, and
//! `PROPTEST_RNG_SEED=<seed>` replays it. The socket test needs RabbitMQ (as tests/session.rs).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{json, Map, Value};
use session::frames::{parse_client_frame, ClientRequest};

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(256);
    let seed = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(rand_seed);
    // Printed with the test's output, which cargo shows when the test fails.
    println!("proptest seed {seed} (replay with PROPTEST_RNG_SEED={seed})");
    Config { cases, failure_persistence: None, rng_seed: RngSeed::Fixed(seed), ..Config::default() }
}

fn rand_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_nanos()).unwrap_or(0);
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

const SESSION: &str = "01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f";

const FRAGMENTS: &[&str] = &[
    "",
    ".",
    "..",
    "../",
    "/",
    "\\",
    "%2e%2e",
    "%2f",
    "\0",
    "\n",
    "\u{7f}",
    "\u{85}",
    "\u{200B}",
    "\u{202E}",
    "\u{FEFF}",
    "\u{FFFD}",
    "\u{FF0E}",
    "\u{1F600}",
    "e\u{301}",
    "\"",
    "'",
    "{",
    "}",
    "[",
    "]",
    "open",
    "close",
    "ping",
    "activity",
    "keepalive",
    "subscribe",
    "id",
    "type",
    "w1",
    "dev",
    SESSION,
    "a",
    "-",
    "_",
    " ",
    "null",
    "true",
    "0",
];

fn hostile_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::collection::vec(prop::sample::select(FRAGMENTS), 0..8).prop_map(|parts| parts.concat()),
        2 => any::<String>(),
        1 => (prop::sample::select(FRAGMENTS), 1usize..400).prop_map(|(fragment, times)| fragment.repeat(times)),
    ]
    .boxed()
}

fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |number| number.is_finite()).prop_map(Value::from),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(hostile_string(), inner, 0..4).prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
    .boxed()
}

/// One valid frame of every type.
fn valid_frames() -> Vec<Map<String, Value>> {
    [
        json!({"type": "open", "id": "r1", "workspace": "w1", "profile": "dev"}),
        json!({"type": "close", "id": "r2", "session": SESSION, "reason": "done"}),
        json!({"type": "activity", "id": "r3", "session": SESSION}),
        json!({"type": "keepalive", "id": "r6", "session": SESSION}),
        json!({"type": "subscribe", "id": "r4", "session": SESSION}),
        json!({"type": "ping", "id": "r5"}),
    ]
    .into_iter()
    .filter_map(|frame| match frame {
        Value::Object(object) => Some(object),
        _ => None,
    })
    .collect()
}

#[derive(Debug, Clone)]
enum FrameMutation {
    Remove(String),
    Replace(String, Value),
    /// The member twice in the text, the mutated value last (serde_json keeps the last).
    Duplicate(String, Value),
    Add(String, Value),
}

fn frame_mutation() -> impl Strategy<Value = (usize, FrameMutation)> {
    let field = prop::sample::select(&["type", "id", "workspace", "profile", "session", "reason"][..]).prop_map(str::to_owned);
    let value = prop_oneof![
        2 => any_json(),
        2 => hostile_string().prop_map(Value::String),
        1 => prop::sample::select(vec![
            String::new(), "w1".to_owned(), ".w".to_owned(), "w/1".to_owned(), "..".to_owned(), "a".repeat(129), "x".repeat(300),
            SESSION.to_owned(), SESSION.to_uppercase(), "open".to_owned(), "Open".to_owned(),
        ]).prop_map(Value::String),
    ];
    let mutation = prop_oneof![
        field.clone().prop_map(FrameMutation::Remove),
        (field.clone(), value.clone()).prop_map(|(name, value)| FrameMutation::Replace(name, value)),
        (field, value.clone()).prop_map(|(name, value)| FrameMutation::Duplicate(name, value)),
        (prop_oneof![hostile_string(), "[a-z_]{1,10}"], value).prop_map(|(name, value)| FrameMutation::Add(name, value)),
    ];
    (0usize..5, mutation)
}

fn apply(frame: usize, mutation: &FrameMutation) -> String {
    let mut object = valid_frames().swap_remove(frame);
    match mutation {
        FrameMutation::Remove(name) => {
            object.remove(name);
        }
        FrameMutation::Replace(name, value) | FrameMutation::Add(name, value) => {
            object.insert(name.clone(), value.clone());
        }
        FrameMutation::Duplicate(name, value) => {
            let text = Value::Object(object).to_string();
            return format!("{},{}:{}}}", &text[..text.len() - 1], Value::String(name.clone()), value);
        }
    }
    Value::Object(object).to_string()
}

/// The id the frame gave, when it is one the protocol accepts (a string of 1 to 128 bytes).
fn well_formed_id(text: &str) -> Option<String> {
    let Ok(Value::Object(object)) = serde_json::from_str::<Value>(text) else { return None };
    match object.get("id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= 128 => Some(id.clone()),
        _ => None,
    }
}

/// Characters that, printed raw, garble a message or a log line.
fn is_garbling(character: char) -> bool {
    character.is_control() || matches!(character, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Parses `text`: a typed request or a clear typed error, the id echoed when well-formed.
fn check(text: &str) -> Result<Result<ClientRequest, String>, TestCaseError> {
    let parsed = parse_client_frame(text);
    let id = well_formed_id(text);
    match &parsed.request {
        // An id of the wrong shape is itself the error, so nothing else can be echoed.
        Err(message) if message.starts_with("`id`") => prop_assert_eq!(parsed.request_id.as_ref(), None),
        _ => prop_assert_eq!(parsed.request_id.as_ref(), id.as_ref(), "the request id is not echoed"),
    }
    if let Err(message) = &parsed.request {
        prop_assert!(!message.trim().is_empty(), "empty error");
        for noise in [
            "called `Option::unwrap()`",
            "panicked at",
            "Error(\"",
            "Value::",
            "Object {",
            "Some(",
            "OpenBody",
            "CloseBody",
            "SessionBody",
            "EmptyBody",
        ] {
            prop_assert!(!message.contains(noise), "debug noise {:?} in {:?}", noise, message);
        }
        prop_assert!(!message.chars().any(is_garbling), "raw control or bidi character in {:?}", message);
    }
    Ok(parsed.request)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_is_a_typed_request_or_a_typed_error(text in prop_oneof![hostile_string(), any::<String>()]) {
        let _ = check(&text)?;
    }

    #[test]
    fn any_json_is_a_typed_request_or_a_typed_error(value in any_json(), id in proptest::option::of(hostile_string())) {
        let value = match (value, id) {
            (Value::Object(mut object), Some(id)) => {
                object.insert("id".to_owned(), Value::String(id));
                Value::Object(object)
            }
            (value, _) => value,
        };
        let _ = check(&value.to_string())?;
    }

    #[test]
    fn deep_nesting_is_a_typed_error(depth in 1usize..20_000) {
        let text = format!(r#"{{"id":"deep","type":"open","workspace":{}1{},"profile":"dev"}}"#, "[".repeat(depth), "]".repeat(depth));
        prop_assert!(check(&text)?.is_err());
    }

    #[test]
    fn a_mutated_frame_is_accepted_or_refused_by_field((frame, mutation) in frame_mutation()) {
        let text = apply(frame, &mutation);
        if let Err(message) = check(&text)? {
            let field = match &mutation {
                FrameMutation::Remove(name) | FrameMutation::Replace(name, _) | FrameMutation::Duplicate(name, _) | FrameMutation::Add(name, _) => name,
            };
            // Another valid type makes it another frame, refused for members that one lacks or has.
            if let FrameMutation::Replace(_, Value::String(frame_type)) | FrameMutation::Duplicate(_, Value::String(frame_type)) = &mutation {
                if field == "type" && ["open", "close", "activity", "keepalive", "subscribe", "ping"].contains(&frame_type.as_str()) {
                    return Ok(());
                }
            }
            // Control, bidi and zero-width characters of a name are shown escaped.
            let shown: String = field.chars().map(|c| if is_garbling(c) { c.escape_unicode().to_string() } else { c.to_string() }).collect();
            prop_assert!(
                message.contains(&format!("`{shown}`")) || message.contains("not valid JSON"),
                "{:?} does not name `{}`", message, shown
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The size limit over a real socket.

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Frames over `max_frame_bytes` (but within the socket's hard limit) are answered
/// `frame_too_large` without their id, so they were refused before parsing; frames within the
/// limit are parsed and answered with their id; a frame past the hard limit ends its connection.
#[tokio::test]
async fn oversized_frames_are_refused_before_parsing() -> anyhow::Result<()> {
    let repository = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let profile = protocol::Profile::load(&repository.join("run-profiles/dev/profile.toml"))?;
    let secret = format!("frame-properties-{}", uuid::Uuid::new_v4().simple());
    let key = session::KeyMaterial::inline(&secret);
    let mut settings = session::SessionConfig::with_key(&profile, &key)?;
    settings.max_frame_bytes = 1024;
    settings.hard_frame_limit_bytes = 8192;
    settings.max_messages_per_second = 10_000;
    // No store answers: the snapshot on connect says so quickly, and nothing here needs one.
    settings.store = session::StoreRoute {
        exchange: String::new(),
        routing_key: format!("berth.test.nobody-{}", uuid::Uuid::new_v4().simple()),
        timeout: Duration::from_millis(200),
    };
    settings.events_exchange = format!("berth.test.frame-events-{}", uuid::Uuid::new_v4().simple());
    let bus = protocol::Bus::connect(protocol::BusConfig::new(AMQP_URL, "session-frame-properties")).await?;
    bus.declare_topology().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (_handle, running) = session::start(settings, bus.clone(), listener, async move {
        let _ = stopped.await;
    })
    .await?;
    let server = tokio::spawn(running);

    let token = session::TokenAuthority::new(&key, "berth")?.mint("frame-prober", &[], Duration::from_secs(600))?;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws?access_token={token}")).await?;

    let mut runner = proptest::test_runner::TestRunner::new(Config { cases: 24, ..config() });
    let sizes = (1025usize..8000, "[a-z0-9]{1,16}");
    let mut cases = Vec::new();
    for _ in 0..24 {
        let tree = sizes.new_tree(&mut runner).map_err(|reason| anyhow::anyhow!("{reason}"))?;
        cases.push(tree.current());
    }
    for (size, id) in cases {
        // A well-formed ping padded past the limit with an unknown field nobody reads.
        let head = format!(r#"{{"type":"ping","id":"{id}","pad":""#);
        let padding = "x".repeat(size.saturating_sub(head.len() + 2));
        let frame = format!("{head}{padding}\"}}");
        socket.send(tokio_tungstenite::tungstenite::Message::text(frame.clone())).await?;
        let reply = read_reply(&mut socket).await?;
        assert_eq!(reply["type"], "error", "{size} bytes: {reply}");
        assert_eq!(reply["code"], "frame_too_large", "{size} bytes: {reply}");
        assert!(reply.get("id").is_none(), "an oversized frame's id {id:?} was read: {reply}");
        // Within the limit the same ping is parsed: its id comes back.
        let small = format!(r#"{{"type":"ping","id":"{id}"}}"#);
        socket.send(tokio_tungstenite::tungstenite::Message::text(small)).await?;
        let reply = read_reply(&mut socket).await?;
        assert_eq!(reply, json!({"type": "ok", "id": id}));
    }
    // Past the socket's hard limit the frame is not even buffered: the connection is closed, and
    // the server goes on serving others.
    socket.send(tokio_tungstenite::tungstenite::Message::text("x".repeat(9000))).await?;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return true,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert_eq!(ended.ok(), Some(true), "a frame past the hard limit did not end the connection");
    let (mut again, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws?access_token={token}")).await?;
    again.send(tokio_tungstenite::tungstenite::Message::text(r#"{"type":"ping","id":"after"}"#)).await?;
    assert_eq!(read_reply(&mut again).await?, json!({"type": "ok", "id": "after"}));
    let _ = again.close(None).await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    bus.close().await;
    Ok(())
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next frame that is not the snapshot sent on connect.
async fn read_reply(socket: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let message =
            tokio::time::timeout(Duration::from_secs(10), socket.next()).await?.ok_or_else(|| anyhow::anyhow!("socket closed"))??;
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let frame: Value = serde_json::from_str(text.as_str())?;
            if frame["type"] != "snapshot" {
                return Ok(frame);
            }
        }
    }
}
