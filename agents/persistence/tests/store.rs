//! The store conformance suite, run against SQLite always and against MongoDB when
//! `BERTH_TEST_MONGODB_URL` is set; then the agent through the real broker (request/reply,
//! fire-and-forget, redelivery, bad input).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use persistence::{agent::error_policy, Agent, Backend, Error, Store};
use protocol::store::{collections, CountArgs, ErrorKind, Filter, Operation, PutArgs, ReplaceArgs, StoreClient, StoreClientError};
use protocol::{topology, Bus, BusConfig, Incoming, Outcome};
use serde_json::{json, Map, Value};
use uuid::Uuid;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(object) => object,
        other => panic!("not an object: {other}"),
    }
}

fn operation(action: &str, args: Value) -> Operation {
    serde_json::from_value(json!({"action": action, "args": args})).unwrap_or_else(|error| panic!("{action} {args}: {error}"))
}

/// A SQLite database file of its own, removed (with its WAL files) on drop.
struct TempDatabase {
    directory: PathBuf,
}

impl TempDatabase {
    fn new() -> TempDatabase {
        TempDatabase { directory: std::env::temp_dir().join(format!("berth-store-test-{}", Uuid::now_v7())) }
    }

    fn url(&self) -> String {
        // The directory does not exist yet: opening must create it.
        format!("sqlite://{}", self.directory.join("nested/store.sqlite").display())
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// The suite every backend must pass. Each part works on its own uniquely named collection and
/// drops it afterwards, so runs against a shared server do not collide.
async fn conformance(store: &dyn Store) {
    puts_gets_and_idempotence(store).await;
    upsert_and_replace(store).await;
    every_matcher_operator(store).await;
    sort_skip_limit_projection(store).await;
    updates(store).await;
    delete_and_count(store).await;
    groups_are_all_or_nothing(store).await;
    bad_input_is_refused(store).await;
}

fn unique_collection(part: &str) -> String {
    format!("t_{part}_{}", Uuid::now_v7().simple())
}

async fn run(store: &dyn Store, task_id: Option<Uuid>, action: &str, args: Value) -> Result<Value, Error> {
    store.execute(task_id, operation(action, args)).await
}

#[track_caller]
fn expect_kind(outcome: Result<Value, Error>, kind: ErrorKind, fragment: &str) {
    match outcome {
        Err(error) => {
            assert_eq!(error.kind(), kind, "{error}");
            assert!(error.to_string().contains(fragment), "{error:?} does not mention {fragment:?}");
        }
        Ok(value) => panic!("expected a {kind} error mentioning {fragment:?}, got {value}"),
    }
}

async fn puts_gets_and_idempotence(store: &dyn Store) {
    let collection = unique_collection("put");
    let first_task = Uuid::now_v7();
    let put = json!({"collection": collection, "id": "d1", "doc": {"name": "one", "n": 1}});
    let stored = run(store, Some(first_task), "put", put.clone()).await.unwrap();
    assert_eq!(stored["id"], "d1");
    assert_eq!(stored["name"], "one");
    assert_eq!(stored["created"], stored["modified"]);
    assert!(chrono::DateTime::parse_from_rfc3339(stored["created"].as_str().unwrap()).is_ok());

    let fetched = run(store, None, "get", json!({"collection": collection, "id": "d1"})).await.unwrap();
    assert_eq!(fetched, stored);
    assert_eq!(run(store, None, "get", json!({"collection": collection, "id": "missing"})).await.unwrap(), Value::Null);

    // The same task delivered again: the first answer, nothing inserted twice.
    assert_eq!(run(store, Some(first_task), "put", put.clone()).await.unwrap(), stored);
    // Another task putting the same content under the same id: a no-op too.
    assert_eq!(run(store, Some(Uuid::now_v7()), "put", put).await.unwrap(), stored);
    // Different content under an existing id is a conflict.
    let clash = json!({"collection": collection, "id": "d1", "doc": {"name": "other"}});
    expect_kind(run(store, Some(Uuid::now_v7()), "put", clash).await, ErrorKind::Conflict, "d1");
    // A document read back (id and timestamps included) can be put again unchanged.
    let round_trip = json!({"collection": collection, "id": "d1", "doc": stored});
    assert_eq!(run(store, Some(Uuid::now_v7()), "put", round_trip).await.unwrap()["name"], "one");

    // Without an id, the task id is the document's id: a redelivery inserts once.
    let audit_task = Uuid::now_v7();
    let audit = json!({"collection": collection, "doc": {"to": "running"}});
    let inserted = run(store, Some(audit_task), "put", audit.clone()).await.unwrap();
    assert_eq!(inserted["id"], audit_task.to_string());
    run(store, Some(audit_task), "put", audit).await.unwrap();
    assert_eq!(run(store, None, "count", json!({"collection": collection})).await.unwrap(), json!(2));

    // A redelivered write that is not naturally idempotent is still applied once.
    let increment_task = Uuid::now_v7();
    let increment = json!({"collection": collection, "filter": {"id": "d1"}, "update": {"inc": {"n": 5}}});
    assert_eq!(run(store, Some(increment_task), "update", increment.clone()).await.unwrap(), json!(1));
    assert_eq!(run(store, Some(increment_task), "update", increment).await.unwrap(), json!(1));
    let after = run(store, None, "get", json!({"collection": collection, "id": "d1"})).await.unwrap();
    assert_eq!(after["n"], json!(6));
    store.drop_collection(&collection).await.unwrap();
}

async fn upsert_and_replace(store: &dyn Store) {
    let collection = unique_collection("upsert");
    let created = run(
        store,
        Some(Uuid::now_v7()),
        "upsert",
        json!({"collection": collection, "id": "s1", "doc": {"state": "open", "user": "alice"}}),
    )
    .await
    .unwrap();
    assert_eq!(created["state"], "open");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let updated = run(
        store,
        Some(Uuid::now_v7()),
        "upsert",
        json!({"collection": collection, "id": "s1", "doc": {"state": "running", "port": 8080}}),
    )
    .await
    .unwrap();
    assert_eq!(updated["state"], "running");
    assert_eq!(updated["user"], "alice", "upsert sets fields and keeps the others");
    assert_eq!(updated["port"], 8080);
    assert_eq!(updated["created"], created["created"]);
    assert!(updated["modified"].as_str() > created["modified"].as_str(), "modified moves forward: {updated}");

    expect_kind(
        run(store, Some(Uuid::now_v7()), "replace", json!({"collection": collection, "id": "nope", "doc": {}})).await,
        ErrorKind::NotFound,
        "nope",
    );
    let replaced = run(store, Some(Uuid::now_v7()), "replace", json!({"collection": collection, "id": "s1", "doc": {"state": "closed"}}))
        .await
        .unwrap();
    assert_eq!(replaced["state"], "closed");
    assert_eq!(replaced.get("user"), None, "replace drops the fields it does not name");
    assert_eq!(replaced["created"], created["created"]);
    store.drop_collection(&collection).await.unwrap();
}

async fn ids_of(store: &dyn Store, collection: &str, filter: Value) -> BTreeSet<String> {
    let found = run(store, None, "find", json!({"collection": collection, "filter": filter})).await;
    let found = found.unwrap_or_else(|error| panic!("find {filter}: {error}"));
    found.as_array().unwrap().iter().map(|document| document["id"].as_str().unwrap().to_owned()).collect()
}

async fn every_matcher_operator(store: &dyn Store) {
    let collection = unique_collection("match");
    let documents = [
        ("a", json!({"n": 1, "s": "apple", "tags": ["x", "y"], "flag": true, "nested": {"k": 1}})),
        ("b", json!({"n": 2.5, "s": "banana", "tags": ["y"], "flag": false, "nested": {"k": 2}, "opt": null})),
        ("c", json!({"n": 10, "s": "cherry", "tags": [], "nested": {"k": 3}, "extra": "e"})),
        ("d", json!({"n": "7", "s": "Date", "tags": "x"})),
        ("e", json!({"n": [3, 20], "s": "elder"})),
    ];
    for (id, doc) in &documents {
        run(store, Some(Uuid::now_v7()), "put", json!({"collection": collection, "id": id, "doc": doc})).await.unwrap();
    }
    let table: Vec<(Value, &str)> = vec![
        (json!({}), "a b c d e"),
        (json!({"s": "apple"}), "a"),
        (json!({"n": 1}), "a"),
        (json!({"n": {"eq": 20}}), "e"),
        (json!({"n": {"eq": 2.5}}), "b"),
        (json!({"tags": "x"}), "a d"),
        (json!({"tags": []}), "c"),
        (json!({"tags": {"ne": "x"}}), "b c e"),
        (json!({"n": {"gt": 2}}), "b c e"),
        (json!({"n": {"gte": 2.5, "lt": 10}}), "b e"),
        (json!({"n": {"lte": 1}}), "a"),
        (json!({"n": {"gt": "5"}}), "d"),
        (json!({"s": {"in": ["apple", "cherry", "zzz"]}}), "a c"),
        (json!({"s": {"in": []}}), ""),
        (json!({"s": {"nin": ["apple"]}}), "b c d e"),
        (json!({"tags": {"in": ["y"]}}), "a b"),
        (json!({"tags": {"nin": ["y", "x"]}}), "c e"),
        (json!({"opt": {"exists": true}}), "b"),
        (json!({"extra": {"exists": false}}), "a b d e"),
        (json!({"opt": null}), "a b c d e"),
        (json!({"opt": {"ne": null}}), ""),
        (json!({"s": {"regex": "^[ab]"}}), "a b"),
        (json!({"s": {"regex": "(?i)^d"}}), "d"),
        (json!({"tags": {"regex": "^y$"}}), "a b"),
        (json!({"nested.k": {"gte": 2}}), "b c"),
        (json!({"nested": {"k": 1}}), "a"),
        (json!({"flag": true}), "a"),
        (json!({"flag": false}), "b"),
        (json!({"flag": {"ne": true}}), "b c d e"),
        (json!({"id": {"in": ["a", "c"]}}), "a c"),
        (json!({"id": {"gt": "c"}}), "d e"),
        (json!({"id": "b"}), "b"),
        (json!({"n": {"gt": 1}, "s": {"regex": "a"}}), "b"),
        (json!({"missing.deep": {"exists": false}, "s": {"lt": "b"}}), "a d"),
    ];
    for (filter, expected) in table {
        let expected: BTreeSet<String> = expected.split_whitespace().map(str::to_owned).collect();
        assert_eq!(ids_of(store, &collection, filter.clone()).await, expected, "find {filter} on {:?}", store.backend());
        let count = run(store, None, "count", json!({"collection": collection, "filter": filter})).await.unwrap();
        assert_eq!(count, json!(expected.len()), "count {filter}");
    }
    store.drop_collection(&collection).await.unwrap();
}

async fn sort_skip_limit_projection(store: &dyn Store) {
    let collection = unique_collection("sort");
    for (id, rank, word) in [("p", 3, "pear"), ("q", 1, "quince"), ("r", 2, "Raisin"), ("s", 2, "sloe")] {
        let doc = json!({"rank": rank, "word": word, "meta": {"len": word.len(), "vowels": 2}});
        run(store, Some(Uuid::now_v7()), "put", json!({"collection": collection, "id": id, "doc": doc})).await.unwrap();
    }
    let ids = |found: Value| -> Vec<String> { found.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_owned()).collect() };
    let by_word = run(store, None, "find", json!({"collection": collection, "sort": [{"field": "word"}]})).await.unwrap();
    assert_eq!(ids(by_word), ["r", "p", "q", "s"], "byte order: uppercase first");
    let by_rank = json!({"collection": collection, "sort": [{"field": "rank", "order": "desc"}, {"field": "word", "order": "asc"}]});
    assert_eq!(ids(run(store, None, "find", by_rank).await.unwrap()), ["p", "r", "s", "q"]);
    // Equal sort keys fall back to the id, so pages are stable.
    let page = json!({"collection": collection, "sort": [{"field": "rank"}], "skip": 1, "limit": 2});
    assert_eq!(ids(run(store, None, "find", page).await.unwrap()), ["r", "s"]);
    let past_the_end = json!({"collection": collection, "sort": [{"field": "rank"}], "skip": 10});
    assert_eq!(run(store, None, "find", past_the_end).await.unwrap(), json!([]));
    let projected = json!({"collection": collection, "filter": {"id": "p"}, "projection": ["word", "meta.len"]});
    assert_eq!(run(store, None, "find", projected).await.unwrap(), json!([{"id": "p", "word": "pear", "meta": {"len": 4}}]));
    store.drop_collection(&collection).await.unwrap();
}

async fn updates(store: &dyn Store) {
    let collection = unique_collection("update");
    let doc = json!({"state": "running", "error": "old", "count": 1, "tags": ["a", "b", "a"], "log": [], "nested": {"x": 1}});
    let before = run(store, Some(Uuid::now_v7()), "put", json!({"collection": collection, "id": "u1", "doc": doc})).await.unwrap();
    run(store, Some(Uuid::now_v7()), "put", json!({"collection": collection, "id": "u2", "doc": {"state": "idle"}})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let update = json!({
        "set": {"state": "idle", "nested.y": 2}, "unset": ["error"], "inc": {"count": 2}, "push": {"log": "paused"},
        "add_to_set": {"labels": "z"}, "pull": {"tags": "a"}, "current_date": ["paused_at"]
    });
    let matched =
        run(store, Some(Uuid::now_v7()), "update", json!({"collection": collection, "filter": {"state": "running"}, "update": update}))
            .await
            .unwrap();
    assert_eq!(matched, json!(1));
    let after = run(store, None, "get", json!({"collection": collection, "id": "u1"})).await.unwrap();
    assert_eq!(after["state"], "idle");
    assert_eq!(after.get("error"), None);
    assert_eq!(after["count"], json!(3));
    assert_eq!(after["log"], json!(["paused"]));
    assert_eq!(after["labels"], json!(["z"]));
    assert_eq!(after["tags"], json!(["b"]));
    assert_eq!(after["nested"], json!({"x": 1, "y": 2}));
    assert_eq!(after["created"], before["created"]);
    assert!(after["modified"].as_str() > before["modified"].as_str());
    assert_eq!(after["paused_at"], after["modified"]);
    // Every match is updated; add_to_set leaves an existing element alone.
    let all = json!({"collection": collection, "filter": {}, "update": {"add_to_set": {"labels": "z"}}});
    assert_eq!(run(store, Some(Uuid::now_v7()), "update", all).await.unwrap(), json!(2));
    assert_eq!(run(store, None, "get", json!({"collection": collection, "id": "u1"})).await.unwrap()["labels"], json!(["z"]));
    // Incrementing a string is refused and changes nothing.
    let wrong = json!({"collection": collection, "filter": {"id": "u1"}, "update": {"inc": {"state": 1}}});
    expect_kind(run(store, Some(Uuid::now_v7()), "update", wrong).await, ErrorKind::BadRequest, "");
    assert_eq!(run(store, None, "get", json!({"collection": collection, "id": "u1"})).await.unwrap()["state"], "idle");
    store.drop_collection(&collection).await.unwrap();
}

async fn delete_and_count(store: &dyn Store) {
    let collection = unique_collection("delete");
    for index in 0..5 {
        run(store, Some(Uuid::now_v7()), "put", json!({"collection": collection, "id": format!("k{index}"), "doc": {"index": index}}))
            .await
            .unwrap();
    }
    let deleted =
        run(store, Some(Uuid::now_v7()), "delete", json!({"collection": collection, "filter": {"index": {"gte": 3}}})).await.unwrap();
    assert_eq!(deleted, json!(2));
    assert_eq!(run(store, None, "count", json!({"collection": collection})).await.unwrap(), json!(3));
    assert_eq!(run(store, None, "count", json!({"collection": collection, "filter": {"index": {"lt": 1}}})).await.unwrap(), json!(1));
    // A collection never written is empty, not an error.
    assert_eq!(run(store, None, "count", json!({"collection": unique_collection("never")})).await.unwrap(), json!(0));
    store.drop_collection(&collection).await.unwrap();
}

async fn groups_are_all_or_nothing(store: &dyn Store) {
    let collection = unique_collection("group");
    let failing = json!({"operations": [
        {"action": "put", "args": {"collection": collection, "id": "g1", "doc": {"v": 1}}},
        {"action": "upsert", "args": {"collection": collection, "id": "g2", "doc": {"v": 2}}},
        {"action": "replace", "args": {"collection": collection, "id": "absent", "doc": {"v": 3}}}
    ]});
    expect_kind(run(store, Some(Uuid::now_v7()), "group", failing).await, ErrorKind::NotFound, "group operation 2 (replace)");
    if store.groups_are_atomic() {
        assert_eq!(
            run(store, None, "count", json!({"collection": collection})).await.unwrap(),
            json!(0),
            "nothing of a failed group stays"
        );
    } else {
        eprintln!("SKIPPED the all-or-nothing check: this {:?} deployment has no transactions", store.backend());
        store.drop_collection(&collection).await.unwrap();
        let refused = json!({"operations": [{"action": "update", "args": {"collection": collection, "update": {"inc": {"v": 1}}}}]});
        expect_kind(run(store, Some(Uuid::now_v7()), "group", refused).await, ErrorKind::Unavailable, "needs transactions");
    }

    let group_task = Uuid::now_v7();
    let working = json!({"operations": [
        {"action": "put", "args": {"collection": collection, "doc": {"v": 1}}},
        {"action": "upsert", "args": {"collection": collection, "id": "g2", "doc": {"v": 2}}},
        {"action": "update", "args": {"collection": collection, "filter": {"id": "g2"}, "update": {"inc": {"v": 10}}}},
        {"action": "get", "args": {"collection": collection, "id": "g2"}}
    ]});
    let results = run(store, Some(group_task), "group", working.clone()).await.unwrap();
    assert_eq!(results.as_array().unwrap().len(), 4);
    assert_eq!(results[3]["v"], json!(12));
    assert_eq!(results[0]["id"], persistence::grouped_task_id(group_task, 0).to_string());
    // Redelivered: the same answer, nothing applied twice.
    assert_eq!(run(store, Some(group_task), "group", working).await.unwrap(), results);
    assert_eq!(run(store, None, "count", json!({"collection": collection})).await.unwrap(), json!(2));
    store.drop_collection(&collection).await.unwrap();
}

async fn bad_input_is_refused(store: &dyn Store) {
    let collection = unique_collection("bad");
    let cases = [
        ("find", json!({"collection": collection, "filter": {"s": {"regex": "("}}}), "bad regex"),
        ("delete", json!({"collection": collection, "filter": {}}), "non-empty filter"),
        ("put", json!({"collection": collection, "doc": {"big": "x".repeat(protocol::store::MAX_DOCUMENT_BYTES)}}), "larger than"),
        ("update", json!({"collection": collection, "update": {"set": {"id": "x"}}}), "keeps `id`"),
    ];
    for (action, args, fragment) in cases {
        expect_kind(run(store, Some(Uuid::now_v7()), action, args).await, ErrorKind::BadRequest, fragment);
    }
    store.drop_collection(&collection).await.unwrap();
}

#[tokio::test]
async fn sqlite_file_conformance() {
    let database = TempDatabase::new();
    let store = persistence::open_store(&database.url()).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    store.ensure_indexes().await.unwrap();
    store.ensure_indexes().await.unwrap();
    conformance(store.as_ref()).await;
    assert!(database.directory.join("nested/store.sqlite").exists());

    // `bootstrap --reset`: everything goes, including the records of applied tasks.
    let task_id = Uuid::now_v7();
    let put = json!({"collection": "users", "id": "alice", "doc": {"roles": ["user"]}});
    run(store.as_ref(), Some(task_id), "put", put.clone()).await.unwrap();
    store.drop_all().await.unwrap();
    assert_eq!(run(store.as_ref(), None, "count", json!({"collection": "users"})).await.unwrap(), json!(0));
    store.ensure_indexes().await.unwrap();
    run(store.as_ref(), Some(task_id), "put", put).await.unwrap();
    assert_eq!(run(store.as_ref(), None, "count", json!({"collection": "users"})).await.unwrap(), json!(1), "the task applies afresh");
}

#[tokio::test]
async fn sqlite_memory_conformance() {
    let store = persistence::open_store("sqlite::memory:").await.unwrap();
    assert!(store.groups_are_atomic());
    conformance(store.as_ref()).await;
}

#[cfg(berth_mongodb_test)]
#[tokio::test]
async fn mongodb_conformance() {
    let url = std::env::var("BERTH_TEST_MONGODB_URL").expect("BERTH_TEST_MONGODB_URL was set at build time but not now");
    let store = persistence::open_store(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::MongoDb);
    store.ensure_indexes().await.unwrap();
    conformance(store.as_ref()).await;
}

#[cfg(not(berth_mongodb_test))]
#[test]
fn mongodb_conformance_skipped_no_server() {
    eprintln!("SKIPPED: the MongoDB conformance run; set BERTH_TEST_MONGODB_URL (e.g. mongodb://127.0.0.1:27017/berth_test) to run it");
    assert!(
        std::env::var_os("BERTH_TEST_MONGODB_URL").is_none_or(|url| url.is_empty()),
        "the URL is set now: rebuild to run the MongoDB suite"
    );
}

#[tokio::test]
async fn sqlite_queries_use_the_indexes() {
    let database = TempDatabase::new();
    let store = persistence::SqliteStore::open(&database.url()).await.unwrap();
    store.ensure_indexes().await.unwrap();
    let connection = rusqlite::Connection::open(database.directory.join("nested/store.sqlite")).unwrap();
    for (filter, index) in [
        (json!({"user": "alice"}), "i_sessions_user"),
        (json!({"state": {"in": ["running", "idle"]}}), "i_sessions_state"),
        (json!({"user": {"gt": "a"}}), "i_sessions_user"),
    ] {
        let filter: Filter = serde_json::from_value(filter).unwrap();
        let clause = persistence::sqlite::where_clause(&filter);
        let sql = format!("EXPLAIN QUERY PLAN SELECT id, doc FROM \"c_sessions\" WHERE {}", clause.sql);
        let mut statement = connection.prepare(&sql).unwrap();
        let plan: Vec<String> = statement
            .query_map(rusqlite::params_from_iter(clause.params), |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|line| line.contains(index)), "{filter:?} does not use {index}: {plan:?}");
        assert!(!plan.iter().any(|line| line.starts_with("SCAN c_sessions")), "{filter:?} scans: {plan:?}");
    }
}

/// An agent consuming a private queue bound to `berth.tasks` under its own routing key, so that
/// tests never meet another agent.
struct RunningAgent {
    bus: Bus,
    queue: String,
    routing_key: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    consumer: tokio::task::JoinHandle<()>,
    store: Arc<dyn Store>,
    _database: TempDatabase,
}

impl RunningAgent {
    async fn start() -> RunningAgent {
        let database = TempDatabase::new();
        let store: Arc<dyn Store> = Arc::from(persistence::open_store(&database.url()).await.unwrap());
        store.ensure_indexes().await.unwrap();
        let bus = Bus::connect(BusConfig::new(AMQP_URL, "persistence-test")).await.unwrap();
        bus.declare_topology().await.unwrap();
        let routing_key = format!("test-persistence-{}", Uuid::now_v7());
        let queue = bus.declare_private_queue(topology::TASKS_EXCHANGE, std::slice::from_ref(&routing_key)).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let agent = Agent::new(store.clone(), bus.clone());
        let consumed_queue = queue.clone();
        let consumer = tokio::spawn(async move {
            agent.consume(&consumed_queue, async { stopped.await.unwrap_or(()) }).await.unwrap();
        });
        RunningAgent { bus, queue, routing_key, stop: Some(stop), consumer, store, _database: database }
    }

    fn client(&self) -> StoreClient {
        StoreClient::new(self.bus.clone()).with_routing_key(&self.routing_key).with_timeout(Duration::from_secs(10))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.consumer).await.expect("the agent stops").unwrap();
        self.bus.delete_queue(&self.queue).await.unwrap();
        self.bus.close().await;
    }
}

async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn request_reply_and_berth_queries_through_the_broker() {
    let agent = RunningAgent::start().await;
    let client = agent.client();

    for (session, user, state) in [("s1", "alice", "running"), ("s2", "alice", "idle"), ("s3", "bob", "running")] {
        let doc = object(json!({"user": user, "state": state, "profile": "dev", "workspace": "w1"}));
        let stored = client.upsert(collections::SESSIONS, session, doc).await.unwrap();
        assert_eq!(stored["id"], session);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let alice: Vec<Value> = client.sessions_of_user("alice", 10).await.unwrap();
    assert_eq!(alice.iter().map(|s| s["id"].as_str().unwrap()).collect::<Vec<_>>(), ["s2", "s1"], "newest first");
    let running = client.sessions_in_state("running", 10).await.unwrap();
    assert_eq!(running.iter().map(|s| s["id"].as_str().unwrap()).collect::<Vec<_>>(), ["s3", "s1"]);
    assert_eq!(client.get(collections::SESSIONS, "s1").await.unwrap().unwrap()["user"], "alice");
    assert_eq!(client.get(collections::SESSIONS, "nobody").await.unwrap(), None);
    assert_eq!(client.count(collections::SESSIONS, Filter::eq("user", "alice")).await.unwrap(), 2);

    // The engine's audit trail: fire-and-forget puts, one per transition.
    let transitions = [("open", "materializing"), ("materializing", "provisioning"), ("provisioning", "running")];
    for (index, (from, to)) in transitions.iter().enumerate() {
        let doc = object(
            json!({"session": "s1", "thred": "t1", "from": from, "to": to, "event_type": "x", "event_id": format!("e{index}"), "at": format!("2026-01-01T00:00:0{index}Z")}),
        );
        client.send(Uuid::now_v7(), &Operation::Put(PutArgs { collection: collections::EVENTS.into(), id: None, doc })).await.unwrap();
    }
    let history = eventually("the audit trail", async || {
        let history = client.session_history("s1").await.unwrap();
        (history.len() == 3).then_some(history)
    })
    .await;
    assert_eq!(history.iter().map(|event| event["to"].as_str().unwrap()).collect::<Vec<_>>(), ["materializing", "provisioning", "running"]);

    // Bad input gets an error reply, and the agent keeps answering.
    let bad = operation("find", json!({"collection": "sessions", "filter": {"user": {"regex": "(["}}}));
    match client.request(&bad).await {
        Err(StoreClientError::Refused { kind: ErrorKind::BadRequest, message, .. }) => assert!(message.contains("regex"), "{message}"),
        other => panic!("expected a bad_request reply, got {other:?}"),
    }
    let missing = Operation::Replace(ReplaceArgs { collection: "sessions".into(), id: "ghost".into(), doc: Map::new() });
    assert_eq!(client.request(&missing).await.unwrap_err().kind(), ErrorKind::NotFound);
    let unknown_action = protocol::Task {
        id: Uuid::now_v7(),
        agent: protocol::AgentKind::Persistence,
        action: "truncate".into(),
        session: None,
        thred: None,
        cause: None,
        args: json!({}),
    };
    let reply =
        agent.bus.request(topology::TASKS_EXCHANGE, &agent.routing_key, &unknown_action.to_bytes(), Duration::from_secs(10)).await.unwrap();
    match protocol::store::Reply::decode(&reply).unwrap() {
        protocol::store::Reply::Err(error) => {
            assert_eq!(error.kind, ErrorKind::BadRequest);
            assert!(error.message.contains("unknown variant `truncate`"), "{}", error.message);
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
    let garbage = agent.bus.request(topology::TASKS_EXCHANGE, &agent.routing_key, b"{not json", Duration::from_secs(10)).await.unwrap();
    assert!(matches!(protocol::store::Reply::decode(&garbage).unwrap(), protocol::store::Reply::Err(e) if e.kind == ErrorKind::BadRequest));
    assert_eq!(client.count(collections::SESSIONS, Filter::all()).await.unwrap(), 3, "still answering");
    agent.stop().await;
}

#[tokio::test]
async fn redelivered_tasks_are_applied_once_through_the_broker() {
    let agent = RunningAgent::start().await;
    let client = agent.client();
    let put_task = Uuid::now_v7();
    let audit = Operation::Put(PutArgs {
        collection: collections::EVENTS.into(),
        id: None,
        doc: object(json!({"session": "r1", "to": "running"})),
    });
    let increment = operation("update", json!({"collection": "sessions", "filter": {"id": "r1"}, "update": {"inc": {"wakes": 1}}}));
    client.upsert(collections::SESSIONS, "r1", object(json!({"wakes": 0}))).await.unwrap();
    let increment_task = Uuid::now_v7();
    for _ in 0..3 {
        client.send(put_task, &audit).await.unwrap();
        client.send(increment_task, &increment).await.unwrap();
    }
    // A request with the same task id as the fire-and-forget copies: answered, not re-applied.
    assert_eq!(client.request_with_id(increment_task, &increment).await.unwrap(), json!(1));
    let stored = eventually("the audit record", async || client.get(collections::EVENTS, &put_task.to_string()).await.unwrap()).await;
    assert_eq!(stored["to"], "running");
    assert_eq!(client.count(collections::EVENTS, Filter::eq("session", "r1")).await.unwrap(), 1);
    assert_eq!(client.get(collections::SESSIONS, "r1").await.unwrap().unwrap()["wakes"], json!(1));
    // Direct store calls see what the agent wrote.
    let direct =
        agent.store.execute(None, Operation::Count(CountArgs { collection: "events".into(), filter: Filter::all() })).await.unwrap();
    assert_eq!(direct, json!(1));
    agent.stop().await;
}

#[tokio::test]
async fn session_records_are_applied_in_queue_order() {
    let agent = RunningAgent::start().await;
    let client = agent.client();
    let steps = 200;
    for step in 0..steps {
        let fields = object(json!({"state": format!("state-{step}"), "step": step}));
        client.send(Uuid::now_v7(), &Operation::record_session("ordered", fields)).await.unwrap();
        let trail = json!({"collection": "sessions", "filter": {"id": "ordered"}, "update": {"push": {"applied": step}}});
        client.send(Uuid::now_v7(), &operation("update", trail)).await.unwrap();
    }
    // A request queued behind the tasks is answered after all of them were applied.
    let record = client.get(collections::SESSIONS, "ordered").await.unwrap().unwrap();
    assert_eq!(record["step"], json!(steps - 1), "the last transition wins: {record}");
    assert_eq!(record["state"], format!("state-{}", steps - 1));
    let applied: Vec<u64> = record["applied"].as_array().unwrap().iter().map(|step| step.as_u64().unwrap()).collect();
    assert_eq!(applied, (0..steps).collect::<Vec<u64>>(), "tasks are applied in the order they were queued");
    agent.stop().await;
}

/// Removes this test's copies from the shared `berth.dead-letter` queue, putting back anyone else's.
async fn remove_own_dead_letters(bus: &Bus, own_bodies: &[Vec<u8>]) {
    bus.remove_messages(topology::DEAD_LETTER_QUEUE, own_bodies.len(), |message| own_bodies.contains(&message.body)).await.unwrap();
}

#[tokio::test]
async fn bad_fire_and_forget_tasks_reach_the_dead_letter_exchange_through_the_broker() {
    let agent = RunningAgent::start().await;
    // A private queue on the fanout dead-letter exchange sees every dead letter without taking
    // them from the shared queue.
    let watch = agent.bus.declare_private_queue(topology::DEAD_EXCHANGE, &[String::new()]).await.unwrap();
    let (seen_sender, mut seen) = tokio::sync::mpsc::unbounded_channel::<Incoming>();
    let (stop_watch, watch_stopped) = tokio::sync::oneshot::channel::<()>();
    let watch_bus = agent.bus.clone();
    let watched_queue = watch.clone();
    let watcher = tokio::spawn(async move {
        let handler = move |message: Incoming| {
            let seen_sender = seen_sender.clone();
            async move {
                let _ = seen_sender.send(message);
                Outcome::Ack
            }
        };
        watch_bus
            .consume(protocol::ConsumeSpec::new(&watched_queue, 8), handler, async { watch_stopped.await.unwrap_or(()) })
            .await
            .unwrap();
    });

    let bad = operation("update", json!({"collection": "sessions", "filter": {}, "update": {"inc": {"count": 1}}}));
    let mut bad_task = bad.to_task(Uuid::now_v7());
    bad_task.args["update"]["inc"]["count"] = json!("one");
    let bad_body = bad_task.to_bytes();
    agent.bus.publish(topology::TASKS_EXCHANGE, &agent.routing_key, &bad_body, protocol::Properties::bare()).await.unwrap();

    let dead = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let message = seen.recv().await.expect("the watcher runs");
            if message.body == bad_body {
                return message;
            }
        }
    })
    .await
    .expect("the bad task is dead-lettered");
    let reason = dead.headers.get(topology::REASON_HEADER).cloned().unwrap_or_default();
    assert!(reason.contains("bad_request") && reason.contains("needs a number"), "{reason:?}");
    assert_eq!(dead.headers.get(topology::ORIGIN_HEADER), Some(&agent.queue));
    // The agent keeps working after it.
    assert_eq!(agent.client().count(collections::SESSIONS, Filter::all()).await.unwrap(), 0);

    let _ = stop_watch.send(());
    watcher.await.unwrap();
    agent.bus.delete_queue(&watch).await.unwrap();
    remove_own_dead_letters(&agent.bus, &[bad_body]).await;
    agent.stop().await;
}

fn incoming(body: Vec<u8>) -> Incoming {
    Incoming {
        body,
        routing_key: "persistence".into(),
        sender: protocol::Sender::Unstated,
        redelivered: false,
        reply_to: None,
        correlation_id: None,
        headers: Default::default(),
    }
}

#[tokio::test]
async fn bad_fire_and_forget_tasks_are_dead_lettered_with_the_reason() {
    let store: Arc<dyn Store> = Arc::from(persistence::open_store("sqlite::memory:").await.unwrap());
    let bus = Bus::connect(BusConfig::new(AMQP_URL, "persistence-test")).await.unwrap();
    let agent = Agent::new(store, bus.clone());
    let task = |action: &str, args: Value| {
        protocol::Task {
            id: Uuid::now_v7(),
            agent: protocol::AgentKind::Persistence,
            action: action.into(),
            session: None,
            thred: None,
            cause: None,
            args,
        }
        .to_bytes()
    };
    let cases = [
        (b"not json".to_vec(), "not a task"),
        (task("explode", json!({})), "unknown variant `explode`"),
        (task("find", json!({"collection": "s", "filter": {"a": {"gt": [1]}}})), "compares a number or a string"),
        (task("get", json!({"collection": "s", "id": 12})), "invalid type"),
        (task("replace", json!({"collection": "s", "id": "none", "doc": {}})), "not_found"),
        (vec![b' '; protocol::store::MAX_DOCUMENT_BYTES + 100 * 1024], "larger than"),
    ];
    for (body, fragment) in cases {
        match agent.handle_delivery(incoming(body)).await {
            Outcome::DeadLetter(reason) => assert!(reason.contains(fragment), "{reason:?} does not mention {fragment:?}"),
            other => panic!("expected a dead letter mentioning {fragment:?}, got {other:?}"),
        }
    }
    assert_eq!(agent.handle_delivery(incoming(task("put", json!({"collection": "s", "doc": {}})))).await, Outcome::Ack);
    assert_eq!(error_policy(&Error::Unavailable("down".into())), Outcome::RetryUnavailable);
    bus.close().await;
}

#[tokio::test]
async fn unsupported_store_urls_are_refused() {
    for url in ["postgres://x", "sqlite://", "redis://127.0.0.1"] {
        let error = persistence::open_store(url).await.err().expect("refused");
        assert_eq!(error.kind(), ErrorKind::BadRequest, "{url}: {error}");
    }
}
