//! The embedded SQLite backend: one table per collection holding JSON documents (WAL mode),
//! expression indexes on the fields Berth queries, and the pure translation of matchers to SQL.
//!
//! Matchers follow MongoDB's rules so that both backends answer alike: an operator on a field that
//! holds an array also matches when one element matches, comparisons stay within one type, and
//! `eq null` matches a missing field. Writes run on one connection inside `BEGIN IMMEDIATE`
//! transactions together with their deduplication record; reads use a small pool of connections.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use protocol::store::{Condition, Filter, Operation, SortKey, SortOrder, ID_FIELD};
use rusqlite::functions::FunctionFlags;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::document::{apply_update, body_of, json_equal, presented, project, stamped, timestamp};
use crate::{check_operation, grouped_task_id, in_group, Backend, Error, Result, Store};

const APPLIED_TASKS_TABLE: &str = "berth_applied_tasks";
const READER_CONNECTIONS: usize = 3;
/// How long a statement waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Memory,
    File(PathBuf),
}

/// Reads `sqlite:///abs/path.sqlite`, `sqlite://relative/path` or `sqlite::memory:`.
pub fn parse_url(url: &str) -> Result<Location> {
    if url == "sqlite::memory:" || url == "sqlite://:memory:" {
        return Ok(Location::Memory);
    }
    match url.strip_prefix("sqlite://") {
        Some(path) if !path.is_empty() => Ok(Location::File(PathBuf::from(path))),
        _ => Err(Error::UnsupportedUrl { url: url.to_owned() }),
    }
}

type SharedConnection = Arc<Mutex<Connection>>;

pub struct SqliteStore {
    writer: SharedConnection,
    readers: Vec<SharedConnection>,
    next_reader: AtomicUsize,
    /// Collections whose table is known to exist, so `CREATE TABLE` runs once per collection.
    tables: Arc<Mutex<HashSet<String>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(|error| Error::Unavailable(format!("sqlite worker failed: {error}")))?
}

fn configure(connection: &Connection) -> Result<()> {
    connection.busy_timeout(BUSY_TIMEOUT)?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.create_scalar_function("regexp", 2, FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC, |context| {
        type BoxedError = Box<dyn std::error::Error + Send + Sync>;
        let pattern =
            context.get_or_create_aux(0, |value| -> Result<regex::Regex, BoxedError> { Ok(regex::Regex::new(value.as_str()?)?) })?;
        Ok(match context.get_raw(1) {
            ValueRef::Text(bytes) => std::str::from_utf8(bytes).is_ok_and(|text| pattern.is_match(text)),
            _ => false,
        })
    })?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed, with its parent directories) the database a URL names.
    pub async fn open(url: &str) -> Result<SqliteStore> {
        let location = parse_url(url)?;
        blocking(move || SqliteStore::open_blocking(&location)).await
    }

    fn open_blocking(location: &Location) -> Result<SqliteStore> {
        let writer = match location {
            Location::Memory => Connection::open_in_memory()?,
            Location::File(path) => {
                if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|source| Error::Io { path: parent.display().to_string(), source })?;
                }
                Connection::open(path)?
            }
        };
        if let Location::File(_) = location {
            // WAL lets readers run while one writer commits, across processes too.
            writer.pragma_update(None, "journal_mode", "WAL")?;
        }
        configure(&writer)?;
        writer.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {APPLIED_TASKS_TABLE} (task_id TEXT PRIMARY KEY NOT NULL, reply TEXT NOT NULL, at TEXT NOT NULL) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS {APPLIED_TASKS_TABLE}_at ON {APPLIED_TASKS_TABLE}(at);"
        ))?;
        let writer = Arc::new(Mutex::new(writer));
        let readers = match location {
            // Every in-memory connection is its own database: share the writer.
            Location::Memory => vec![writer.clone()],
            Location::File(path) => (0..READER_CONNECTIONS)
                .map(|_| {
                    let reader = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
                    configure(&reader)?;
                    Ok(Arc::new(Mutex::new(reader)))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(SqliteStore { writer, readers, next_reader: AtomicUsize::new(0), tables: Arc::default() })
    }

    fn reader(&self) -> SharedConnection {
        let index = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        self.readers[index].clone()
    }

    /// Creates the tables an operation needs that are not known to exist yet.
    async fn ensure_tables(&self, operation: &Operation) -> Result<()> {
        let mut wanted = Vec::new();
        collections_of(operation, &mut wanted);
        let missing: Vec<String> = {
            let known = lock(&self.tables);
            wanted.into_iter().filter(|name| !known.contains(name)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let writer = self.writer.clone();
        let created = missing.clone();
        blocking(move || {
            let connection = lock(&writer);
            for collection in &created {
                create_table(&connection, collection)?;
            }
            Ok(())
        })
        .await?;
        lock(&self.tables).extend(missing);
        Ok(())
    }

    async fn execute_once(&self, task_id: Option<Uuid>, operation: Operation) -> Result<Value> {
        self.ensure_tables(&operation).await?;
        let now = timestamp(Utc::now());
        if operation.writes() {
            let writer = self.writer.clone();
            blocking(move || write_transaction(&mut lock(&writer), task_id, &operation, &now)).await
        } else {
            let reader = self.reader();
            blocking(move || apply(&lock(&reader), task_id, &operation, &now)).await
        }
    }
}

fn collections_of(operation: &Operation, into: &mut Vec<String>) {
    match operation {
        Operation::Group(group) => group.operations.iter().for_each(|inner| collections_of(inner, into)),
        other => into.extend(other.collection().map(str::to_owned)),
    }
}

fn is_missing_table(error: &Error) -> bool {
    matches!(error, Error::Sqlite(rusqlite::Error::SqliteFailure(_, Some(message))) if message.starts_with("no such table"))
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn execute(&self, task_id: Option<Uuid>, operation: Operation) -> Result<Value> {
        check_operation(&operation)?;
        match self.execute_once(task_id, operation.clone()).await {
            // Another process dropped the table since we cached it: forget and create it again.
            Err(error) if is_missing_table(&error) => {
                lock(&self.tables).clear();
                self.execute_once(task_id, operation).await
            }
            outcome => outcome,
        }
    }

    async fn create_index(&self, collection: &str, fields: &[&str]) -> Result<()> {
        protocol::store::validate_collection(collection).map_err(Error::BadRequest)?;
        for field in fields {
            protocol::store::validate_field_path(field).map_err(Error::BadRequest)?;
        }
        let statement = format!(
            "CREATE INDEX IF NOT EXISTS \"i_{collection}_{}\" ON {}({})",
            fields.join("_"),
            table_name(collection),
            fields.iter().map(|field| value_expression(field)).collect::<Vec<_>>().join(", ")
        );
        let collection = collection.to_owned();
        let writer = self.writer.clone();
        blocking(move || {
            let connection = lock(&writer);
            create_table(&connection, &collection)?;
            connection.execute_batch(&statement)?;
            Ok(())
        })
        .await
    }

    async fn drop_collection(&self, collection: &str) -> Result<()> {
        protocol::store::validate_collection(collection).map_err(Error::BadRequest)?;
        lock(&self.tables).remove(collection);
        let statement = format!("DROP TABLE IF EXISTS {}", table_name(collection));
        let writer = self.writer.clone();
        blocking(move || Ok(lock(&writer).execute_batch(&statement)?)).await
    }

    async fn drop_all(&self) -> Result<()> {
        lock(&self.tables).clear();
        let writer = self.writer.clone();
        blocking(move || {
            let connection = lock(&writer);
            let tables: Vec<String> = connection
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'c\\_%' ESCAPE '\\'")?
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for table in tables {
                connection.execute_batch(&format!("DROP TABLE IF EXISTS \"{table}\""))?;
            }
            connection.execute(&format!("DELETE FROM {APPLIED_TASKS_TABLE}"), [])?;
            Ok(())
        })
        .await
    }

    async fn prune_applied_tasks(&self, retention: Duration) -> Result<u64> {
        let cutoff = Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let cutoff = timestamp(cutoff);
        let writer = self.writer.clone();
        blocking(move || {
            let removed = lock(&writer).execute(&format!("DELETE FROM {APPLIED_TASKS_TABLE} WHERE at < ?1"), [cutoff])?;
            Ok(removed as u64)
        })
        .await
    }
}

/// The table of a collection (names are validated: lowercase letters, digits, `_`).
pub fn table_name(collection: &str) -> String {
    format!("\"c_{collection}\"")
}

fn create_table(connection: &Connection, collection: &str) -> Result<()> {
    connection.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (id TEXT PRIMARY KEY NOT NULL, doc TEXT NOT NULL) WITHOUT ROWID",
        table_name(collection)
    ))?;
    Ok(())
}

fn write_transaction(connection: &mut Connection, task_id: Option<Uuid>, operation: &Operation, now: &str) -> Result<Value> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(task_id) = task_id {
        let earlier: Option<String> = transaction
            .query_row(&format!("SELECT reply FROM {APPLIED_TASKS_TABLE} WHERE task_id = ?1"), [task_id.to_string()], |row| row.get(0))
            .optional()?;
        if let Some(earlier) = earlier {
            tracing::debug!(%task_id, "task already applied; answering as before");
            return serde_json::from_str(&earlier).map_err(|error| Error::Unavailable(format!("unreadable earlier reply: {error}")));
        }
    }
    // Dropping the transaction on an error rolls back everything, group members included.
    let result = apply(&transaction, task_id, operation, now)?;
    if let Some(task_id) = task_id {
        transaction.execute(
            &format!("INSERT INTO {APPLIED_TASKS_TABLE} (task_id, reply, at) VALUES (?1, ?2, ?3)"),
            rusqlite::params![task_id.to_string(), result.to_string(), now],
        )?;
    }
    transaction.commit()?;
    Ok(result)
}

fn parse_stored(text: &str) -> Result<Map<String, Value>> {
    serde_json::from_str(text).map_err(|error| Error::Unavailable(format!("unreadable stored document: {error}")))
}

fn load(connection: &Connection, collection: &str, id: &str) -> Result<Option<Map<String, Value>>> {
    let text: Option<String> =
        connection.query_row(&format!("SELECT doc FROM {} WHERE id = ?1", table_name(collection)), [id], |row| row.get(0)).optional()?;
    text.as_deref().map(parse_stored).transpose()
}

fn store_document(connection: &Connection, collection: &str, id: &str, stored: &Map<String, Value>) -> Result<()> {
    connection.execute(
        &format!("INSERT INTO {} (id, doc) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc", table_name(collection)),
        rusqlite::params![id, Value::Object(stored.clone()).to_string()],
    )?;
    Ok(())
}

fn matching(
    connection: &Connection,
    collection: &str,
    filter: &Filter,
    tail: &str,
    extra: Vec<SqlValue>,
) -> Result<Vec<(String, Map<String, Value>)>> {
    let clause = where_clause(filter);
    let sql = format!("SELECT id, doc FROM {} WHERE {} {tail}", table_name(collection), clause.sql);
    let mut statement = connection.prepare_cached(&sql)?;
    let parameters = clause.params.into_iter().chain(extra);
    let rows = statement
        .query_map(rusqlite::params_from_iter(parameters), |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(|(id, text)| Ok((id, parse_stored(&text)?))).collect()
}

/// Executes one operation on a connection (inside the caller's transaction for writes).
fn apply(connection: &Connection, task_id: Option<Uuid>, operation: &Operation, now: &str) -> Result<Value> {
    match operation {
        Operation::Put(args) => {
            let id = args.id.clone().unwrap_or_else(|| task_id.unwrap_or_else(Uuid::now_v7).to_string());
            let body = body_of(&args.doc);
            if let Some(stored) = load(connection, &args.collection, &id)? {
                if json_equal(&Value::Object(body_of(&stored)), &Value::Object(body)) {
                    return Ok(presented(&id, stored));
                }
                return Err(Error::Conflict(format!("{}/{id} exists with other content", args.collection)));
            }
            let stored = stamped(body, now, now);
            store_document(connection, &args.collection, &id, &stored)?;
            Ok(presented(&id, stored))
        }
        Operation::Upsert(args) => {
            let stored = match load(connection, &args.collection, &args.id)? {
                Some(mut stored) => {
                    stored.extend(body_of(&args.doc));
                    stored.insert(protocol::store::MODIFIED_FIELD.to_owned(), Value::String(now.to_owned()));
                    stored
                }
                None => stamped(body_of(&args.doc), now, now),
            };
            store_document(connection, &args.collection, &args.id, &stored)?;
            Ok(presented(&args.id, stored))
        }
        Operation::Get(args) => Ok(load(connection, &args.collection, &args.id)?.map_or(Value::Null, |stored| presented(&args.id, stored))),
        Operation::Find(args) => {
            let limit = args.limit.map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
            let skip = i64::try_from(args.skip).unwrap_or(i64::MAX);
            let clause_parameters = where_clause(&args.filter).params.len();
            let tail = format!("{} LIMIT ?{} OFFSET ?{}", order_clause(&args.sort), clause_parameters + 1, clause_parameters + 2);
            let rows =
                matching(connection, &args.collection, &args.filter, &tail, vec![SqlValue::Integer(limit), SqlValue::Integer(skip)])?;
            let documents = rows.into_iter().map(|(id, stored)| {
                let document = presented(&id, stored);
                match &args.projection {
                    Some(fields) => project(document, fields),
                    None => document,
                }
            });
            Ok(Value::Array(documents.collect()))
        }
        Operation::Update(args) => {
            let rows = matching(connection, &args.collection, &args.filter, "", Vec::new())?;
            let matched = rows.len();
            for (id, mut stored) in rows {
                apply_update(&mut stored, &args.update, now)
                    .map_err(|reason| Error::BadRequest(format!("{}/{id}: {reason}", args.collection)))?;
                store_document(connection, &args.collection, &id, &stored)?;
            }
            Ok(Value::from(matched))
        }
        Operation::Replace(args) => {
            let Some(existing) = load(connection, &args.collection, &args.id)? else {
                return Err(Error::NotFound(format!("{}/{}", args.collection, args.id)));
            };
            let created = existing.get(protocol::store::CREATED_FIELD).and_then(Value::as_str).unwrap_or(now).to_owned();
            let stored = stamped(body_of(&args.doc), &created, now);
            store_document(connection, &args.collection, &args.id, &stored)?;
            Ok(presented(&args.id, stored))
        }
        Operation::Delete(args) => {
            let clause = where_clause(&args.filter);
            let sql = format!("DELETE FROM {} WHERE {}", table_name(&args.collection), clause.sql);
            let deleted = connection.execute(&sql, rusqlite::params_from_iter(clause.params))?;
            Ok(Value::from(deleted))
        }
        Operation::Count(args) => {
            let clause = where_clause(&args.filter);
            let sql = format!("SELECT COUNT(*) FROM {} WHERE {}", table_name(&args.collection), clause.sql);
            let count: i64 = connection.query_row(&sql, rusqlite::params_from_iter(clause.params), |row| row.get(0))?;
            Ok(Value::from(count))
        }
        Operation::Group(group) => {
            let mut results = Vec::with_capacity(group.operations.len());
            for (index, member) in group.operations.iter().enumerate() {
                let member_task_id = task_id.map(|task_id| grouped_task_id(task_id, index));
                let result = apply(connection, member_task_id, member, now).map_err(|error| in_group(index, member, error))?;
                results.push(result);
            }
            Ok(Value::Array(results))
        }
    }
}

/// What `SQLITE_*` failures mean to a client.
pub fn error_kind(error: &rusqlite::Error) -> protocol::store::ErrorKind {
    use protocol::store::ErrorKind;
    match error {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            rusqlite::ErrorCode::ConstraintViolation => ErrorKind::Conflict,
            rusqlite::ErrorCode::TooBig => ErrorKind::BadRequest,
            _ => ErrorKind::Unavailable,
        },
        rusqlite::Error::UserFunctionError(_) => ErrorKind::BadRequest,
        _ => ErrorKind::Unavailable,
    }
}

/// A WHERE clause with its numbered parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlWhere {
    pub sql: String,
    pub params: Vec<SqlValue>,
}

/// `'$."a"."b"'`: segments are validated (letters, digits, `_`, `-`), so quoting them is enough.
fn json_path(field: &str) -> String {
    let quoted: Vec<String> = field.split('.').map(|segment| format!("\"{segment}\"")).collect();
    format!("'$.{}'", quoted.join("."))
}

/// The SQL expression of a field's value. Indexes are built on exactly this text, so that the
/// planner recognises it in queries.
pub fn value_expression(field: &str) -> String {
    if field == ID_FIELD {
        return "id".to_owned();
    }
    format!("json_extract(doc, {})", json_path(field))
}

/// `ORDER BY` for sort keys, with the id as the final tie-breaker so that pages are stable
/// (MongoDB gets the same). Without sort keys the order is unspecified and nothing is sorted, so
/// that a limited lookup stops at its limit.
pub fn order_clause(sort: &[SortKey]) -> String {
    if sort.is_empty() {
        return String::new();
    }
    let mut terms: Vec<String> = sort
        .iter()
        .map(|key| format!("{} {}", value_expression(&key.field), if key.order == SortOrder::Desc { "DESC" } else { "ASC" }))
        .collect();
    if !sort.iter().any(|key| key.field == ID_FIELD) {
        terms.push("id ASC".to_owned());
    }
    format!("ORDER BY {}", terms.join(", "))
}

/// Translates a matcher to SQL over the `doc` JSON column.
pub fn where_clause(filter: &Filter) -> SqlWhere {
    let mut builder = WhereBuilder { params: Vec::new() };
    let terms: Vec<String> = filter.conditions.iter().map(|condition| builder.condition(&condition.field, &condition.condition)).collect();
    let sql = if terms.is_empty() { "1".to_owned() } else { terms.join(" AND ") };
    SqlWhere { sql, params: builder.params }
}

/// The SQL pieces naming one field.
struct Target {
    is_id: bool,
    /// The field's SQL value (`json_extract`), NULL when missing.
    value: String,
    /// Its JSON type (`json_type`): 'null', 'true', 'false', 'integer', 'real', 'text', 'array',
    /// 'object', or NULL when missing.
    kind: String,
    path: String,
}

impl Target {
    fn new(field: &str) -> Target {
        let path = json_path(field);
        Target { is_id: field == ID_FIELD, value: value_expression(field), kind: format!("json_type(doc, {path})"), path }
    }

    /// True when the field is an array with an element satisfying `element_condition` (over
    /// `element.type` and `element.value`).
    fn any_element(&self, element_condition: &str) -> String {
        format!("({} = 'array' AND EXISTS (SELECT 1 FROM json_each(doc, {}) AS element WHERE {element_condition}))", self.kind, self.path)
    }

    /// A range on the field's own value that every array satisfies (their JSON text starts with
    /// `[`): it lets SQLite serve the array branch of a condition from the same index.
    fn array_range(&self) -> String {
        format!("{value} >= '[' AND {value} < '\\'", value = self.value)
    }
}

struct WhereBuilder {
    params: Vec<SqlValue>,
}

const NUMBER_TYPES: &str = "('integer', 'real')";

impl WhereBuilder {
    fn bind(&mut self, value: SqlValue) -> String {
        self.params.push(value);
        format!("?{}", self.params.len())
    }

    fn bind_number(&mut self, number: &serde_json::Number) -> String {
        let value = match number.as_i64() {
            Some(integer) => SqlValue::Integer(integer),
            None => SqlValue::Real(number.as_f64().unwrap_or(f64::NAN)),
        };
        self.bind(value)
    }

    fn condition(&mut self, field: &str, condition: &Condition) -> String {
        let target = Target::new(field);
        match condition {
            Condition::Eq(value) => self.equals(&target, value),
            Condition::Ne(value) => format!("NOT IFNULL({}, 0)", self.equals(&target, value)),
            Condition::Gt(value) => self.compare(&target, ">", value),
            Condition::Gte(value) => self.compare(&target, ">=", value),
            Condition::Lt(value) => self.compare(&target, "<", value),
            Condition::Lte(value) => self.compare(&target, "<=", value),
            Condition::In(values) => self.any_of(&target, values),
            Condition::Nin(values) => format!("NOT IFNULL({}, 0)", self.any_of(&target, values)),
            Condition::Exists(present) => match (target.is_id, present) {
                (true, present) => if *present { "1" } else { "0" }.to_owned(),
                (false, true) => format!("{} IS NOT NULL", target.kind),
                (false, false) => format!("{} IS NULL", target.kind),
            },
            Condition::Regex(pattern) => {
                let pattern = self.bind(SqlValue::Text(pattern.clone()));
                if target.is_id {
                    return format!("(id REGEXP {pattern})");
                }
                let element = target.any_element(&format!("element.type = 'text' AND element.value REGEXP {pattern}"));
                format!("(({} = 'text' AND {} REGEXP {pattern}) OR {element})", target.kind, target.value)
            }
        }
    }

    fn any_of(&mut self, target: &Target, values: &[Value]) -> String {
        if values.is_empty() {
            return "0".to_owned();
        }
        let terms: Vec<String> = values.iter().map(|value| self.equals(target, value)).collect();
        format!("({})", terms.join(" OR "))
    }

    fn equals(&mut self, target: &Target, value: &Value) -> String {
        if target.is_id {
            return match value {
                Value::String(id) => format!("(id = {})", self.bind(SqlValue::Text(id.clone()))),
                _ => "0".to_owned(),
            };
        }
        let Target { kind, value: field_value, .. } = target;
        match value {
            Value::Null => format!("({kind} IS NULL OR {kind} = 'null' OR {})", target.any_element("element.type = 'null'")),
            Value::Bool(flag) => {
                let json_type = if *flag { "'true'" } else { "'false'" };
                format!("({kind} = {json_type} OR {})", target.any_element(&format!("element.type = {json_type}")))
            }
            Value::Number(number) => {
                let parameter = self.bind_number(number);
                let element = target.any_element(&format!("element.type IN {NUMBER_TYPES} AND element.value = {parameter}"));
                format!("(({field_value} = {parameter} AND {kind} IN {NUMBER_TYPES}) OR ({} AND {element}))", target.array_range())
            }
            Value::String(text) => {
                let parameter = self.bind(SqlValue::Text(text.clone()));
                let element = target.any_element(&format!("element.type = 'text' AND element.value = {parameter}"));
                format!("(({field_value} = {parameter} AND {kind} = 'text') OR ({} AND {element}))", target.array_range())
            }
            Value::Array(_) | Value::Object(_) => {
                let parameter = self.bind(SqlValue::Text(value.to_string()));
                let json_type = if value.is_array() { "'array'" } else { "'object'" };
                let element = target.any_element(&format!("element.type = {json_type} AND element.value = json({parameter})"));
                format!("(({kind} = {json_type} AND {field_value} = json({parameter})) OR {element})")
            }
        }
    }

    fn compare(&mut self, target: &Target, operator: &str, value: &Value) -> String {
        let (parameter, types, element_types) = match value {
            Value::Number(number) => (self.bind_number(number), format!("IN {NUMBER_TYPES}"), format!("IN {NUMBER_TYPES}")),
            Value::String(text) => (self.bind(SqlValue::Text(text.clone())), "= 'text'".to_owned(), "= 'text'".to_owned()),
            // The protocol admits only numbers and strings here.
            _ => return "0".to_owned(),
        };
        if target.is_id {
            return if value.is_string() { format!("(id {operator} {parameter})") } else { "0".to_owned() };
        }
        let element = target.any_element(&format!("element.type {element_types} AND element.value {operator} {parameter}"));
        format!(
            "(({kind} {types} AND {value} {operator} {parameter}) OR ({range} AND {element}))",
            kind = target.kind,
            value = target.value,
            range = target.array_range()
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(value: Value) -> Filter {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("sqlite::memory:").unwrap(), Location::Memory);
        assert_eq!(parse_url("sqlite:///tmp/a/b.sqlite").unwrap(), Location::File(PathBuf::from("/tmp/a/b.sqlite")));
        assert!(parse_url("sqlite://").is_err());
        assert!(parse_url("postgres://x").is_err());
    }

    #[test]
    fn translation_binds_values_and_never_inlines_them() {
        let clause = where_clause(&filter(json!({"user": "alice'; DROP TABLE x; --", "n": {"gt": 3}})));
        assert!(!clause.sql.contains("alice"), "{}", clause.sql);
        assert_eq!(clause.params.len(), 2);
        assert!(clause.sql.contains("json_extract(doc, '$.\"user\"') = ?"), "{}", clause.sql);
        assert_eq!(where_clause(&Filter::all()).sql, "1");
        assert_eq!(where_clause(&filter(json!({"id": {"in": []}}))).sql, "0");
    }

    #[test]
    fn order_has_a_tie_breaker() {
        let sort = vec![SortKey { field: "a.b".into(), order: SortOrder::Desc }];
        assert_eq!(order_clause(&sort), "ORDER BY json_extract(doc, '$.\"a\".\"b\"') DESC, id ASC");
        assert_eq!(order_clause(&[]), "");
    }
}
