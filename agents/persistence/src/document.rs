//! Pure document handling shared by both backends: timestamps, the body a backend stores, the
//! update operators applied in memory (SQLite), projections and value equality.

use chrono::{DateTime, Utc};
use protocol::store::{UpdateSpec, CREATED_FIELD, ID_FIELD, MODIFIED_FIELD};
use serde_json::{Map, Value};

/// RFC 3339 in UTC with a fixed width, so that timestamps sort the same as text and as time.
pub fn timestamp(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The fields a client gave, without the ones the store keeps itself (`id`, `created`, `modified`),
/// so that a document read back can be written back.
pub fn body_of(doc: &Map<String, Value>) -> Map<String, Value> {
    doc.iter()
        .filter(|(key, _)| !matches!(key.as_str(), ID_FIELD | CREATED_FIELD | MODIFIED_FIELD))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// A stored body with fresh timestamps.
pub fn stamped(mut body: Map<String, Value>, created: &str, modified: &str) -> Map<String, Value> {
    body.insert(CREATED_FIELD.to_owned(), Value::String(created.to_owned()));
    body.insert(MODIFIED_FIELD.to_owned(), Value::String(modified.to_owned()));
    body
}

/// What a client sees: `id` first, then the stored fields (timestamps included).
pub fn presented(id: &str, stored: Map<String, Value>) -> Value {
    let mut document = Map::with_capacity(stored.len() + 1);
    document.insert(ID_FIELD.to_owned(), Value::String(id.to_owned()));
    document.extend(stored.into_iter().filter(|(key, _)| key != ID_FIELD));
    Value::Object(document)
}

/// Keeps `id` and the named (possibly dotted) fields of a presented document.
pub fn project(document: Value, fields: &[String]) -> Value {
    let Value::Object(source) = document else { return document };
    let mut projected = Map::new();
    if let Some(id) = source.get(ID_FIELD) {
        projected.insert(ID_FIELD.to_owned(), id.clone());
    }
    for field in fields {
        let segments: Vec<&str> = field.split('.').collect();
        if let Some(value) = lookup(&source, &segments) {
            insert_path(&mut projected, &segments, value.clone());
        }
    }
    Value::Object(projected)
}

fn lookup<'a>(object: &'a Map<String, Value>, segments: &[&str]) -> Option<&'a Value> {
    let (first, rest) = segments.split_first()?;
    let value = object.get(*first)?;
    if rest.is_empty() {
        return Some(value);
    }
    match value {
        Value::Object(inner) => lookup(inner, rest),
        _ => None,
    }
}

fn insert_path(object: &mut Map<String, Value>, segments: &[&str], value: Value) {
    let Some((first, rest)) = segments.split_first() else { return };
    if rest.is_empty() {
        object.insert((*first).to_owned(), value);
        return;
    }
    let inner = object.entry((*first).to_owned()).or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(inner) = inner {
        insert_path(inner, rest, value);
    }
}

/// Equality as MongoDB sees it for JSON values: numbers by value (1 == 1.0), the rest structurally.
pub fn json_equal(first: &Value, second: &Value) -> bool {
    match (first, second) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => a == b,
            _ => a.as_f64() == b.as_f64(),
        },
        (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(a, b)| json_equal(a, b)),
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(key, value)| b.get(key).is_some_and(|other| json_equal(value, other)))
        }
        _ => first == second,
    }
}

/// Applies an update to a stored body in memory and bumps `modified`. Errors mirror MongoDB's
/// refusals (incrementing a string, pushing onto a non-array, a path through a non-object).
pub fn apply_update(stored: &mut Map<String, Value>, update: &UpdateSpec, now: &str) -> Result<(), String> {
    for (field, value) in &update.set {
        *slot(stored, field)? = value.clone();
    }
    for field in &update.unset {
        remove_path(stored, field);
    }
    for (field, amount) in &update.inc {
        let target = slot(stored, field)?;
        *target = match (&*target, amount) {
            (Value::Null, amount) => amount.clone(),
            (Value::Number(current), Value::Number(amount)) => {
                add_numbers(current, amount).ok_or_else(|| format!("`inc` on `{field}` overflows"))?
            }
            (current, _) => return Err(format!("`inc` on `{field}`: the field holds {current}, not a number")),
        };
    }
    for (field, value) in &update.push {
        array_slot(stored, field, "push")?.push(value.clone());
    }
    for (field, value) in &update.add_to_set {
        let items = array_slot(stored, field, "add_to_set")?;
        if !items.iter().any(|item| json_equal(item, value)) {
            items.push(value.clone());
        }
    }
    for (field, value) in &update.pull {
        match existing_mut(stored, field) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => items.retain(|item| !json_equal(item, value)),
            Some(other) => return Err(format!("`pull` on `{field}`: the field holds {other}, not an array")),
        }
    }
    for field in &update.current_date {
        *slot(stored, field)? = Value::String(now.to_owned());
    }
    stored.insert(MODIFIED_FIELD.to_owned(), Value::String(now.to_owned()));
    Ok(())
}

fn add_numbers(current: &serde_json::Number, amount: &serde_json::Number) -> Option<Value> {
    if let (Some(current), Some(amount)) = (current.as_i64(), amount.as_i64()) {
        return current.checked_add(amount).map(Value::from);
    }
    let sum = current.as_f64()? + amount.as_f64()?;
    serde_json::Number::from_f64(sum).map(Value::Number)
}

/// The value at a dotted path, creating missing parents (as `null` at the leaf).
fn slot<'a>(object: &'a mut Map<String, Value>, path: &str) -> Result<&'a mut Value, String> {
    let mut segments = path.split('.').peekable();
    let mut current = object;
    loop {
        let Some(segment) = segments.next() else { return Err(format!("empty field name {path:?}")) };
        if segments.peek().is_none() {
            return Ok(current.entry(segment.to_owned()).or_insert(Value::Null));
        }
        let next = current.entry(segment.to_owned()).or_insert_with(|| Value::Object(Map::new()));
        if next.is_null() {
            *next = Value::Object(Map::new());
        }
        current = match next {
            Value::Object(inner) => inner,
            other => return Err(format!("cannot reach `{path}`: `{segment}` holds {other}, not an object")),
        };
    }
}

fn array_slot<'a>(object: &'a mut Map<String, Value>, path: &str, operator: &str) -> Result<&'a mut Vec<Value>, String> {
    let target = slot(object, path)?;
    if target.is_null() {
        *target = Value::Array(Vec::new());
    }
    match target {
        Value::Array(items) => Ok(items),
        other => Err(format!("`{operator}` on `{path}`: the field holds {other}, not an array")),
    }
}

fn existing_mut<'a>(object: &'a mut Map<String, Value>, path: &str) -> Option<&'a mut Value> {
    let mut segments = path.split('.').peekable();
    let mut current = object;
    loop {
        let segment = segments.next()?;
        let value = current.get_mut(segment)?;
        if segments.peek().is_none() {
            return Some(value);
        }
        current = value.as_object_mut()?;
    }
}

fn remove_path(object: &mut Map<String, Value>, path: &str) {
    match path.rsplit_once('.') {
        None => {
            object.remove(path);
        }
        Some((parent, leaf)) => {
            if let Some(Value::Object(inner)) = existing_mut(object, parent) {
                inner.remove(leaf);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(object) => object,
            _ => panic!("not an object"),
        }
    }

    #[track_caller]
    fn check(before: Value, update: Value, expected: Result<Value, &str>) {
        let update: UpdateSpec = serde_json::from_value(update).unwrap();
        let mut stored = object(before);
        let outcome = apply_update(&mut stored, &update, "T").map(|()| Value::Object(stored));
        match (outcome, expected) {
            (Ok(mut actual), Ok(expected)) => {
                actual.as_object_mut().unwrap().remove("modified");
                assert_eq!(actual, expected);
            }
            (Err(actual), Err(fragment)) => assert!(actual.contains(fragment), "{actual:?} lacks {fragment:?}"),
            (actual, expected) => panic!("got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn update_operators_table() {
        check(json!({}), json!({"set": {"a.b": 1}}), Ok(json!({"a": {"b": 1}})));
        check(json!({"a": 5}), json!({"set": {"a.b": 1}}), Err("not an object"));
        check(json!({"a": {"b": 1, "c": 2}}), json!({"unset": ["a.b", "missing.x"]}), Ok(json!({"a": {"c": 2}})));
        check(json!({"n": 1}), json!({"inc": {"n": 2, "m": 1.5}}), Ok(json!({"n": 3, "m": 1.5})));
        check(json!({"n": 1}), json!({"inc": {"n": 0.5}}), Ok(json!({"n": 1.5})));
        check(json!({"n": "x"}), json!({"inc": {"n": 1}}), Err("not a number"));
        check(json!({"n": i64::MAX}), json!({"inc": {"n": 1}}), Err("overflows"));
        check(json!({"t": [1]}), json!({"push": {"t": 1, "u": "a"}}), Ok(json!({"t": [1, 1], "u": ["a"]})));
        check(json!({"t": 1}), json!({"push": {"t": 1}}), Err("not an array"));
        check(json!({"t": [1.0, 2]}), json!({"add_to_set": {"t": 1}}), Ok(json!({"t": [1.0, 2]})));
        check(json!({"t": [1, 2, 1]}), json!({"pull": {"t": 1, "missing": 3}}), Ok(json!({"t": [2]})));
        check(json!({"t": "s"}), json!({"pull": {"t": 1}}), Err("not an array"));
        check(json!({}), json!({"current_date": ["seen"]}), Ok(json!({"seen": "T"})));
    }

    #[test]
    fn projection_and_presentation() {
        let document = presented("d1", object(json!({"a": {"b": 1, "c": 2}, "d": 3, "created": "x"})));
        assert_eq!(project(document.clone(), &["a.b".into(), "zz".into()]), json!({"id": "d1", "a": {"b": 1}}));
        assert_eq!(body_of(&object(document)), object(json!({"a": {"b": 1, "c": 2}, "d": 3})));
    }

    #[test]
    fn timestamps_have_a_fixed_width() {
        let early = timestamp(DateTime::from_timestamp(0, 0).unwrap());
        assert_eq!(early, "1970-01-01T00:00:00.000000Z");
        assert!(chrono::DateTime::parse_from_rfc3339(&early).is_ok());
    }
}
