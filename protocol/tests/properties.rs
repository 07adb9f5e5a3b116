//! Property tests of two edges of `protocol`: CloudEvent parsing and validation, and run-profile
//! loading. Hostile input (random bytes, JSON of random shape, deep nesting, huge strings, unicode
//! edge cases) and near-valid input (a valid event or profile with one field mutated, removed,
//! duplicated or given the wrong type) must never panic; every refusal is an error that says
//! clearly what is wrong and names the field; every acceptance round-trips.
//!
//! 256 cases per property unless `PROPTEST_CASES` says otherwise. No failure files are written
//! (`failure_persistence: None`): a failure prints its shrunk input and the seed, and
//! `PROPTEST_RNG_SEED=<seed>` replays it.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use protocol::event::{CloudEvent, DEFAULT_MAX_EVENT_BYTES};
use protocol::Profile;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Shared: configuration, hostile strings, the error-message checks.

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(256);
    let seed = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(rand_seed);
    // Printed with the test's output, which cargo shows when the test fails.
    println!("proptest seed {seed} (replay with PROPTEST_RNG_SEED={seed})");
    Config { cases, failure_persistence: None, rng_seed: RngSeed::Fixed(seed), ..Config::default() }
}

fn rand_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_nanos()).unwrap_or(0);
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// Pieces hostile strings are made of: path tricks, percent-encodings, controls, bidi marks.
const FRAGMENTS: &[&str] = &[
    "",
    ".",
    "..",
    "/",
    "\\",
    "../",
    "..\\",
    "%2e",
    "%2E%2E",
    "%2f",
    "%5c",
    "%252e",
    "%00",
    "\0",
    "\n",
    "\r\n",
    "\t",
    "\u{7f}",
    "\u{85}",
    "\u{200B}",
    "\u{200E}",
    "\u{200F}",
    "\u{202E}",
    "\u{2066}",
    "\u{2028}",
    "\u{FEFF}",
    "\u{FFFD}",
    "\u{FF0E}",
    "\u{FF0F}",
    "\u{2025}",
    "\u{1F600}",
    "e\u{301}",
    "\"",
    "'",
    "`",
    "{",
    "}",
    "[",
    "]",
    "$",
    "1.0",
    "session.open",
    "a",
    "Z",
    "-",
    "_",
    " ",
    "null",
    "true",
    "0",
    "-1",
    "1e999",
    "01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f",
];

/// Strings an attacker would try, short ones mostly, now and then a huge one.
fn hostile_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => prop::collection::vec(prop::sample::select(FRAGMENTS), 0..8).prop_map(|parts| parts.concat()),
        3 => any::<String>(),
        1 => "[a-z0-9.\\-_]{0,24}",
        1 => (prop::sample::select(FRAGMENTS), 1usize..70_000).prop_map(|(fragment, times)| fragment.repeat(times.min(300_000 / fragment.len().max(1)))),
    ]
    .boxed()
}

/// JSON values of random shape (bounded depth and width).
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |number| number.is_finite()).prop_map(Value::from),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(hostile_string(), inner, 0..6).prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
    .boxed()
}

/// `depth` nested arrays or objects: past serde's recursion limit, and far past it.
fn deeply_nested() -> BoxedStrategy<String> {
    (1usize..20_000, any::<bool>())
        .prop_map(|(depth, objects)| {
            if objects {
                format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
            } else {
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            }
        })
        .boxed()
}

/// What no error message shown to a client or an operator may contain.
const NOISE: &[&str] = &[
    "called `Option::unwrap()`",
    "called `Result::unwrap()`",
    "panicked at",
    "EnvelopeError",
    "ProfileError",
    "Value::",
    "Object {",
    "String(\"",
    "Some(\"",
    "Invalid {",
    "TooLarge {",
    "Parse {",
    "PathBuf",
];

/// The start of a value's debug form: enough to see it, never megabytes.
fn short(value: &impl std::fmt::Debug) -> String {
    let text = format!("{value:?}");
    match text.char_indices().nth(600) {
        Some((end, _)) => format!("{}… ({} bytes)", &text[..end], text.len()),
        None => text,
    }
}

fn check_clear(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.trim().is_empty(), "empty error message");
    for noise in NOISE {
        prop_assert!(!message.contains(noise), "error message carries debug noise {:?}: {}", noise, short(&message));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CloudEvents.

const ID: &str = "01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f";

fn valid_event() -> Map<String, Value> {
    let Value::Object(object) = json!({
        "specversion": "1.0", "id": ID, "source": "/tests", "type": "session.open", "subject": "s-1",
        "time": "2026-11-22T10:00:00Z", "datacontenttype": "application/json", "data": {"user": "alice"},
        "userid": "alice", "thredid": "t-1",
    }) else {
        unreachable!("a literal object")
    };
    object
}

/// One change to a valid event.
#[derive(Debug, Clone)]
enum EventMutation {
    Remove(String),
    Replace(String, Value),
    /// The attribute twice in the text, the second time with this value.
    Duplicate(String, Value),
    /// A new top-level member.
    Add(String, Value),
}

impl EventMutation {
    /// The attribute an error about this mutation must name.
    fn attribute(&self) -> &str {
        match self {
            EventMutation::Remove(name)
            | EventMutation::Replace(name, _)
            | EventMutation::Duplicate(name, _)
            | EventMutation::Add(name, _) => name,
        }
    }

    fn apply(&self) -> Vec<u8> {
        let mut object = valid_event();
        match self {
            EventMutation::Remove(name) => {
                object.remove(name);
            }
            EventMutation::Replace(name, value) | EventMutation::Add(name, value) => {
                object.insert(name.clone(), value.clone());
            }
            EventMutation::Duplicate(name, value) => {
                let text = serde_json::to_string(&object).unwrap_or_default();
                let extra = format!("{}:{}", Value::String(name.clone()), value);
                // The last occurrence wins in serde_json, so the mutated value comes last.
                return format!("{},{extra}}}", &text[..text.len().saturating_sub(1)]).into_bytes();
            }
        }
        serde_json::to_vec(&object).unwrap_or_default()
    }
}

/// Values of the wrong type, and of the right type but wrong or borderline content.
fn attribute_value() -> BoxedStrategy<Value> {
    prop_oneof![
        2 => any_json(),
        2 => hostile_string().prop_map(Value::String),
        1 => prop::sample::select(&[
            "", "1.0", "0.3", "1.0 ", "session.open", "Session.Open", "a..b", ".a", "a.", "a.b.c", "2026-11-22T10:00:00Z",
            "2026-11-22T10:00:00+14:00", "2026-11-22", "2026-06-30T23:59:60Z", "9999-12-31T23:59:59.999999999Z",
            "0000-01-01T00:00:00Z", "application/json", "application/cloudevents+json", "text/plain",
            "01936F0E-7D3A-7C4E-9A51-3D2A1B0C9E8F", "{01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f}", "urn:uuid:01936f0e-7d3a-7c4e-9a51-3d2a1b0c9e8f",
            "01936f0e7d3a7c4e9a513d2a1b0c9e8f", "00000000-0000-0000-0000-000000000000",
        ][..]).prop_map(|text| Value::String(text.to_owned())),
    ]
    .boxed()
}

fn event_mutation() -> impl Strategy<Value = EventMutation> {
    let known = prop::sample::select(
        &[
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "datacontenttype",
            "dataschema",
            "data",
            "data_base64",
            "userid",
            "thredid",
        ][..],
    )
    .prop_map(str::to_owned);
    let extension_name = prop_oneof![hostile_string(), "[a-z0-9]{1,24}", "[A-Za-z0-9_]{1,24}"];
    prop_oneof![
        known.clone().prop_map(EventMutation::Remove),
        (known.clone(), attribute_value()).prop_map(|(name, value)| EventMutation::Replace(name, value)),
        (known, attribute_value()).prop_map(|(name, value)| EventMutation::Duplicate(name, value)),
        (extension_name, attribute_value()).prop_map(|(name, value)| EventMutation::Add(name, value)),
    ]
}

/// Refusals are clear, and acceptances survive serialize → parse unchanged.
fn check_event(bytes: &[u8]) -> Result<Result<CloudEvent, String>, TestCaseError> {
    match CloudEvent::parse(bytes, DEFAULT_MAX_EVENT_BYTES) {
        Ok(event) => {
            let again = CloudEvent::parse(&event.to_bytes(), DEFAULT_MAX_EVENT_BYTES);
            prop_assert!(again.as_ref() == Ok(&event), "serialize → parse changed the event: {} became {}", short(&event), short(&again));
            Ok(Ok(event))
        }
        Err(error) => {
            let message = error.to_string();
            check_clear(&message)?;
            Ok(Err(message))
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn event_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = check_event(&bytes)?;
    }

    #[test]
    fn event_random_json_is_refused_clearly_or_round_trips(value in any_json()) {
        let _ = check_event(&serde_json::to_vec(&value).unwrap_or_default())?;
    }

    #[test]
    fn event_deep_nesting_is_refused_clearly(text in deeply_nested()) {
        let _ = check_event(text.as_bytes())?;
        let inside = format!(r#"{{"specversion":"1.0","id":"{ID}","source":"/t","type":"a.b","data":{text}}}"#);
        let _ = check_event(inside.as_bytes())?;
    }

    #[test]
    fn event_one_mutation_is_accepted_or_refused_by_name(mutation in event_mutation()) {
        if let Err(message) = check_event(&mutation.apply())? {
            let attribute = mutation.attribute();
            // An attribute name is shown escaped, so a control or bidi character in it cannot
            // garble the message or a log line.
            let shown = attribute.escape_debug().to_string();
            prop_assert!(
                message.contains(&format!("`{shown}`")) || message.contains("over the limit") || message.contains("not valid JSON"),
                "{} does not name `{shown}`", short(&message)
            );
        }
    }

    #[test]
    fn event_error_messages_carry_no_raw_control_or_bidi_characters(mutation in event_mutation()) {
        if let Err(message) = check_event(&mutation.apply())? {
            prop_assert!(!message.chars().any(is_garbling), "raw control or bidi character in {}", short(&message));
        }
    }

    #[test]
    fn event_over_the_limit_is_refused_before_parsing(extra in 0usize..4096, limit in 0usize..2048) {
        let bytes = vec![b'{'; limit + 1 + extra];
        let message = CloudEvent::parse(&bytes, limit).map(|_| ()).map_err(|error| error.to_string());
        prop_assert_eq!(message, Err(format!("event is {} bytes, over the limit of {limit} bytes", limit + 1 + extra)));
    }

    #[test]
    fn constructed_events_round_trip(
        event_type in "[a-z][a-z0-9_-]{0,8}\\.[a-z][a-z0-9_-]{0,8}",
        source in hostile_string().prop_filter("source is required", |source| !source.is_empty()),
        subject in proptest::option::of(hostile_string().prop_filter("subject is non-empty", |subject| !subject.is_empty())),
        data in any_json(),
        extension in "[a-z0-9]{1,20}",
        extension_value in hostile_string(),
    ) {
        prop_assume!(!["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"].contains(&extension.as_str()));
        let event = CloudEvent::new(&event_type, &source, subject.as_deref(), data).with_extension(&extension, extension_value);
        let bytes = event.to_bytes();
        prop_assume!(bytes.len() <= DEFAULT_MAX_EVENT_BYTES);
        prop_assert_eq!(check_event(&bytes)?, Ok(event));
    }
}

/// Characters that, printed raw, garble a message or a terminal: controls (a newline among them),
/// bidi overrides and isolates, zero-width characters.
fn is_garbling(character: char) -> bool {
    character.is_control() || matches!(character, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

// ---------------------------------------------------------------------------------------------
// Run-profiles.

fn dev_profile_text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../run-profiles/dev/profile.toml")).unwrap_or_default()
}

fn dev_profile_table() -> toml::Table {
    toml::from_str(&dev_profile_text()).unwrap_or_default()
}

/// Every path to a value in a TOML table (`container.memory_mib`, `users[0].id`).
fn value_paths(table: &toml::Table) -> Vec<Vec<PathStep>> {
    fn walk(value: &toml::Value, here: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
        out.push(here.clone());
        match value {
            toml::Value::Table(table) => {
                for (key, child) in table {
                    here.push(PathStep::Key(key.clone()));
                    walk(child, here, out);
                    here.pop();
                }
            }
            toml::Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    here.push(PathStep::Index(index));
                    walk(child, here, out);
                    here.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&toml::Value::Table(table.clone()), &mut Vec::new(), &mut out);
    out.retain(|path| !path.is_empty());
    out
}

#[derive(Debug, Clone, PartialEq)]
enum PathStep {
    Key(String),
    Index(usize),
}

/// One change to the dev profile at one path.
#[derive(Debug, Clone)]
enum ProfileMutation {
    Remove,
    Replace(toml::Value),
    /// A sibling key nobody reads.
    AddUnknown(String),
}

fn toml_value() -> BoxedStrategy<toml::Value> {
    let leaf = prop_oneof![
        hostile_string().prop_map(toml::Value::String),
        any::<i64>().prop_map(toml::Value::Integer),
        prop::sample::select(&[0i64, -1, 1, 5, 6, 20, 21, 1024, 1025, 65535, 65536, i64::MAX, i64::MIN][..]).prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        prop::sample::select(&[0.0, -0.0, 0.5, 64.0, 64.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY][..]).prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        prop::sample::select(
            &[
                "/",
                "/srv/berth/x:/x:ro",
                "/srv/berth:/x:ro",
                "/srv/berth/../etc:/e:ro",
                "/var/run/docker.sock:/s",
                "CHOWN",
                "SYS_ADMIN",
                "runc",
                "runsc",
                "kata",
                "10.0.0.0/8",
                "10.0.0.1/8",
                "::1",
                "{user}/{workspace}",
                "{user}",
                "tcp",
                "docker",
                "Staging",
                "a..b",
                "example.org",
                "Example.org",
                "/home/user",
                "/proc/x",
                "../x",
                "",
            ][..]
        )
        .prop_map(|text| toml::Value::String(text.to_owned())),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}|http|tcp|docker|cidr|port", inner, 0..3)
                .prop_map(|map| toml::Value::Table(map.into_iter().collect())),
        ]
    })
    .boxed()
}

fn profile_mutation() -> impl Strategy<Value = (Vec<PathStep>, ProfileMutation)> {
    let paths = value_paths(&dev_profile_table());
    let mutation = prop_oneof![
        1 => Just(ProfileMutation::Remove),
        4 => toml_value().prop_map(ProfileMutation::Replace),
        1 => "[a-z_]{1,12}".prop_map(ProfileMutation::AddUnknown),
    ];
    (prop::sample::select(paths), mutation)
}

/// Applies `mutation` at `path`; `None` when the path does not lead anywhere any more.
fn mutate_profile(path: &[PathStep], mutation: &ProfileMutation) -> Option<toml::Table> {
    let mut root = toml::Value::Table(dev_profile_table());
    let (last, parents) = path.split_last()?;
    let mut parent = &mut root;
    for step in parents {
        parent = match (step, parent) {
            (PathStep::Key(key), toml::Value::Table(table)) => table.get_mut(key)?,
            (PathStep::Index(index), toml::Value::Array(items)) => items.get_mut(*index)?,
            _ => return None,
        };
    }
    match (last, parent, mutation) {
        (PathStep::Key(key), toml::Value::Table(table), ProfileMutation::Remove) => {
            table.remove(key);
        }
        (PathStep::Key(key), toml::Value::Table(table), ProfileMutation::Replace(value)) => {
            table.insert(key.clone(), value.clone());
        }
        (PathStep::Key(_), toml::Value::Table(table), ProfileMutation::AddUnknown(name)) => {
            table.entry(name.clone()).or_insert(toml::Value::Integer(1));
        }
        (PathStep::Index(index), toml::Value::Array(items), ProfileMutation::Remove) => {
            items.remove(*index);
        }
        (PathStep::Index(index), toml::Value::Array(items), ProfileMutation::Replace(value)) => {
            items[*index] = value.clone();
        }
        (PathStep::Index(_), toml::Value::Array(items), ProfileMutation::AddUnknown(name)) => {
            items.push(toml::Value::String(name.clone()));
        }
        _ => return None,
    }
    match root {
        toml::Value::Table(table) => Some(table),
        _ => None,
    }
}

/// Names one of which the error must mention: the innermost key of the path or the table
/// holding it; for a new unknown key, also its name.
fn named_keys(path: &[PathStep], mutation: &ProfileMutation) -> Vec<String> {
    let keys: Vec<String> = path
        .iter()
        .filter_map(|step| match step {
            PathStep::Key(key) => Some(key.clone()),
            PathStep::Index(_) => None,
        })
        .collect();
    // The table holding the change: serde refuses a table as a whole ("wanted exactly 1
    // element") and TOML's error then shows the table's line.
    let mut names: Vec<String> = keys.iter().rev().take(2).cloned().collect();
    if let (ProfileMutation::AddUnknown(name), Some(PathStep::Key(_))) = (mutation, path.last()) {
        names.push(name.clone());
    }
    names
}

/// Whether `text` has more than 255 quotes in a row, which the TOML writer (toml_write 0.1.2, a
/// `u8` counter) cannot serialize without overflowing. Berth never writes TOML; only the round
/// trip here does, so such cases skip it.
fn has_long_quote_run(text: &str) -> bool {
    let mut run = (0usize, 0u8);
    for byte in text.bytes() {
        run = if byte == b'"' || byte == b'\'' {
            if run.1 == byte {
                (run.0 + 1, byte)
            } else {
                (1, byte)
            }
        } else {
            (0, 0)
        };
        if run.0 > 200 {
            return true;
        }
    }
    false
}

/// The keys of every table within `value`.
fn keys_within(value: &toml::Value) -> Vec<String> {
    match value {
        toml::Value::Array(items) => items.iter().flat_map(keys_within).collect(),
        toml::Value::Table(table) => table.iter().flat_map(|(key, child)| std::iter::once(key.clone()).chain(keys_within(child))).collect(),
        _ => Vec::new(),
    }
}

fn string_values(value: &toml::Value) -> Vec<String> {
    match value {
        toml::Value::String(text) => vec![text.clone()],
        toml::Value::Array(items) => items.iter().flat_map(string_values).collect(),
        toml::Value::Table(table) => {
            table.iter().flat_map(|(key, child)| std::iter::once(key.clone()).chain(string_values(child))).collect()
        }
        _ => Vec::new(),
    }
}

/// Refusals are clear, and an accepted profile survives Profile → TOML → Profile unchanged.
fn check_profile(text: &str) -> Result<Result<Profile, String>, TestCaseError> {
    let path = Path::new("run-profiles/fuzz/profile.toml");
    match Profile::parse(text, path) {
        Ok(profile) if has_long_quote_run(text) => Ok(Ok(profile)),
        Ok(profile) => {
            let serialized = toml::to_string(&profile);
            let serialized = match serialized {
                Ok(serialized) => serialized,
                Err(error) => return Err(TestCaseError::fail(format!("an accepted profile does not serialize: {error}"))),
            };
            let again = Profile::parse(&serialized, path).map_err(|error| error.to_string());
            prop_assert!(
                again.as_ref() == Ok(&profile),
                "Profile → TOML → Profile changed it: {} became {}",
                short(&profile),
                short(&again)
            );
            Ok(Ok(profile))
        }
        Err(error) => {
            let message = error.to_string();
            check_clear(&message)?;
            prop_assert!(message.contains("run-profiles/fuzz/profile.toml"), "{} does not name the file", short(&message));
            Ok(Err(message))
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn profile_random_text_is_refused_clearly(text in prop_oneof![hostile_string(), any::<String>()]) {
        let _ = check_profile(&text)?;
    }

    #[test]
    fn profile_deep_nesting_is_refused_clearly(depth in 1usize..20_000, inline_tables in any::<bool>()) {
        let text = if inline_tables {
            format!("version = {}1{}", "{ a = ".repeat(depth), " }".repeat(depth))
        } else {
            format!("version = {}1{}", "[".repeat(depth), "]".repeat(depth))
        };
        let _ = check_profile(&text)?;
    }

    #[test]
    fn profile_one_mutation_is_accepted_or_refused_by_name((path, mutation) in profile_mutation()) {
        let Some(table) = mutate_profile(&path, &mutation) else { return Ok(()) };
        prop_assume!(!string_values(&toml::Value::Table(table.clone())).iter().any(|text| has_long_quote_run(text)));
        let Ok(text) = toml::to_string(&table) else { return Ok(()) };
        if let Err(message) = check_profile(&text)? {
            let keys = named_keys(&path, &mutation);
            // A table replaced by another may be refused for a key inside the new one (TOML's
            // errors show the line at fault).
            let inner_keys: Vec<String> = match &mutation {
                ProfileMutation::Replace(value) => keys_within(value),
                _ => Vec::new(),
            };
            prop_assert!(
                keys.iter().chain(&inner_keys).any(|key| message.contains(key.as_str())),
                "{} does not name one of {:?}", short(&message), keys
            );
            // Berth's own checks (not TOML's) name the very field, not just its table.
            if !message.contains("TOML parse error") && inner_keys.is_empty() {
                let field = match (&mutation, path.last()) {
                    (ProfileMutation::AddUnknown(name), Some(PathStep::Key(_))) => name.clone(),
                    _ => keys.first().cloned().unwrap_or_default(),
                };
                prop_assert!(message.contains(&field), "{} does not name `{}`", short(&message), field);
            }
        }
    }

    #[test]
    fn profile_text_edits_are_accepted_or_refused_clearly(at in any::<prop::sample::Index>(), insert in hostile_string(), cut in 0usize..16) {
        let text = dev_profile_text();
        let mut boundary = at.index(text.len() + 1);
        while !text.is_char_boundary(boundary) {
            boundary -= 1;
        }
        let mut end = (boundary + cut).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let edited = format!("{}{insert}{}", &text[..boundary], &text[end..]);
        let _ = check_profile(&edited)?;
    }
}

#[test]
fn the_dev_profile_round_trips() {
    assert!(matches!(check_profile(&dev_profile_text()), Ok(Ok(_))));
}
