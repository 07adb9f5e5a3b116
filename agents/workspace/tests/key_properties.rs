//! Property tests of the door between object keys and local paths (`WorkspacePath`).
//!
//! The security property, tested hard: a key (or relative path) the agent accepts NEVER maps to a
//! path outside the workspace directory, however the key was built (parsed, percent-encoded by
//! object_store, raw parts) and whatever a tool does to the name afterwards: no `..` or `.`
//! segment, nothing absolute, no backslash, NUL or control character, and neither percent-decoding
//! (to a fixpoint) nor Unicode normalization (NFC, NFD, NFKC, NFKD) of an accepted name yields a
//! dot segment or a separator. Besides: an accepted path round-trips path → key → path verbatim,
//! and every refusal is a clear, non-empty message.
//!
//! 256 cases per property unless `PROPTEST_CASES` says otherwise. No failure files are written
//! (`failure_persistence: None`): a failure prints its shrunk input and the seed, and
//! `PROPTEST_RNG_SEED=<seed>` replays it.

use std::path::{Component, Path, PathBuf};

use object_store::path::{Path as ObjectPath, PathPart};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use unicode_normalization::UnicodeNormalization;
use workspace::WorkspacePath;

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

/// Pieces of names an attacker would try: dot segments, separators, their percent-encodings
/// (single, double, mixed case, overlong UTF-8), their fullwidth and compatibility look-alikes,
/// controls, bidi and zero-width marks, combining characters.
const FRAGMENTS: &[&str] = &[
    ".",
    "..",
    "...",
    "/",
    "\\",
    "%2e",
    "%2E",
    "%2e%2e",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "%25",
    "%252e",
    "%25252e",
    "%252f",
    "%c0%ae",
    "%C0%AF",
    "%e0%80%ae",
    "%00",
    "%0a",
    "%7f",
    "%c2%85",
    "%ef%bc%8e",
    "%",
    "%%",
    "%2",
    "\0",
    "\n",
    "\r",
    "\t",
    "\u{7f}",
    "\u{85}",
    "\u{2028}",
    "\u{200B}",
    "\u{200D}",
    "\u{200E}",
    "\u{202E}",
    "\u{2066}",
    "\u{FEFF}",
    "\u{FFFD}",
    "\u{FF0E}",
    "\u{FF0F}",
    "\u{FF3C}",
    "\u{2024}",
    "\u{2025}",
    "\u{2026}",
    "\u{FE52}",
    "\u{FE68}",
    "\u{FE30}",
    "\u{2044}",
    "\u{2215}",
    "\u{FF05}",
    "\u{FF12}",
    "\u{FF25}",
    "\u{2100}",
    "\u{0307}",
    "e\u{301}",
    "\u{1F600}",
    "a",
    "b",
    "Z",
    "0",
    " ",
    "-",
    "_",
    "~",
    "$",
    "{",
    "}",
    "#",
    "?",
    "*",
    "|",
    "<",
    ">",
    ":",
    "\"",
    "'",
    "CON",
    "nul",
];

fn segment() -> BoxedStrategy<String> {
    prop_oneof![
        6 => prop::collection::vec(prop::sample::select(FRAGMENTS), 1..6).prop_map(|parts| parts.concat()),
        2 => any::<String>(),
        1 => "[a-zA-Z0-9._ -]{1,16}",
        1 => (prop::sample::select(FRAGMENTS), 1usize..300).prop_map(|(fragment, times)| fragment.repeat(times)),
    ]
    .boxed()
}

/// A `/`-separated relative path (or something that tries to pass for one).
fn relative_path() -> BoxedStrategy<String> {
    prop_oneof![
        8 => prop::collection::vec(segment(), 1..6).prop_map(|segments| segments.join("/")),
        1 => prop::collection::vec(segment(), 1..4).prop_map(|segments| format!("/{}", segments.join("/"))),
        1 => (segment(), 1usize..2000).prop_map(|(segment, times)| vec![segment; times].join("/")),
    ]
    .boxed()
}

const PREFIX: &str = "dev/alice/w1";

fn prefix() -> ObjectPath {
    ObjectPath::from(PREFIX)
}

/// Keys under the prefix, built every way a key reaches the agent: parsed from text (as a store
/// listing does), percent-encoded part by part by object_store, raw parts, or from a URL path.
fn key() -> BoxedStrategy<ObjectPath> {
    let parsed =
        relative_path().prop_filter_map("object_store refuses the text", |rest| ObjectPath::parse(format!("{PREFIX}/{rest}")).ok());
    let encoded = prop::collection::vec(segment(), 0..5).prop_map(|segments| {
        prefix().parts().chain(segments.iter().map(|segment| PathPart::from(segment.as_str()))).collect::<ObjectPath>()
    });
    let raw_parts = prop::collection::vec(segment(), 1..5).prop_filter_map("a part object_store refuses", |segments| {
        let parts: Option<Vec<PathPart<'static>>> =
            segments.iter().map(|segment| PathPart::parse(segment).ok().map(|part| PathPart::from(part.as_ref().to_owned()))).collect();
        let parts = parts?;
        Some(prefix().parts().chain(parts).collect::<ObjectPath>())
    });
    let url = relative_path().prop_filter_map("not a URL path", |rest| ObjectPath::from_url_path(format!("{PREFIX}/{rest}")).ok());
    prop_oneof![3 => parsed, 3 => encoded, 2 => raw_parts, 1 => url].boxed()
}

/// Decodes `%XX` escapes (invalid UTF-8 replaced), as a tool downstream might.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            if let (Some(high), Some(low)) = ((bytes[index + 1] as char).to_digit(16), (bytes[index + 2] as char).to_digit(16)) {
                decoded.push((high * 16 + low) as u8);
                index += 3;
                continue;
            }
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Every form a tool might turn a name into: as is, Unicode-normalized four ways, and
/// percent-decoded up to three times after each of those (and normalized again).
fn derived_forms(segment: &str) -> Vec<String> {
    let mut forms = Vec::new();
    let normalized = [
        segment.to_owned(),
        segment.nfc().collect::<String>(),
        segment.nfd().collect::<String>(),
        segment.nfkc().collect::<String>(),
        segment.nfkd().collect::<String>(),
    ];
    for form in normalized {
        let mut current = form;
        for _ in 0..3 {
            forms.push(current.clone());
            forms.push(current.nfkc().collect());
            let next = percent_decode(&current);
            if next == current {
                break;
            }
            current = next;
        }
        forms.push(current);
    }
    forms
}

/// Why an accepted path could reach outside the workspace, if it could.
fn escape(path: &WorkspacePath) -> Option<String> {
    let text = path.as_str();
    if text.is_empty() {
        return Some("empty".to_owned());
    }
    if text.contains(['\\', '\0']) || text.chars().any(char::is_control) {
        return Some(format!("backslash, NUL or control character in {text:?}"));
    }
    let lexical = Path::new(text);
    if let Some(component) = lexical.components().find(|component| !matches!(component, Component::Normal(_))) {
        return Some(format!("component {component:?} in {text:?}"));
    }
    let root = PathBuf::from("/srv/berth/workspaces/root-0/session-1");
    let under = path.under(&root);
    let segments = text.split('/').count();
    if !under.starts_with(&root) || under.components().count() != root.components().count() + segments {
        return Some(format!("{text:?} joined to {} gives {}", root.display(), under.display()));
    }
    for segment in text.split('/') {
        if segment.is_empty() {
            return Some(format!("empty segment in {text:?}"));
        }
        for form in derived_forms(segment) {
            if form == "." || form == ".." || form.contains(['/', '\\', '\0']) {
                return Some(format!("segment {segment:?} of {text:?} becomes {form:?} once decoded or normalized"));
            }
        }
    }
    None
}

/// What no refusal may look like.
fn check_refusal(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.trim().is_empty(), "empty refusal");
    for noise in ["called `Option::unwrap()`", "panicked at", "PathPart {", "Path {", "raw:", "InvalidPart"] {
        prop_assert!(!message.contains(noise), "refusal carries debug noise {:?}: {:?}", noise, message);
    }
    prop_assert!(!message.chars().any(is_garbling), "refusal prints a control or bidi character raw: {:?}", message);
    Ok(())
}

/// Characters that, printed raw, garble a message or a log line.
fn is_garbling(character: char) -> bool {
    character.is_control() || matches!(character, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

proptest! {
    #![proptest_config(config())]

    /// The security property, over keys built every way.
    #[test]
    fn an_accepted_key_never_maps_outside_the_workspace(key in key()) {
        match WorkspacePath::from_key(&key, &prefix()) {
            Ok(path) => {
                prop_assert_eq!(escape(&path), None);
                // The key is exactly the local path under the prefix.
                prop_assert_eq!(key.as_ref(), format!("{PREFIX}/{}", path.as_str()));
            }
            Err(message) => check_refusal(&message)?,
        }
    }

    /// The same over relative paths (a local walk, the sidecar tree, a manifest).
    #[test]
    fn an_accepted_relative_path_never_leaves_the_workspace(relative in relative_path()) {
        match WorkspacePath::parse(&relative) {
            Ok(path) => {
                prop_assert_eq!(escape(&path), None);
                prop_assert_eq!(path.as_str(), relative.as_str());
            }
            Err(message) => check_refusal(&message)?,
        }
    }

    /// path → key → path gives the same path; the key is the path verbatim under the prefix.
    #[test]
    fn accepted_paths_round_trip_through_keys(relative in relative_path()) {
        let Ok(path) = WorkspacePath::parse(&relative) else { return Ok(()) };
        let key = path.to_key(&prefix());
        prop_assert_eq!(key.as_ref(), format!("{PREFIX}/{relative}"));
        prop_assert_eq!(WorkspacePath::from_key(&key, &prefix()), Ok(path.clone()));
        // And through the text a store lists.
        let listed = ObjectPath::parse(key.as_ref());
        prop_assert!(listed.is_ok(), "the key {:?} does not parse back", key.as_ref());
        if let Ok(listed) = listed {
            prop_assert_eq!(WorkspacePath::from_key(&listed, &prefix()), Ok(path));
        }
    }

    /// Siblings and parents are checked like any path.
    #[test]
    fn derived_paths_stay_inside(relative in relative_path(), name in segment()) {
        let Ok(path) = WorkspacePath::parse(&relative) else { return Ok(()) };
        if let Some(parent) = path.parent() {
            prop_assert_eq!(escape(&parent), None);
        }
        match path.with_file_name(&name) {
            Ok(sibling) => prop_assert_eq!(escape(&sibling), None),
            Err(message) => check_refusal(&message)?,
        }
    }

    /// A key outside the prefix (a sibling workspace, a prefix of the prefix) is refused.
    #[test]
    fn keys_outside_the_prefix_are_refused(rest in relative_path(), neighbour in prop::sample::select(&["dev/alice/w10", "dev/alice", "dev/alice/w", "dev/bob/w1", "dev/alice/w1x"][..])) {
        let Ok(key) = ObjectPath::parse(format!("{neighbour}/{rest}")) else { return Ok(()) };
        prop_assume!(!key.as_ref().starts_with(&format!("{PREFIX}/")));
        let outcome = WorkspacePath::from_key(&key, &prefix());
        prop_assert!(outcome.is_err(), "{:?} was accepted under {PREFIX}", key.as_ref());
        if let Err(message) = outcome {
            check_refusal(&message)?;
        }
    }
}

/// Shrunk cases the properties found, kept as plain tests.
#[test]
fn found_by_the_properties() {
    let refused = |relative: &str| WorkspacePath::parse(relative).is_err();
    // Fullwidth full stops and the two dot leader are `..` to any tool that applies NFKC.
    assert!(refused("\u{FF0E}\u{FF0E}"), "fullwidth ..");
    assert!(refused("a/\u{2025}"), "two dot leader");
    assert!(refused("\u{FE52}"), "small full stop");
    assert!(refused("a\u{FF0F}b"), "fullwidth solidus");
    // Fullwidth percent-encodings: NFKC gives `%2E%2E`.
    assert!(refused("\u{FF05}\u{FF12}\u{FF25}\u{FF05}\u{FF12}\u{FF25}"), "fullwidth %2E%2E");
    // Names that merely contain such characters are fine.
    assert!(WorkspacePath::parse("notes/file\u{FF0E}txt").is_ok());
    assert!(WorkspacePath::parse("pleadings/Ünïcode name (1).pdf").is_ok());
}
