//! The MongoDB backend through the official driver, and the pure translation of the generic
//! operations to MongoDB syntax (filters, updates, sorts, projections, documents), unit-tested
//! without a server.
//!
//! Ids live in `_id` (always a string). Writes and their deduplication record share a transaction
//! when the deployment supports transactions (a replica set or sharded cluster). On a standalone
//! server the record is written after the operation; a `group` whose members replay safely (no
//! `inc`, no `push`) is applied in order, completed by redelivery if it stops half-way, and any
//! other group is refused as `unavailable` rather than risk applying part of it twice.

use std::time::Duration;

use chrono::Utc;
use mongodb::bson::{self, doc, Bson, Document};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use protocol::store::{Condition, ErrorKind, Filter, Operation, SortKey, SortOrder, UpdateSpec, CREATED_FIELD, ID_FIELD, MODIFIED_FIELD};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::document::{body_of, json_equal, presented, stamped, timestamp};
use crate::{check_operation, grouped_task_id, in_group, Backend, Error, Result, Store};

const APPLIED_TASKS_COLLECTION: &str = "_berth_applied_tasks";
const DEFAULT_DATABASE: &str = "berth";

pub struct MongoStore {
    client: Client,
    database: Database,
    transactions: bool,
}

impl MongoStore {
    /// Connects and learns whether the deployment supports transactions.
    pub async fn open(url: &str) -> Result<MongoStore> {
        let mut options = mongodb::options::ClientOptions::parse(url).await?;
        options.app_name.get_or_insert_with(|| "berth-persistence".to_owned());
        options.server_selection_timeout.get_or_insert(Duration::from_secs(10));
        let database_name = options.default_database.clone().unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        let client = Client::with_options(options)?;
        let database = client.database(&database_name);
        let hello = database.run_command(doc! {"hello": 1}).await?;
        let transactions = hello.contains_key("setName") || hello.get_str("msg").is_ok_and(|msg| msg == "isdbgrid");
        tracing::info!(database = %database_name, transactions, "connected to mongodb");
        Ok(MongoStore { client, database, transactions })
    }

    /// Whether writes and their deduplication record share a transaction here.
    pub fn supports_transactions(&self) -> bool {
        self.transactions
    }

    fn collection(&self, name: &str) -> Collection<Document> {
        self.database.collection(name)
    }

    async fn execute_write(&self, task_id: Option<Uuid>, operation: &Operation, now: &str) -> Result<Value> {
        if let Operation::Group(group) = operation {
            if !self.transactions && !group.operations.iter().all(replays_safely) {
                return Err(Error::Unavailable(
                    "a group with inc or push needs transactions; this MongoDB deployment is a standalone server".to_owned(),
                ));
            }
        }
        let mut session = self.client.start_session().await?;
        if self.transactions {
            session.start_transaction().await?;
        }
        let applied = self.collection(APPLIED_TASKS_COLLECTION);
        if let Some(task_id) = task_id {
            if let Some(earlier) = applied.find_one(doc! {"_id": task_id.to_string()}).session(&mut session).await? {
                if self.transactions {
                    session.abort_transaction().await?;
                }
                let reply = earlier.get_str("reply").unwrap_or("null");
                return serde_json::from_str(reply).map_err(|error| Error::Unavailable(format!("unreadable earlier reply: {error}")));
            }
        }
        let result = match self.apply(&mut session, task_id, operation, now).await {
            Ok(result) => result,
            Err(error) => {
                if self.transactions {
                    let _ = session.abort_transaction().await;
                }
                return Err(error);
            }
        };
        if let Some(task_id) = task_id {
            let record = doc! {"_id": task_id.to_string(), "reply": result.to_string(), "at": bson::DateTime::now()};
            match applied.insert_one(record).session(&mut session).await {
                Ok(_) => {}
                // Without transactions a concurrent copy of the task may have recorded it first.
                Err(error) if !self.transactions && error_kind(&error) == ErrorKind::Conflict => {
                    tracing::warn!(%task_id, "task applied by two deliveries at once on a standalone server");
                }
                Err(error) => {
                    if self.transactions {
                        let _ = session.abort_transaction().await;
                    }
                    return Err(error.into());
                }
            }
        }
        if self.transactions {
            session.commit_transaction().await?;
        }
        Ok(result)
    }

    async fn load(&self, session: &mut ClientSession, collection: &str, id: &str) -> Result<Option<Map<String, Value>>> {
        let found = self.collection(collection).find_one(doc! {"_id": id}).session(session).await?;
        Ok(found.map(stored_fields))
    }

    async fn apply(&self, session: &mut ClientSession, task_id: Option<Uuid>, operation: &Operation, now: &str) -> Result<Value> {
        match operation {
            Operation::Put(args) => {
                let id = args.id.clone().unwrap_or_else(|| task_id.unwrap_or_else(Uuid::now_v7).to_string());
                let body = body_of(&args.doc);
                if let Some(stored) = self.load(session, &args.collection, &id).await? {
                    if json_equal(&Value::Object(body_of(&stored)), &Value::Object(body)) {
                        return Ok(presented(&id, stored));
                    }
                    return Err(Error::Conflict(format!("{}/{id} exists with other content", args.collection)));
                }
                let stored = stamped(body, now, now);
                self.collection(&args.collection).insert_one(stored_document(&id, &stored)).session(session).await?;
                Ok(presented(&id, stored))
            }
            Operation::Upsert(args) => {
                let update = upsert_to_bson(&body_of(&args.doc), now);
                let stored = self
                    .collection(&args.collection)
                    .find_one_and_update(doc! {"_id": &args.id}, update)
                    .upsert(true)
                    .return_document(ReturnDocument::After)
                    .session(session)
                    .await?;
                let stored = stored.map(stored_fields).unwrap_or_default();
                Ok(presented(&args.id, stored))
            }
            Operation::Get(args) => {
                Ok(self.load(session, &args.collection, &args.id).await?.map_or(Value::Null, |stored| presented(&args.id, stored)))
            }
            Operation::Find(args) => {
                let collection = self.collection(&args.collection);
                let mut find = collection.find(filter_to_bson(&args.filter)).skip(args.skip);
                if !args.sort.is_empty() {
                    find = find.sort(sort_to_bson(&args.sort));
                }
                if let Some(limit) = args.limit {
                    find = find.limit(i64::try_from(limit).unwrap_or(i64::MAX));
                }
                if let Some(fields) = &args.projection {
                    find = find.projection(projection_to_bson(fields));
                }
                let mut cursor = find.session(&mut *session).await?;
                let mut documents = Vec::new();
                while let Some(found) = cursor.next(&mut *session).await {
                    let found = found?;
                    let id = found.get("_id").map(bson_id_text).unwrap_or_default();
                    documents.push(presented(&id, stored_fields(found)));
                }
                Ok(Value::Array(documents))
            }
            Operation::Update(args) => {
                let update = update_to_bson(&args.update, now);
                let outcome = self.collection(&args.collection).update_many(filter_to_bson(&args.filter), update).session(session).await?;
                Ok(Value::from(outcome.matched_count))
            }
            Operation::Replace(args) => {
                let Some(existing) = self.load(session, &args.collection, &args.id).await? else {
                    return Err(Error::NotFound(format!("{}/{}", args.collection, args.id)));
                };
                let created = existing.get(CREATED_FIELD).and_then(Value::as_str).unwrap_or(now).to_owned();
                let stored = stamped(body_of(&args.doc), &created, now);
                self.collection(&args.collection)
                    .replace_one(doc! {"_id": &args.id}, stored_document(&args.id, &stored))
                    .session(session)
                    .await?;
                Ok(presented(&args.id, stored))
            }
            Operation::Delete(args) => {
                let outcome = self.collection(&args.collection).delete_many(filter_to_bson(&args.filter)).session(session).await?;
                Ok(Value::from(outcome.deleted_count))
            }
            Operation::Count(args) => {
                let count = self.collection(&args.collection).count_documents(filter_to_bson(&args.filter)).session(session).await?;
                Ok(Value::from(count))
            }
            Operation::Group(group) => {
                let mut results = Vec::with_capacity(group.operations.len());
                for (index, member) in group.operations.iter().enumerate() {
                    let member_task_id = task_id.map(|task_id| grouped_task_id(task_id, index));
                    let result = Box::pin(self.apply(session, member_task_id, member, now)).await;
                    results.push(result.map_err(|error| in_group(index, member, error))?);
                }
                Ok(Value::Array(results))
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for MongoStore {
    fn backend(&self) -> Backend {
        Backend::MongoDb
    }

    fn groups_are_atomic(&self) -> bool {
        self.transactions
    }

    async fn execute(&self, task_id: Option<Uuid>, operation: Operation) -> Result<Value> {
        check_operation(&operation)?;
        let now = timestamp(Utc::now());
        if operation.writes() {
            return self.execute_write(task_id, &operation, &now).await;
        }
        let mut session = self.client.start_session().await?;
        self.apply(&mut session, task_id, &operation, &now).await
    }

    async fn create_index(&self, collection: &str, fields: &[&str]) -> Result<()> {
        protocol::store::validate_collection(collection).map_err(Error::BadRequest)?;
        let mut keys = Document::new();
        for field in fields {
            protocol::store::validate_field_path(field).map_err(Error::BadRequest)?;
            keys.insert(mongo_field(field), 1);
        }
        self.collection(collection).create_index(IndexModel::builder().keys(keys).build()).await?;
        Ok(())
    }

    async fn ensure_indexes(&self) -> Result<()> {
        for index in crate::BERTH_INDEXES {
            self.create_index(index.collection, index.fields).await?;
        }
        // MongoDB forgets old deduplication records by itself.
        let expiry = IndexOptions::builder().expire_after(crate::APPLIED_TASK_RETENTION).build();
        let model = IndexModel::builder().keys(doc! {"at": 1}).options(expiry).build();
        self.collection(APPLIED_TASKS_COLLECTION).create_index(model).await?;
        Ok(())
    }

    async fn drop_collection(&self, collection: &str) -> Result<()> {
        protocol::store::validate_collection(collection).map_err(Error::BadRequest)?;
        self.collection(collection).drop().await?;
        Ok(())
    }

    async fn drop_all(&self) -> Result<()> {
        for name in self.database.list_collection_names().await? {
            if !name.starts_with("system.") {
                self.collection(&name).drop().await?;
            }
        }
        Ok(())
    }

    async fn prune_applied_tasks(&self, retention: Duration) -> Result<u64> {
        let cutoff = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - retention.as_millis() as i64);
        let outcome = self.collection(APPLIED_TASKS_COLLECTION).delete_many(doc! {"at": {"$lt": cutoff}}).await?;
        Ok(outcome.deleted_count)
    }
}

/// Whether applying an operation again after a partial failure gives the same state. On a
/// standalone server (no transactions) a group of such operations is applied in order instead of
/// refused: if it stops half-way, the redelivered task completes it, as earlier members are no-ops.
pub fn replays_safely(operation: &Operation) -> bool {
    match operation {
        Operation::Update(args) => args.update.inc.is_empty() && args.update.push.is_empty(),
        Operation::Group(group) => group.operations.iter().all(replays_safely),
        Operation::Put(_) | Operation::Upsert(_) | Operation::Replace(_) | Operation::Delete(_) => true,
        Operation::Get(_) | Operation::Find(_) | Operation::Count(_) => true,
    }
}

/// What MongoDB's failures mean to a client.
pub fn error_kind(error: &mongodb::error::Error) -> ErrorKind {
    use mongodb::error::{ErrorKind as Kind, WriteFailure};
    let code = match error.kind.as_ref() {
        Kind::Command(command) => Some(command.code),
        Kind::Write(WriteFailure::WriteError(write)) => Some(write.code),
        Kind::InvalidArgument { .. } | Kind::BsonSerialization(_) => return ErrorKind::BadRequest,
        _ => None,
    };
    match code {
        // Duplicate key.
        Some(11000) => ErrorKind::Conflict,
        // BadValue, FailedToParse, TypeMismatch, PathNotViable, ConflictingUpdateOperators,
        // DollarPrefixedFieldName, EmptyFieldName, ImmutableField, InvalidRegex(51091).
        Some(2 | 9 | 14 | 28 | 40 | 52 | 56 | 66 | 51091) => ErrorKind::BadRequest,
        _ => ErrorKind::Unavailable,
    }
}

/// A field name as MongoDB knows it (`id` is `_id`).
pub fn mongo_field(field: &str) -> String {
    if field == ID_FIELD {
        "_id".to_owned()
    } else {
        field.to_owned()
    }
}

/// JSON to BSON: integers become Int64 (doubles when out of range), the rest maps one to one.
pub fn json_to_bson(value: &Value) -> Bson {
    match value {
        Value::Null => Bson::Null,
        Value::Bool(flag) => Bson::Boolean(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => Bson::Int64(integer),
            None => Bson::Double(number.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(text) => Bson::String(text.clone()),
        Value::Array(items) => Bson::Array(items.iter().map(json_to_bson).collect()),
        Value::Object(object) => Bson::Document(object_to_bson(object)),
    }
}

fn object_to_bson(object: &Map<String, Value>) -> Document {
    object.iter().map(|(key, value)| (key.clone(), json_to_bson(value))).collect()
}

/// BSON to JSON for what Berth stores; dates become RFC 3339 text and other BSON-only types
/// their relaxed extended JSON.
pub fn bson_to_json(value: Bson) -> Value {
    match value {
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Boolean(flag) => Value::Bool(flag),
        Bson::Int32(integer) => Value::from(integer),
        Bson::Int64(integer) => Value::from(integer),
        Bson::Double(number) => serde_json::Number::from_f64(number).map_or(Value::Null, Value::Number),
        Bson::String(text) => Value::String(text),
        Bson::Array(items) => Value::Array(items.into_iter().map(bson_to_json).collect()),
        Bson::Document(document) => Value::Object(document.into_iter().map(|(key, value)| (key, bson_to_json(value))).collect()),
        Bson::DateTime(at) => {
            chrono::DateTime::from_timestamp_millis(at.timestamp_millis()).map_or(Value::Null, |at| Value::String(timestamp(at)))
        }
        Bson::ObjectId(id) => Value::String(id.to_hex()),
        other => other.into_relaxed_extjson(),
    }
}

fn bson_id_text(id: &Bson) -> String {
    match id {
        Bson::String(text) => text.clone(),
        Bson::ObjectId(id) => id.to_hex(),
        other => other.to_string(),
    }
}

/// A stored MongoDB document's fields without `_id`.
fn stored_fields(mut document: Document) -> Map<String, Value> {
    document.remove("_id");
    document.into_iter().map(|(key, value)| (key, bson_to_json(value))).collect()
}

/// The document to insert: `_id` first, then the stored fields.
pub fn stored_document(id: &str, stored: &Map<String, Value>) -> Document {
    let mut document = doc! {"_id": id};
    document.extend(object_to_bson(stored));
    document
}

/// A matcher in MongoDB syntax: `{field: {$op: operand, …}, …}`.
pub fn filter_to_bson(filter: &Filter) -> Document {
    let mut translated = Document::new();
    for condition in &filter.conditions {
        let (operator, operand) = match &condition.condition {
            Condition::Eq(value) => ("$eq", json_to_bson(value)),
            Condition::Ne(value) => ("$ne", json_to_bson(value)),
            Condition::Gt(value) => ("$gt", json_to_bson(value)),
            Condition::Gte(value) => ("$gte", json_to_bson(value)),
            Condition::Lt(value) => ("$lt", json_to_bson(value)),
            Condition::Lte(value) => ("$lte", json_to_bson(value)),
            Condition::In(values) => ("$in", Bson::Array(values.iter().map(json_to_bson).collect())),
            Condition::Nin(values) => ("$nin", Bson::Array(values.iter().map(json_to_bson).collect())),
            Condition::Exists(present) => ("$exists", Bson::Boolean(*present)),
            Condition::Regex(pattern) => ("$regex", Bson::String(pattern.clone())),
        };
        let field = mongo_field(&condition.field);
        match translated.get_mut(&field) {
            Some(Bson::Document(operators)) => {
                operators.insert(operator, operand);
            }
            _ => {
                translated.insert(field, doc! {operator: operand});
            }
        }
    }
    translated
}

/// An update in MongoDB syntax; `current_date` and `modified` are set to the agent's `now` (text,
/// like every timestamp Berth stores), and `pull` removes equal elements (through `$in`, so that
/// an object operand is compared, not read as a condition).
pub fn update_to_bson(update: &UpdateSpec, now: &str) -> Document {
    let mut set = object_to_bson(&update.set);
    for field in &update.current_date {
        set.insert(field.clone(), now);
    }
    set.insert(MODIFIED_FIELD, now);
    let mut translated = doc! {"$set": set};
    if !update.unset.is_empty() {
        translated.insert("$unset", update.unset.iter().map(|field| (field.clone(), Bson::String(String::new()))).collect::<Document>());
    }
    let mut add = |operator: &str, fields: &Map<String, Value>, wrap: fn(Bson) -> Bson| {
        if !fields.is_empty() {
            translated
                .insert(operator, fields.iter().map(|(field, value)| (field.clone(), wrap(json_to_bson(value)))).collect::<Document>());
        }
    };
    add("$inc", &update.inc, |value| value);
    add("$push", &update.push, |value| value);
    add("$addToSet", &update.add_to_set, |value| value);
    add("$pull", &update.pull, |value| Bson::Document(doc! {"$in": [value]}));
    translated
}

/// An upsert: the given fields and `modified` set, `created` only when inserting.
pub fn upsert_to_bson(body: &Map<String, Value>, now: &str) -> Document {
    let mut set = object_to_bson(body);
    set.insert(MODIFIED_FIELD, now);
    doc! {"$set": set, "$setOnInsert": {CREATED_FIELD: now}}
}

/// A sort with `_id` as the final tie-breaker (SQLite gets the same); none without sort keys.
pub fn sort_to_bson(sort: &[SortKey]) -> Document {
    let mut translated = Document::new();
    if sort.is_empty() {
        return translated;
    }
    for key in sort {
        translated.insert(mongo_field(&key.field), if key.order == SortOrder::Desc { -1 } else { 1 });
    }
    if !translated.contains_key("_id") {
        translated.insert("_id", 1);
    }
    translated
}

/// A projection: the named fields (and `_id`, which MongoDB includes by default).
pub fn projection_to_bson(fields: &[String]) -> Document {
    fields.iter().map(|field| (mongo_field(field), Bson::Int32(1))).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[track_caller]
    fn check_filter(filter: Value, expected: Document) {
        let filter: Filter = serde_json::from_value(filter).unwrap();
        assert_eq!(filter_to_bson(&filter), expected);
    }

    #[test]
    fn every_matcher_operator_translates() {
        check_filter(json!({"user": "alice"}), doc! {"user": {"$eq": "alice"}});
        check_filter(json!({"id": {"eq": "s1"}}), doc! {"_id": {"$eq": "s1"}});
        check_filter(json!({"n": {"ne": 1}}), doc! {"n": {"$ne": 1_i64}});
        check_filter(json!({"n": {"gt": 1, "lte": 2.5}}), doc! {"n": {"$gt": 1_i64, "$lte": 2.5}});
        check_filter(json!({"n": {"gte": "a", "lt": "b"}}), doc! {"n": {"$gte": "a", "$lt": "b"}});
        check_filter(json!({"state": {"in": ["running", "idle"]}}), doc! {"state": {"$in": ["running", "idle"]}});
        check_filter(json!({"state": {"nin": []}}), doc! {"state": {"$nin": []}});
        check_filter(json!({"error": {"exists": false}}), doc! {"error": {"$exists": false}});
        check_filter(json!({"user": {"regex": "^al"}}), doc! {"user": {"$regex": "^al"}});
        check_filter(json!({"a.b": null}), doc! {"a.b": {"$eq": null}});
        check_filter(json!({"meta": {"k": [1, true]}}), doc! {"meta": {"$eq": {"k": [1_i64, true]}}});
        check_filter(json!({}), Document::new());
    }

    #[test]
    fn updates_translate() {
        let update: UpdateSpec = serde_json::from_value(json!({
            "set": {"state": "idle"}, "unset": ["error"], "inc": {"n": 1}, "push": {"log": "x"},
            "add_to_set": {"tags": "t"}, "pull": {"tags": {"k": 1}}, "current_date": ["seen"]
        }))
        .unwrap();
        assert_eq!(
            update_to_bson(&update, "NOW"),
            doc! {
                "$set": {"state": "idle", "seen": "NOW", "modified": "NOW"},
                "$unset": {"error": ""},
                "$inc": {"n": 1_i64},
                "$push": {"log": "x"},
                "$addToSet": {"tags": "t"},
                "$pull": {"tags": {"$in": [{"k": 1_i64}]}},
            }
        );
        let body = serde_json::from_value(json!({"state": "open"})).unwrap();
        assert_eq!(upsert_to_bson(&body, "NOW"), doc! {"$set": {"state": "open", "modified": "NOW"}, "$setOnInsert": {"created": "NOW"}});
    }

    #[test]
    fn sorts_projections_and_documents_translate() {
        let sort = vec![SortKey { field: "created".into(), order: SortOrder::Desc }, SortKey { field: "id".into(), order: SortOrder::Asc }];
        assert_eq!(sort_to_bson(&sort), doc! {"created": -1, "_id": 1});
        assert_eq!(sort_to_bson(&[]), Document::new());
        assert_eq!(projection_to_bson(&["state".into(), "a.b".into()]), doc! {"state": 1, "a.b": 1});
        let stored: Map<String, Value> = serde_json::from_value(json!({"a": {"b": [1, 2.5, "x", null, true]}, "big": u64::MAX})).unwrap();
        let document = stored_document("d1", &stored);
        assert_eq!(document.get_str("_id").unwrap(), "d1");
        let back = stored_fields(document);
        assert_eq!(back.get("a"), stored.get("a"));
        assert_eq!(back.get("big"), Some(&json!(u64::MAX as f64)));
        assert_eq!(bson_to_json(Bson::DateTime(bson::DateTime::from_millis(0))), json!("1970-01-01T00:00:00.000000Z"));
    }

    #[test]
    fn groups_that_replay_safely() {
        let group =
            |members: Value| -> Operation { serde_json::from_value(json!({"action": "group", "args": {"operations": members}})).unwrap() };
        let upsert = json!({"action": "upsert", "args": {"collection": "sessions", "id": "s", "doc": {"state": "running"}}});
        let put = json!({"action": "put", "args": {"collection": "events", "doc": {"to": "running"}}});
        let set = json!({"action": "update", "args": {"collection": "s", "update": {"set": {"a": 1}, "add_to_set": {"t": 1}}}});
        let inc = json!({"action": "update", "args": {"collection": "s", "update": {"inc": {"n": 1}}}});
        assert!(replays_safely(&group(json!([upsert, put, set]))));
        assert!(!replays_safely(&group(json!([upsert, inc]))));
    }

    #[test]
    fn error_kinds() {
        let invalid = mongodb::error::Error::custom("x");
        assert_eq!(error_kind(&invalid), ErrorKind::Unavailable);
    }
}
