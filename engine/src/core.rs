//! The pure core: `start` and `step` apply a pattern to a thred and an event and return the new
//! thred and the effects to carry out. No IO, no clock: time comes in as `now_ms`.

use std::collections::BTreeMap;

use protocol::AgentKind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::expr::{json_object_to_cel, json_to_cel, CelScope, Expression, Scope};
use crate::pattern::{EffectTemplate, Pattern, PersistOperation, Transition, STATE_TIMEOUT_TIMER, TIMER_FIRED};

/// Collection of the audit trail: one record per state change.
pub const AUDIT_COLLECTION: &str = "events";

/// A running instance of a pattern.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thred {
    pub id: String,
    pub pattern: String,
    /// What identifies "the same session": events bind to the thred by `subject` = key.
    pub key: String,
    /// What this thred owns exclusively while live (`start.exclusive`), e.g. `dev/alice/thesis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<String>,
    pub state: String,
    pub context: Map<String, Value>,
    /// Running timers by name.
    #[serde(default)]
    pub timers: BTreeMap<String, RunningTimer>,
    /// Generations only grow, so a superseded timer's late firing is recognised and dropped.
    #[serde(default)]
    pub last_timer_generation: u64,
    /// Bumped by the store at every commit (optimistic concurrency).
    #[serde(default)]
    pub version: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// In a terminal state.
    #[serde(default)]
    pub ended: bool,
    /// The host the service placed this thred on (`placement.rs`): its tasks for host-affine
    /// agents go to that host's queues. The core never changes it; it shows it to expressions
    /// (`thred.host`) and writes it to the pattern's record as `host_id` (the session agent's
    /// door finds the host of a session's terminal and files there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningTimer {
    pub generation: u64,
    pub deadline_ms: i64,
}

/// An event as the core sees it (converted from the CloudEvent at the edge).
#[derive(Debug, Clone, PartialEq)]
pub struct EventInput {
    pub id: String,
    pub event_type: String,
    pub source: String,
    pub subject: Option<String>,
    pub data: Value,
    /// Extension attributes (`thredid`, `taskid`, `userid`, …).
    pub extensions: BTreeMap<String, Value>,
}

impl EventInput {
    fn as_value(&self) -> Value {
        json!({
            "id": self.id,
            "type": self.event_type,
            "source": self.source,
            "subject": self.subject,
            "data": self.data,
            "extensions": self.extensions,
        })
    }

    /// For `timer.fired`: the timer's name and generation.
    fn timer(&self) -> Option<(&str, u64)> {
        Some((self.data.get("timer")?.as_str()?, self.data.get("generation")?.as_u64()?))
    }
}

/// What the core asks the service to do. Indexes in the returned list give stable task ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Task {
        agent: AgentKind,
        action: String,
        args: Value,
    },
    /// To `user` (from `ctx.user`, absent when the context has none); `state` after the step.
    Notify {
        user: Option<String>,
        state: String,
        detail: Value,
    },
    Persist {
        operation: PersistOperation,
        collection: String,
        id: Option<String>,
        doc: Value,
    },
    StartTimer {
        timer: String,
        generation: u64,
        deadline_ms: i64,
    },
    CancelTimer {
        timer: String,
        generation: u64,
    },
}

/// What became of the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The thred moved (possibly re-entering the same state).
    Transitioned { from: String, to: String },
    /// A transition without a target ran: the state is the same, effects may have run.
    Stayed,
    /// The state ignores this event type on purpose.
    Ignored,
    /// A timer that was cancelled or superseded fired late: dropped.
    StaleTimer,
    /// The state does not expect this event (logged and counted, never retried).
    Rejected(String),
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub thred: Thred,
    pub effects: Vec<Effect>,
    pub disposition: Disposition,
}

/// Why a step could not run: a pattern expression failed, or a starting event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("pattern `{pattern}`: {message}")]
    Expression { pattern: String, message: String },
    #[error("pattern `{pattern}` refuses the starting event: {reason}")]
    InvalidStart { pattern: String, reason: String },
    #[error("pattern `{pattern}` has no state `{state}` (the thred was written by another pattern version)")]
    UnknownState { pattern: String, state: String },
}

/// Creates a thred for a starting event and applies the event to it: [`new_thred`], then [`step`].
///
/// `seed` is the service's initial context (event data, profile timers, …); the pattern's
/// `start.context` values are evaluated over it, then the key.
pub fn start(pattern: &Pattern, thred_id: &str, seed: Map<String, Value>, event: &EventInput, now_ms: i64) -> Result<Step, StepError> {
    let thred = new_thred(pattern, thred_id, seed, event, now_ms)?;
    step(pattern, &thred, event, now_ms)
}

/// The thred a starting event creates, before the event is applied to it: validated, its
/// `start.context` values evaluated over `seed`, its key and exclusive string computed. The
/// service reads what the thred needs (its exclusive owner, admission's counts) between this and
/// [`step`].
pub fn new_thred(pattern: &Pattern, thred_id: &str, seed: Map<String, Value>, event: &EventInput, now_ms: i64) -> Result<Thred, StepError> {
    let expression_error = |message: String| StepError::Expression { pattern: pattern.name.clone(), message };
    let event_value = event.as_value();
    let mut thred = Thred {
        id: thred_id.to_owned(),
        pattern: pattern.name.clone(),
        key: String::new(),
        exclusive: None,
        state: pattern.initial.clone(),
        context: seed,
        timers: BTreeMap::new(),
        last_timer_generation: 0,
        version: 0,
        created_ms: now_ms,
        updated_ms: now_ms,
        ended: false,
        host: None,
    };
    // Validation and the context values see the seed; the key sees the finished context.
    let seed_scope = Scope { ctx: &thred.context, event: &event_value, thred: &thred_value(&thred), now_ms }.to_cel();
    if let Some(validate) = &pattern.start.validate {
        let valid =
            validate.evaluate_bool_cel(&seed_scope).map_err(|reason| StepError::InvalidStart { pattern: pattern.name.clone(), reason })?;
        if !valid {
            return Err(StepError::InvalidStart {
                pattern: pattern.name.clone(),
                reason: format!("`start.validate` ({}) is false", validate.source()),
            });
        }
    }
    for (name, expression) in &pattern.start.context {
        let value = expression.evaluate_cel(&seed_scope).map_err(expression_error)?;
        thred.context.insert(name.clone(), value);
    }
    let key_scope = CelScope { ctx: json_object_to_cel(&thred.context), ..seed_scope };
    thred.key = match pattern.start.key.evaluate_cel(&key_scope).map_err(expression_error)? {
        Value::String(key) if !key.is_empty() => key,
        other => {
            return Err(StepError::InvalidStart {
                pattern: pattern.name.clone(),
                reason: format!("`start.key` ({}) must give a non-empty string, gave {other}", pattern.start.key.source()),
            })
        }
    };
    if let Some(exclusive) = &pattern.start.exclusive {
        thred.exclusive = match exclusive.evaluate_cel(&key_scope).map_err(expression_error)? {
            Value::String(owned) if !owned.is_empty() => Some(owned),
            other => {
                return Err(StepError::InvalidStart {
                    pattern: pattern.name.clone(),
                    reason: format!("`start.exclusive` ({}) must give a non-empty string, gave {other}", exclusive.source()),
                })
            }
        };
    }
    Ok(thred)
}

/// Applies one event to a thred.
pub fn step(pattern: &Pattern, thred: &Thred, event: &EventInput, now_ms: i64) -> Result<Step, StepError> {
    let Some(state) = pattern.state(&thred.state) else {
        return Err(StepError::UnknownState { pattern: pattern.name.clone(), state: thred.state.clone() });
    };
    let unchanged = |disposition| Ok(Step { thred: thred.clone(), effects: Vec::new(), disposition });
    if thred.ended {
        return unchanged(Disposition::Rejected(format!("thred ended in `{}`", thred.state)));
    }
    let event_value = event.as_value();
    let event_cel = json_to_cel(&event_value);
    let mut run = Run { pattern, thred: thred.clone(), effects: Vec::new(), event: event_value, event_cel, scope: None, now_ms };

    // A timer only counts if it is the generation still running; anything else was cancelled or
    // superseded and must never fire.
    let mut fired_timer = None;
    if event.event_type == TIMER_FIRED {
        let Some((timer, generation)) = event.timer() else {
            return unchanged(Disposition::Rejected("timer.fired without timer and generation".to_owned()));
        };
        match run.thred.timers.get(timer) {
            Some(running) if running.generation == generation => {
                run.thred.timers.remove(timer);
                fired_timer = Some(timer.to_owned());
            }
            _ => return unchanged(Disposition::StaleTimer),
        }
    }

    if fired_timer.as_deref() == Some(STATE_TIMEOUT_TIMER) {
        let Some(timeout) = &state.timeout else {
            return unchanged(Disposition::StaleTimer);
        };
        run.effects_from(&timeout.effects)?;
        run.enter(&timeout.target)?;
        return run.finish(Some(state.name.clone()));
    }

    let candidates = state.on.iter().chain(pattern.any_state.iter());
    let mut chosen: Option<&Transition> = None;
    let mut any_matched_event = false;
    for transition in candidates {
        if transition.event != event.event_type || transition.timer.as_deref() != fired_timer.as_deref() {
            continue;
        }
        any_matched_event = true;
        let holds = match &transition.guard {
            None => true,
            Some(guard) => run.evaluate_guard(guard)?,
        };
        if holds {
            chosen = Some(transition);
            break;
        }
    }
    let Some(transition) = chosen else {
        if state.ignore.contains(&event.event_type) || pattern.ignore_everywhere.contains(&event.event_type) {
            return unchanged_with_timers(run.thred, Disposition::Ignored);
        }
        let reason = if any_matched_event {
            format!("no guard of state `{}` holds for `{}`", state.name, event.event_type)
        } else {
            format!("state `{}` does not handle `{}`", state.name, event.event_type)
        };
        return unchanged_with_timers(run.thred, Disposition::Rejected(reason));
    };
    run.effects_from(&transition.effects)?;
    match &transition.target {
        Some(target) => {
            run.enter(target)?;
            run.finish(Some(state.name.clone()))
        }
        None => run.finish(None),
    }
}

/// A fired timer is consumed even when nothing handles it, so the thred no longer lists it.
fn unchanged_with_timers(thred: Thred, disposition: Disposition) -> Result<Step, StepError> {
    Ok(Step { thred, effects: Vec::new(), disposition })
}

fn thred_value(thred: &Thred) -> Value {
    json!({"id": thred.id, "key": thred.key, "state": thred.state, "pattern": thred.pattern, "created_ms": thred.created_ms, "host": thred.host})
}

/// One step in progress.
struct Run<'a> {
    pattern: &'a Pattern,
    thred: Thred,
    effects: Vec<Effect>,
    event: Value,
    event_cel: cel_interpreter::Value,
    /// The variables in CEL form, rebuilt only after the context or the state changed.
    scope: Option<CelScope>,
    now_ms: i64,
}

impl Run<'_> {
    fn error(&self, message: String) -> StepError {
        StepError::Expression { pattern: self.pattern.name.clone(), message }
    }

    fn scope(&mut self) -> &CelScope {
        let Run { scope, thred, event_cel, now_ms, .. } = self;
        scope.get_or_insert_with(|| CelScope {
            ctx: json_object_to_cel(&thred.context),
            event: event_cel.clone(),
            thred: json_to_cel(&thred_value(thred)),
            now_ms: *now_ms,
        })
    }

    /// Sets a context value, updating the converted context in place rather than converting it
    /// all again at the next evaluation.
    fn set_context(&mut self, name: &str, value: Value) {
        if self.scope.as_mut().is_some_and(|scope| !scope.set_ctx(name, &value)) {
            self.scope = None;
        }
        self.thred.context.insert(name.to_owned(), value);
    }

    fn evaluate(&mut self, expression: &Expression) -> Result<Value, StepError> {
        let outcome = expression.evaluate_cel(self.scope());
        outcome.map_err(|message| self.error(message))
    }

    fn evaluate_guard(&mut self, guard: &Expression) -> Result<bool, StepError> {
        let outcome = guard.evaluate_bool_cel(self.scope());
        outcome.map_err(|message| self.error(message))
    }

    fn evaluate_seconds(&mut self, expression: &Expression) -> Result<f64, StepError> {
        match self.evaluate(expression)? {
            Value::Number(number) => Ok(number.as_f64().unwrap_or(0.0)),
            other => {
                Err(self.error(format!("{}: {:?} must give seconds (a number), gave {other}", expression.location(), expression.source())))
            }
        }
    }

    fn effects_from(&mut self, templates: &[EffectTemplate]) -> Result<(), StepError> {
        for template in templates {
            self.effect(template)?;
        }
        Ok(())
    }

    fn effect(&mut self, template: &EffectTemplate) -> Result<(), StepError> {
        match template {
            EffectTemplate::Task { agent, action, args } => {
                let mut values = Map::new();
                for (name, expression) in args {
                    values.insert(name.clone(), self.evaluate(expression)?);
                }
                self.effects.push(Effect::Task { agent: *agent, action: action.clone(), args: Value::Object(values) });
            }
            EffectTemplate::Notify { detail } => {
                let detail = match detail {
                    Some(expression) => self.evaluate(expression)?,
                    None => Value::Object(Map::new()),
                };
                // The state is filled in by `finish`, once the step knows where it ends.
                self.effects.push(Effect::Notify { user: None, state: String::new(), detail });
            }
            EffectTemplate::Persist { operation, collection, id, doc } => {
                let id = match id {
                    Some(expression) => match self.evaluate(expression)? {
                        Value::String(text) => Some(text),
                        other => Some(other.to_string()),
                    },
                    None => None,
                };
                let doc = self.evaluate(doc)?;
                if !doc.is_object() {
                    return Err(self.error(format!("a persisted document must be a map, got {doc}")));
                }
                self.effects.push(Effect::Persist { operation: *operation, collection: collection.clone(), id, doc });
            }
            EffectTemplate::StartTimer { timer, after_secs } => {
                let seconds = self.evaluate_seconds(after_secs)?;
                self.start_timer(timer, seconds);
            }
            EffectTemplate::CancelTimer { timer } => self.cancel_timer(timer),
            EffectTemplate::Set(values) => {
                for (name, expression) in values {
                    let value = self.evaluate(expression)?;
                    self.set_context(name, value);
                }
            }
        }
        Ok(())
    }

    fn start_timer(&mut self, timer: &str, seconds: f64) {
        // Starting a timer supersedes the running one of the same name.
        self.cancel_timer(timer);
        if seconds <= 0.0 || !seconds.is_finite() {
            return;
        }
        self.thred.last_timer_generation += 1;
        let generation = self.thred.last_timer_generation;
        let deadline_ms = self.now_ms + (seconds * 1000.0).round() as i64;
        self.thred.timers.insert(timer.to_owned(), RunningTimer { generation, deadline_ms });
        self.effects.push(Effect::StartTimer { timer: timer.to_owned(), generation, deadline_ms });
    }

    fn cancel_timer(&mut self, timer: &str) {
        if let Some(running) = self.thred.timers.remove(timer) {
            self.effects.push(Effect::CancelTimer { timer: timer.to_owned(), generation: running.generation });
        }
    }

    /// Leaves the current state and enters `target`.
    fn enter(&mut self, target: &str) -> Result<(), StepError> {
        self.cancel_timer(STATE_TIMEOUT_TIMER);
        self.thred.state = target.to_owned();
        // Only `thred` changed: the converted context is kept (converting it dominates a step).
        if let Some(scope) = &mut self.scope {
            scope.thred = json_to_cel(&thred_value(&self.thred));
        }
        let pattern = self.pattern;
        let Some(state) = pattern.state(target) else {
            return Err(StepError::UnknownState { pattern: pattern.name.clone(), state: target.to_owned() });
        };
        self.effects_from(&state.on_enter)?;
        if let Some(timeout) = &state.timeout {
            let seconds = self.evaluate_seconds(&timeout.after_secs)?;
            self.start_timer(STATE_TIMEOUT_TIMER, seconds);
        }
        if state.terminal {
            let running: Vec<String> = self.thred.timers.keys().cloned().collect();
            for timer in running {
                self.cancel_timer(&timer);
            }
            self.thred.ended = true;
        }
        Ok(())
    }

    /// Completes the step: notifications learn the final state, state changes are recorded.
    fn finish(mut self, left_state: Option<String>) -> Result<Step, StepError> {
        let user = self.thred.context.get("user").and_then(Value::as_str).map(str::to_owned);
        for effect in &mut self.effects {
            if let Effect::Notify { user: notify_user, state, .. } = effect {
                *notify_user = user.clone();
                *state = self.thred.state.clone();
            }
        }
        self.thred.updated_ms = self.now_ms;
        let disposition = match left_state {
            Some(from) => {
                self.record_transition(&from);
                Disposition::Transitioned { from, to: self.thred.state.clone() }
            }
            None => Disposition::Stayed,
        };
        Ok(Step { thred: self.thred, effects: self.effects, disposition })
    }

    fn record_transition(&mut self, from: &str) {
        if let Some(record) = &self.pattern.record {
            let mut doc = Map::new();
            doc.insert("state".to_owned(), json!(self.thred.state));
            doc.insert("thred".to_owned(), json!(self.thred.id));
            doc.insert("pattern".to_owned(), json!(self.thred.pattern));
            if let Some(host) = &self.thred.host {
                doc.insert("host_id".to_owned(), json!(host));
            }
            for field in &record.fields {
                if let Some(value) = self.thred.context.get(field) {
                    doc.insert(field.clone(), value.clone());
                }
            }
            self.effects.push(Effect::Persist {
                operation: PersistOperation::Upsert,
                collection: record.collection.clone(),
                id: Some(self.thred.key.clone()),
                doc: Value::Object(doc),
            });
        }
        let at = chrono::DateTime::from_timestamp_millis(self.now_ms).map(|time| time.to_rfc3339()).unwrap_or_default();
        self.effects.push(Effect::Persist {
            operation: PersistOperation::Put,
            collection: AUDIT_COLLECTION.to_owned(),
            id: None,
            doc: json!({
                "session": self.thred.key,
                "thred": self.thred.id,
                "from": from,
                "to": self.thred.state,
                "event_type": self.event.get("type"),
                "event_id": self.event.get("id"),
                "at": at,
            }),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::pattern::load_pattern_file;

    const NOW: i64 = 1_800_000_000_000;

    fn session_pattern() -> Pattern {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../patterns/workspace-session.json");
        load_pattern_file(&file).unwrap_or_else(|error| panic!("{error}"))
    }

    fn event(event_type: &str, data: Value) -> EventInput {
        EventInput {
            id: format!("e-{event_type}"),
            event_type: event_type.to_owned(),
            source: "/test".to_owned(),
            subject: Some("s-1".to_owned()),
            data,
            extensions: BTreeMap::new(),
        }
    }

    fn timer(name: &str, generation: u64) -> EventInput {
        event(TIMER_FIRED, json!({"timer": name, "generation": generation}))
    }

    fn seed() -> Map<String, Value> {
        json!({
            "session": "s-1", "user": "alice", "workspace": "w1", "profile": "dev",
            "timers": {"idle_after_secs": 60, "stop_after_idle_secs": 300, "max_age_secs": 3600, "autosave_secs": 60, "ready_timeout_secs": 20,
                       "dormant_after_idle_secs": 120, "idle_cpu_percent": 5.0, "idle_warning_secs": 15, "max_keepalives": 2}
        })
        .as_object()
        .cloned()
        .unwrap_or_default()
    }

    /// A thred in `state` as the pattern would have left it: counters set, container known, and
    /// the timers that state runs (max_age 1, idle 2, autosave 3, stop 4, state_timeout 5).
    fn thred_in(state: &str) -> Thred {
        let mut context = seed();
        for (name, value) in [
            ("provision_attempts", json!(1)),
            ("materialize_attempts", json!(1)),
            ("sync_attempts", json!(1)),
            ("activity_count", json!(0)),
            ("close_requested", json!(false)),
            ("stop_reason", json!("")),
            ("error", json!("")),
            ("failing", json!(false)),
            ("preserved", json!([])),
            ("last_sync_error", json!("")),
            ("container_id", json!("c-1")),
            ("host", json!("127.0.0.1")),
            ("port", json!(32768)),
            ("probing", json!(false)),
            ("cpu_ns", json!(0)),
            ("cpu_at_ms", json!(0)),
            ("keepalives", json!(0)),
            ("ready_ms", json!(0)),
            ("resume_started_ms", json!(0)),
            ("resume_ms", json!(0)),
        ] {
            context.insert(name.to_owned(), value);
        }
        let mut timers = BTreeMap::new();
        let mut add = |name: &str, generation: u64| {
            timers.insert(name.to_owned(), RunningTimer { generation, deadline_ms: NOW });
        };
        if !matches!(state, "open" | "stopping" | "saving" | "sync_backoff" | "removing_container" | "removing_workspace") {
            add("max_age", 1);
        }
        match state {
            "running" => {
                add("idle", 2);
                add("autosave", 3);
            }
            "idle" => add("stop", 4),
            _ => {}
        }
        if session_pattern().state(state).is_some_and(|s| s.timeout.is_some()) {
            add(STATE_TIMEOUT_TIMER, 5);
        }
        Thred {
            id: "t-1".to_owned(),
            pattern: "workspace-session".to_owned(),
            key: "s-1".to_owned(),
            exclusive: Some("dev/alice/thesis".to_owned()),
            state: state.to_owned(),
            context,
            timers,
            last_timer_generation: 5,
            version: 3,
            created_ms: NOW - 1000,
            updated_ms: NOW - 1000,
            ended: matches!(state, "failed" | "stopped" | "closed"),
            host: None,
        }
    }

    fn summary(step: &Step) -> (String, Vec<String>) {
        let outcome = match &step.disposition {
            Disposition::Transitioned { to, .. } => format!("-> {to}"),
            Disposition::Stayed => "stay".to_owned(),
            Disposition::Ignored => "ignored".to_owned(),
            Disposition::StaleTimer => "stale".to_owned(),
            Disposition::Rejected(_) => "rejected".to_owned(),
        };
        let tasks = step
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Task { agent, action, .. } => Some(format!("{agent}.{action}")),
                _ => None,
            })
            .collect();
        (outcome, tasks)
    }

    /// One row: a thred in `state` gets `input`; it must end as `outcome` having emitted exactly
    /// `tasks` (agent.action, in order).
    #[track_caller]
    fn check(state: &str, input: EventInput, outcome: &str, tasks: &[&str]) {
        let pattern = session_pattern();
        let step = step(&pattern, &thred_in(state), &input, NOW).unwrap_or_else(|error| panic!("{state} + {}: {error}", input.event_type));
        let (actual_outcome, actual_tasks) = summary(&step);
        assert_eq!(
            (actual_outcome.as_str(), actual_tasks.iter().map(String::as_str).collect::<Vec<_>>()),
            (outcome, tasks.to_vec()),
            "state `{state}` + `{}` {}",
            input.event_type,
            input.data
        );
    }

    #[test]
    fn workspace_session_table() {
        let synced_final = || event("workspace.synced", json!({"final": true}));
        // Every way out starts the same exit: freeze (pause), then the final sync.
        const FREEZE: &[&str] = &["container.pause"];
        // open
        check("open", event("session.open", json!({"user": "alice", "workspace": "w1"})), "-> materializing", &["workspace.materialize"]);
        check("open", event("session.open", json!({"profile": "dev"})), "-> materializing", &["workspace.materialize"]);
        check("open", event("session.open", json!({"profile": "prod"})), "-> closed", &[]);
        check("open", event("session.close", json!({})), "-> stopping", FREEZE);
        check("open", event("container.ready", json!({})), "rejected", &[]);
        // materializing
        check("materializing", event("workspace.materialized", json!({"files": 3})), "-> provisioning", &["container.provision"]);
        check(
            "materializing",
            event("workspace.failed", json!({"stage": "download", "error": "store down"})),
            "-> materialize_backoff",
            &[],
        );
        check("materializing", event("workspace.failed", json!({"stage": "quota", "error": "too big"})), "-> stopping", FREEZE);
        check("materializing", timer(STATE_TIMEOUT_TIMER, 5), "-> stopping", FREEZE);
        check("materializing", timer(STATE_TIMEOUT_TIMER, 4), "stale", &[]);
        check("materializing", timer("max_age", 1), "-> stopping", FREEZE);
        check("materializing", event("workspace.progress", json!({})), "ignored", &[]);
        check("materializing", event("session.activity", json!({})), "ignored", &[]);
        check("materializing", event("container.ready", json!({})), "rejected", &[]);
        check("materializing", event("session.close", json!({})), "-> stopping", FREEZE);
        // A second open of the same workspace joins: the opener is told, nothing else happens.
        check("materializing", event("session.open", json!({"workspace": "w1"})), "stay", &[]);
        check("running", event("workspace.conflict", json!({"files": [{"path": "a"}]})), "stay", &[]);
        // A full workspace (its own file system): the user is told, nothing else happens.
        check("running", event("workspace.quota_exceeded", json!({"used_mib": 512, "quota_mib": 512})), "stay", &[]);
        check("idle", event("workspace.quota_exceeded", json!({"used_mib": 512, "quota_mib": 512})), "stay", &[]);
        // materialize_backoff
        check("materialize_backoff", timer(STATE_TIMEOUT_TIMER, 5), "-> materializing", &["workspace.materialize"]);
        check("materialize_backoff", event("workspace.materialized", json!({})), "rejected", &[]);
        // provisioning
        // Running takes a first work probe: the baseline the idle rule measures from.
        check(
            "provisioning",
            event("container.ready", json!({"container_id": "c-9", "host": "127.0.0.1", "port": 4000})),
            "-> running",
            &["container.probe"],
        );
        check("provisioning", event("container.failed", json!({"error": "boom"})), "-> provision_backoff", &[]);
        check("provisioning", timer(STATE_TIMEOUT_TIMER, 5), "-> stopping", FREEZE);
        check("provisioning", event("workspace.synced", json!({})), "ignored", &[]);
        check("provisioning", event("container.paused", json!({})), "rejected", &[]);
        // provision_backoff
        check("provision_backoff", timer(STATE_TIMEOUT_TIMER, 5), "-> provisioning", &["container.provision"]);
        check("provision_backoff", event("session.close", json!({})), "-> stopping", FREEZE);
        // running
        check("running", event("session.activity", json!({"source": "websocket"})), "stay", &[]);
        // The idle deadline asks for a work probe; its answer decides (see the_idle_rule_*).
        check("running", timer("idle", 2), "stay", &["container.probe"]);
        check("running", timer("idle", 1), "stale", &[]);
        check("running", timer("autosave", 3), "stay", &["workspace.sync"]);
        check("running", timer("max_age", 1), "-> stopping", FREEZE);
        check("running", event("container.exited", json!({"exit_code": 137, "oom_killed": true})), "-> stopping", FREEZE);
        check("running", event("session.close", json!({})), "-> stopping", FREEZE);
        check("running", event("container.stats", json!({})), "ignored", &[]);
        // An autosave's answer records when the store last matched (the failover message says so).
        check("running", event("workspace.synced", json!({"final": false})), "stay", &[]);
        // A drained host's session freezes first; a gone host's is asked nothing, then queued.
        check("running", event("session.move", json!({"from": "h2"})), "-> moving", FREEZE);
        check("running", event("session.failover", json!({"from": "h2", "message": "m"})), "-> moving", &[]);
        check("idle", event("session.failover", json!({"from": "h2", "message": "m"})), "-> moving", &[]);
        // A session on its way out waits for its host.
        check("saving", event("session.failover", json!({"from": "h2", "message": "m"})), "ignored", &[]);
        check("running", event("workspace.materialized", json!({})), "rejected", &[]);
        // idle
        check("idle", event("session.activity", json!({"source": "terminal"})), "-> running", &["container.resume", "container.probe"]);
        check("idle", timer("stop", 4), "-> stopping", FREEZE);
        check("idle", timer("idle", 2), "stale", &[]);
        check("idle", event("container.paused", json!({})), "ignored", &[]);
        check("idle", event("container.exited", json!({})), "-> stopping", FREEZE);
        check("idle", event("container.ready", json!({})), "rejected", &[]);
        // stopping: frozen (or already gone) → the final sync
        check("stopping", event("container.paused", json!({"state": "paused"})), "-> saving", &["workspace.sync"]);
        check("stopping", event("container.paused", json!({"state": "missing"})), "-> saving", &["workspace.sync"]);
        check("stopping", event("container.failed", json!({"error": "docker said no"})), "-> saving", &["workspace.sync"]);
        check("stopping", timer(STATE_TIMEOUT_TIMER, 5), "-> saving", &["workspace.sync"]);
        check("stopping", event("session.close", json!({})), "stay", &[]);
        check("stopping", event("container.exited", json!({})), "ignored", &[]);
        // saving
        check("saving", synced_final(), "-> removing_container", &["container.remove"]);
        check("saving", event("workspace.synced", json!({"final": false})), "rejected", &[]);
        check("saving", event("workspace.sync_failed", json!({"final": true, "error": "s3 down"})), "-> sync_backoff", &[]);
        check("saving", event("session.close", json!({})), "stay", &[]);
        check("saving", event("container.exited", json!({})), "ignored", &[]);
        // A final sync never gives up: a lost answer sends it again, nothing is removed.
        check("saving", timer(STATE_TIMEOUT_TIMER, 5), "-> saving", &["workspace.sync"]);
        // sync_backoff
        check("sync_backoff", timer(STATE_TIMEOUT_TIMER, 5), "-> saving", &["workspace.sync"]);
        check("sync_backoff", event("session.close", json!({})), "stay", &[]);
        check("sync_backoff", event("workspace.synced", json!({"final": true})), "ignored", &[]);
        // removing
        check("removing_container", event("container.removed", json!({})), "-> removing_workspace", &["workspace.remove"]);
        check("removing_container", event("container.failed", json!({"error": "gone"})), "-> removing_workspace", &["workspace.remove"]);
        check("removing_container", event("container.exited", json!({})), "ignored", &[]);
        check("removing_container", timer(STATE_TIMEOUT_TIMER, 5), "-> removing_container", &["container.remove"]);
        check("removing_workspace", event("workspace.removed", json!({})), "-> stopped", &[]);
        check("removing_workspace", event("container.removed", json!({})), "ignored", &[]);
        // Refused because something changed after the final sync: save again.
        check(
            "removing_workspace",
            event("workspace.sync_failed", json!({"final": true, "action": "remove"})),
            "-> saving",
            &["workspace.sync"],
        );
        // terminal states take nothing
        for terminal in ["failed", "stopped", "closed"] {
            check(terminal, event("session.activity", json!({})), "rejected", &[]);
            check(terminal, event("workspace.removed", json!({})), "rejected", &[]);
            check(terminal, timer("max_age", 1), "rejected", &[]);
        }
    }

    #[test]
    fn a_failure_saves_first_and_ends_failed_with_its_reason() {
        let pattern = session_pattern();
        let crashed =
            step(&pattern, &thred_in("running"), &event("container.exited", json!({"exit_code": 137, "oom_killed": true})), NOW).unwrap();
        assert_eq!(crashed.thred.state, "stopping");
        assert_eq!(crashed.thred.context["error"], json!("container exited with code 137 (out of memory)"));
        let mut thred = crashed.thred;
        thred.state = "removing_workspace".to_owned();
        let removed = step(&pattern, &thred, &event("workspace.removed", json!({"preserved": ["a\\b.txt"]})), NOW).unwrap();
        assert_eq!(removed.disposition, Disposition::Transitioned { from: "removing_workspace".into(), to: "failed".into() });
        let details: Vec<&Value> = removed
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Notify { detail, .. } => Some(detail),
                _ => None,
            })
            .collect();
        assert_eq!(
            details,
            vec![&json!({"error": "container exited with code 137 (out of memory)", "reason": "crashed", "preserved": ["a\\b.txt"]})]
        );
    }

    #[test]
    fn the_directory_may_be_cached_only_when_the_session_did_not_fail() {
        let pattern = session_pattern();
        let remove_args = |failing: bool| -> Vec<Value> {
            let mut thred = thred_in("removing_container");
            thred.context["failing"] = json!(failing);
            let removed = step(&pattern, &thred, &event("container.removed", json!({})), NOW).unwrap();
            removed
                .effects
                .iter()
                .filter_map(|effect| match effect {
                    Effect::Task { action, args, .. } if action == "remove" => Some(args.clone()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(remove_args(false), vec![json!({"cache": true})]);
        assert_eq!(remove_args(true), vec![json!({"cache": false})]);
    }

    #[test]
    fn a_joining_open_tells_the_opener_which_session_it_joined() {
        let pattern = session_pattern();
        let mut open = event("session.open", json!({"workspace": "thesis"}));
        open.subject = Some("s-2".to_owned());
        let joined = step(&pattern, &thred_in("running"), &open, NOW).unwrap();
        assert_eq!(joined.disposition, Disposition::Stayed);
        let notified: Vec<(&str, &Value)> = joined
            .effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Notify { state, detail, .. } => Some((state.as_str(), detail)),
                _ => None,
            })
            .collect();
        assert_eq!(notified, vec![("running", &json!({"joined": true, "requested": "s-2", "workspace": "w1"}))]);
    }

    #[test]
    fn recovery_freezes_saves_then_removes() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../patterns/workspace-recovery.json");
        let pattern = load_pattern_file(&file).unwrap_or_else(|error| panic!("{error}"));
        let recover = event("session.recover", json!({"user": "alice", "workspace": "w1", "reason": "orphan container"}));
        let mut seed = seed();
        seed.insert("reason".to_owned(), json!("orphan container"));
        let mut step = start(&pattern, "t-r", seed, &recover, NOW).unwrap();
        let mut path = vec![(step.thred.state.clone(), summary(&step).1)];
        for answer in [
            event("container.paused", json!({"state": "missing"})),
            event("workspace.sync_failed", json!({"final": true, "error": "store down"})),
            timer(STATE_TIMEOUT_TIMER, step.thred.last_timer_generation + 2),
            event("workspace.synced", json!({"final": true})),
            event("container.removed", json!({})),
            event("workspace.removed", json!({"preserved": []})),
        ] {
            let mut answer = answer;
            if answer.event_type == TIMER_FIRED {
                answer.data["generation"] = json!(step.thred.timers[STATE_TIMEOUT_TIMER].generation);
            }
            step = super::step(&pattern, &step.thred, &answer, NOW).unwrap();
            path.push((step.thred.state.clone(), summary(&step).1));
        }
        let expected: Vec<(&str, Vec<&str>)> = vec![
            ("stopping", vec!["container.pause"]),
            ("saving", vec!["workspace.sync"]),
            ("sync_backoff", vec![]),
            ("saving", vec!["workspace.sync"]),
            ("removing_container", vec!["container.remove"]),
            ("removing_workspace", vec!["workspace.remove"]),
            ("recovered", vec![]),
        ];
        let actual: Vec<(&str, Vec<&str>)> =
            path.iter().map(|(state, tasks)| (state.as_str(), tasks.iter().map(String::as_str).collect())).collect();
        assert_eq!(actual, expected);
        assert!(step.thred.ended);
    }

    #[test]
    fn closing_leads_to_closed_and_idling_to_stopped() {
        let pattern = session_pattern();
        let mut thred = thred_in("stopping");
        thred.context.insert("close_requested".to_owned(), json!(true));
        thred.state = "removing_workspace".to_owned();
        let step = step(&pattern, &thred, &event("workspace.removed", json!({})), NOW).unwrap();
        assert_eq!(step.disposition, Disposition::Transitioned { from: "removing_workspace".into(), to: "closed".into() });
        assert!(step.thred.ended);
        assert!(step.thred.timers.is_empty(), "a terminal thred runs no timers: {:?}", step.thred.timers);
    }

    #[test]
    fn start_builds_the_context_and_starts_max_age() {
        let pattern = session_pattern();
        let mut seed = seed();
        seed.remove("session");
        let step = start(&pattern, "t-9", seed, &event("session.open", json!({"user": "alice", "workspace": "w1"})), NOW).unwrap();
        assert_eq!(step.thred.key, "s-1");
        assert_eq!(step.thred.state, "materializing");
        assert_eq!(step.thred.context["provision_attempts"], json!(0));
        assert_eq!(step.thred.timers["max_age"].deadline_ms, NOW + 3_600_000);
        assert_eq!(step.thred.timers[STATE_TIMEOUT_TIMER].deadline_ms, NOW + 600_000);
        let task_args: Vec<&Value> = step
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Task { args, .. } => Some(args),
                _ => None,
            })
            .collect();
        // No warm-pool slot in the seed: the open is cold.
        assert_eq!(task_args, vec![&json!({"user": "alice", "workspace": "w1", "slot": "", "fence": false})]);
        let notified: Vec<(&Option<String>, &str)> = step
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Notify { user, state, .. } => Some((user, state.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(notified, vec![(&Some("alice".to_owned()), "materializing")]);
        let persisted: Vec<(&str, &Option<String>)> = step
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Persist { collection, id, .. } => Some((collection.as_str(), id)),
                _ => None,
            })
            .collect();
        assert_eq!(persisted, vec![("sessions", &Some("s-1".to_owned())), ("events", &None)]);
    }

    /// A warm open runs the materialize and the container's claim side by side; what follows waits
    /// for both answers, whichever comes first: `running` at once when the claim found the
    /// container answering (its answer carries `container.ready`'s data), else provisioning (the
    /// readiness check). A refused claim counts as answered (provisioning then claims again).
    /// Provisioning carries the slot only while the claim is not known done.
    #[test]
    fn a_warm_open_waits_for_the_materialize_and_the_claim_in_either_order() {
        let pattern = session_pattern();
        let open = event("session.open", json!({"user": "alice", "workspace": "w1"}));
        let warm_start = || {
            let mut seed = seed();
            seed.insert("pool_slot".to_owned(), json!("p-7"));
            let step = start(&pattern, "t-9", seed, &open, NOW).unwrap();
            assert_eq!(step.thred.state, "claiming");
            let tasks: Vec<(String, &Value)> = step
                .effects
                .iter()
                .filter_map(|effect| match effect {
                    Effect::Task { agent, action, args } => Some((format!("{agent}.{action}"), args)),
                    _ => None,
                })
                .collect();
            let args = json!({"user": "alice", "workspace": "w1", "slot": "p-7"});
            assert_eq!(tasks, vec![("workspace.materialize".to_owned(), &args), ("container.claim".to_owned(), &args)]);
            step.thred
        };
        let provision_slot = |step: &Step| -> Value {
            step.effects
                .iter()
                .find_map(|effect| match effect {
                    Effect::Task { action, args, .. } if action == "provision" => Some(args["slot"].clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no provision task in {:?}", step.effects))
        };
        let materialized = event("workspace.materialized", json!({"files": 10}));
        let claimed = event("container.claimed", json!({"slot": "p-7"}));
        let refused = event("container.failed", json!({"action": "claim", "error": "slot p-7 is claimed by session s-2 already"}));

        // The files first, then the claim.
        let first = step(&pattern, &warm_start(), &materialized, NOW).unwrap();
        assert_eq!(summary(&first), ("stay".to_owned(), vec![]));
        let second = step(&pattern, &first.thred, &claimed, NOW).unwrap();
        assert_eq!(summary(&second), ("-> provisioning".to_owned(), vec!["container.provision".to_owned()]));
        assert_eq!(provision_slot(&second), json!(""), "the claim is done: provision only checks readiness");

        // The claim first, then the files.
        let first = step(&pattern, &warm_start(), &claimed, NOW).unwrap();
        assert_eq!(summary(&first), ("stay".to_owned(), vec![]));
        let second = step(&pattern, &first.thred, &materialized, NOW).unwrap();
        assert_eq!(summary(&second), ("-> provisioning".to_owned(), vec!["container.provision".to_owned()]));
        assert_eq!(provision_slot(&second), json!(""));

        // A claim that found the container answering: running once the files are in, either
        // order, on the container the claim checked (no provision task).
        let ready = json!({"container_id": "c-7", "host": "127.0.0.1", "port": 4100, "network": {"ip": "10.0.0.7", "port": 8080,
                           "host": "local", "boot_id": "b"}, "adopted": true, "timings_ms": {"create": 0, "start": 0, "ready": 3}});
        let claimed_ready = event("container.claimed", json!({"slot": "p-7", "ready": ready}));
        let runs = |step: &Step| {
            assert_eq!(step.thred.state, "running", "{:?}", step.effects);
            assert!(!step.effects.iter().any(|effect| matches!(effect, Effect::Task { action, .. } if action == "provision")));
            let context = &step.thred.context;
            assert_eq!((&context["container_id"], &context["port"], &context["ready_ms"]), (&json!("c-7"), &json!(4100), &json!(3)));
            assert_eq!(context["network"]["ip"], json!("10.0.0.7"));
            assert_eq!(context["slot_claimed"], json!(true));
        };
        let first = step(&pattern, &warm_start(), &materialized, NOW).unwrap();
        runs(&step(&pattern, &first.thred, &claimed_ready, NOW).unwrap());
        let first = step(&pattern, &warm_start(), &claimed_ready, NOW).unwrap();
        assert_eq!(summary(&first), ("stay".to_owned(), vec![]));
        runs(&step(&pattern, &first.thred, &materialized, NOW).unwrap());
        // An answer whose `ready` is null is a claim without the check: provisioning does it.
        let claimed_unchecked = event("container.claimed", json!({"slot": "p-7", "ready": null}));
        let first = step(&pattern, &warm_start(), &claimed_unchecked, NOW).unwrap();
        let second = step(&pattern, &first.thred, &materialized, NOW).unwrap();
        assert_eq!(summary(&second), ("-> provisioning".to_owned(), vec!["container.provision".to_owned()]));
        let first = step(&pattern, &warm_start(), &materialized, NOW).unwrap();
        let second = step(&pattern, &first.thred, &claimed_unchecked, NOW).unwrap();
        assert_eq!(summary(&second), ("-> provisioning".to_owned(), vec!["container.provision".to_owned()]));

        // A refused claim: provisioning tries the claim again and fails the usual way.
        let first = step(&pattern, &warm_start(), &refused, NOW).unwrap();
        assert_eq!(summary(&first), ("stay".to_owned(), vec![]));
        let second = step(&pattern, &first.thred, &materialized, NOW).unwrap();
        assert_eq!(provision_slot(&second), json!("p-7"));

        // A failed materialize backs off as a cold one does; a claim answered meanwhile is kept.
        let failed =
            step(&pattern, &warm_start(), &event("workspace.failed", json!({"stage": "download", "error": "store down"})), NOW).unwrap();
        assert_eq!(summary(&failed), ("-> materialize_backoff".to_owned(), vec![]));
        let waiting = step(&pattern, &failed.thred, &claimed, NOW).unwrap();
        assert_eq!(summary(&waiting), ("stay".to_owned(), vec![]));
        let again =
            step(&pattern, &waiting.thred, &timer(STATE_TIMEOUT_TIMER, waiting.thred.timers[STATE_TIMEOUT_TIMER].generation), NOW).unwrap();
        assert_eq!(summary(&again), ("-> materializing".to_owned(), vec!["workspace.materialize".to_owned()]));
        let provisioning = step(&pattern, &again.thred, &materialized, NOW).unwrap();
        assert_eq!(provision_slot(&provisioning), json!(""));

        // A late claim answer anywhere else is ignored, not refused.
        let late = step(&pattern, &thred_in("running"), &claimed, NOW).unwrap();
        assert_eq!(summary(&late).0, "ignored");
    }

    /// A state waiting for one container task's answer moves on only on that task's failure: a
    /// late failure of another (a probe sent while running fails once the container is paused)
    /// must not start the final sync before the freeze, or remove the directory before the
    /// container.
    #[test]
    fn a_late_failure_of_another_task_is_no_answer_to_the_one_awaited() {
        let pattern = session_pattern();
        let probe_failed = event("container.failed", json!({"action": "probe", "error": "docker returned no statistics"}));
        for (state, awaited, next) in [
            ("stopping", "pause", "saving"),
            ("removing_container", "remove", "removing_workspace"),
            ("moving", "pause", "moving_saving"),
            ("moving_removing_container", "remove", "moving_removing_workspace"),
            ("provisioning", "provision", "provision_backoff"),
        ] {
            let stayed = step(&pattern, &thred_in(state), &probe_failed, NOW).unwrap();
            assert_eq!(summary(&stayed), ("stay".to_owned(), vec![]), "{state}");
            let own = event("container.failed", json!({"action": awaited, "error": "refused"}));
            let moved = step(&pattern, &thred_in(state), &own, NOW).unwrap();
            assert_eq!(moved.thred.state, next, "{state} on its own {awaited} failing");
        }
    }

    #[test]
    fn starting_events_are_validated() {
        let pattern = session_pattern();
        let mut seed = seed();
        seed.remove("user");
        let refused = start(&pattern, "t-9", seed, &event("session.open", json!({"workspace": "w1"})), NOW).unwrap_err();
        assert!(matches!(refused, StepError::InvalidStart { .. }), "{refused}");
        let mut no_subject = event("session.open", json!({"workspace": "w1"}));
        no_subject.subject = None;
        assert!(matches!(start(&pattern, "t-9", seed_without_session(), &no_subject, NOW), Err(StepError::InvalidStart { .. })));
    }

    fn seed_without_session() -> Map<String, Value> {
        let mut seed = seed();
        seed.remove("session");
        seed
    }

    #[test]
    fn restarting_a_timer_supersedes_it_and_activity_counts() {
        let pattern = session_pattern();
        let step = step(&pattern, &thred_in("running"), &event("session.activity", json!({})), NOW + 5).unwrap();
        assert_eq!(step.thred.timers["idle"], RunningTimer { generation: 6, deadline_ms: NOW + 5 + 60_000 });
        assert_eq!(step.thred.context["activity_count"], json!(1));
        assert_eq!(
            step.effects,
            vec![
                Effect::CancelTimer { timer: "idle".into(), generation: 2 },
                Effect::StartTimer { timer: "idle".into(), generation: 6, deadline_ms: NOW + 5 + 60_000 },
                // The warning before the pause moves with it (idle_warning_secs 15 before).
                Effect::StartTimer { timer: "idle_warning".into(), generation: 7, deadline_ms: NOW + 5 + 45_000 },
            ]
        );
        // The superseded generation firing late changes nothing.
        let late = super::step(&pattern, &step.thred, &timer("idle", 2), NOW + 10).unwrap();
        assert_eq!(late.disposition, Disposition::StaleTimer);
        assert_eq!(late.thred, step.thred);
    }

    #[test]
    fn backoff_grows() {
        let pattern = session_pattern();
        let mut thred = thred_in("provisioning");
        thred.context.insert("provision_attempts".to_owned(), json!(0));
        let first = step(&pattern, &thred, &event("container.failed", json!({"error": "x"})), NOW).unwrap();
        assert_eq!(first.thred.timers[STATE_TIMEOUT_TIMER].deadline_ms, NOW + 2000);
        let mut again = thred.clone();
        again.context.insert("provision_attempts".to_owned(), json!(1));
        let second = step(&pattern, &again, &event("container.failed", json!({"error": "x"})), NOW).unwrap();
        assert_eq!(second.thred.timers[STATE_TIMEOUT_TIMER].deadline_ms, NOW + 4000);
        let mut exhausted = thred;
        exhausted.context.insert("provision_attempts".to_owned(), json!(2));
        let third = step(&pattern, &exhausted, &event("container.failed", json!({"error": "x"})), NOW).unwrap();
        assert_eq!(third.thred.state, "stopping", "a failure saves the workspace before it ends");
        assert_eq!(third.thred.context["error"], json!("x"));
        assert_eq!(third.thred.context["failing"], json!(true));
    }

    /// A thred in `running` whose idle deadline fired: the probe was asked for, and the previous
    /// one (the baseline) saw `baseline_cpu_ns` of CPU `since_ms` ago.
    fn probing_thred(baseline_cpu_ns: i64, since_ms: i64) -> Thred {
        let mut thred = thred_in("running");
        thred.context.insert("probing".to_owned(), json!(true));
        thred.context.insert("cpu_ns".to_owned(), json!(baseline_cpu_ns));
        thred.context.insert("cpu_at_ms".to_owned(), json!(NOW - since_ms));
        thred
    }

    fn probed(cpu_ns: i64, write_age_ms: i64, terminal_commands: i64) -> EventInput {
        event("container.probed", json!({"cpu_ns": cpu_ns, "write_age_ms": write_age_ms, "terminal_commands": terminal_commands}))
    }

    /// The idle rule: a session pauses only when, over the interval since the last probe, it used
    /// less CPU than `idle_cpu_percent` of one CPU, nothing in its workspace changed, and no
    /// command runs under a terminal shell. Otherwise the deadline re-arms.
    #[test]
    fn the_idle_rule_pauses_only_a_quiet_session() {
        let pattern = session_pattern();
        let minute_ms = 60_000;
        // 60 s at 5 % of one CPU is 3 CPU-seconds.
        let quiet_cpu = 1_000_000_000;
        let rows: [(&str, EventInput, &str); 6] = [
            ("quiet", probed(quiet_cpu, 2 * minute_ms, 0), "-> idle"),
            ("a busy loop", probed(30_000_000_000, 2 * minute_ms, 0), "stay"),
            ("just over the threshold", probed(3_100_000_000, 2 * minute_ms, 0), "stay"),
            ("a background writer", probed(quiet_cpu, 500, 0), "stay"),
            ("a terminal command", probed(quiet_cpu, 2 * minute_ms, 1), "stay"),
            ("a restarted container (counter went back)", probed(-1, 2 * minute_ms, 0), "stay"),
        ];
        for (what, input, outcome) in rows {
            let stepped = step(&pattern, &probing_thred(0, minute_ms), &input, NOW).unwrap();
            assert_eq!(summary(&stepped).0, outcome, "{what}");
            assert_eq!(stepped.thred.context["probing"], json!(false), "{what}");
            if outcome == "stay" {
                // Busy: the deadline re-arms from now and the probe becomes the new baseline.
                assert_eq!(stepped.thred.timers["idle"].deadline_ms, NOW + minute_ms, "{what}");
                assert_eq!(stepped.thred.context["cpu_at_ms"], json!(NOW), "{what}");
                let working =
                    stepped.effects.iter().any(|effect| matches!(effect, Effect::Notify { detail, .. } if detail.get("working").is_some()));
                assert!(working, "{what}: the user is told why the session keeps running");
            } else {
                assert!(summary(&stepped).1.contains(&"container.pause".to_owned()), "{what}");
            }
        }
        // No baseline yet (its answer was lost): never pause on a guess, take this one as the baseline.
        let mut no_baseline = probing_thred(0, minute_ms);
        no_baseline.context.insert("cpu_at_ms".to_owned(), json!(0));
        let stepped = step(&pattern, &no_baseline, &probed(0, 2 * minute_ms, 0), NOW).unwrap();
        assert_eq!(summary(&stepped).0, "stay");
        // Input between the deadline and the answer wins: the answer only records a baseline.
        let after_input = step(&pattern, &probing_thred(0, minute_ms), &event("session.activity", json!({})), NOW).unwrap();
        let stepped = step(&pattern, &after_input.thred, &probed(0, 2 * minute_ms, 0), NOW + 1).unwrap();
        assert_eq!(summary(&stepped), ("stay".to_owned(), vec![]));
        // A probe that cannot be answered falls back to the input-only rule: pausing loses nothing.
        let failed =
            step(&pattern, &probing_thred(0, minute_ms), &event("container.failed", json!({"action": "probe", "error": "x"})), NOW)
                .unwrap();
        assert_eq!(summary(&failed).0, "-> idle");
        check("running", event("container.failed", json!({"action": "stats", "error": "x"})), "stay", &[]);
    }

    #[test]
    fn the_ladder_pauses_then_stops_then_closes_and_wakes_from_either_tier() {
        let pattern = session_pattern();
        let notifications = |stepped: &Step| -> Vec<Value> {
            stepped
                .effects
                .iter()
                .filter_map(|effect| match effect {
                    Effect::Notify { detail, .. } => Some(detail.clone()),
                    _ => None,
                })
                .collect()
        };
        // The warning before the pause.
        let mut warned = thred_in("running");
        warned.timers.insert("idle_warning".to_owned(), RunningTimer { generation: 6, deadline_ms: NOW });
        let warning = step(&pattern, &warned, &timer("idle_warning", 6), NOW).unwrap();
        assert_eq!(notifications(&warning)[0]["warning"], json!("pause"));
        assert_eq!(notifications(&warning)[0]["in_secs"], json!(15));
        // Paused: the tier, the next step and its warning are all scheduled.
        let paused = step(&pattern, &probing_thred(0, 60_000), &probed(0, 120_000, 0), NOW).unwrap();
        assert_eq!(paused.thred.state, "idle");
        assert_eq!(notifications(&paused)[0]["tier"], json!("paused"));
        assert_eq!(notifications(&paused)[0]["next"], json!("dormant"));
        for (timer_name, after_secs) in [("dormant", 120), ("dormant_warning", 105), ("stop", 300), ("stop_warning", 285)] {
            assert_eq!(paused.thred.timers[timer_name].deadline_ms, NOW + after_secs * 1000, "{timer_name}");
        }
        assert!(!paused.thred.timers.contains_key("idle") && !paused.thred.timers.contains_key("idle_warning"));
        let idle = paused.thred;
        let generation = |thred: &Thred, name: &str| thred.timers[name].generation;
        let dormant_warning = step(&pattern, &idle, &timer("dormant_warning", generation(&idle, "dormant_warning")), NOW).unwrap();
        assert_eq!(notifications(&dormant_warning)[0]["warning"], json!("dormant"));
        // Dormant: the container stops, its directory stays; the close is still due.
        let dormant = step(&pattern, &idle, &timer("dormant", generation(&idle, "dormant")), NOW).unwrap();
        assert_eq!(summary(&dormant), ("-> dormant".to_owned(), vec!["container.stop".to_owned()]));
        assert_eq!(notifications(&dormant)[0]["tier"], json!("dormant"));
        let dormant = dormant.thred;
        assert!(dormant.timers.contains_key("stop"));
        // The stop's own answers and the exit it causes change nothing.
        for quiet in ["container.stopped", "container.exited", "container.failed"] {
            let stepped = step(&pattern, &dormant, &event(quiet, json!({})), NOW).unwrap();
            assert_eq!(summary(&stepped).0, "ignored", "{quiet}");
        }
        // The longest interval: closed through the freeze and the final sync, like every exit.
        let closing = step(&pattern, &dormant, &timer("stop", generation(&dormant, "stop")), NOW).unwrap();
        assert_eq!(summary(&closing), ("-> stopping".to_owned(), vec!["container.pause".to_owned()]));
        assert_eq!(closing.thred.context["stop_reason"], json!("idle"));
        assert!(closing.thred.timers.keys().all(|name| name == STATE_TIMEOUT_TIMER), "{:?}", closing.thred.timers);
        // Wake from the paused tier: resume, and every ladder timer goes.
        let woken = step(&pattern, &idle, &event("session.activity", json!({})), NOW).unwrap();
        assert_eq!(summary(&woken), ("-> running".to_owned(), vec!["container.resume".to_owned(), "container.probe".to_owned()]));
        assert!(["dormant", "dormant_warning", "stop", "stop_warning"].iter().all(|name| !woken.thred.timers.contains_key(*name)));
        let resumed = step(&pattern, &woken.thred, &event("container.resumed", json!({})), NOW + 40).unwrap();
        assert_eq!(resumed.thred.context["resume_ms"], json!(40), "the measured wake is the next estimate");
        // Wake from the dormant tier: the same container starts again, no materialize.
        let waking = step(&pattern, &dormant, &event("session.activity", json!({})), NOW).unwrap();
        assert_eq!(summary(&waking), ("-> waking".to_owned(), vec!["container.wake".to_owned()]));
        assert!(!waking.thred.timers.contains_key("stop"));
        let ready =
            json!({"container_id": "c-1", "host": "127.0.0.1", "port": 40001, "timings_ms": {"create": 0, "start": 300, "ready": 200}});
        let running = step(&pattern, &waking.thred, &event("container.ready", ready), NOW).unwrap();
        assert_eq!(running.thred.state, "running");
        assert_eq!(running.thred.context["port"], json!(40001), "the new port is reported");
        assert_eq!(running.thred.context["ready_ms"], json!(500));
        assert_eq!(notifications(&running)[0]["port"], json!(40001));
        assert_eq!(notifications(&running)[0]["network"], json!({}), "no network address reported: an empty one");
        let network = json!({"ip": "172.18.0.5", "port": 8080, "host": "local", "boot_id": "b"});
        let ready = json!({"container_id": "c-1", "host": "127.0.0.1", "port": 40002, "network": network,
                           "timings_ms": {"create": 0, "start": 300, "ready": 200}});
        let running = step(&pattern, &waking.thred, &event("container.ready", ready), NOW).unwrap();
        assert_eq!(running.thred.context["network"], network, "the network address is kept (and so recorded)");
        assert_eq!(notifications(&running)[0]["network"], network, "and told with the running notification");
        // A container that cannot start again is replaced on the same directory.
        let replaced = step(&pattern, &waking.thred, &event("container.failed", json!({"action": "wake", "error": "gone"})), NOW).unwrap();
        assert_eq!(summary(&replaced), ("-> provisioning".to_owned(), vec!["container.provision".to_owned()]));
        // Keep-alives: bounded (2 in this seed) without input, each one postpones the pause.
        let mut thred = thred_in("running");
        for kept in 1..=2 {
            let stepped = step(&pattern, &thred, &event("session.keepalive", json!({})), NOW).unwrap();
            assert_eq!(notifications(&stepped)[0]["kept_alive"], json!(true));
            assert_eq!(stepped.thred.context["keepalives"], json!(kept));
            thred = stepped.thred;
        }
        let refused = step(&pattern, &thred, &event("session.keepalive", json!({})), NOW).unwrap();
        assert_eq!(notifications(&refused)[0]["keepalive_refused"], json!(true));
        let input = step(&pattern, &thred, &event("session.activity", json!({})), NOW).unwrap();
        assert_eq!(input.thred.context["keepalives"], json!(0), "input resets the bound");
        // "Keep working" on a paused or dormant session wakes it.
        let kept_idle = step(&pattern, &idle, &event("session.keepalive", json!({})), NOW).unwrap();
        assert_eq!(kept_idle.thred.state, "running");
        let kept_dormant = step(&pattern, &dormant, &event("session.keepalive", json!({})), NOW).unwrap();
        assert_eq!(kept_dormant.thred.state, "waking");
        // Without a dormant tier the ladder goes from paused straight to the close.
        let mut no_dormant = probing_thred(0, 60_000);
        no_dormant.context["timers"]["dormant_after_idle_secs"] = json!(0);
        let paused = step(&pattern, &no_dormant, &probed(0, 120_000, 0), NOW).unwrap();
        assert!(!paused.thred.timers.contains_key("dormant") && !paused.thred.timers.contains_key("dormant_warning"));
        assert_eq!(notifications(&paused)[0]["next"], json!("close"));
    }

    #[test]
    fn autosave_off_starts_no_timer() {
        let pattern = session_pattern();
        let mut thred = thred_in("provisioning");
        thred.context["timers"]["autosave_secs"] = json!(0);
        let step = step(&pattern, &thred, &event("container.ready", json!({"container_id": "c", "host": "h", "port": 1})), NOW).unwrap();
        assert!(step.thred.timers.contains_key("idle"));
        assert!(!step.thred.timers.contains_key("autosave"));
    }
}
