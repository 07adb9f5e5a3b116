//! The bootstrap job and `berth dev`: everything a deployment needs before (and around) its services.
//!
//! Bootstrap is idempotent: it declares, validates, creates what is missing and compares what exists,
//! so a second run reports every item unchanged and destroys nothing. Only `--reset` drops records.

mod dev;
pub mod faults;

use std::fmt;

use protocol::store::{collections, Operation, UpsertArgs};
use protocol::{Bus, BusConfig, Profile};
use serde_json::{Map, Value};

pub use crate::dev::{dev, spawn_components, Components};

/// Whether bootstrap may destroy stored records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    Keep,
    DropRecords,
}

/// What bootstrap did to one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

impl fmt::Display for Change {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Unchanged => "unchanged",
        })
    }
}

/// What one bootstrap run did, item by item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub profile: String,
    pub reset: bool,
    /// The broker vhost whose bus identities were ensured.
    pub vhost: String,
    pub patterns: Vec<(String, Change)>,
    pub users: Vec<(String, Change)>,
}

impl Report {
    /// True when the run changed nothing that was stored before.
    pub fn changed_nothing(&self) -> bool {
        !self.reset && self.patterns.iter().chain(&self.users).all(|(_, change)| *change == Change::Unchanged)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(formatter, "profile {}: topology declared, indexes ensured, redis expiry notifications on", self.profile)?;
        writeln!(
            formatter,
            "bus identities ensured in vhost {} (passwords in {})",
            self.vhost,
            protocol::identity::secrets_dir().display()
        )?;
        if self.reset {
            writeln!(formatter, "records dropped (--reset)")?;
        }
        for (name, change) in &self.patterns {
            writeln!(formatter, "pattern {name}: {change}")?;
        }
        for (id, change) in &self.users {
            writeln!(formatter, "user {id}: {change}")?;
        }
        Ok(())
    }
}

/// `berth bootstrap`: prints the report.
pub async fn run(profile: &Profile, reset: Reset) -> anyhow::Result<()> {
    let report = bootstrap(profile, reset).await?;
    print!("{report}");
    Ok(())
}

/// Prepares a deployment for `profile` and reports what it did.
pub async fn bootstrap(profile: &Profile, reset: Reset) -> anyhow::Result<Report> {
    // Validate the patterns before touching anything, so a broken pattern changes nothing.
    let patterns = engine::load_profile_patterns(profile)?;

    let bus = Bus::connect(BusConfig::for_identity(&profile.services.amqp_url, protocol::Identity::Admin, "berth-bootstrap")?).await?;
    bus.declare_topology().await?;
    bus.close().await;
    // Every component connects as its own user (protocol::identity): create them, their
    // passwords and permissions in this vhost.
    let vhost = protocol::broker_admin::ensure_identities(&profile.services.amqp_url).await?;

    engine::configure_redis(profile).await?;

    let store = persistence::open_store(&profile.services.store_url).await?;
    if reset == Reset::DropRecords {
        store.drop_all().await?;
    }
    store.ensure_indexes().await?;

    let mut report =
        Report { profile: profile.name.clone(), reset: reset == Reset::DropRecords, vhost, patterns: Vec::new(), users: Vec::new() };
    for pattern in &patterns {
        let file = protocol::profile::patterns_dir().join(format!("{}.json", pattern.name));
        // Stored as text: pattern files use keys (`$schema`) that document stores reserve.
        let definition = std::fs::read_to_string(&file)?;
        let mut document = Map::new();
        document.insert("name".into(), Value::String(pattern.name.clone()));
        document.insert("definition".into(), Value::String(definition));
        let change = put_if_different(store.as_ref(), collections::PATTERNS, &pattern.name, document).await?;
        report.patterns.push((pattern.name.clone(), change));
    }
    for user in &profile.users {
        let mut document = Map::new();
        document.insert("roles".into(), serde_json::to_value(&user.roles)?);
        document.insert("groups".into(), serde_json::to_value(&user.groups)?);
        document.insert("profile".into(), Value::String(profile.name.clone()));
        let change = put_if_different(store.as_ref(), collections::USERS, &user.id, document).await?;
        report.users.push((user.id.clone(), change));
    }
    Ok(report)
}

/// Writes `document` under `id` unless the stored one already has exactly these fields.
async fn put_if_different(
    store: &dyn persistence::Store,
    collection: &str,
    id: &str,
    document: Map<String, Value>,
) -> anyhow::Result<Change> {
    let existing =
        store.execute(None, Operation::Get(protocol::store::GetArgs { collection: collection.to_owned(), id: id.to_owned() })).await?;
    let change = match &existing {
        Value::Object(stored) if document.iter().all(|(field, value)| stored.get(field) == Some(value)) => return Ok(Change::Unchanged),
        Value::Object(_) => Change::Updated,
        _ => Change::Created,
    };
    let upsert = Operation::Upsert(UpsertArgs { collection: collection.to_owned(), id: id.to_owned(), doc: document });
    store.execute(None, upsert).await?;
    Ok(change)
}
