//! CEL expressions in patterns: compiled once when a pattern loads, evaluated by the pure core
//! against the thred's context, the event and the step's time (passed in, never read from a clock).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use cel_interpreter::objects::{Key, Map as CelMap};
use cel_interpreter::{Context, Program, Value as CelValue};
use serde_json::{Map, Number, Value};

/// The longest expression source and the deepest bracket nesting accepted. The CEL parser recurses
/// once per nesting level and per operator (even in malformed input), and a stack overflow aborts
/// the process (no `catch_unwind` turns it into an error): `(` nested 400 deep, `[` 200 deep or
/// 3,000 `<` in a row did, in a test thread's 2 MiB stack. The shipped patterns' longest
/// expression is under 200 bytes.
const MAX_SOURCE_BYTES: usize = 1024;
const MAX_NESTING: usize = 32;

/// How deep `(`, `[` and `{` nest in `source` (string literals included, which only errs on the
/// safe side).
fn nesting_depth(source: &str) -> usize {
    let mut depth: usize = 0;
    let mut deepest = 0;
    for character in source.chars() {
        match character {
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A compiled CEL expression together with its source, for error messages.
pub struct Expression {
    source: String,
    /// Where the expression sits in its pattern (`state "running", on[0].guard`), for errors.
    location: String,
    program: Program,
    /// The value of an expression that reads no variable (`'0'`, `false`, `{}`: most of a
    /// pattern's `start.context`), computed once at compile time: CEL has no side effects and
    /// its functions are pure, so it is what every evaluation would give.
    /// Boxed: an expression sits in every effect template, and most have none.
    constant: Option<Box<Value>>,
}

impl fmt::Debug for Expression {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Expression({:?})", self.source)
    }
}

/// The variables an expression can read: `ctx`, `event`, `thred` and `now` (epoch milliseconds).
pub struct Scope<'a> {
    pub ctx: &'a Map<String, Value>,
    pub event: &'a Value,
    pub thred: &'a Value,
    pub now_ms: i64,
}

/// The same variables already converted to CEL. Converting JSON to CEL dominates the cost of an
/// evaluation, so a step converts once and reuses the result until the context changes.
#[derive(Debug, Clone)]
pub struct CelScope {
    pub ctx: CelValue,
    pub event: CelValue,
    pub thred: CelValue,
    pub now_ms: i64,
}

impl CelScope {
    /// `ctx.<name> = value`, in place: the rest of the converted context is kept. False (nothing
    /// changed) when `ctx` is not a map.
    pub fn set_ctx(&mut self, name: &str, value: &Value) -> bool {
        let CelValue::Map(map) = &mut self.ctx else { return false };
        Arc::make_mut(&mut map.map).insert(Key::String(Arc::new(name.to_owned())), json_to_cel(value));
        true
    }
}

impl Scope<'_> {
    pub fn to_cel(&self) -> CelScope {
        CelScope { ctx: json_object_to_cel(self.ctx), event: json_to_cel(self.event), thred: json_to_cel(self.thred), now_ms: self.now_ms }
    }
}

impl Expression {
    /// Compiles `source`; the error is the parser's message.
    pub fn compile(source: &str) -> Result<Expression, String> {
        Expression::compile_at(source, "")
    }

    /// Compiles `source` found at `location` in a pattern.
    pub fn compile_at(source: &str, location: &str) -> Result<Expression, String> {
        if source.trim().is_empty() {
            return Err("expression is empty".to_owned());
        }
        if source.len() > MAX_SOURCE_BYTES {
            return Err(format!("expression is {} bytes, over the limit of {MAX_SOURCE_BYTES}", source.len()));
        }
        if nesting_depth(source) > MAX_NESTING {
            return Err(format!("expression nests brackets more than {MAX_NESTING} deep"));
        }
        // The parser of cel-interpreter 0.10 panics on a few malformed inputs; a pattern file is
        // outside input, so a panic is turned into an error instead of taking the process down.
        let compiled = std::panic::catch_unwind(|| Program::compile(source));
        match compiled {
            Ok(Ok(program)) => {
                let mut expression = Expression { source: source.to_owned(), location: location.to_owned(), program, constant: None };
                if expression.variables().is_empty() {
                    // One that fails keeps failing at each evaluation, with its error there.
                    let empty = CelScope { ctx: CelValue::Null, event: CelValue::Null, thred: CelValue::Null, now_ms: 0 };
                    expression.constant = expression.execute(&empty).ok().map(Box::new);
                }
                Ok(expression)
            }
            Ok(Err(errors)) => Err(format!("CEL syntax error in {source:?}: {errors}")),
            Err(_) => Err(format!("CEL syntax error in {source:?}")),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Names of the top-level variables the expression reads.
    pub fn variables(&self) -> Vec<String> {
        self.program.references().variables().into_iter().map(str::to_owned).collect()
    }

    /// Evaluates to a JSON value.
    pub fn evaluate(&self, scope: &Scope<'_>) -> Result<Value, String> {
        self.evaluate_cel(&scope.to_cel())
    }

    /// Evaluates over already-converted variables.
    pub fn evaluate_cel(&self, scope: &CelScope) -> Result<Value, String> {
        if let Some(constant) = &self.constant {
            return Ok(Value::clone(constant));
        }
        self.execute(scope)
    }

    fn execute(&self, scope: &CelScope) -> Result<Value, String> {
        let mut context = base_context().new_inner_scope();
        context.add_variable_from_value("ctx", scope.ctx.clone());
        context.add_variable_from_value("event", scope.event.clone());
        context.add_variable_from_value("thred", scope.thred.clone());
        context.add_variable_from_value("now", CelValue::Int(scope.now_ms));
        let value = self.program.execute(&context).map_err(|error| format!("{}{:?} failed: {error}", self.prefix(), self.source))?;
        cel_to_json(&value).map_err(|reason| format!("{}{:?} gave {reason}", self.prefix(), self.source))
    }

    fn prefix(&self) -> String {
        if self.location.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.location)
        }
    }

    /// Evaluates a guard: it must give a boolean.
    pub fn evaluate_bool(&self, scope: &Scope<'_>) -> Result<bool, String> {
        self.evaluate_bool_cel(&scope.to_cel())
    }

    /// Evaluates a guard over already-converted variables.
    pub fn evaluate_bool_cel(&self, scope: &CelScope) -> Result<bool, String> {
        match self.evaluate_cel(scope)? {
            Value::Bool(flag) => Ok(flag),
            other => Err(format!("{}{:?} must give a boolean, gave {other}", self.prefix(), self.source)),
        }
    }
}

/// The standard functions, registered once: building them for every evaluation dominated the
/// cost of a step.
fn base_context() -> &'static Context<'static> {
    static BASE: OnceLock<Context<'static>> = OnceLock::new();
    BASE.get_or_init(Context::default)
}

/// JSON into CEL: integers stay integers so that `ctx.attempts + 1` type-checks.
pub fn json_to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(flag) => CelValue::Bool(*flag),
        Value::Number(number) => match (number.as_i64(), number.as_u64()) {
            (Some(integer), _) => CelValue::Int(integer),
            (None, Some(unsigned)) => CelValue::UInt(unsigned),
            _ => CelValue::Float(number.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(text) => CelValue::String(Arc::new(text.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Value::Object(object) => json_object_to_cel(object),
    }
}

/// A JSON object into a CEL map.
pub fn json_object_to_cel(object: &Map<String, Value>) -> CelValue {
    let map: HashMap<Key, CelValue> = object.iter().map(|(name, item)| (Key::String(Arc::new(name.clone())), json_to_cel(item))).collect();
    CelValue::Map(CelMap { map: Arc::new(map) })
}

/// CEL back into JSON; functions, bytes, durations and timestamps have no place in a thred.
pub fn cel_to_json(value: &CelValue) -> Result<Value, String> {
    Ok(match value {
        CelValue::Null => Value::Null,
        CelValue::Bool(flag) => Value::Bool(*flag),
        CelValue::Int(integer) => Value::Number(Number::from(*integer)),
        CelValue::UInt(unsigned) => Value::Number(Number::from(*unsigned)),
        CelValue::Float(float) => Number::from_f64(*float).map(Value::Number).ok_or_else(|| format!("a non-finite number ({float})"))?,
        CelValue::String(text) => Value::String(text.to_string()),
        CelValue::List(items) => Value::Array(items.iter().map(cel_to_json).collect::<Result<_, _>>()?),
        CelValue::Map(map) => {
            let mut object = Map::new();
            for (key, item) in map.map.iter() {
                let name = match key {
                    Key::String(text) => text.to_string(),
                    Key::Int(integer) => integer.to_string(),
                    Key::Uint(unsigned) => unsigned.to_string(),
                    Key::Bool(flag) => flag.to_string(),
                };
                object.insert(name, cel_to_json(item)?);
            }
            Value::Object(object)
        }
        other => return Err(format!("a value JSON cannot hold ({:?})", other.type_of())),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_context_value_set_in_place_reads_like_a_fresh_conversion() {
        let ctx = json!({"user": "alice", "attempts": 2}).as_object().cloned().unwrap();
        let (event, thred) = (json!({}), json!({}));
        let mut scope = Scope { ctx: &ctx, event: &event, thred: &thred, now_ms: 0 }.to_cel();
        let shared = scope.clone();
        assert!(scope.set_ctx("attempts", &json!(3)));
        assert!(scope.set_ctx("host", &json!("h1")));
        let read = Expression::compile("[ctx.user, ctx.attempts, ctx.host]").unwrap();
        assert_eq!(read.evaluate_cel(&scope).unwrap(), json!(["alice", 3, "h1"]));
        // A clone taken before (an expression's variables) keeps what it saw.
        assert_eq!(Expression::compile("ctx.attempts").unwrap().evaluate_cel(&shared).unwrap(), json!(2));
        scope.ctx = CelValue::Null;
        assert!(!scope.set_ctx("attempts", &json!(4)), "no map to set in");
    }

    #[track_caller]
    fn check(source: &str, expected: Result<Value, &str>) {
        let ctx = json!({"user": "alice", "attempts": 2, "timers": {"idle_after_secs": 60}});
        let event = json!({"type": "session.open", "data": {"profile": "dev"}});
        let scope = Scope { ctx: ctx.as_object().unwrap(), event: &event, thred: &json!({"state": "open"}), now_ms: 1000 };
        let outcome = Expression::compile(source).and_then(|expression| expression.evaluate(&scope));
        match (outcome, expected) {
            (Ok(actual), Ok(expected)) => assert_eq!(actual, expected, "{source}"),
            (Err(actual), Err(fragment)) => assert!(actual.contains(fragment), "{actual:?} lacks {fragment:?}"),
            (actual, expected) => panic!("{source}: got {actual:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn expressions_table() {
        check("ctx.user", Ok(json!("alice")));
        check("ctx.attempts + 1", Ok(json!(3)));
        check("ctx.attempts < 3 && event.data.profile == 'dev'", Ok(json!(true)));
        check("has(event.data.missing)", Ok(json!(false)));
        check("has(event.data.profile) ? event.data.profile : 'none'", Ok(json!("dev")));
        check("ctx.timers.idle_after_secs * 1000 + now", Ok(json!(61000)));
        check("{'a': ctx.user, 'b': [1, 2]}", Ok(json!({"a": "alice", "b": [1, 2]})));
        check("[1, 2, 4, 8][ctx.attempts]", Ok(json!(4)));
        check("ctx.nope", Err("failed"));
        check("ctx.user +", Err("CEL syntax error"));
        check("", Err("expression is empty"));
        // Found by tests/pattern_properties.rs: these overflowed the parser's stack and aborted.
        check(&format!("{}1{}", "(".repeat(400), ")".repeat(400)), Err("nests brackets more than 32 deep"));
        check(&"[".repeat(200), Err("nests brackets more than 32 deep"));
        check(&"true ? 1 : ".repeat(3200), Err("over the limit of 1024"));
        check(&format!("ctx.a {}", "<".repeat(3000)), Err("over the limit of 1024"));
        check(&format!("{}1{}", "(".repeat(32), ")".repeat(32)), Ok(json!(1)));
    }

    #[test]
    fn expressions_without_variables_are_computed_once_and_failing_ones_still_fail() {
        for (source, expected) in [("'0'", json!("0")), ("false", json!(false)), ("{}", json!({})), ("[]", json!([])), ("1 + 2", json!(3))]
        {
            let expression = Expression::compile(source).unwrap();
            assert_eq!(expression.constant.as_deref(), Some(&expected), "{source}");
            check(source, Ok(expected));
        }
        // Reads a variable: evaluated each time.
        assert!(Expression::compile("ctx.user").unwrap().constant.is_none());
        assert!(Expression::compile("now + 1").unwrap().constant.is_none());
        // A constant that fails is not folded: each evaluation reports its error.
        assert!(Expression::compile("1 / 0").unwrap().constant.is_none());
        check("1 / 0", Err("failed"));
    }
}
