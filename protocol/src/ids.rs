//! The identifiers every component passes around, each with its one validation: a value that
//! parses here is safe as a path segment, an object-key prefix, a container or directory name, an
//! AMQP routing-key word and a store key alike, so no component needs a rule of its own.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A value that is not a valid identifier of its kind, with the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?}: {rule}")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
    pub rule: &'static str,
}

/// Letters, digits and the given punctuation, `max` characters at most, not empty and not
/// starting with `.` (no hidden files, no `..`).
fn plain(text: &str, max: usize, punctuation: &[char]) -> bool {
    !text.is_empty()
        && text.len() <= max
        && !text.starts_with('.')
        && text.chars().all(|c| c.is_ascii_alphanumeric() || punctuation.contains(&c))
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $rule:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The rule, as error messages state it.
            pub const RULE: &'static str = $rule;

            pub fn parse(text: &str) -> Result<$name, IdError> {
                let check: fn(&str) -> bool = $check;
                if check(text) {
                    Ok($name(text.to_owned()))
                } else {
                    Err(IdError { kind: $kind, value: text.to_owned(), rule: $rule })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(text: String) -> Result<$name, IdError> {
                $name::parse(&text)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<$name, IdError> {
                $name::parse(text)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }

        // Compared with text as it is (a test's expectation, a path segment), without parsing it.
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

identifier!(
    /// A user: the subject of their token, a word of their notifications' routing key
    /// (`user.<id>`, so never `*` or `#`), a segment of their object-store prefix.
    UserId,
    "user id",
    "1 to 128 letters, digits, `-`, `_`, `.` or `@`, not starting with `.`",
    |text| plain(text, 128, &['-', '_', '.', '@'])
);

identifier!(
    /// One of a user's workspaces: a segment of its object-store prefix and of host paths.
    WorkspaceId,
    "workspace id",
    "1 to 128 letters, digits, `-`, `_` or `.`, not starting with `.`",
    |text| plain(text, 128, &['-', '_', '.'])
);

identifier!(
    /// A session (and a warm-pool slot): a container name, a directory name, a Redis key part.
    SessionId,
    "session id",
    "1 to 120 letters, digits, `-`, `_` or `.`, starting with a letter or digit",
    |text| plain(text, 120, &['-', '_', '.']) && text.starts_with(|c: char| c.is_ascii_alphanumeric())
);

identifier!(
    /// A store collection: a SQLite table name and a MongoDB collection name alike.
    CollectionName,
    "collection name",
    "1 to 64 lowercase letters, digits or `_`, starting with a letter",
    |text| {
        text.len() <= 64
            && text.starts_with(|c: char| c.is_ascii_lowercase())
            && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }
);

/// Checks the identifiers an event carries where every event puts them: its `subject` (the
/// session) and, when present, `data.user` and `data.workspace`.
pub fn check_event(event: &crate::CloudEvent) -> Result<(), IdError> {
    if let Some(session) = &event.subject {
        SessionId::parse(session)?;
    }
    let field = |name: &str| event.data.get(name).and_then(serde_json::Value::as_str);
    if let Some(user) = field("user") {
        UserId::parse(user)?;
    }
    if let Some(workspace) = field("workspace") {
        WorkspaceId::parse(workspace)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_one_rule() {
        for good in ["alice", "alice@example.org", "a.b", "spender-01a2_x"] {
            assert!(UserId::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "#", "a*", "a b", ".hidden", "..", "a/b", "ä", &"u".repeat(129)] {
            assert!(UserId::parse(bad).is_err(), "{bad}");
        }
        assert!(WorkspaceId::parse("thesis.v2").is_ok());
        assert!(WorkspaceId::parse("a@b").is_err());
        assert!(WorkspaceId::parse("..").is_err());
        assert!(SessionId::parse("s-01a2-b").is_ok());
        assert!(SessionId::parse("-s").is_err());
        assert!(SessionId::parse("s/1").is_err());
        assert!(SessionId::parse(&"s".repeat(121)).is_err());
        assert!(CollectionName::parse("sessions").is_ok());
        assert!(CollectionName::parse("usage_2").is_ok());
        for bad in ["", "Sessions", "my-sessions", "2fa", "a b"] {
            assert!(CollectionName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_kind_the_value_and_the_rule() {
        let error = UserId::parse("#").unwrap_err();
        assert_eq!(error.to_string(), format!("user id \"#\": {}", UserId::RULE));
    }

    #[test]
    fn ids_compare_with_text() {
        let user = UserId::parse("alice").unwrap();
        let text = String::from("alice");
        assert!(user == "alice" && user == *"alice" && user == text);
        assert!(user != "bob");
    }

    #[test]
    fn ids_read_from_json_are_checked() {
        let parsed: Result<SessionId, _> = serde_json::from_str("\"s-1\"");
        assert_eq!(parsed.map(String::from).ok().as_deref(), Some("s-1"));
        let refused: Result<UserId, _> = serde_json::from_str("\"#\"");
        assert!(refused.is_err());
    }
}
