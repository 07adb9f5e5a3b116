//! Property tests of pattern loading (`parse_pattern`): hostile text and the shipped
//! `patterns/workspace-session.json` with one mutation (a value removed, replaced by one of the
//! wrong type or a hostile one, an unknown key added, a state renamed) must never panic, and are
//! either accepted or refused with an error naming the file and, where there is one, the state and
//! the field at fault; a refusal carries no debug noise and no raw control or bidi character.
//!
//! 256 cases per property unless `PROPTEST_CASES` says otherwise. No failure files are written
//! (`failure_persistence: None`): a failure prints its shrunk input and the seed, and
//! `PROPTEST_RNG_SEED=<seed>` replays it.

use std::path::Path;

use engine::pattern::{parse_pattern, PatternError};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::Value;

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

const FILE: &str = "patterns/fuzzed.json";

fn seed_text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../patterns/workspace-session.json")).unwrap_or_default()
}

fn seed_value() -> Value {
    serde_json::from_str(&seed_text()).unwrap_or(Value::Null)
}

/// Pieces of hostile strings, CEL included.
const FRAGMENTS: &[&str] = &[
    "",
    ".",
    "..",
    "/",
    "\\",
    "\0",
    "\n",
    "\t",
    "\u{7f}",
    "\u{85}",
    "\u{200B}",
    "\u{202E}",
    "\u{2066}",
    "\u{FEFF}",
    "\u{FFFD}",
    "\u{1F600}",
    "e\u{301}",
    "\"",
    "'",
    "`",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "!",
    "?",
    ":",
    "+",
    "-",
    "*",
    "/",
    "%",
    "==",
    "&&",
    "||",
    "<",
    ">=",
    "ctx",
    "event",
    "thred",
    "now",
    "context",
    "has(",
    "size(",
    "int(",
    "string(",
    "ctx.user",
    "event.data.x",
    "1",
    "0",
    "-1",
    "9223372036854775807",
    "1e999",
    "0x",
    "1.5",
    "true",
    "null",
    "'a'",
    "\"b\"",
    "b'\\xff'",
    "r'x'",
    "\\u",
    "\\U0010FFFF",
    "\\x",
    "'''",
    "\"\"\"",
    "session.open",
    "timer.fired",
    "idle",
    "state_timeout",
    "stopping",
    "running",
    "Session.Open",
    "a.b",
    "a..b",
];

fn hostile_string() -> BoxedStrategy<String> {
    prop_oneof![
        5 => prop::collection::vec(prop::sample::select(FRAGMENTS), 0..10).prop_map(|parts| parts.concat()),
        2 => any::<String>(),
        1 => (prop::sample::select(FRAGMENTS), 1usize..5000).prop_map(|(fragment, times)| fragment.repeat(times)),
    ]
    .boxed()
}

fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![0u64, 1, 2, 4_294_967_295, 4_294_967_296, u64::MAX]).prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |number| number.is_finite()).prop_map(Value::from),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop_oneof![hostile_string(), "[a-z_]{1,10}"], inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
    .boxed()
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Every path to a value in the seed (`states.running.on[0].guard`).
fn value_paths(value: &Value) -> Vec<Vec<Step>> {
    fn walk(value: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        out.push(here.clone());
        match value {
            Value::Object(object) => {
                for (key, child) in object {
                    here.push(Step::Key(key.clone()));
                    walk(child, here, out);
                    here.pop();
                }
            }
            Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    here.push(Step::Index(index));
                    walk(child, here, out);
                    here.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, &mut Vec::new(), &mut out);
    out.retain(|path| !path.is_empty());
    out
}

/// `states.running.on[0].guard`, the way errors spell paths.
fn spell(path: &[Step]) -> String {
    let mut text = String::new();
    for step in path {
        match step {
            Step::Key(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Step::Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    text
}

#[derive(Debug, Clone)]
enum Mutation {
    Remove,
    Replace(Value),
    /// A key nobody reads, next to the value at the path.
    AddUnknown(String),
    /// The object key at the path renamed (a state, a context name, a timer).
    Rename(String),
}

fn mutation() -> impl Strategy<Value = (Vec<Step>, Mutation)> {
    let paths = value_paths(&seed_value());
    let values = prop_oneof![
        3 => any_json(),
        3 => hostile_string().prop_map(Value::String),
        1 => prop::sample::select(&[
            "ctx.nope +", "unknown_variable", "ctx.user + 1", "has(event.data.x) ?", "size(ctx.preserved) > 0", "1 / 0",
            "'a' * 2", "[1, 2, 3][5]", "{'a': 1}.b", "ctx.timers.idle_after_secs", "\u{0}", "(((((((((((((((((((((1)))))))))))))))))))))",
        ][..]).prop_map(|text| Value::String(text.to_owned())),
    ];
    let mutations = prop_oneof![
        1 => Just(Mutation::Remove),
        5 => values.prop_map(Mutation::Replace),
        1 => prop_oneof!["[a-z_]{1,10}", hostile_string()].prop_map(Mutation::AddUnknown),
        1 => prop_oneof!["[a-z_]{1,10}", hostile_string()].prop_map(Mutation::Rename),
    ];
    (prop::sample::select(paths), mutations)
}

/// Applies the mutation; `None` when it does not apply (e.g. renaming an array element).
fn apply(path: &[Step], mutation: &Mutation) -> Option<Value> {
    let mut root = seed_value();
    let (last, parents) = path.split_last()?;
    let mut parent = &mut root;
    for step in parents {
        parent = match (step, parent) {
            (Step::Key(key), Value::Object(object)) => object.get_mut(key)?,
            (Step::Index(index), Value::Array(items)) => items.get_mut(*index)?,
            _ => return None,
        };
    }
    match (last, parent, mutation) {
        (Step::Key(key), Value::Object(object), Mutation::Remove) => {
            object.remove(key);
        }
        (Step::Key(key), Value::Object(object), Mutation::Replace(value)) => {
            object.insert(key.clone(), value.clone());
        }
        (Step::Key(_), Value::Object(object), Mutation::AddUnknown(name)) => {
            object.entry(name.clone()).or_insert(Value::Bool(true));
        }
        (Step::Key(key), Value::Object(object), Mutation::Rename(name)) => {
            let value = object.remove(key)?;
            object.insert(name.clone(), value);
        }
        (Step::Index(index), Value::Array(items), Mutation::Remove) => {
            items.remove(*index);
        }
        (Step::Index(index), Value::Array(items), Mutation::Replace(value)) => {
            items[*index] = value.clone();
        }
        _ => return None,
    }
    Some(root)
}

/// Characters that, printed raw, garble a message or a log line (a newline among them).
fn is_garbling(character: char) -> bool {
    character.is_control() || matches!(character, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// The start of a value's text: enough to see it, never megabytes.
fn short(text: &str) -> String {
    match text.char_indices().nth(600) {
        Some((end, _)) => format!("{:?}… ({} bytes)", &text[..end], text.len()),
        None => format!("{text:?}"),
    }
}

/// Parses `text`; a refusal must be clear and name the file.
fn check(text: &str) -> Result<Option<PatternError>, TestCaseError> {
    let Err(error) = parse_pattern(text, Path::new(FILE)) else { return Ok(None) };
    let message = error.to_string();
    prop_assert!(message.starts_with(&format!("{FILE}: ")), "{} does not start with the file", short(&message));
    prop_assert!(message.len() > FILE.len() + 2, "empty reason: {}", short(&message));
    for noise in [
        "called `Option::unwrap()`",
        "called `Result::unwrap()`",
        "panicked at",
        "PatternError",
        "Invalid {",
        "Syntax {",
        "Error(\"",
        "Value::",
        "Expression(",
        "Spec",
    ] {
        prop_assert!(!message.contains(noise), "debug noise {:?} in {}", noise, short(&message));
    }
    // Line breaks may structure a reason (a CEL error points at the column on a second line).
    prop_assert!(!message.chars().any(|c| c != '\n' && is_garbling(c)), "raw control or bidi character in {}", short(&message));
    prop_assert!(!message.lines().next().unwrap_or_default().contains('\n'));
    Ok(Some(error))
}

/// Errors that are about a reference between two places (a target, a timer, reachability): they
/// may name the other end rather than the mutated field.
const CROSS_REFERENCES: &[&str] = &[
    "no state named",
    "unreachable from the initial state",
    "no effect ever starts timer",
    "must name the initial state",
    "is both handled and ignored",
    "the initial state cannot be terminal",
    "a terminal state has no",
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_text_is_refused_clearly(text in prop_oneof![hostile_string(), any::<String>()]) {
        let _ = check(&text)?;
    }

    #[test]
    fn random_json_is_refused_clearly(value in any_json()) {
        let _ = check(&value.to_string())?;
    }

    #[test]
    fn deep_nesting_is_refused_clearly(depth in 1usize..20_000, objects in any::<bool>()) {
        let text = if objects {
            format!("{}1{}", "{\"states\":".repeat(depth), "}".repeat(depth))
        } else {
            format!("{{\"version\": 1, \"states\": {}{}}}", "[".repeat(depth), "]".repeat(depth))
        };
        let _ = check(&text)?;
    }

    #[test]
    fn text_edits_of_the_seed_are_accepted_or_refused_clearly(at in any::<prop::sample::Index>(), insert in hostile_string(), cut in 0usize..24) {
        let text = seed_text();
        let mut start = at.index(text.len() + 1);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (start + cut).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let _ = check(&format!("{}{insert}{}", &text[..start], &text[end..]))?;
    }

    #[test]
    fn one_mutation_is_accepted_or_refused_naming_file_state_and_field((path, mutation) in mutation()) {
        let Some(mutated) = apply(&path, &mutation) else { return Ok(()) };
        let Some(error) = check(&serde_json::to_string_pretty(&mutated).unwrap_or_default())? else { return Ok(()) };
        let PatternError::Invalid { state, field, reason, .. } = &error else {
            return Err(TestCaseError::fail(format!("a mutation of valid JSON gave a syntax error: {error}")));
        };
        // Empty only when the file has an empty key, which the error then shows as ``.
        prop_assert!(!field.is_empty() || reason.contains("unknown field ``"), "no field named: {}", error);
        let states: Vec<String> = mutated.get("states").and_then(Value::as_object).map(|states| states.keys().cloned().collect()).unwrap_or_default();
        if let Some(state) = state {
            prop_assert!(states.contains(state), "{} names state {:?}, which the pattern does not have", error, state);
        }
        if CROSS_REFERENCES.iter().any(|phrase| reason.contains(phrase)) {
            return Ok(());
        }
        // The error's place and the mutation's place: one contains the other.
        let error_path = match state {
            Some(state) if field == "(state)" => format!("states.{state}"),
            Some(state) => format!("states.{state}.{field}"),
            None => field.clone(),
        };
        let mutated_path = match &mutation {
            Mutation::Rename(name) => spell(&[&path[..path.len() - 1], &[Step::Key(name.clone())]].concat()),
            Mutation::AddUnknown(name) if matches!(path.last(), Some(Step::Key(_))) => spell(&[&path[..path.len() - 1], &[Step::Key(name.clone())]].concat()),
            _ => spell(&path),
        };
        let parent_path = spell(&path[..path.len() - 1]);
        let related = mutated_path.starts_with(&error_path)
            || error_path.starts_with(&mutated_path)
            || (!parent_path.is_empty() && error_path.starts_with(&parent_path))
            || error_path.is_empty()
            || parent_path.is_empty();
        prop_assert!(related, "the error is about {:?}, the mutation about {:?}: {}", error_path, mutated_path, error);
    }
}

#[test]
fn the_seed_is_valid() {
    assert!(parse_pattern(&seed_text(), Path::new(FILE)).is_ok());
}
