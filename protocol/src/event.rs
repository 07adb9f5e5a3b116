//! The CloudEvents 1.0 envelope (JSON structured mode) and its validation at the edge.
//!
//! Every event that enters Berth is parsed here; nothing downstream sees raw JSON. Validation names
//! the attribute at fault so that a client in any language can fix its message.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Content type of an event body in structured mode.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// Default size limit of one encoded event.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 256 * 1024;

/// Attributes defined by the CloudEvents spec; anything else at the top level is an extension.
const CONTEXT_ATTRIBUTES: [&str; 9] = ["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "data"];

/// A validated CloudEvent. Construct with [`CloudEvent::new`] or [`CloudEvent::parse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    /// Extension attributes (`thredid`, `userid`, …): lowercase alphanumeric names, string values.
    #[serde(flatten)]
    pub extensions: BTreeMap<String, Value>,
}

/// Why an event was refused. Each variant names the attribute at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("event is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("event is not valid JSON: {0}")]
    NotJson(String),
    #[error("event must be a JSON object")]
    NotAnObject,
    #[error("required attribute `{0}` is missing")]
    Missing(&'static str),
    /// The attribute name is shown escaped: it comes from outside, and a control or bidi
    /// character printed raw would garble the message and the log line it ends up in.
    #[error("attribute `{}` is invalid: {reason}", attribute.escape_debug())]
    Invalid { attribute: String, reason: String },
}

fn invalid(attribute: &str, reason: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Invalid { attribute: attribute.to_owned(), reason: reason.into() }
}

impl CloudEvent {
    /// A new event with a fresh UUID v7 id and the current time.
    pub fn new(event_type: &str, source: &str, subject: Option<&str>, data: Value) -> CloudEvent {
        CloudEvent {
            specversion: "1.0".to_owned(),
            id: Uuid::now_v7().to_string(),
            source: source.to_owned(),
            event_type: event_type.to_owned(),
            subject: subject.map(str::to_owned),
            time: Some(Utc::now()),
            datacontenttype: Some("application/json".to_owned()),
            data,
            extensions: BTreeMap::new(),
        }
    }

    /// Adds an extension attribute. Panics in debug builds on a name the spec forbids, because
    /// extension names in Berth's own code are constants.
    pub fn with_extension(mut self, name: &str, value: impl Into<String>) -> CloudEvent {
        debug_assert!(validate_extension_name(name).is_ok(), "bad extension name {name}");
        self.extensions.insert(name.to_owned(), Value::String(value.into()));
        self
    }

    /// A string extension attribute, if present.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).and_then(Value::as_str)
    }

    /// Parses and validates an event in JSON structured mode.
    pub fn parse(bytes: &[u8], max_bytes: usize) -> Result<CloudEvent, EnvelopeError> {
        if bytes.len() > max_bytes {
            return Err(EnvelopeError::TooLarge { size: bytes.len(), limit: max_bytes });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|error| EnvelopeError::NotJson(error.to_string()))?;
        let Value::Object(object) = value else { return Err(EnvelopeError::NotAnObject) };
        CloudEvent::from_object(object)
    }

    /// Validates an already-decoded JSON object.
    pub fn from_object(mut object: Map<String, Value>) -> Result<CloudEvent, EnvelopeError> {
        let specversion = take_required_string(&mut object, "specversion")?;
        if specversion != "1.0" {
            return Err(invalid("specversion", format!("must be \"1.0\", got {specversion:?}")));
        }
        let id = take_required_string(&mut object, "id")?;
        if Uuid::parse_str(&id).is_err() {
            return Err(invalid("id", format!("must be a UUID, got {id:?}")));
        }
        let source = take_required_string(&mut object, "source")?;
        let event_type = take_required_string(&mut object, "type")?;
        validate_event_type(&event_type)?;
        let subject = take_optional_string(&mut object, "subject")?;
        if subject.as_deref() == Some("") {
            return Err(invalid("subject", "must not be empty when present"));
        }
        let time = match take_optional_string(&mut object, "time")? {
            None => None,
            Some(text) => Some(
                DateTime::parse_from_rfc3339(&text)
                    .map_err(|error| invalid("time", format!("must be RFC 3339 ({error})")))?
                    .with_timezone(&Utc),
            ),
        };
        let datacontenttype = take_optional_string(&mut object, "datacontenttype")?;
        if let Some(content_type) = &datacontenttype {
            if !content_type.starts_with("application/json") && !content_type.ends_with("+json") {
                return Err(invalid("datacontenttype", "Berth carries JSON data only"));
            }
        }
        // dataschema is allowed by the spec; we keep it as an opaque URI among the extensions map.
        let data = object.remove("data").unwrap_or(Value::Null);
        if object.contains_key("data_base64") {
            return Err(invalid("data_base64", "binary data is not accepted; send JSON in `data`"));
        }
        let mut extensions = BTreeMap::new();
        for (name, value) in object {
            if name != "dataschema" {
                validate_extension_name(&name)?;
            }
            match &value {
                Value::String(_) | Value::Bool(_) | Value::Number(_) => {}
                _ => return Err(invalid(&name, "extension attributes must be strings, numbers or booleans")),
            }
            extensions.insert(name, value);
        }
        Ok(CloudEvent { specversion, id, source, event_type, subject, time, datacontenttype, data, extensions })
    }

    /// The encoded event (structured mode); the bus publishes this, so an event that does not
    /// encode is an error, never an empty body.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// [`CloudEvent::encode`] for tests, sizes and logs: a failure is logged and gives no bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode().unwrap_or_else(|error| {
            tracing::error!(event_id = %self.id, %error, "an event did not encode");
            Vec::new()
        })
    }
}

fn take_required_string(object: &mut Map<String, Value>, name: &'static str) -> Result<String, EnvelopeError> {
    match object.remove(name) {
        None | Some(Value::Null) => Err(EnvelopeError::Missing(name)),
        Some(Value::String(text)) if text.is_empty() => Err(invalid(name, "must not be empty")),
        Some(Value::String(text)) => Ok(text),
        Some(other) => Err(invalid(name, format!("must be a string, got {}", json_kind(&other)))),
    }
}

fn take_optional_string(object: &mut Map<String, Value>, name: &str) -> Result<Option<String>, EnvelopeError> {
    match object.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(invalid(name, format!("must be a string, got {}", json_kind(&other)))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Event types are dotted lowercase names such as `session.open` or `container.ready`.
fn validate_event_type(event_type: &str) -> Result<(), EnvelopeError> {
    let well_formed = event_type.len() <= 128
        && event_type.split('.').count() >= 2
        && event_type
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'));
    if well_formed {
        Ok(())
    } else {
        Err(invalid("type", format!("must be dotted lowercase words like `session.open`, got {event_type:?}")))
    }
}

/// Extension names: lowercase ASCII letters and digits, at most 20 characters (CloudEvents 1.0).
pub fn validate_extension_name(name: &str) -> Result<(), EnvelopeError> {
    let spec_compliant = !name.is_empty() && name.len() <= 20 && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if CONTEXT_ATTRIBUTES.contains(&name) || spec_compliant {
        return Ok(());
    }
    Err(invalid(name, "extension attribute names must be 1-20 lowercase letters or digits"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ID: &str = "01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f";

    fn good() -> Value {
        json!({"specversion": "1.0", "id": ID, "source": "/tests", "type": "session.open",
               "subject": "s-1", "time": "2026-11-22T10:00:00Z", "data": {"user": "alice"}})
    }

    #[track_caller]
    fn check(mutate: impl FnOnce(&mut Map<String, Value>), expected: Result<(), &str>) {
        let Value::Object(mut object) = good() else { unreachable!() };
        mutate(&mut object);
        let bytes = serde_json::to_vec(&object).unwrap();
        let outcome = CloudEvent::parse(&bytes, DEFAULT_MAX_EVENT_BYTES).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(outcome, expected.map_err(str::to_owned));
    }

    #[test]
    fn envelope_validation_table() {
        check(|_| {}, Ok(()));
        check(
            |o| {
                o.remove("subject");
                o.remove("time");
                o.remove("data");
            },
            Ok(()),
        );
        check(
            |o| {
                o.insert("userid".into(), json!("alice"));
            },
            Ok(()),
        );
        check(
            |o| {
                o.insert("dataschema".into(), json!("https://example.org/s"));
            },
            Ok(()),
        );
        check(
            |o| {
                o.remove("specversion");
            },
            Err("required attribute `specversion` is missing"),
        );
        check(
            |o| {
                o.insert("specversion".into(), json!("0.3"));
            },
            Err("attribute `specversion` is invalid: must be \"1.0\", got \"0.3\""),
        );
        check(
            |o| {
                o.remove("id");
            },
            Err("required attribute `id` is missing"),
        );
        check(
            |o| {
                o.insert("id".into(), json!("42"));
            },
            Err("attribute `id` is invalid: must be a UUID, got \"42\""),
        );
        check(
            |o| {
                o.insert("id".into(), json!(42));
            },
            Err("attribute `id` is invalid: must be a string, got a number"),
        );
        check(
            |o| {
                o.remove("source");
            },
            Err("required attribute `source` is missing"),
        );
        check(
            |o| {
                o.insert("source".into(), json!(""));
            },
            Err("attribute `source` is invalid: must not be empty"),
        );
        check(
            |o| {
                o.remove("type");
            },
            Err("required attribute `type` is missing"),
        );
        check(
            |o| {
                o.insert("type".into(), json!("Open"));
            },
            Err("attribute `type` is invalid: must be dotted lowercase words like `session.open`, got \"Open\""),
        );
        check(
            |o| {
                o.insert("subject".into(), json!(""));
            },
            Err("attribute `subject` is invalid: must not be empty when present"),
        );
        check(
            |o| {
                o.insert("time".into(), json!("2026"));
            },
            Err("attribute `time` is invalid: must be RFC 3339 (premature end of input)"),
        );
        check(
            |o| {
                o.insert("datacontenttype".into(), json!("text/plain"));
            },
            Err("attribute `datacontenttype` is invalid: Berth carries JSON data only"),
        );
        check(
            |o| {
                o.insert("thred_id".into(), json!("x"));
            },
            Err("attribute `thred_id` is invalid: extension attribute names must be 1-20 lowercase letters or digits"),
        );
        check(
            |o| {
                o.insert("UserId".into(), json!("x"));
            },
            Err("attribute `UserId` is invalid: extension attribute names must be 1-20 lowercase letters or digits"),
        );
        check(
            |o| {
                o.insert("userid".into(), json!({"nested": true}));
            },
            Err("attribute `userid` is invalid: extension attributes must be strings, numbers or booleans"),
        );
        // Found by tests/properties.rs: a name from outside is shown escaped, never raw.
        check(
            |o| {
                o.insert("\0".into(), json!(null));
            },
            Err("attribute `\\0` is invalid: extension attribute names must be 1-20 lowercase letters or digits"),
        );
        check(
            |o| {
                o.insert("a\u{202E}b".into(), json!("x"));
            },
            Err("attribute `a\\u{202e}b` is invalid: extension attribute names must be 1-20 lowercase letters or digits"),
        );
        check(
            |o| {
                o.insert("data_base64".into(), json!("AAAA"));
            },
            Err("attribute `data_base64` is invalid: binary data is not accepted; send JSON in `data`"),
        );
    }

    #[test]
    fn size_limit_and_shape() {
        let big = json!({"specversion": "1.0", "id": ID, "source": "/t", "type": "a.b", "data": "x".repeat(300)});
        let bytes = serde_json::to_vec(&big).unwrap();
        assert_eq!(CloudEvent::parse(&bytes, 100).unwrap_err(), EnvelopeError::TooLarge { size: bytes.len(), limit: 100 });
        assert_eq!(CloudEvent::parse(b"[1]", 100).unwrap_err(), EnvelopeError::NotAnObject);
        assert!(matches!(CloudEvent::parse(b"{", 100).unwrap_err(), EnvelopeError::NotJson(_)));
    }

    #[test]
    fn round_trip_keeps_extensions() {
        let event = CloudEvent::new("session.open", "/t", Some("s-1"), json!({"a": 1})).with_extension("userid", "alice");
        let parsed = CloudEvent::parse(&event.to_bytes(), DEFAULT_MAX_EVENT_BYTES).unwrap();
        assert_eq!(parsed, event);
        assert_eq!(parsed.extension("userid"), Some("alice"));
    }
}
