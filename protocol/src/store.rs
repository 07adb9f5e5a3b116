//! Persistence operations on the wire: the typed generic operations the persistence agent executes,
//! their replies, and [`StoreClient`], the small request/reply client other components use.
//!
//! An operation travels as a [`Task`] with `agent: persistence`, `action` = the operation name and
//! `args` = its body. Queries use [`Bus::request`] (RabbitMQ direct reply-to); the engine's persist
//! effects are fire-and-forget tasks.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::bus::{Bus, BusError};
use crate::message::{AgentKind, Task};
use crate::topology;

/// Largest document (serialized JSON) the store accepts; MongoDB's own limit is 16 MiB.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Longest accepted document id.
pub const MAX_ID_LENGTH: usize = 256;
/// Field names the store keeps itself: the id and the two timestamps.
pub const ID_FIELD: &str = "id";
pub const CREATED_FIELD: &str = "created";
pub const MODIFIED_FIELD: &str = "modified";

/// The collections Berth uses.
pub mod collections {
    /// One record per session (id = session id): state, user, profile, workspace, container id,
    /// host, port, prefix, error.
    pub const SESSIONS: &str = "sessions";
    /// Append-only audit of every transition: session, thred, from, to, event_type, event_id, at.
    pub const EVENTS: &str = "events";
    /// The patterns bootstrap loaded.
    pub const PATTERNS: &str = "patterns";
    pub const USERS: &str = "users";
    /// One user's usage in one period (id `<user>/<2026-12-01>` or `<user>/<2026-12>`): running,
    /// idle, CPU and GiB seconds, cost. Written by the engine's meter.
    pub const USAGE: &str = "usage";
}

/// One generic persistence operation. On the wire: `{"action": "<name>", "args": {...}}`, which is
/// also the shape of a [`Task`]'s `action` and `args` and of a group's members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", content = "args", rename_all = "snake_case")]
// One operation lives per task and is never stored in bulk, so boxing the larger variants buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Operation {
    /// Inserts a document; a second put with the same id is a no-op.
    Put(PutArgs),
    /// Sets the given fields, creating the record if absent; keeps `created`, bumps `modified`.
    Upsert(UpsertArgs),
    Get(GetArgs),
    Find(FindArgs),
    /// Applies an update to every document matching the filter.
    Update(UpdateArgs),
    /// Replaces a whole document (keeping `created`); `not_found` if absent.
    Replace(ReplaceArgs),
    /// Deletes every document matching a (non-empty) filter.
    Delete(DeleteArgs),
    Count(CountArgs),
    /// Operations applied as one transaction: all or nothing.
    Group(GroupArgs),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutArgs {
    pub collection: String,
    /// Defaults to the task id, so a redelivered task inserts once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub doc: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsertArgs {
    pub collection: String,
    pub id: String,
    pub doc: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetArgs {
    pub collection: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindArgs {
    pub collection: String,
    #[serde(default)]
    pub filter: Filter,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sort: Vec<SortKey>,
    #[serde(default)]
    pub skip: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Fields to return (besides `id`, always returned); absent = the whole document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<Vec<String>>,
}

impl FindArgs {
    /// Everything in `collection` matching `filter`, unsorted and unlimited.
    pub fn new(collection: &str, filter: Filter) -> FindArgs {
        FindArgs { collection: collection.to_owned(), filter, sort: Vec::new(), skip: 0, limit: None, projection: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SortKey {
    pub field: String,
    #[serde(default)]
    pub order: SortOrder,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    #[default]
    Asc,
    Desc,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateArgs {
    pub collection: String,
    #[serde(default)]
    pub filter: Filter,
    pub update: UpdateSpec,
}

/// The changes an `update` makes; field names may be dotted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSpec {
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub set: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unset: Vec<String>,
    /// Adds numbers; a missing field starts at 0.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub inc: Map<String, Value>,
    /// Appends to an array; a missing field becomes a one-element array.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub push: Map<String, Value>,
    /// Appends unless an equal element is already there.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub add_to_set: Map<String, Value>,
    /// Removes every element equal to the value.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub pull: Map<String, Value>,
    /// Sets the fields to the time of the update (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub current_date: Vec<String>,
}

impl UpdateSpec {
    /// Every field the update touches, with the operator touching it.
    pub fn touched_fields(&self) -> Vec<(&'static str, &str)> {
        let mut fields = Vec::new();
        fields.extend(self.set.keys().map(|field| ("set", field.as_str())));
        fields.extend(self.unset.iter().map(|field| ("unset", field.as_str())));
        fields.extend(self.inc.keys().map(|field| ("inc", field.as_str())));
        fields.extend(self.push.keys().map(|field| ("push", field.as_str())));
        fields.extend(self.add_to_set.keys().map(|field| ("add_to_set", field.as_str())));
        fields.extend(self.pull.keys().map(|field| ("pull", field.as_str())));
        fields.extend(self.current_date.iter().map(|field| ("current_date", field.as_str())));
        fields
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceArgs {
    pub collection: String,
    pub id: String,
    pub doc: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteArgs {
    pub collection: String,
    pub filter: Filter,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountArgs {
    pub collection: String,
    #[serde(default)]
    pub filter: Filter,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupArgs {
    pub operations: Vec<Operation>,
}

/// A matcher: every condition must hold. On the wire an object of field -> `{operator: value}`;
/// a bare value means `eq`; dotted field names reach into nested documents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub struct Filter {
    pub conditions: Vec<FieldCondition>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FieldCondition {
    pub field: String,
    pub condition: Condition,
}

/// One operator and its operand, with the operand's type already checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Equal; on an array field, equal to the array or to one of its elements (MongoDB's rule).
    /// `null` also matches a missing field.
    Eq(Value),
    /// Not [`Condition::Eq`] (so a missing field matches).
    Ne(Value),
    /// Ordering within one type: numbers with numbers, strings with strings.
    Gt(Value),
    Gte(Value),
    Lt(Value),
    Lte(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    /// The field is present (even if `null`) or absent.
    Exists(bool),
    /// A regular expression on a string field (inline flags such as `(?i)` work in both backends).
    Regex(String),
}

/// The operator names a filter accepts.
pub const FILTER_OPERATORS: [&str; 10] = ["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin", "exists", "regex"];

impl Condition {
    pub fn operator(&self) -> &'static str {
        match self {
            Condition::Eq(_) => "eq",
            Condition::Ne(_) => "ne",
            Condition::Gt(_) => "gt",
            Condition::Gte(_) => "gte",
            Condition::Lt(_) => "lt",
            Condition::Lte(_) => "lte",
            Condition::In(_) => "in",
            Condition::Nin(_) => "nin",
            Condition::Exists(_) => "exists",
            Condition::Regex(_) => "regex",
        }
    }

    fn operand(&self) -> Value {
        match self {
            Condition::Eq(value) | Condition::Ne(value) => value.clone(),
            Condition::Gt(value) | Condition::Gte(value) | Condition::Lt(value) | Condition::Lte(value) => value.clone(),
            Condition::In(values) | Condition::Nin(values) => Value::Array(values.clone()),
            Condition::Exists(present) => Value::Bool(*present),
            Condition::Regex(pattern) => Value::String(pattern.clone()),
        }
    }

    fn parse(field: &str, operator: &str, operand: Value) -> Result<Condition, String> {
        let ordered = |operand: Value| match operand {
            Value::Number(_) | Value::String(_) => Ok(operand),
            other => Err(format!("`{field}`: `{operator}` compares a number or a string, got {other}")),
        };
        let list = |operand: Value| match operand {
            Value::Array(values) => Ok(values),
            other => Err(format!("`{field}`: `{operator}` takes an array, got {other}")),
        };
        Ok(match operator {
            "eq" => Condition::Eq(operand),
            "ne" => Condition::Ne(operand),
            "gt" => Condition::Gt(ordered(operand)?),
            "gte" => Condition::Gte(ordered(operand)?),
            "lt" => Condition::Lt(ordered(operand)?),
            "lte" => Condition::Lte(ordered(operand)?),
            "in" => Condition::In(list(operand)?),
            "nin" => Condition::Nin(list(operand)?),
            "exists" => match operand {
                Value::Bool(present) => Condition::Exists(present),
                other => return Err(format!("`{field}`: `exists` takes true or false, got {other}")),
            },
            "regex" => match operand {
                Value::String(pattern) => Condition::Regex(pattern),
                other => return Err(format!("`{field}`: `regex` takes a string, got {other}")),
            },
            unknown => return Err(format!("`{field}`: unknown operator `{unknown}` (expected one of {})", FILTER_OPERATORS.join(", "))),
        })
    }
}

impl Filter {
    /// The empty filter: matches everything.
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Adds one condition (builder style).
    pub fn and(mut self, field: &str, condition: Condition) -> Filter {
        self.conditions.push(FieldCondition { field: field.to_owned(), condition });
        self
    }

    /// `field` equals `value`.
    pub fn eq(field: &str, value: impl Into<Value>) -> Filter {
        Filter::all().and(field, Condition::Eq(value.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }
}

impl TryFrom<Value> for Filter {
    type Error = String;

    fn try_from(value: Value) -> Result<Filter, String> {
        let object = match value {
            Value::Object(object) => object,
            Value::Null => return Ok(Filter::all()),
            other => return Err(format!("a filter is an object of field -> condition, got {other}")),
        };
        let mut conditions = Vec::new();
        for (field, matcher) in object {
            validate_field_path(&field)?;
            match matcher {
                Value::Object(operators)
                    if !operators.is_empty() && operators.keys().all(|key| FILTER_OPERATORS.contains(&key.as_str())) =>
                {
                    for (operator, operand) in operators {
                        conditions.push(FieldCondition { condition: Condition::parse(&field, &operator, operand)?, field: field.clone() });
                    }
                }
                Value::Object(operators) if operators.keys().any(|key| FILTER_OPERATORS.contains(&key.as_str())) => {
                    let keys: Vec<&String> = operators.keys().collect();
                    return Err(format!("`{field}`: {keys:?} mixes operators with field names"));
                }
                Value::Object(operators) if operators.is_empty() => {
                    return Err(format!("`{field}`: an empty matcher; give an operator such as {{\"eq\": …}}"))
                }
                bare_value => conditions.push(FieldCondition { field, condition: Condition::Eq(bare_value) }),
            }
        }
        Ok(Filter { conditions })
    }
}

impl From<Filter> for Value {
    fn from(filter: Filter) -> Value {
        let mut object = Map::new();
        for FieldCondition { field, condition } in filter.conditions {
            let entry = object.entry(field).or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(operators) = entry {
                operators.insert(condition.operator().to_owned(), condition.operand());
            }
        }
        Value::Object(object)
    }
}

/// Checks a (possibly dotted) field name: segments of letters, digits, `_` and `-`, not starting
/// with `_` (MongoDB reserves `_id`) or a digit (which MongoDB would read as an array index).
pub fn validate_field_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 256 {
        return Err(format!("field name {path:?} must have 1 to 256 characters"));
    }
    for segment in path.split('.') {
        let Some(first) = segment.chars().next() else {
            return Err(format!("field name {path:?} has an empty segment"));
        };
        if !first.is_ascii_alphabetic() {
            return Err(format!("field name {path:?}: each segment starts with a letter"));
        }
        if !segment.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("field name {path:?}: only letters, digits, `_` and `-` are allowed"));
        }
    }
    if path.starts_with("id.") {
        return Err(format!("field name {path:?}: `id` is a string and has no fields"));
    }
    Ok(())
}

/// Checks a collection name ([`crate::ids::CollectionName`], the one rule patterns are checked by too).
pub fn validate_collection(name: &str) -> Result<(), String> {
    crate::ids::CollectionName::parse(name).map(drop).map_err(|error| error.to_string())
}

/// Checks a document id.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LENGTH || id.chars().any(char::is_control) {
        return Err(format!("id {id:?}: 1 to {MAX_ID_LENGTH} printable characters"));
    }
    Ok(())
}

fn validate_document(doc: &Map<String, Value>, id: Option<&str>) -> Result<(), String> {
    for (key, value) in doc {
        if key == ID_FIELD {
            // A document read back carries its id; writing it back is fine if it is the same.
            match (value, id) {
                (Value::String(given), Some(expected)) if given == expected => continue,
                _ => return Err(format!("the document's `id` ({value}) differs from the operation's id")),
            }
        }
        validate_field_path(key)?;
        if key.contains('.') {
            return Err(format!("document key {key:?} contains a dot; nest an object instead"));
        }
        validate_nested_keys(value, key)?;
    }
    let size = serde_json::to_vec(doc).map(|bytes| bytes.len()).unwrap_or(usize::MAX);
    if size > MAX_DOCUMENT_BYTES {
        return Err(format!("document of {size} bytes is larger than the {MAX_DOCUMENT_BYTES}-byte limit"));
    }
    Ok(())
}

fn validate_nested_keys(value: &Value, path: &str) -> Result<(), String> {
    match value {
        Value::Object(object) => {
            for (key, inner) in object {
                if key.is_empty() || key.starts_with('$') || key.contains('.') {
                    return Err(format!("key {key:?} under `{path}`: keys must be non-empty, without `$` or `.`"));
                }
                validate_nested_keys(inner, &format!("{path}.{key}"))?;
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(|item| validate_nested_keys(item, path)),
        _ => Ok(()),
    }
}

fn validate_filter_and_collection(collection: &str, filter: &Filter) -> Result<(), String> {
    validate_collection(collection)?;
    for condition in &filter.conditions {
        validate_field_path(&condition.field)?;
    }
    Ok(())
}

fn is_kept_by_store(field: &str) -> bool {
    let top = field.split('.').next().unwrap_or(field);
    top == ID_FIELD || top == CREATED_FIELD || top == MODIFIED_FIELD
}

impl Operation {
    /// The operation's name (the task's `action`).
    pub fn action(&self) -> &'static str {
        match self {
            Operation::Put(_) => "put",
            Operation::Upsert(_) => "upsert",
            Operation::Get(_) => "get",
            Operation::Find(_) => "find",
            Operation::Update(_) => "update",
            Operation::Replace(_) => "replace",
            Operation::Delete(_) => "delete",
            Operation::Count(_) => "count",
            Operation::Group(_) => "group",
        }
    }

    /// Whether the operation changes anything (and so must be applied once per task id).
    pub fn writes(&self) -> bool {
        !matches!(self, Operation::Get(_) | Operation::Find(_) | Operation::Count(_))
    }

    /// The collection the operation works on (`None` for a group).
    pub fn collection(&self) -> Option<&str> {
        match self {
            Operation::Put(args) => Some(&args.collection),
            Operation::Upsert(args) => Some(&args.collection),
            Operation::Get(args) => Some(&args.collection),
            Operation::Find(args) => Some(&args.collection),
            Operation::Update(args) => Some(&args.collection),
            Operation::Replace(args) => Some(&args.collection),
            Operation::Delete(args) => Some(&args.collection),
            Operation::Count(args) => Some(&args.collection),
            Operation::Group(_) => None,
        }
    }

    /// Reads an operation out of a task's `action` and `args`, checking everything types alone
    /// cannot (names, sizes, conflicting updates).
    pub fn from_task(task: &Task) -> Result<Operation, String> {
        let operation: Operation = serde_json::from_value(json!({"action": task.action, "args": task.args}))
            .map_err(|error| format!("`{}`: {error}", task.action))?;
        operation.validate()?;
        Ok(operation)
    }

    /// The task carrying this operation.
    pub fn to_task(&self, id: Uuid) -> Task {
        let args = match serde_json::to_value(self) {
            Ok(Value::Object(mut wire)) => wire.remove("args").unwrap_or(Value::Null),
            _ => Value::Null,
        };
        Task { id, agent: AgentKind::Persistence, action: self.action().to_owned(), session: None, thred: None, cause: None, args }
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Operation::Put(args) => {
                validate_collection(&args.collection)?;
                if let Some(id) = &args.id {
                    validate_id(id)?;
                }
                validate_document(&args.doc, args.id.as_deref())
            }
            Operation::Upsert(UpsertArgs { collection, id, doc }) | Operation::Replace(ReplaceArgs { collection, id, doc }) => {
                validate_collection(collection)?;
                validate_id(id)?;
                validate_document(doc, Some(id))
            }
            Operation::Get(args) => {
                validate_collection(&args.collection)?;
                validate_id(&args.id)
            }
            Operation::Find(args) => {
                validate_filter_and_collection(&args.collection, &args.filter)?;
                if args.limit == Some(0) {
                    // MongoDB reads 0 as "no limit", SQLite as "no rows": refuse the ambiguity.
                    return Err("limit must be at least 1; leave it out for no limit".to_owned());
                }
                for key in &args.sort {
                    validate_field_path(&key.field)?;
                }
                if let Some(fields) = &args.projection {
                    for field in fields {
                        validate_field_path(field)?;
                    }
                    for (index, field) in fields.iter().enumerate() {
                        for other in &fields[index + 1..] {
                            if overlaps(field, other) {
                                return Err(format!("projection fields `{field}` and `{other}` overlap"));
                            }
                        }
                    }
                }
                Ok(())
            }
            Operation::Update(args) => {
                validate_filter_and_collection(&args.collection, &args.filter)?;
                validate_update(&args.update)
            }
            Operation::Delete(args) => {
                validate_filter_and_collection(&args.collection, &args.filter)?;
                if args.filter.is_empty() {
                    return Err("delete needs a non-empty filter".to_owned());
                }
                Ok(())
            }
            Operation::Count(args) => validate_filter_and_collection(&args.collection, &args.filter),
            Operation::Group(group) => {
                if group.operations.is_empty() {
                    return Err("a group needs at least one operation".to_owned());
                }
                for (index, operation) in group.operations.iter().enumerate() {
                    if let Operation::Group(_) = operation {
                        return Err(format!("group operation {index}: groups do not nest"));
                    }
                    operation.validate().map_err(|error| format!("group operation {index} ({}): {error}", operation.action()))?;
                }
                Ok(())
            }
        }
    }
}

/// One transition of a session as the audit trail (`events`) keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionRecord {
    pub session: String,
    pub thred: String,
    pub from: String,
    pub to: String,
    /// The type and id of the event that caused the transition.
    pub event_type: String,
    pub event_id: String,
    /// When the engine applied it (RFC 3339).
    pub at: String,
}

impl Operation {
    /// Appends a transition to `events`. The record's id is the task's id, so a redelivered task
    /// appends it once.
    pub fn record_transition(record: &TransitionRecord) -> Operation {
        let doc = match serde_json::to_value(record) {
            Ok(Value::Object(doc)) => doc,
            _ => Map::new(),
        };
        Operation::Put(PutArgs { collection: collections::EVENTS.to_owned(), id: None, doc })
    }

    /// Sets fields of a session record (state, user, container id, host, port, error, …),
    /// creating the record if absent.
    pub fn record_session(session: &str, fields: Map<String, Value>) -> Operation {
        Operation::Upsert(UpsertArgs { collection: collections::SESSIONS.to_owned(), id: session.to_owned(), doc: fields })
    }
}

/// Whether one dotted path is the other or lies inside it.
pub fn overlaps(first: &str, second: &str) -> bool {
    let inside = |outer: &str, inner: &str| inner.len() > outer.len() && inner.starts_with(outer) && inner.as_bytes()[outer.len()] == b'.';
    first == second || inside(first, second) || inside(second, first)
}

fn validate_update(update: &UpdateSpec) -> Result<(), String> {
    let touched = update.touched_fields();
    if touched.is_empty() {
        return Err("the update changes nothing".to_owned());
    }
    for (operator, field) in &touched {
        validate_field_path(field)?;
        if is_kept_by_store(field) {
            return Err(format!("`{operator}` on `{field}`: the store keeps `id`, `created` and `modified` itself"));
        }
    }
    for (index, (first_operator, first)) in touched.iter().enumerate() {
        for (second_operator, second) in &touched[index + 1..] {
            if overlaps(first, second) {
                return Err(format!("`{first_operator}` on `{first}` conflicts with `{second_operator}` on `{second}`"));
            }
        }
    }
    for (field, amount) in &update.inc {
        if !amount.is_number() {
            return Err(format!("`inc` on `{field}` needs a number, got {amount}"));
        }
    }
    let values = update.set.iter().chain(&update.push).chain(&update.add_to_set).chain(&update.pull);
    for (field, value) in values {
        validate_nested_keys(value, field)?;
    }
    Ok(())
}

/// Why the store refused an operation; decides whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The operation is malformed or can never succeed as written.
    BadRequest,
    NotFound,
    /// It contradicts what is stored (e.g. a put of a different document under an existing id).
    Conflict,
    /// The backend cannot be reached or is busy: a retry may succeed.
    Unavailable,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The answer to a request: `{"ok": true, "result": …}` or `{"ok": false, "error": {kind, message}}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ok(Value),
    Err(ReplyError),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ReplyError>,
}

impl Reply {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
        Reply::Err(ReplyError { kind, message: message.into() })
    }

    /// The encoded reply; the persistence agent sends this.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let wire = match self {
            Reply::Ok(result) => WireReply { ok: true, result: Some(result.clone()), error: None },
            Reply::Err(error) => WireReply { ok: false, result: None, error: Some(error.clone()) },
        };
        serde_json::to_vec(&wire)
    }

    /// [`Reply::encode`] for tests: a failure is logged and gives no bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode().unwrap_or_else(|error| {
            tracing::error!(%error, "a store reply did not encode");
            Vec::new()
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<Reply, serde_json::Error> {
        let wire: WireReply = serde_json::from_slice(bytes)?;
        Ok(match (wire.ok, wire.error) {
            (true, _) => Reply::Ok(wire.result.unwrap_or(Value::Null)),
            (false, Some(error)) => Reply::Err(error),
            (false, None) => Reply::Err(ReplyError { kind: ErrorKind::Unavailable, message: "failed without a reason".to_owned() }),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreClientError {
    #[error("persistence request failed: {0}")]
    Bus(#[from] BusError),
    #[error("the store refused `{action}` ({kind}): {message}")]
    Refused { action: &'static str, kind: ErrorKind, message: String },
    #[error("unreadable reply to `{action}`: {message}")]
    BadReply { action: &'static str, message: String },
}

impl StoreClientError {
    /// The store's error kind; bus failures count as `unavailable`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreClientError::Refused { kind, .. } => *kind,
            StoreClientError::Bus(_) | StoreClientError::BadReply { .. } => ErrorKind::Unavailable,
        }
    }
}

/// How long a request waits for its reply unless told otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The persistence agent seen from other components: request/reply for queries, fire-and-forget
/// tasks for writes nobody waits on.
#[derive(Clone)]
pub struct StoreClient {
    bus: Bus,
    timeout: Duration,
    exchange: String,
    routing_key: String,
}

impl StoreClient {
    pub fn new(bus: Bus) -> StoreClient {
        StoreClient {
            bus,
            timeout: DEFAULT_REQUEST_TIMEOUT,
            exchange: topology::TASKS_EXCHANGE.to_owned(),
            routing_key: AgentKind::Persistence.as_str().to_owned(),
        }
    }

    /// Sends through another exchange: `""` (the default exchange) with a queue's name as the
    /// routing key reaches a responder that is bound nowhere (tests).
    pub fn with_exchange(self, exchange: &str) -> StoreClient {
        StoreClient { exchange: exchange.to_owned(), ..self }
    }

    /// Sends to another routing key on `berth.tasks` (tests run their own agent on a private queue).
    pub fn with_routing_key(self, routing_key: &str) -> StoreClient {
        StoreClient { routing_key: routing_key.to_owned(), ..self }
    }

    pub fn with_timeout(self, timeout: Duration) -> StoreClient {
        StoreClient { timeout, ..self }
    }

    /// Sends one operation and waits for its result, under a fresh task id.
    pub async fn request(&self, operation: &Operation) -> Result<Value, StoreClientError> {
        self.request_with_id(Uuid::now_v7(), operation).await
    }

    /// Sends one operation under a chosen task id: asking again with the same id after a timeout
    /// never applies a write twice.
    pub async fn request_with_id(&self, task_id: Uuid, operation: &Operation) -> Result<Value, StoreClientError> {
        let action = operation.action();
        let task = operation.to_task(task_id);
        let body = task.encode().map_err(|source| BusError::Encode { what: "store task", source })?;
        let bytes = self.bus.request(&self.exchange, &self.routing_key, &body, self.timeout).await?;
        match Reply::decode(&bytes) {
            Ok(Reply::Ok(result)) => Ok(result),
            Ok(Reply::Err(ReplyError { kind, message })) => Err(StoreClientError::Refused { action, kind, message }),
            Err(error) => Err(StoreClientError::BadReply { action, message: error.to_string() }),
        }
    }

    /// Publishes the operation as a task (with confirms) without waiting for it to be applied.
    pub async fn send(&self, task_id: Uuid, operation: &Operation) -> Result<(), StoreClientError> {
        let properties = crate::bus::Properties::json().with_message_id(&task_id.to_string());
        let body = operation.to_task(task_id).encode().map_err(|source| BusError::Encode { what: "store task", source })?;
        self.bus.publish(&self.exchange, &self.routing_key, &body, properties).await?;
        Ok(())
    }

    /// One document by id, or `None`.
    pub async fn get(&self, collection: &str, id: &str) -> Result<Option<Value>, StoreClientError> {
        let operation = Operation::Get(GetArgs { collection: collection.to_owned(), id: id.to_owned() });
        let result = self.request(&operation).await?;
        Ok((!result.is_null()).then_some(result))
    }

    pub async fn find(&self, args: FindArgs) -> Result<Vec<Value>, StoreClientError> {
        match self.request(&Operation::Find(args)).await? {
            Value::Array(documents) => Ok(documents),
            other => Err(StoreClientError::BadReply { action: "find", message: format!("expected an array, got {other}") }),
        }
    }

    pub async fn count(&self, collection: &str, filter: Filter) -> Result<u64, StoreClientError> {
        let result = self.request(&Operation::Count(CountArgs { collection: collection.to_owned(), filter })).await?;
        result.as_u64().ok_or_else(|| StoreClientError::BadReply { action: "count", message: format!("expected a count, got {result}") })
    }

    /// Inserts a document (a no-op if the id exists with the same content); returns it as stored.
    pub async fn put(&self, collection: &str, id: &str, doc: Map<String, Value>) -> Result<Value, StoreClientError> {
        self.request(&Operation::Put(PutArgs { collection: collection.to_owned(), id: Some(id.to_owned()), doc })).await
    }

    /// Sets fields of a document, creating it if absent; returns it as stored.
    pub async fn upsert(&self, collection: &str, id: &str, doc: Map<String, Value>) -> Result<Value, StoreClientError> {
        self.request(&Operation::Upsert(UpsertArgs { collection: collection.to_owned(), id: id.to_owned(), doc })).await
    }

    /// A user's sessions, most recently created first.
    pub async fn sessions_of_user(&self, user: &str, limit: u64) -> Result<Vec<Value>, StoreClientError> {
        self.find(newest_first(FindArgs::new(collections::SESSIONS, Filter::eq("user", user)), limit)).await
    }

    /// Sessions in one state, most recently created first.
    pub async fn sessions_in_state(&self, state: &str, limit: u64) -> Result<Vec<Value>, StoreClientError> {
        self.find(newest_first(FindArgs::new(collections::SESSIONS, Filter::eq("state", state)), limit)).await
    }

    /// A session's audit trail: every transition, oldest first.
    pub async fn session_history(&self, session: &str) -> Result<Vec<Value>, StoreClientError> {
        let mut args = FindArgs::new(collections::EVENTS, Filter::eq("session", session));
        args.sort = vec![
            SortKey { field: "at".to_owned(), order: SortOrder::Asc },
            SortKey { field: CREATED_FIELD.to_owned(), order: SortOrder::Asc },
        ];
        self.find(args).await
    }
}

fn newest_first(mut args: FindArgs, limit: u64) -> FindArgs {
    args.sort = vec![SortKey { field: CREATED_FIELD.to_owned(), order: SortOrder::Desc }];
    args.limit = Some(limit);
    args
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn task(action: &str, args: Value) -> Task {
        Task { id: Uuid::now_v7(), agent: AgentKind::Persistence, action: action.to_owned(), session: None, thred: None, cause: None, args }
    }

    #[track_caller]
    fn check(action: &str, args: Value, expected: Result<(), &str>) {
        let outcome = Operation::from_task(&task(action, args)).map(|_| ());
        match (outcome, expected) {
            (Ok(()), Ok(())) => {}
            (Err(actual), Err(fragment)) => assert!(actual.contains(fragment), "{actual:?} does not contain {fragment:?}"),
            (actual, expected) => panic!("got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn operations_parse_and_refuse_bad_input() {
        check("put", json!({"collection": "events", "doc": {"to": "running"}}), Ok(()));
        check(
            "find",
            json!({"collection": "sessions", "filter": {"user": {"eq": "alice"}, "state": {"in": ["running", "idle"]}},
                   "sort": [{"field": "created", "order": "desc"}], "skip": 0, "limit": 50, "projection": ["state", "user"]}),
            Ok(()),
        );
        check("update", json!({"collection": "s", "filter": {}, "update": {"set": {"a": 1}, "inc": {"n": 2}}}), Ok(()));
        check("group", json!({"operations": [{"action": "put", "args": {"collection": "a", "doc": {}}}]}), Ok(()));
        check("frobnicate", json!({}), Err("unknown variant `frobnicate`"));
        check("find", json!({"collection": "s", "filter": {"a": {"gt": 1, "near": 2}}}), Err("mixes operators"));
        check("find", json!({"collection": "s", "filter": {"a": {"gt": true}}}), Err("compares a number or a string"));
        check("find", json!({"collection": "s", "filter": {"a": {"in": 3}}}), Err("takes an array"));
        check("find", json!({"collection": "s", "filter": {"a": {"exists": "yes"}}}), Err("takes true or false"));
        check("find", json!({"collection": "s", "filter": {"a": {"regex": 1}}}), Err("takes a string"));
        check("find", json!({"collection": "s", "filter": {"$where": 1}}), Err("starts with a letter"));
        check("find", json!({"collection": "s", "filter": {"a": {}}}), Err("empty matcher"));
        check("find", json!({"collection": "s", "filter": [1]}), Err("a filter is an object"));
        check("find", json!({"collection": "s", "projection": ["a", "a.b"]}), Err("overlap"));
        check("find", json!({"collection": "s", "limit": 0}), Err("limit must be at least 1"));
        check("get", json!({"collection": "Bad Name", "id": "x"}), Err("collection name"));
        check("get", json!({"collection": "s", "id": ""}), Err("id \"\""));
        check("get", json!({"collection": "s", "id": 7}), Err("invalid type"));
        check("get", json!({"collection": "s", "id": "x", "extra": 1}), Err("unknown field `extra`"));
        check("put", json!({"collection": "s", "doc": {"a.b": 1}}), Err("contains a dot"));
        check("put", json!({"collection": "s", "doc": {"a": {"$set": 1}}}), Err("without `$`"));
        check("put", json!({"collection": "s", "id": "x", "doc": {"id": "y"}}), Err("differs"));
        check("put", json!({"collection": "s", "doc": {"big": "x".repeat(MAX_DOCUMENT_BYTES)}}), Err("larger than"));
        check("update", json!({"collection": "s", "update": {}}), Err("changes nothing"));
        check("update", json!({"collection": "s", "update": {"set": {"a": 1}, "unset": ["a.b"]}}), Err("conflicts"));
        check("update", json!({"collection": "s", "update": {"set": {"created": 1}}}), Err("keeps `id`"));
        check("update", json!({"collection": "s", "update": {"inc": {"n": "1"}}}), Err("needs a number"));
        check("delete", json!({"collection": "s", "filter": {}}), Err("non-empty filter"));
        check("group", json!({"operations": []}), Err("at least one"));
        check("group", json!({"operations": [{"action": "group", "args": {"operations": []}}]}), Err("do not nest"));
    }

    #[test]
    fn filters_round_trip_and_bare_values_mean_eq() {
        let filter: Filter = serde_json::from_value(json!({"user": "alice", "meta": {"a": 1}, "n": {"gt": 1, "lt": 5}})).unwrap();
        assert!(filter.conditions.contains(&FieldCondition { field: "user".into(), condition: Condition::Eq(json!("alice")) }));
        assert!(filter.conditions.contains(&FieldCondition { field: "meta".into(), condition: Condition::Eq(json!({"a": 1})) }));
        assert!(filter.conditions.contains(&FieldCondition { field: "n".into(), condition: Condition::Gt(json!(1)) }));
        let again: Filter = serde_json::from_value(serde_json::to_value(&filter).unwrap()).unwrap();
        assert_eq!(again, filter);
    }

    #[test]
    fn tasks_round_trip() {
        let operation = Operation::Get(GetArgs { collection: "sessions".into(), id: "s1".into() });
        let task = operation.to_task(Uuid::now_v7());
        assert_eq!(task.action, "get");
        assert_eq!(task.args, json!({"collection": "sessions", "id": "s1"}));
        assert_eq!(Operation::from_task(&task).unwrap(), operation);
    }

    #[test]
    fn berth_records_are_valid_operations() {
        let record = TransitionRecord {
            session: "s1".into(),
            thred: "t1".into(),
            from: "open".into(),
            to: "materializing".into(),
            event_type: "session.open".into(),
            event_id: "e1".into(),
            at: "2026-01-01T00:00:00Z".into(),
        };
        let task = Operation::record_transition(&record).to_task(Uuid::now_v7());
        assert_eq!((task.action.as_str(), task.args["collection"].as_str()), ("put", Some("events")));
        assert_eq!(task.args["doc"]["to"], "materializing");
        Operation::from_task(&task).unwrap();
        let fields = json!({"state": "running", "port": 32768});
        let Value::Object(fields) = fields else { unreachable!() };
        let task = Operation::record_session("s1", fields).to_task(Uuid::now_v7());
        assert_eq!(task.args, json!({"collection": "sessions", "id": "s1", "doc": {"state": "running", "port": 32768}}));
        Operation::from_task(&task).unwrap();
    }

    #[test]
    fn replies_have_the_wire_shape() {
        assert_eq!(serde_json::from_slice::<Value>(&Reply::Ok(Value::Null).to_bytes()).unwrap(), json!({"ok": true, "result": null}));
        let refused = Reply::error(ErrorKind::NotFound, "no such session");
        let wire: Value = serde_json::from_slice(&refused.to_bytes()).unwrap();
        assert_eq!(wire, json!({"ok": false, "error": {"kind": "not_found", "message": "no such session"}}));
        assert_eq!(Reply::decode(&refused.to_bytes()).unwrap(), refused);
    }
}
