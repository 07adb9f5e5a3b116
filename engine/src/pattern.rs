//! The pattern model: the strict, versioned JSON file format (`PatternSpec`, from which the JSON
//! Schema in `patterns/pattern.schema.json` is generated) and its validation into a compiled
//! [`Pattern`] whose guards and values are ready-to-run CEL programs.
//!
//! Every error names the file, the state (when there is one) and the field at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use protocol::AgentKind;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::expr::Expression;

/// The only pattern format version this build reads.
pub const PATTERN_VERSION: u32 = 1;
/// The timer a state's `timeout` runs on; pattern timers may not use this name.
pub const STATE_TIMEOUT_TIMER: &str = "state_timeout";
/// The event type the engine publishes when a timer fires.
pub const TIMER_FIRED: &str = protocol::events::kind::TIMER_FIRED;
/// Variables an expression may read.
const EXPRESSION_VARIABLES: [&str; 4] = ["ctx", "event", "thred", "now"];

// ---------------------------------------------------------------------------------------------
// The file format.

/// A pattern file: a state machine that threds run.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatternSpec {
    /// Optional pointer to the schema, for editors.
    #[serde(rename = "$schema", default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Format version; this build reads 1.
    pub version: u32,
    /// Pattern name: lowercase letters, digits, `-` and `_` (the file is `<name>.json`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// How an event that belongs to no thred starts one.
    pub start: StartSpec,
    /// The state a new thred is created in; the starting event is then applied to it.
    pub initial: String,
    /// A record upserted after every state change (e.g. the `sessions` collection).
    #[serde(default)]
    pub record: Option<RecordSpec>,
    /// Transitions every non-terminal state has, tried after the state's own `on`.
    #[serde(default)]
    pub any_state: Vec<TransitionSpec>,
    /// Event types every state ignores quietly unless it handles them.
    #[serde(default)]
    pub ignore_everywhere: Vec<String>,
    pub states: BTreeMap<String, StateSpec>,
}

/// Which events start a thred and what identifies "the same session".
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartSpec {
    /// Event types that start a thred when none is live for their key.
    pub events: Vec<String>,
    /// CEL: the thred key (e.g. `event.subject`). Later events bind by `subject` = key.
    pub key: String,
    /// At most this many live threds per key; further starting events go to the newest one.
    #[serde(default = "one")]
    pub max_live_per_key: u32,
    /// CEL over the new thred's context: a string naming what at most one live thred of this
    /// pattern may own at a time (e.g. a user's workspace). A starting event whose exclusive key
    /// is already owned *joins* the owner instead of starting a thred: it is applied to the owner
    /// (a state reacts to it, typically by telling the opener which session it joined). Enforced
    /// in the same Redis commit as the thred, so it holds across replicas and restarts.
    #[serde(default)]
    pub exclusive: Option<String>,
    /// Start only when no thred of any pattern is live for the key; otherwise the starting event
    /// is ignored (a recovery must never run beside the session it recovers).
    #[serde(default)]
    pub only_when_key_idle: bool,
    /// Threds of this pattern count against the profile's `[limits]`: live sessions and opens per
    /// user, and the host capacity they hold (the container's memory and CPUs).
    #[serde(default)]
    pub admission: Option<AdmissionSpec>,
    /// Threds of this pattern may claim a slot of the profile's warm pool (`[pool]`).
    #[serde(default)]
    pub pool: Option<PoolSpec>,
    /// CEL guard over the starting event; false sends the event to the dead-letter queue.
    #[serde(default)]
    pub validate: Option<String>,
    /// CEL values set in the new thred's context, in order (they may read `ctx`).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// How a pattern's threds are admitted. The service tells the starting step its verdict in
/// `ctx.admission` (`{verdict: admit|queue|refuse, limit, max, position}`), and the commit enforces
/// it atomically: a thred holds capacity in every live state except the waiting ones, and may only
/// leave a waiting state for a holding one when the capacity is free and no older thred waits.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSpec {
    /// The state where threds wait for capacity, first come first served.
    pub queue_state: String,
    /// States that hold no capacity (the initial state and the queue state at least).
    pub waiting_states: Vec<String>,
    /// The event the engine sends a waiting thred when capacity is free for it.
    pub admitted_event: String,
    /// Holding states metered at the idle price (a paused container holds memory, not CPU).
    #[serde(default)]
    pub idle_states: Vec<String>,
}

/// How a pattern's threds claim warm-pool slots. A new thred admitted at once gets a free slot of
/// the profile's pool, if there is one, in `ctx.<context>` (absent: the open goes cold); the claim
/// is committed with the thred, so two threds never get one slot.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// The context field that receives the claimed slot's id.
    pub context: String,
}

/// A record kept up to date with the thred's state.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordSpec {
    pub collection: String,
    /// Context fields copied into the record when present (besides `state`, `thred`, `pattern`).
    #[serde(default)]
    pub fields: Vec<String>,
}

/// One state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    #[serde(default)]
    pub description: String,
    /// A terminal state ends the thred: it has no transitions and no timeout.
    #[serde(default)]
    pub terminal: bool,
    /// Effects of entering the state (also on re-entry through a transition targeting it).
    #[serde(default)]
    pub on_enter: Vec<EffectSpec>,
    /// Transitions, tried in order; the first whose event (and timer) matches and guard holds wins.
    #[serde(default)]
    pub on: Vec<TransitionSpec>,
    /// Event types this state ignores quietly (anything else unhandled is logged as rejected).
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Leave the state when it has lasted this long.
    #[serde(default)]
    pub timeout: Option<TimeoutSpec>,
}

/// A transition.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransitionSpec {
    /// The event type (`timer.fired` together with `timer`).
    pub event: String,
    /// For `timer.fired`: the timer's name.
    #[serde(default)]
    pub timer: Option<String>,
    /// CEL guard; absent = always.
    #[serde(default)]
    pub guard: Option<String>,
    /// The next state; absent = stay (no exit, no entry effects). Naming the current state re-enters it.
    #[serde(default)]
    pub target: Option<String>,
    /// Effects of the transition, run before the target's `on_enter`.
    #[serde(default)]
    pub effects: Vec<EffectSpec>,
}

/// A state timeout.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutSpec {
    /// CEL: seconds (a number); zero or less means no timeout this time.
    pub after_secs: String,
    pub target: String,
    #[serde(default)]
    pub effects: Vec<EffectSpec>,
}

/// An effect; exactly one key.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EffectSpec {
    /// A task for an agent.
    Task(TaskSpec),
    /// A notification to the thred's user (`ctx.user`) with the state after the transition.
    Notify(NotifySpec),
    /// A persistence operation.
    Persist(PersistSpec),
    /// Starts (or restarts, superseding the previous one) a named timer.
    StartTimer(StartTimerSpec),
    /// Cancels a named timer; cancelling a timer that is not running does nothing.
    CancelTimer(CancelTimerSpec),
    /// Sets context values (CEL each), in order; later effects see them.
    Set(BTreeMap<String, String>),
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub agent: AgentName,
    pub action: String,
    /// Argument name → CEL value.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
}

/// The agent a task goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentName {
    Container,
    Workspace,
    Persistence,
    Session,
}

impl AgentName {
    pub fn kind(self) -> AgentKind {
        match self {
            AgentName::Container => AgentKind::Container,
            AgentName::Workspace => AgentKind::Workspace,
            AgentName::Persistence => AgentKind::Persistence,
            AgentName::Session => AgentKind::Session,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// CEL: the notification's `detail`.
    #[serde(default)]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PersistSpec {
    pub operation: PersistOperation,
    pub collection: String,
    /// CEL: the record id; absent = the task id.
    #[serde(default)]
    pub id: Option<String>,
    /// CEL: the document (a map).
    pub doc: String,
}

/// Fire-and-forget persistence operations a pattern may emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PersistOperation {
    Put,
    Upsert,
}

impl PersistOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            PersistOperation::Put => "put",
            PersistOperation::Upsert => "upsert",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartTimerSpec {
    pub timer: String,
    /// CEL: seconds (a number); zero or less starts nothing (e.g. autosave switched off).
    pub after_secs: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelTimerSpec {
    pub timer: String,
}

/// The JSON Schema of pattern files, as committed in `patterns/pattern.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(PatternSpec);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Why a pattern file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: line {line}, column {column}: {}", printable(.message))]
    Syntax { file: PathBuf, line: usize, column: usize, message: String },
    /// State and field names come from the file and are shown escaped; so is the reason, but for
    /// its line breaks (a CEL error points at the column on a second line).
    #[error("{file}: {}field `{}`: {}", state_prefix(.state), .field.escape_debug(), printable(.reason))]
    Invalid { file: PathBuf, state: Option<String>, field: String, reason: String },
}

fn state_prefix(state: &Option<String>) -> String {
    match state {
        Some(state) => format!("state `{}`: ", state.escape_debug()),
        None => String::new(),
    }
}

/// `text` with control characters other than line breaks, bidi controls and zero-width marks
/// escaped: names and expressions from a pattern file must not garble the message or a log line.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            let garbling = (c.is_control() && c != '\n')
                || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}');
            if garbling {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The compiled model.

/// A validated pattern, its expressions compiled.
#[derive(Debug)]
pub struct Pattern {
    pub name: String,
    pub version: u32,
    pub file: PathBuf,
    pub start: Start,
    pub initial: String,
    pub record: Option<RecordSpec>,
    pub any_state: Vec<Transition>,
    pub ignore_everywhere: BTreeSet<String>,
    pub states: BTreeMap<String, State>,
    /// Every event type the pattern mentions: an event type no pattern knows is dead-lettered.
    pub event_types: BTreeSet<String>,
    /// The specification it was compiled from.
    pub spec: PatternSpec,
}

#[derive(Debug)]
pub struct Start {
    pub events: BTreeSet<String>,
    pub key: Expression,
    pub max_live_per_key: u32,
    pub exclusive: Option<Expression>,
    pub only_when_key_idle: bool,
    pub admission: Option<AdmissionSpec>,
    pub pool: Option<PoolSpec>,
    pub validate: Option<Expression>,
    pub context: Vec<(String, Expression)>,
}

#[derive(Debug)]
pub struct State {
    pub name: String,
    pub terminal: bool,
    pub on_enter: Vec<EffectTemplate>,
    pub on: Vec<Transition>,
    pub ignore: BTreeSet<String>,
    pub timeout: Option<Timeout>,
}

#[derive(Debug)]
pub struct Transition {
    pub event: String,
    pub timer: Option<String>,
    pub guard: Option<Expression>,
    pub target: Option<String>,
    pub effects: Vec<EffectTemplate>,
}

#[derive(Debug)]
pub struct Timeout {
    pub after_secs: Expression,
    pub target: String,
    pub effects: Vec<EffectTemplate>,
}

/// An effect whose values are still expressions.
#[derive(Debug)]
pub enum EffectTemplate {
    Task { agent: AgentKind, action: String, args: Vec<(String, Expression)> },
    Notify { detail: Option<Expression> },
    Persist { operation: PersistOperation, collection: String, id: Option<Expression>, doc: Expression },
    StartTimer { timer: String, after_secs: Expression },
    CancelTimer { timer: String },
    Set(Vec<(String, Expression)>),
}

impl Pattern {
    pub fn state(&self, name: &str) -> Option<&State> {
        self.states.get(name)
    }

    /// Does this pattern know the event type at all?
    pub fn knows(&self, event_type: &str) -> bool {
        self.event_types.contains(event_type)
    }
}

// ---------------------------------------------------------------------------------------------
// Loading and validation.

/// Reads, parses and validates one pattern file.
pub fn load_pattern_file(path: &Path) -> Result<Pattern, PatternError> {
    let text = std::fs::read_to_string(path).map_err(|source| PatternError::Read { file: path.to_owned(), source })?;
    parse_pattern(&text, path)
}

/// Parses and validates pattern text; `file` names it in errors.
pub fn parse_pattern(text: &str, file: &Path) -> Result<Pattern, PatternError> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let spec: PatternSpec = match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(spec) => spec,
        Err(error) => {
            let path = error.path().to_string();
            let state_names: Vec<String> = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|value| Some(value.get("states")?.as_object()?.keys().cloned().collect()))
                .unwrap_or_default();
            let inner = error.into_inner();
            // serde_json reports some shape errors in valid JSON as syntax (an effect `{}` is
            // "expected value"): those are about a field, and say so.
            let valid_json = inner.is_syntax() && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
            if valid_json {
                let (state, field) = split_state_path(&path, &state_names);
                let mut reason = strip_position(&inner.to_string());
                if reason == "expected value" {
                    reason = "expected an object with exactly one key naming its kind (an effect is `task`, `notify`, `persist`, `start_timer`, `cancel_timer` or `set`)".to_owned();
                }
                return Err(PatternError::Invalid { file: file.to_owned(), state, field, reason });
            }
            if inner.is_syntax() || inner.is_eof() {
                return Err(PatternError::Syntax {
                    file: file.to_owned(),
                    line: inner.line(),
                    column: inner.column(),
                    message: strip_position(&inner.to_string()),
                });
            }
            let (state, field) = split_state_path(&path, &state_names);
            let reason = without_type_names(&strip_position(&inner.to_string()));
            return Err(PatternError::Invalid { file: file.to_owned(), state, field, reason });
        }
    };
    if let Err(error) = deserializer.end() {
        return Err(PatternError::Syntax {
            file: file.to_owned(),
            line: error.line(),
            column: error.column(),
            message: strip_position(&error.to_string()),
        });
    }
    Validator::new(file).compile(spec)
}

/// serde_json appends " at line L column C"; the error already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_owned(),
        None => message.to_owned(),
    }
}

/// serde names the Rust type it expected ("expected struct StateSpec"); a pattern's author
/// knows objects, not our types.
fn without_type_names(reason: &str) -> String {
    let mut text = reason.to_owned();
    for kind in ["struct ", "enum "] {
        while let Some(start) = text.find(&format!("expected {kind}")) {
            let name_start = start + "expected ".len() + kind.len();
            let name_end = text[name_start..].find(|c: char| !c.is_ascii_alphanumeric()).map_or(text.len(), |end| name_start + end);
            let replacement = if kind == "struct " { "expected an object" } else { "expected one of its kinds" };
            text.replace_range(start..name_end, replacement);
        }
    }
    text
}

/// `states.running.on[0].gaurd` → (Some("running"), "on[0].gaurd").
/// `states.running[0]` (a state that is not an object) → (Some("running"), "(state)").
/// `state_names` (the file's, when it is JSON) resolve names holding a `.` or `[`.
fn split_state_path(path: &str, state_names: &[String]) -> (Option<String>, String) {
    let Some(rest) = path.strip_prefix("states.") else { return (None, path.to_owned()) };
    let known = state_names
        .iter()
        .filter(|name| rest.strip_prefix(name.as_str()).is_some_and(|after| after.is_empty() || after.starts_with(['.', '['])))
        .max_by_key(|name| name.len());
    if let Some(name) = known {
        let field = rest[name.len()..].strip_prefix('.').filter(|field| !field.is_empty()).unwrap_or("(state)");
        return (Some(name.clone()), field.to_owned());
    }
    match rest.find(['.', '[']) {
        Some(end) if rest[end..].starts_with('.') && end + 1 < rest.len() => (Some(rest[..end].to_owned()), rest[end + 1..].to_owned()),
        Some(end) => (Some(rest[..end].to_owned()), "(state)".to_owned()),
        None => (Some(rest.to_owned()), "(state)".to_owned()),
    }
}

struct Validator {
    file: PathBuf,
    /// Timers some effect starts; transitions and cancels must name one of them.
    started_timers: BTreeSet<String>,
}

fn is_name(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn is_event_type(text: &str) -> bool {
    text.split('.').count() >= 2
        && text
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'))
}

fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Validator {
    fn new(file: &Path) -> Validator {
        Validator { file: file.to_owned(), started_timers: BTreeSet::new() }
    }

    fn error(&self, state: Option<&str>, field: &str, reason: impl Into<String>) -> PatternError {
        PatternError::Invalid { file: self.file.clone(), state: state.map(str::to_owned), field: field.to_owned(), reason: reason.into() }
    }

    fn expression(&self, state: Option<&str>, field: &str, source: &str) -> Result<Expression, PatternError> {
        let location = match state {
            Some(state) => format!("state `{state}`: `{field}`"),
            None => format!("`{field}`"),
        };
        let expression = Expression::compile_at(source, &location).map_err(|reason| self.error(state, field, reason))?;
        for variable in expression.variables() {
            if !EXPRESSION_VARIABLES.contains(&variable.as_str()) {
                return Err(self.error(
                    state,
                    field,
                    format!("unknown variable `{variable}` (expressions read ctx, event, thred and now)"),
                ));
            }
        }
        Ok(expression)
    }

    fn event_type(&self, state: Option<&str>, field: &str, event_type: &str) -> Result<(), PatternError> {
        if is_event_type(event_type) {
            Ok(())
        } else {
            Err(self.error(state, field, format!("{event_type:?} is not an event type (dotted lowercase words like `session.open`)")))
        }
    }

    fn collect_started_timers(&mut self, spec: &PatternSpec) {
        let mut lists: Vec<&Vec<EffectSpec>> = Vec::new();
        for transition in &spec.any_state {
            lists.push(&transition.effects);
        }
        for state in spec.states.values() {
            lists.push(&state.on_enter);
            for transition in &state.on {
                lists.push(&transition.effects);
            }
            if let Some(timeout) = &state.timeout {
                lists.push(&timeout.effects);
            }
        }
        for effects in lists {
            for effect in effects {
                if let EffectSpec::StartTimer(start) = effect {
                    self.started_timers.insert(start.timer.clone());
                }
            }
        }
    }

    fn compile(mut self, spec: PatternSpec) -> Result<Pattern, PatternError> {
        if spec.version != PATTERN_VERSION {
            return Err(self.error(None, "version", format!("this build reads version {PATTERN_VERSION}, got {}", spec.version)));
        }
        if !is_name(&spec.name) {
            return Err(self.error(None, "name", format!("{:?} must be lowercase letters, digits, `-` or `_`", spec.name)));
        }
        if spec.states.is_empty() {
            return Err(self.error(None, "states", "a pattern has at least one state"));
        }
        self.collect_started_timers(&spec);
        let start = self.compile_start(&spec.start)?;
        if !spec.states.contains_key(&spec.initial) {
            return Err(self.error(None, "initial", format!("no state named `{}`", spec.initial)));
        }
        if spec.states[&spec.initial].terminal {
            return Err(self.error(None, "initial", "the initial state cannot be terminal"));
        }
        if let Some(admission) = &spec.start.admission {
            for (field, state) in std::iter::once(("start.admission.queue_state".to_owned(), &admission.queue_state)).chain(
                admission
                    .waiting_states
                    .iter()
                    .enumerate()
                    .map(|(index, state)| (format!("start.admission.waiting_states[{index}]"), state)),
            ) {
                if !spec.states.contains_key(state) {
                    return Err(self.error(None, &field, format!("no state named `{state}`")));
                }
            }
            if !admission.waiting_states.contains(&admission.queue_state) || !admission.waiting_states.contains(&spec.initial) {
                return Err(self.error(None, "start.admission.waiting_states", "must name the initial state and the queue state"));
            }
            self.event_type(None, "start.admission.admitted_event", &admission.admitted_event)?;
        }
        if let Some(record) = &spec.record {
            if protocol::ids::CollectionName::parse(&record.collection).is_err() {
                return Err(self.error(None, "record.collection", protocol::ids::CollectionName::RULE));
            }
            for (index, field) in record.fields.iter().enumerate() {
                if !is_identifier(field) {
                    return Err(self.error(None, &format!("record.fields[{index}]"), format!("{field:?} is not a context field name")));
                }
            }
        }
        let mut event_types: BTreeSet<String> = start.events.clone();
        event_types.insert(TIMER_FIRED.to_owned());
        let mut any_state = Vec::new();
        for (index, transition) in spec.any_state.iter().enumerate() {
            let compiled = self.compile_transition(&spec, None, &format!("any_state[{index}]"), transition)?;
            event_types.insert(compiled.event.clone());
            any_state.push(compiled);
        }
        let mut ignore_everywhere = BTreeSet::new();
        for (index, event_type) in spec.ignore_everywhere.iter().enumerate() {
            self.event_type(None, &format!("ignore_everywhere[{index}]"), event_type)?;
            ignore_everywhere.insert(event_type.clone());
            event_types.insert(event_type.clone());
        }
        let mut states = BTreeMap::new();
        for (name, state_spec) in &spec.states {
            let state = self.compile_state(&spec, name, state_spec)?;
            for transition in &state.on {
                event_types.insert(transition.event.clone());
            }
            event_types.extend(state.ignore.iter().cloned());
            states.insert(name.clone(), state);
        }
        self.check_reachable(&spec)?;
        Ok(Pattern {
            name: spec.name.clone(),
            version: spec.version,
            file: self.file.clone(),
            start,
            initial: spec.initial.clone(),
            record: spec.record.clone(),
            any_state,
            ignore_everywhere,
            states,
            event_types,
            spec,
        })
    }

    fn compile_start(&self, start: &StartSpec) -> Result<Start, PatternError> {
        if start.events.is_empty() {
            return Err(self.error(None, "start.events", "name at least one event type that starts a thred"));
        }
        let mut events = BTreeSet::new();
        for (index, event_type) in start.events.iter().enumerate() {
            self.event_type(None, &format!("start.events[{index}]"), event_type)?;
            events.insert(event_type.clone());
        }
        if start.max_live_per_key == 0 {
            return Err(self.error(None, "start.max_live_per_key", "must be at least 1"));
        }
        let key = self.expression(None, "start.key", &start.key)?;
        let exclusive = match &start.exclusive {
            Some(source) => Some(self.expression(None, "start.exclusive", source)?),
            None => None,
        };
        let validate = match &start.validate {
            Some(source) => Some(self.expression(None, "start.validate", source)?),
            None => None,
        };
        if let Some(pool) = &start.pool {
            if !is_identifier(&pool.context) {
                return Err(self.error(None, "start.pool.context", "context names are identifiers"));
            }
            if start.admission.is_none() {
                return Err(self.error(None, "start.pool", "a pool slot is claimed only by an admitted thred: add start.admission"));
            }
        }
        let mut context = Vec::new();
        for (name, source) in &start.context {
            let field = format!("start.context.{name}");
            if !is_identifier(name) {
                return Err(self.error(None, &field, "context names are identifiers"));
            }
            context.push((name.clone(), self.expression(None, &field, source)?));
        }
        Ok(Start {
            events,
            key,
            max_live_per_key: start.max_live_per_key,
            exclusive,
            only_when_key_idle: start.only_when_key_idle,
            admission: start.admission.clone(),
            pool: start.pool.clone(),
            validate,
            context,
        })
    }

    fn compile_state(&self, spec: &PatternSpec, name: &str, state: &StateSpec) -> Result<State, PatternError> {
        let here = Some(name);
        if !is_name(name) {
            return Err(self.error(here, "(state)", "state names are lowercase letters, digits, `-` or `_`"));
        }
        if state.terminal && !state.on.is_empty() {
            return Err(self.error(here, "on", "a terminal state has no transitions"));
        }
        if state.terminal && state.timeout.is_some() {
            return Err(self.error(here, "timeout", "a terminal state has no timeout"));
        }
        let on_enter = self.compile_effects(here, "on_enter", &state.on_enter)?;
        let mut on = Vec::new();
        for (index, transition) in state.on.iter().enumerate() {
            on.push(self.compile_transition(spec, here, &format!("on[{index}]"), transition)?);
        }
        let mut ignore = BTreeSet::new();
        for (index, event_type) in state.ignore.iter().enumerate() {
            let field = format!("ignore[{index}]");
            self.event_type(here, &field, event_type)?;
            if on.iter().any(|transition| &transition.event == event_type) {
                return Err(self.error(here, &field, format!("`{event_type}` is both handled and ignored")));
            }
            ignore.insert(event_type.clone());
        }
        let timeout = match &state.timeout {
            None => None,
            Some(timeout) => {
                if !spec.states.contains_key(&timeout.target) {
                    return Err(self.error(here, "timeout.target", format!("no state named `{}`", timeout.target)));
                }
                Some(Timeout {
                    after_secs: self.expression(here, "timeout.after_secs", &timeout.after_secs)?,
                    target: timeout.target.clone(),
                    effects: self.compile_effects(here, "timeout.effects", &timeout.effects)?,
                })
            }
        };
        Ok(State { name: name.to_owned(), terminal: state.terminal, on_enter, on, ignore, timeout })
    }

    fn compile_transition(
        &self,
        spec: &PatternSpec,
        state: Option<&str>,
        field: &str,
        transition: &TransitionSpec,
    ) -> Result<Transition, PatternError> {
        self.event_type(state, &format!("{field}.event"), &transition.event)?;
        match (&transition.timer, transition.event == TIMER_FIRED) {
            (None, true) => return Err(self.error(state, &format!("{field}.timer"), "a `timer.fired` transition names its timer")),
            (Some(_), false) => return Err(self.error(state, &format!("{field}.timer"), "only `timer.fired` transitions name a timer")),
            (Some(timer), true) if !self.started_timers.contains(timer) => {
                return Err(self.error(state, &format!("{field}.timer"), format!("no effect ever starts timer `{timer}`")))
            }
            _ => {}
        }
        if let Some(target) = &transition.target {
            if !spec.states.contains_key(target) {
                return Err(self.error(state, &format!("{field}.target"), format!("no state named `{target}`")));
            }
        }
        let guard = match &transition.guard {
            Some(source) => Some(self.expression(state, &format!("{field}.guard"), source)?),
            None => None,
        };
        Ok(Transition {
            event: transition.event.clone(),
            timer: transition.timer.clone(),
            guard,
            target: transition.target.clone(),
            effects: self.compile_effects(state, &format!("{field}.effects"), &transition.effects)?,
        })
    }

    fn compile_effects(&self, state: Option<&str>, field: &str, effects: &[EffectSpec]) -> Result<Vec<EffectTemplate>, PatternError> {
        let mut compiled = Vec::new();
        for (index, effect) in effects.iter().enumerate() {
            let at = format!("{field}[{index}]");
            compiled.push(self.compile_effect(state, &at, effect)?);
        }
        Ok(compiled)
    }

    fn timer_name(&self, state: Option<&str>, field: &str, timer: &str) -> Result<(), PatternError> {
        if !is_identifier(timer) || timer.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(self.error(state, field, format!("{timer:?} is not a timer name (lowercase identifier)")));
        }
        if timer == STATE_TIMEOUT_TIMER {
            return Err(self.error(state, field, format!("`{STATE_TIMEOUT_TIMER}` is reserved for state timeouts")));
        }
        Ok(())
    }

    /// A container or workspace task must be one of `protocol::tasks` (CATALOGUE.md's Tasks table)
    /// and name only arguments its type has: the agent would dead-let anything else at run time,
    /// or ignore the argument a misspelling was meant to set. (Persistence work goes through
    /// `persist`; the session agent takes no tasks.)
    fn task_contract<'a>(
        &self,
        state: Option<&str>,
        at: &str,
        agent: AgentKind,
        action: &str,
        args: impl Iterator<Item = &'a String>,
    ) -> Result<(), PatternError> {
        if !matches!(agent, AgentKind::Container | AgentKind::Workspace) {
            return Ok(());
        }
        let Some(known) = protocol::tasks::arguments(agent, action) else {
            let actions = protocol::tasks::actions(agent).join(", ");
            return Err(self.error(
                state,
                &format!("{at}.task.action"),
                format!("the {agent} agent has no `{action}` task (it takes {actions})"),
            ));
        };
        if let Some(name) = args.into_iter().find(|name| !known.contains(&name.as_str())) {
            return Err(self.error(
                state,
                &format!("{at}.task.args.{name}"),
                format!("{agent} `{action}` takes no argument `{name}` (its arguments: {})", known.join(", ")),
            ));
        }
        Ok(())
    }

    fn compile_effect(&self, state: Option<&str>, at: &str, effect: &EffectSpec) -> Result<EffectTemplate, PatternError> {
        Ok(match effect {
            EffectSpec::Task(task) => {
                if !is_name(&task.action) {
                    return Err(self.error(state, &format!("{at}.task.action"), "actions are lowercase words"));
                }
                let agent = task.agent.kind();
                self.task_contract(state, at, agent, &task.action, task.args.keys())?;
                let mut args = Vec::new();
                for (name, source) in &task.args {
                    args.push((name.clone(), self.expression(state, &format!("{at}.task.args.{name}"), source)?));
                }
                EffectTemplate::Task { agent, action: task.action.clone(), args }
            }
            EffectSpec::Notify(notify) => EffectTemplate::Notify {
                detail: match &notify.detail {
                    Some(source) => Some(self.expression(state, &format!("{at}.notify.detail"), source)?),
                    None => None,
                },
            },
            EffectSpec::Persist(persist) => {
                if protocol::ids::CollectionName::parse(&persist.collection).is_err() {
                    return Err(self.error(state, &format!("{at}.persist.collection"), protocol::ids::CollectionName::RULE));
                }
                EffectTemplate::Persist {
                    operation: persist.operation,
                    collection: persist.collection.clone(),
                    id: match &persist.id {
                        Some(source) => Some(self.expression(state, &format!("{at}.persist.id"), source)?),
                        None => None,
                    },
                    doc: self.expression(state, &format!("{at}.persist.doc"), &persist.doc)?,
                }
            }
            EffectSpec::StartTimer(start) => {
                self.timer_name(state, &format!("{at}.start_timer.timer"), &start.timer)?;
                EffectTemplate::StartTimer {
                    timer: start.timer.clone(),
                    after_secs: self.expression(state, &format!("{at}.start_timer.after_secs"), &start.after_secs)?,
                }
            }
            EffectSpec::CancelTimer(cancel) => {
                let field = format!("{at}.cancel_timer.timer");
                self.timer_name(state, &field, &cancel.timer)?;
                if !self.started_timers.contains(&cancel.timer) {
                    return Err(self.error(state, &field, format!("no effect ever starts timer `{}`", cancel.timer)));
                }
                EffectTemplate::CancelTimer { timer: cancel.timer.clone() }
            }
            EffectSpec::Set(values) => {
                if values.is_empty() {
                    return Err(self.error(state, &format!("{at}.set"), "sets at least one value"));
                }
                let mut compiled = Vec::new();
                for (name, source) in values {
                    let field = format!("{at}.set.{name}");
                    if !is_identifier(name) {
                        return Err(self.error(state, &field, "context names are identifiers"));
                    }
                    compiled.push((name.clone(), self.expression(state, &field, source)?));
                }
                EffectTemplate::Set(compiled)
            }
        })
    }

    /// Every state must be reachable from the initial one: an unreachable state is a typo.
    fn check_reachable(&self, spec: &PatternSpec) -> Result<(), PatternError> {
        let mut reached = BTreeSet::new();
        let mut frontier = vec![spec.initial.clone()];
        let global_targets: Vec<&String> = spec.any_state.iter().filter_map(|t| t.target.as_ref()).collect();
        while let Some(name) = frontier.pop() {
            if !reached.insert(name.clone()) {
                continue;
            }
            let Some(state) = spec.states.get(&name) else { continue };
            let mut targets: Vec<&String> = state.on.iter().filter_map(|t| t.target.as_ref()).collect();
            if let Some(timeout) = &state.timeout {
                targets.push(&timeout.target);
            }
            if !state.terminal {
                targets.extend(global_targets.iter().copied());
            }
            frontier.extend(targets.into_iter().cloned());
        }
        match spec.states.keys().find(|name| !reached.contains(*name)) {
            Some(unreached) => {
                Err(self.error(Some(unreached), "(state)", format!("unreachable from the initial state `{}`", spec.initial)))
            }
            None => Ok(()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} v{} ({} states)", self.name, self.version, self.states.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn session_text() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../patterns/workspace-session.json")).unwrap()
    }

    /// Edits the workspace-session pattern as JSON and expects exactly `expected` back.
    #[track_caller]
    fn check(edit: impl FnOnce(&mut serde_json::Value), expected: Result<(), &str>) {
        let mut value: serde_json::Value = serde_json::from_str(&session_text()).unwrap();
        edit(&mut value);
        let text = serde_json::to_string_pretty(&value).unwrap();
        let outcome = parse_pattern(&text, Path::new("patterns/p.json")).map(|_| ()).map_err(|error| error.to_string());
        assert_eq!(outcome, expected.map_err(str::to_owned));
    }

    #[test]
    fn the_shipped_pattern_is_valid() {
        check(|_| {}, Ok(()));
    }

    #[test]
    fn malformed_patterns_are_rejected_with_file_state_and_field() {
        use serde_json::json;
        check(|p| p["version"] = json!(2), Err("patterns/p.json: field `version`: this build reads version 1, got 2"));
        check(|p| p["colour"] = json!("red"), Err("patterns/p.json: field `colour`: unknown field `colour`, expected one of `$schema`, `version`, `name`, `description`, `start`, `initial`, `record`, `any_state`, `ignore_everywhere`, `states`"));
        check(
            |p| p["states"]["running"]["on"][0]["gaurd"] = json!("true"),
            Err("patterns/p.json: state `running`: field `on[0].gaurd`: unknown field `gaurd`, expected one of `event`, `timer`, `guard`, `target`, `effects`"),
        );
        check(
            |p| p["states"]["idle"]["on"][1]["target"] = json!("stoping"),
            Err("patterns/p.json: state `idle`: field `on[1].target`: no state named `stoping`"),
        );
        check(
            |p| p["states"]["provisioning"]["on"][1]["guard"] = json!("ctx.provision_attempts <"),
            Err("patterns/p.json: state `provisioning`: field `on[1].guard`: CEL syntax error in \"ctx.provision_attempts <\""),
        );
        check(
            |p| p["states"]["running"]["on_enter"][0]["start_timer"]["after_secs"] = json!("context.timers.idle_after_secs"),
            Err("patterns/p.json: state `running`: field `on_enter[0].start_timer.after_secs`: unknown variable `context` (expressions read ctx, event, thred and now)"),
        );
        check(
            |p| p["states"]["running"]["on_enter"][0] = json!({"task": {"agent": "docker", "action": "x"}}),
            Err("patterns/p.json: state `running`: field `on_enter[0].task.agent`: unknown variant `docker`, expected one of `container`, `workspace`, `persistence`, `session`"),
        );
        check(
            |p| p["states"]["running"]["on_enter"][0] = json!({"task": {"agent": "container", "action": "reboot"}}),
            Err("patterns/p.json: state `running`: field `on_enter[0].task.action`: the container agent has no `reboot` task (it takes provision, claim, wake, probe, pause, resume, stop, remove, stats, pool_create, pool_remove)"),
        );
        check(
            |p| p["states"]["running"]["on_enter"][0] = json!({"task": {"agent": "workspace", "action": "sync", "args": {"user": "ctx.user", "workspace": "ctx.workspace", "finale": "true"}}}),
            Err("patterns/p.json: state `running`: field `on_enter[0].task.args.finale`: workspace `sync` takes no argument `finale` (its arguments: user, workspace, final)"),
        );
        check(
            |p| p["states"]["running"]["on_enter"][0] = json!({"launch": {}}),
            Err("patterns/p.json: state `running`: field `on_enter[0]`: unknown variant `launch`, expected one of `task`, `notify`, `persist`, `start_timer`, `cancel_timer`, `set`"),
        );
        check(
            |p| p["states"]["running"]["on"][2]["timer"] = json!("idel"),
            Err("patterns/p.json: state `running`: field `on[2].timer`: no effect ever starts timer `idel`"),
        );
        check(
            |p| p["states"]["stopped"]["on"] = json!([{"event": "session.open", "target": "open"}]),
            Err("patterns/p.json: state `stopped`: field `on`: a terminal state has no transitions"),
        );
        check(|p| p["initial"] = json!("opening"), Err("patterns/p.json: field `initial`: no state named `opening`"));
        check(
            |p| p["states"]["orphaned"] = json!({"terminal": true}),
            Err("patterns/p.json: state `orphaned`: field `(state)`: unreachable from the initial state `open`"),
        );
        check(
            |p| p["states"]["idle"]["ignore"][0] = json!("session.activity"),
            Err("patterns/p.json: state `idle`: field `ignore[0]`: `session.activity` is both handled and ignored"),
        );
        check(
            |p| p["start"]["events"] = json!(["Session.Open"]),
            Err("patterns/p.json: field `start.events[0]`: \"Session.Open\" is not an event type (dotted lowercase words like `session.open`)"),
        );
        check(
            |p| p["states"]["idle"]["on"][0]["event"] = json!(5),
            Err("patterns/p.json: state `idle`: field `on[0].event`: invalid type: integer `5`, expected a string"),
        );
        // Found by tests/pattern_properties.rs: an empty effect was a "syntax error" in valid JSON,
        // and names from the file were printed raw.
        check(
            |p| p["states"]["running"]["on_enter"][0] = json!({}),
            Err("patterns/p.json: state `running`: field `on_enter[0]`: expected an object with exactly one key naming its kind (an effect is `task`, `notify`, `persist`, `start_timer`, `cancel_timer` or `set`)"),
        );
        check(
            |p| p["states"]["a.b"] = json!(true),
            Err("patterns/p.json: state `a.b`: field `(state)`: invalid type: boolean `true`, expected an object"),
        );
        check(
            |p| p["states"]["idle"] = json!(true),
            Err("patterns/p.json: state `idle`: field `(state)`: invalid type: boolean `true`, expected an object"),
        );
        check(
            |p| p["states"]["idle"] = json!([null]),
            Err("patterns/p.json: state `idle`: field `(state)`: invalid type: null, expected a string"),
        );
        check(
            |p| p["colour\u{202E}"] = json!("red"),
            Err("patterns/p.json: field `colour\\u{202e}`: unknown field `colour\\u{202e}`, expected one of `$schema`, `version`, `name`, `description`, `start`, `initial`, `record`, `any_state`, `ignore_everywhere`, `states`"),
        );
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let error = parse_pattern("{\n  \"version\": 1,\n  oops\n}", Path::new("x.json")).unwrap_err().to_string();
        assert_eq!(error, "x.json: line 3, column 3: key must be a string");
    }

    /// The committed schema is the one the types generate. Regenerate with
    /// `BERTH_WRITE_SCHEMA=1 cargo test -p engine --lib committed_schema`.
    #[test]
    fn committed_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../patterns/pattern.schema.json");
        let generated = json_schema();
        if std::env::var_os("BERTH_WRITE_SCHEMA").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(committed == generated, "patterns/pattern.schema.json is stale: regenerate it (see this test's doc)");
    }
}
