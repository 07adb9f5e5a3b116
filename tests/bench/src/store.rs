//! `berth bench store`: inserts/s and indexed lookups/s through the agent (broker included) next
//! to direct calls on the same store, in the same run, on a throw-away collection.
//!
//! The agent runs in this process on a private queue (its own routing key), so a persistence agent
//! already running elsewhere neither steals the requests nor skews the figures.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use protocol::store::{Filter, FindArgs, GetArgs, Operation, PutArgs, StoreClient};
use protocol::{topology, Bus, BusConfig, Profile};
use serde_json::json;
use uuid::Uuid;

use persistence::{open_store, Agent, Store};

use crate::stats::{milliseconds, Latencies};

/// Operations per measured row unless `BERTH_BENCH_STORE_OPERATIONS` says otherwise.
const DEFAULT_OPERATIONS: usize = 2000;
/// Requests in flight at once, for both paths alike.
const IN_FLIGHT: usize = 32;
const USERS: usize = 100;

struct Row {
    operation: &'static str,
    path: &'static str,
    count: usize,
    elapsed: Duration,
    /// Per-operation latencies (empty where completion is observed only in bulk).
    latencies: Latencies,
}

impl Row {
    fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn percentile(&self, fraction: f64) -> String {
        if self.latencies.is_empty() {
            return "-".to_owned();
        }
        format!("{:.2}", milliseconds(self.latencies.percentile(fraction)))
    }
}

async fn measure<F, Fut>(operation: &'static str, path: &'static str, count: usize, work: F) -> anyhow::Result<Row>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let mut timed = futures::stream::iter(0..count)
        .map(|index| {
            let call = work(index);
            async move {
                let call_started = Instant::now();
                call.await.map(|()| call_started.elapsed())
            }
        })
        .buffer_unordered(IN_FLIGHT);
    let mut latencies = Latencies::new();
    while let Some(latency) = timed.next().await {
        latencies.record(latency?);
    }
    let elapsed = started.elapsed();
    Ok(Row { operation, path, count, elapsed, latencies })
}

fn put(collection: &str, prefix: &str, index: usize) -> Operation {
    let doc = json!({"user": format!("user-{}", index % USERS), "state": "running", "index": index, "workspace": "bench"});
    let serde_json::Value::Object(doc) = doc else { unreachable!("a literal object") };
    Operation::Put(PutArgs { collection: collection.to_owned(), id: Some(format!("{prefix}-{index}")), doc })
}

fn get(collection: &str, index: usize, count: usize) -> Operation {
    // Spread the lookups over the whole collection rather than walking it in order.
    Operation::Get(GetArgs { collection: collection.to_owned(), id: format!("direct-{}", (index * 7919) % count) })
}

fn find_by_user(collection: &str, index: usize) -> Operation {
    let mut args = FindArgs::new(collection, Filter::eq("user", format!("user-{}", (index * 31) % USERS)));
    args.limit = Some(10);
    Operation::Find(args)
}

/// `berth bench store`.
pub async fn bench(profile: Profile) -> anyhow::Result<()> {
    let profile = &profile;
    let count = match std::env::var("BERTH_BENCH_STORE_OPERATIONS") {
        Ok(text) => text.parse::<usize>().map_err(|error| anyhow::anyhow!("BERTH_BENCH_STORE_OPERATIONS={text:?}: {error}"))?.max(1),
        Err(_) => DEFAULT_OPERATIONS,
    };
    let store: Arc<dyn Store> = Arc::from(open_store(&profile.services.store_url).await?);
    let collection = format!("bench_{}", Uuid::now_v7().simple());
    store.create_index(&collection, &["user"]).await?;
    let bus = Bus::connect(BusConfig::new(&profile.services.amqp_url, "berth-bench-store")).await?;
    bus.declare_topology().await?;
    let routing_key = format!("bench-persistence-{}", Uuid::now_v7());
    let queue = bus.declare_private_queue(topology::TASKS_EXCHANGE, std::slice::from_ref(&routing_key)).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = Agent::new(store.clone(), bus.clone());
    let consumed_queue = queue.clone();
    let consumer = tokio::spawn(async move { agent.consume(&consumed_queue, async { stopped.await.unwrap_or(()) }).await });
    let client = StoreClient::new(bus.clone()).with_routing_key(&routing_key).with_timeout(Duration::from_secs(60));

    let measured = measure_all(store.as_ref(), &client, &collection, count).await;

    let _ = stop.send(());
    let _ = consumer.await;
    let _ = bus.delete_queue(&queue).await;
    let _ = store.drop_collection(&collection).await;
    bus.close().await;
    let rows = measured?;

    println!(
        "berth bench store: backend {:?} at {}, {count} operations per row, {IN_FLIGHT} in flight",
        store.backend(),
        protocol::bus::redact(&profile.services.store_url)
    );
    println!("{:<24} {:<30} {:>10} {:>9} {:>9}", "operation", "path", "ops/s", "p50 ms", "p99 ms");
    for row in &rows {
        println!(
            "{:<24} {:<30} {:>10.0} {:>9} {:>9}",
            row.operation,
            row.path,
            row.per_second(),
            row.percentile(0.5),
            row.percentile(0.99)
        );
    }
    Ok(())
}

async fn measure_all(store: &dyn Store, client: &StoreClient, collection: &str, count: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    rows.push(
        measure("insert", "direct", count, |index| async move {
            store.execute(Some(Uuid::now_v7()), put(collection, "direct", index)).await?;
            Ok(())
        })
        .await?,
    );
    rows.push(
        measure("insert", "agent, request/reply", count, |index| async move {
            client.request(&put(collection, "agent", index)).await?;
            Ok(())
        })
        .await?,
    );
    rows.push(fire_and_forget_inserts(store, client, collection, count).await?);
    rows.push(
        measure("get by id", "direct", count, |index| async move {
            store.execute(None, get(collection, index, count)).await?;
            Ok(())
        })
        .await?,
    );
    rows.push(
        measure("get by id", "agent, request/reply", count, |index| async move {
            client.request(&get(collection, index, count)).await?;
            Ok(())
        })
        .await?,
    );
    rows.push(
        measure("find by indexed field", "direct", count, |index| async move {
            store.execute(None, find_by_user(collection, index)).await?;
            Ok(())
        })
        .await?,
    );
    rows.push(
        measure("find by indexed field", "agent, request/reply", count, |index| async move {
            client.request(&find_by_user(collection, index)).await?;
            Ok(())
        })
        .await?,
    );
    Ok(rows)
}

/// The engine's path: tasks published with confirms, timed until the last one is stored.
async fn fire_and_forget_inserts(store: &dyn Store, client: &StoreClient, collection: &str, count: usize) -> anyhow::Result<Row> {
    let started = Instant::now();
    let mut sent = futures::stream::iter(0..count)
        .map(|index| async move { client.send(Uuid::now_v7(), &put(collection, "task", index)).await })
        .buffer_unordered(IN_FLIGHT);
    while let Some(outcome) = sent.next().await {
        outcome?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let stored_by_tasks = Filter::all().and("id", protocol::store::Condition::Regex("^task-".to_owned()));
    loop {
        let counted = store
            .execute(
                None,
                Operation::Count(protocol::store::CountArgs { collection: collection.to_owned(), filter: stored_by_tasks.clone() }),
            )
            .await?;
        if counted.as_u64() == Some(count as u64) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {counted} of {count} fire-and-forget inserts were stored in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Row { operation: "insert", path: "agent, fire-and-forget", count, elapsed: started.elapsed(), latencies: Latencies::new() })
}
