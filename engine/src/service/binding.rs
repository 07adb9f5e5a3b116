//! Which thred an event belongs to: a pure decision over the patterns, the event's type and what
//! the store read for it (the thred its `thredid` names, the live threds of its subject). The
//! engine reads, binds, steps and commits; a commit that finds the read outdated (a conflict)
//! reads and binds again, so binding itself never touches Redis.

use crate::core::Thred;
use crate::pattern::Pattern;

/// What binding read from Redis.
pub(super) struct BindingRead {
    /// The thred the event's `thredid` names, if it exists.
    pub(super) named: Option<Thred>,
    /// The live threds of the event's subject, newest first.
    pub(super) live: Vec<Thred>,
}

/// How an event was bound.
pub(super) enum Binding<'a> {
    /// Boxed: a thred is large next to the other variants.
    Existing(&'a Pattern, Box<Thred>),
    Start(&'a Pattern),
    Orphan,
}

/// Binds an event of `event_type`: to the thred its `thredid` names (if that thred's pattern is
/// loaded); else it starts a thred of the first pattern it starts whose limits on the subject's
/// live threds allow one; else to the newest live thred of the subject whose pattern knows it;
/// else it is an orphan.
pub(super) fn bind<'a>(patterns: &'a [Pattern], event_type: &str, read: BindingRead) -> Binding<'a> {
    let pattern_named = |name: &str| patterns.iter().find(|pattern| pattern.name == name);
    if let Some(thred) = read.named {
        if let Some(pattern) = pattern_named(&thred.pattern) {
            return Binding::Existing(pattern, Box::new(thred));
        }
    }
    let live = read.live;
    for pattern in patterns {
        if !pattern.start.events.contains(event_type) {
            continue;
        }
        if pattern.start.only_when_key_idle && !live.is_empty() {
            continue;
        }
        let live_of_pattern = live.iter().filter(|thred| thred.pattern == pattern.name).count();
        if live_of_pattern < pattern.start.max_live_per_key as usize {
            return Binding::Start(pattern);
        }
    }
    for thred in live {
        if let Some(pattern) = pattern_named(&thred.pattern) {
            if pattern.knows(event_type) {
                return Binding::Existing(pattern, Box::new(thred));
            }
        }
    }
    Binding::Orphan
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use serde_json::{json, Map, Value};

    use super::*;
    use crate::pattern::parse_pattern;

    fn shipped(file: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../patterns").join(file);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn pattern(mut spec: Value, edit: impl FnOnce(&mut Value)) -> Pattern {
        edit(&mut spec);
        parse_pattern(&spec.to_string(), Path::new("patterns/p.json")).unwrap_or_else(|error| panic!("{error}"))
    }

    /// The shipped session and recovery patterns, in the order the engine loads them.
    fn patterns() -> Vec<Pattern> {
        vec![pattern(shipped("workspace-session.json"), |_| {}), pattern(shipped("workspace-recovery.json"), |_| {})]
    }

    fn thred(id: &str, pattern: &str, created_ms: i64) -> Thred {
        Thred {
            id: id.to_owned(),
            pattern: pattern.to_owned(),
            key: "s-1".to_owned(),
            exclusive: None,
            state: "running".to_owned(),
            context: Map::new(),
            timers: BTreeMap::new(),
            last_timer_generation: 0,
            version: 1,
            created_ms,
            updated_ms: created_ms,
            ended: false,
            host: None,
        }
    }

    fn read(named: Option<Thred>, live: Vec<Thred>) -> BindingRead {
        BindingRead { named, live }
    }

    /// `existing <pattern> <thred>`, `start <pattern>` or `orphan`.
    fn describe(binding: Binding<'_>) -> String {
        match binding {
            Binding::Existing(pattern, thred) => format!("existing {} {}", pattern.name, thred.id),
            Binding::Start(pattern) => format!("start {}", pattern.name),
            Binding::Orphan => "orphan".to_owned(),
        }
    }

    #[test]
    fn the_named_thred_wins_over_the_subject_and_over_starting() {
        let patterns = patterns();
        let live = vec![thred("live", "workspace-session", 2)];
        let bound = bind(&patterns, "session.open", read(Some(thred("named", "workspace-session", 1)), live));
        assert_eq!(describe(bound), "existing workspace-session named");
    }

    #[test]
    fn a_named_thred_of_an_unloaded_pattern_is_bound_as_if_unnamed() {
        let patterns = patterns();
        let bound = bind(&patterns, "session.open", read(Some(thred("named", "retired-pattern", 1)), Vec::new()));
        assert_eq!(describe(bound), "start workspace-session");
        let live = vec![thred("live", "workspace-session", 2)];
        let bound = bind(&patterns, "session.move", read(Some(thred("named", "retired-pattern", 1)), live));
        assert_eq!(describe(bound), "existing workspace-session live");
    }

    #[test]
    fn a_starting_event_on_an_idle_subject_starts_its_pattern() {
        let patterns = patterns();
        assert_eq!(describe(bind(&patterns, "session.open", read(None, Vec::new()))), "start workspace-session");
        assert_eq!(describe(bind(&patterns, "session.recover", read(None, Vec::new()))), "start workspace-recovery");
    }

    #[test]
    fn only_when_key_idle_starts_nothing_next_to_any_live_thred() {
        let patterns = patterns();
        // A live session thred: the recovery pattern does not start, and the session pattern
        // does not know `session.recover`, so the event is an orphan.
        let live = vec![thred("live", "workspace-session", 1)];
        assert_eq!(describe(bind(&patterns, "session.recover", read(None, live))), "orphan");
        // A second open of a live session joins the live thred instead of starting another.
        let live = vec![thred("live", "workspace-session", 1)];
        assert_eq!(describe(bind(&patterns, "session.open", read(None, live))), "existing workspace-session live");
    }

    #[test]
    fn max_live_per_key_counts_only_the_patterns_own_threds() {
        let two_per_key = |spec: &mut Value| {
            spec["start"]["only_when_key_idle"] = json!(false);
            spec["start"]["max_live_per_key"] = json!(2);
        };
        let patterns = vec![pattern(shipped("workspace-session.json"), two_per_key), pattern(shipped("workspace-recovery.json"), |_| {})];
        let one = vec![thred("a", "workspace-session", 1), thred("r", "workspace-recovery", 2)];
        assert_eq!(describe(bind(&patterns, "session.open", read(None, one))), "start workspace-session");
        let two = vec![thred("b", "workspace-session", 3), thred("a", "workspace-session", 1)];
        assert_eq!(describe(bind(&patterns, "session.open", read(None, two))), "existing workspace-session b");
    }

    #[test]
    fn other_events_go_to_the_newest_live_thred_whose_pattern_knows_them() {
        let patterns = patterns();
        // Newest first, as the store reads them: the recovery thred does not know `session.move`.
        let live = vec![
            thred("recovery", "workspace-recovery", 3),
            thred("newer", "workspace-session", 2),
            thred("older", "workspace-session", 1),
        ];
        assert_eq!(describe(bind(&patterns, "session.move", read(None, live))), "existing workspace-session newer");
    }

    #[test]
    fn an_event_nobody_starts_or_knows_is_an_orphan() {
        let patterns = patterns();
        assert_eq!(describe(bind(&patterns, "session.move", read(None, Vec::new()))), "orphan");
        let live = vec![thred("gone", "retired-pattern", 1)];
        assert_eq!(describe(bind(&patterns, "session.move", read(None, live))), "orphan");
    }
}
