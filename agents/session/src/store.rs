//! Reads session records from the persistence agent by request/reply: the current state of a
//! user's sessions (for the snapshot on connect) and a session's owner (for authorization).

use protocol::{AgentKind, Bus, Task};
use serde_json::{json, Value};

use crate::config::StoreRoute;
use crate::error::{Error, Result};

/// The collection holding one record per session.
const SESSIONS_COLLECTION: &str = "sessions";
/// The most sessions a snapshot lists.
const SNAPSHOT_LIMIT: u64 = 200;

/// A client of the persistence agent's query side.
#[derive(Clone)]
pub struct SessionStore {
    bus: Bus,
    route: StoreRoute,
}

impl SessionStore {
    pub fn new(bus: Bus, route: StoreRoute) -> SessionStore {
        SessionStore { bus, route }
    }

    /// The sessions of `user`, newest first; every session when `user` is `None`.
    pub async fn sessions_of(&self, user: Option<&str>) -> Result<Vec<Value>> {
        let filter = match user {
            Some(user) => json!({"user": {"eq": user}}),
            None => json!({}),
        };
        let args = json!({
            "collection": SESSIONS_COLLECTION,
            "filter": filter,
            "sort": [{"field": "created", "order": "desc"}],
            "limit": SNAPSHOT_LIMIT,
        });
        match self.request("find", args).await? {
            Value::Array(records) => Ok(records),
            Value::Null => Ok(Vec::new()),
            other => Err(Error::StoreReply(format!("`find` answered {other} instead of a list"))),
        }
    }

    /// One session record, or `None` when there is no such session.
    pub async fn session(&self, session: &str) -> Result<Option<Value>> {
        self.document(SESSIONS_COLLECTION, session).await
    }

    /// One document of `collection` by id, or `None`.
    pub async fn document(&self, collection: &str, id: &str) -> Result<Option<Value>> {
        let args = json!({"collection": collection, "id": id});
        match self.request("get", args).await {
            Ok(Value::Null) => Ok(None),
            Ok(record @ Value::Object(_)) => Ok(Some(record)),
            Ok(other) => Err(Error::StoreReply(format!("`get` answered {other} instead of a document"))),
            Err(Error::StoreRefused { kind, .. }) if kind == "not_found" => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn request(&self, action: &str, args: Value) -> Result<Value> {
        let task = Task {
            id: uuid::Uuid::now_v7(),
            agent: AgentKind::Persistence,
            action: action.to_owned(),
            session: None,
            thred: None,
            cause: None,
            args,
        };
        let reply = self
            .bus
            .request(&self.route.exchange, &self.route.routing_key, &task.to_bytes(), self.route.timeout)
            .await
            .map_err(|error| Error::StoreUnavailable(error.to_string()))?;
        parse_reply(&reply)
    }
}

/// `{"ok": true, "result": …}` or `{"ok": false, "error": {"kind", "message"}}`.
fn parse_reply(reply: &[u8]) -> Result<Value> {
    let mut value: Value = serde_json::from_slice(reply).map_err(|error| Error::StoreReply(error.to_string()))?;
    match value.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(value.get_mut("result").map(Value::take).unwrap_or(Value::Null)),
        Some(false) => {
            let error = value.get("error").cloned().unwrap_or(Value::Null);
            let field = |name: &str| error.get(name).and_then(Value::as_str).unwrap_or("unknown").to_owned();
            Err(Error::StoreRefused { kind: field("kind"), message: field("message") })
        }
        None => Err(Error::StoreReply("reply has no boolean `ok`".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert_eq!(parse_reply(br#"{"ok":true,"result":[1]}"#).unwrap(), json!([1]));
        assert_eq!(parse_reply(br#"{"ok":true}"#).unwrap(), Value::Null);
        assert!(matches!(
            parse_reply(br#"{"ok":false,"error":{"kind":"not_found","message":"x"}}"#),
            Err(Error::StoreRefused { kind, .. }) if kind == "not_found"
        ));
        assert!(matches!(parse_reply(b"nope"), Err(Error::StoreReply(_))));
    }
}
