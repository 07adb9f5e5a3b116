//! The `berth` command line against the real broker: `publish` refuses bad input with exit code 2
//! and publishes nothing, publishes good input with a confirm, and `tail` prints what flows.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use protocol::{topology, Bus, BusConfig};

fn amqp_url() -> String {
    std::env::var("BERTH_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn berth(arguments: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_berth"));
    command
        .args(arguments)
        .env("BERTH_AMQP_URL", amqp_url())
        .env("BERTH_PROFILES_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/run-profiles"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("berth runs");
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("berth finishes")
}

async fn message_count(bus: &Bus, queue: &str) -> u32 {
    bus.ready_messages(queue).await.expect("queue exists")
}

#[tokio::test]
async fn publish_refuses_bad_input_with_exit_2_and_publishes_nothing() {
    let bus = Bus::connect(BusConfig::new(&amqp_url(), "test-cli")).await.expect("broker");
    bus.declare_topology().await.expect("topology");
    protocol::broker_admin::ensure_identities(&amqp_url()).await.expect("bus identities");
    let event_type = format!("test.cli{}", uuid::Uuid::new_v4().simple());
    let queue = bus.declare_private_queue(topology::EVENTS_EXCHANGE, std::slice::from_ref(&event_type)).await.expect("queue");

    let bad_cases: Vec<(Vec<String>, Option<String>, &str)> = vec![
        (vec!["--type".into(), event_type.clone(), "--data".into(), "{not json".into()], None, "--data is not valid JSON"),
        (vec!["--type".into(), "Not A Type".into()], None, "attribute `type` is invalid"),
        (vec!["--type".into(), event_type.clone(), "--ext".into(), "Bad_Name=x".into()], None, "attribute `Bad_Name` is invalid"),
        (
            vec!["--file".into(), "-".into()],
            Some(format!(r#"{{"specversion":"1.0","type":"{event_type}","source":"/t"}}"#)),
            "required attribute `id` is missing",
        ),
        (vec!["--file".into(), "-".into()], Some("[]".into()), "event must be a JSON object"),
        (vec![], None, "give --type"),
        // A catalogue event's data is checked against its type, from the arguments or a file.
        (
            vec!["--type".into(), "session.open".into(), "--subject".into(), "s-1".into(), "--data".into(), r#"{"user":"alice"}"#.into()],
            None,
            "`session.open` data: missing field `workspace`",
        ),
        (
            vec!["--file".into(), "-".into()],
            Some(r#"{"specversion":"1.0","id":"01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f","type":"session.activity","source":"/t","subject":"s-1","data":{"source":"pigeon"}}"#.into()),
            "`session.activity` data: unknown variant `pigeon`",
        ),
    ];
    for (arguments, stdin, expected) in &bad_cases {
        let mut full = vec!["publish"];
        full.extend(arguments.iter().map(String::as_str));
        let output = berth(&full, stdin.as_deref());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{full:?} should exit 2; stderr: {stderr}");
        assert!(stderr.contains(expected), "{full:?}: {stderr:?} should contain {expected:?}");
    }
    // Give a wrongly published message time to arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(message_count(&bus, &queue).await, 0, "bad input published nothing");

    // The client identity (the default) may publish only its session events: the broker refuses
    // anything else and nothing is published.
    let refused = berth(&["publish", "--type", &event_type, "--subject", "s-1"], None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the client identity published {event_type}");
    assert!(stderr.contains("berth-client") && stderr.contains("ACCESS_REFUSED"), "{stderr}");
    let good = berth(
        &["publish", "--as", "admin", "--type", &event_type, "--subject", "s-1", "--data", r#"{"user":"alice"}"#, "--ext", "userid=alice"],
        None,
    );
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    let id = String::from_utf8_lossy(&good.stdout).trim().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "publish prints the event id, got {id:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(message_count(&bus, &queue).await, 1, "the good event was published once");
    bus.delete_queue(&queue).await.ok();
    bus.close().await;
}

#[tokio::test]
async fn tail_prints_matching_events_one_json_per_line() {
    let event_type = format!("test.tail{}", uuid::Uuid::new_v4().simple());
    let mut tail = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["tail", "--type", &event_type, "--count", "2"])
        .env("BERTH_AMQP_URL", amqp_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tail runs");
    // Publish until tail has bound its queue and seen two events (it binds asynchronously).
    let bus = Bus::connect(BusConfig::new(&amqp_url(), "test-tail")).await.expect("broker");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut published = 0;
    while tail.try_wait().expect("poll").is_none() {
        assert!(std::time::Instant::now() < deadline, "tail did not finish");
        let event = protocol::CloudEvent::new(&event_type, "/t", Some("s"), serde_json::json!({"n": published}));
        bus.publish_event(&event).await.expect("publish");
        published += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let output = tail.wait_with_output().expect("tail output");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).expect("each line is JSON")).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|event| event["type"] == event_type.as_str()));
    bus.close().await;
}
