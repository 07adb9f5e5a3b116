//! Reads session records from the persistence agent by request/reply (protocol's [`StoreClient`]):
//! the current state of a user's sessions (for the snapshot on connect) and a session's owner (for
//! authorization).

use protocol::store::{collections, ErrorKind, Filter, FindArgs, SortKey, SortOrder, StoreClient, StoreClientError, CREATED_FIELD};
use protocol::Bus;
use serde_json::Value;

use crate::config::StoreRoute;
use crate::error::{Error, Result};

/// The most sessions a snapshot lists.
const SNAPSHOT_LIMIT: u64 = 200;

/// A client of the persistence agent's query side.
#[derive(Clone)]
pub struct SessionStore {
    client: StoreClient,
}

impl SessionStore {
    pub fn new(bus: Bus, route: StoreRoute) -> SessionStore {
        let client = StoreClient::new(bus).with_exchange(&route.exchange).with_routing_key(&route.routing_key).with_timeout(route.timeout);
        SessionStore { client }
    }

    /// The sessions of `user`, newest first; every session when `user` is `None`.
    pub async fn sessions_of(&self, user: Option<&str>) -> Result<Vec<Value>> {
        let found = match user {
            Some(user) => self.client.sessions_of_user(user, SNAPSHOT_LIMIT).await,
            None => {
                let mut args = FindArgs::new(collections::SESSIONS, Filter::all());
                args.sort = vec![SortKey { field: CREATED_FIELD.to_owned(), order: SortOrder::Desc }];
                args.limit = Some(SNAPSHOT_LIMIT);
                self.client.find(args).await
            }
        };
        found.map_err(store_error)
    }

    /// One session record, or `None` when there is no such session.
    pub async fn session(&self, session: &str) -> Result<Option<Value>> {
        self.document(collections::SESSIONS, session).await
    }

    /// One document of `collection` by id, or `None`.
    pub async fn document(&self, collection: &str, id: &str) -> Result<Option<Value>> {
        match self.client.get(collection, id).await {
            Ok(None) => Ok(None),
            Ok(Some(record @ Value::Object(_))) => Ok(Some(record)),
            Ok(Some(other)) => Err(Error::StoreReply(format!("`get` answered {other} instead of a document"))),
            Err(StoreClientError::Refused { kind: ErrorKind::NotFound, .. }) => Ok(None),
            Err(error) => Err(store_error(error)),
        }
    }
}

fn store_error(error: StoreClientError) -> Error {
    match error {
        StoreClientError::Bus(error) => Error::StoreUnavailable(error.to_string()),
        StoreClientError::Refused { kind, message, .. } => Error::StoreRefused { kind: kind.as_str().to_owned(), message },
        StoreClientError::BadReply { message, .. } => Error::StoreReply(message),
    }
}
