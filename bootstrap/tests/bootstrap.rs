//! Bootstrap against the real broker, Redis and an SQLite store: idempotent, destroys nothing without
//! `--reset`, refuses a broken pattern before changing anything.

use std::path::PathBuf;

use bootstrap::{bootstrap, Change, Reset};
use protocol::store::{collections, GetArgs, Operation, UpsertArgs};
use protocol::Profile;
use serde_json::{json, Value};

/// The dev profile on a private SQLite file; the patterns directory is the repository's.
fn profile(store_dir: &std::path::Path) -> Profile {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_var("BERTH_PATTERNS_DIR", root.join("patterns"));
    let mut profile = Profile::load(&root.join("run-profiles/dev/profile.toml")).expect("dev profile");
    profile.services.store_url = format!("sqlite://{}", store_dir.join("store.sqlite").display());
    profile
}

async fn get(profile: &Profile, collection: &str, id: &str) -> Value {
    let store = persistence::open_store(&profile.services.store_url).await.expect("store");
    store.execute(None, Operation::Get(GetArgs { collection: collection.to_owned(), id: id.to_owned() })).await.expect("get")
}

#[tokio::test]
async fn bootstrap_is_idempotent_keeps_data_and_resets_only_when_asked() {
    let directory = std::env::temp_dir().join(format!("berth-bootstrap-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let profile = profile(&directory);

    let first = bootstrap(&profile, Reset::Keep).await.expect("first bootstrap");
    assert_eq!(first.patterns, vec![("workspace-session".to_owned(), Change::Created), ("workspace-recovery".to_owned(), Change::Created)]);
    assert!(first.users.iter().all(|(_, change)| *change == Change::Created), "{first}");
    assert_eq!(get(&profile, collections::USERS, "admin").await["roles"], json!(["admin"]));

    // A session record written by the running system must survive a second bootstrap.
    let store = persistence::open_store(&profile.services.store_url).await.expect("store");
    let mut record = serde_json::Map::new();
    record.insert("state".into(), json!("running"));
    store
        .execute(None, Operation::Upsert(UpsertArgs { collection: collections::SESSIONS.into(), id: "s-1".into(), doc: record }))
        .await
        .expect("upsert");

    let second = bootstrap(&profile, Reset::Keep).await.expect("second bootstrap");
    assert!(second.changed_nothing(), "second run changed something:\n{second}");
    assert_eq!(get(&profile, collections::SESSIONS, "s-1").await["state"], "running");

    let reset = bootstrap(&profile, Reset::DropRecords).await.expect("reset bootstrap");
    assert!(reset.reset);
    assert!(get(&profile, collections::SESSIONS, "s-1").await.is_null(), "--reset dropped the records");
    assert!(reset.patterns.iter().all(|(_, change)| *change == Change::Created), "{reset}");
    std::fs::remove_dir_all(&directory).ok();
}

#[tokio::test]
async fn a_broken_pattern_fails_bootstrap_before_anything_is_written() {
    let directory = std::env::temp_dir().join(format!("berth-bootstrap-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let mut profile = profile(&directory);
    profile.patterns = vec!["no-such-pattern".into()];
    let error = bootstrap(&profile, Reset::Keep).await.expect_err("a missing pattern fails");
    assert!(format!("{error:#}").contains("no-such-pattern"), "{error:#}");
    assert!(!directory.join("store.sqlite").exists(), "nothing was written");
    std::fs::remove_dir_all(&directory).ok();
}

/// Bootstrap creates every bus identity in the deployment's vhost (a vhost of this test's own):
/// each connects there as its own user afterwards, the client may publish only its session events,
/// and a second run changes nothing.
#[tokio::test]
async fn bootstrap_creates_the_bus_identities_in_its_vhost() {
    let directory = std::env::temp_dir().join(format!("berth-bootstrap-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).expect("temp dir");
    let vhost = format!("berth-bootstrap-{}", uuid::Uuid::new_v4().simple());
    let rabbitmqctl = |arguments: &[&str]| {
        let output = std::process::Command::new("rabbitmqctl").args(arguments).output().expect("rabbitmqctl runs");
        assert!(output.status.success(), "rabbitmqctl {arguments:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let mut profile = profile(&directory);
    profile.services.amqp_url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");

    let report = bootstrap(&profile, Reset::Keep).await.expect("bootstrap");
    assert_eq!(report.vhost, vhost);
    assert!(report.to_string().contains(&format!("bus identities ensured in vhost {vhost}")), "{report}");
    for identity in protocol::Identity::CREATED {
        let config = protocol::BusConfig::for_identity(&profile.services.amqp_url, identity, "bootstrap-test").expect("password kept");
        let bus = protocol::Bus::connect(config).await.unwrap_or_else(|error| panic!("{identity} connects to {vhost}: {error}"));
        bus.declare_topology().await.unwrap_or_else(|error| panic!("{identity} finds the topology: {error}"));
        if identity == protocol::Identity::Client {
            let forged = protocol::CloudEvent::new("container.ready", "/test", Some("s-1"), json!({}));
            assert!(matches!(bus.publish_event(&forged).await, Err(protocol::bus::BusError::Refused { .. })));
        }
        bus.close().await;
    }
    let again = bootstrap(&profile, Reset::Keep).await.expect("second bootstrap");
    assert!(again.changed_nothing(), "{again}");
    rabbitmqctl(&["delete_vhost", &vhost]);
    std::fs::remove_dir_all(&directory).ok();
}
