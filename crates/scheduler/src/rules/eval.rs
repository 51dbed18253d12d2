//! Evaluating a rule against one event: the CEL variables, conditions and templates.

use std::sync::Arc;

use agentmesh_proto::eventbus::v1 as bus;
use serde_json::{Value as Json, json};

use super::model::{Part, Template};

/// CEL's standard environment, built once (building it per event cost more than evaluating a
/// typical condition).
static STDLIB: std::sync::LazyLock<Arc<cel::Env>> =
    std::sync::LazyLock::new(|| Arc::new(cel::Env::stdlib()));

/// The variables of one stimulus: built once per event and shared by every rule it reaches.
pub struct Variables {
    context: cel::Context<'static, 'static>,
}

impl std::fmt::Debug for Variables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Variables")
    }
}

/// `data` as CEL sees it: parsed JSON when it is JSON, else the text, else null.
fn data_value(event: &bus::Event) -> Json {
    if event.data.is_empty() {
        return Json::Null;
    }
    if let Ok(value) = serde_json::from_slice::<Json>(&event.data) {
        return value;
    }
    match std::str::from_utf8(&event.data) {
        Ok(text) => Json::String(text.to_owned()),
        Err(_) => Json::Null,
    }
}

fn priority_name(p: i32) -> &'static str {
    match bus::Priority::try_from(p) {
        Ok(bus::Priority::Low) => "LOW",
        Ok(bus::Priority::High) => "HIGH",
        Ok(bus::Priority::Critical) => "CRITICAL",
        _ => "NORMAL",
    }
}

/// `2026-12-04T18:33:54.123Z`; empty when unset.
fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else {
        return String::new();
    };
    let secs = t.seconds.max(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.nanos.max(0) / 1_000_000
    )
}

impl Variables {
    /// The variables of `event` for rule `rule` (`rule` and `firing` are set per rule with
    /// [`Variables::for_rule`]).
    #[must_use]
    pub fn new(event: &bus::Event) -> Self {
        let headers: serde_json::Map<String, Json> = event
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
            .collect();
        let event_value = json!({
            "id": event.id,
            "subject": event.subject,
            "type": event.r#type,
            "source": event.source,
            "time": rfc3339(event.time.as_ref()),
            "priority": priority_name(event.priority),
            "correlation_id": event.correlation_id,
            "content_type": event.content_type,
            "headers": headers,
        });
        let mut context = cel::Context::with_env(STDLIB.clone());
        // Serialising plain JSON cannot fail.
        let _ = context.add_variable("event", event_value);
        let _ = context.add_variable("headers", Json::Object(headers));
        let _ = context.add_variable("data", data_value(event));
        // Set in cascade steps and correlated firings; null elsewhere.
        let _ = context.add_variable("output", Json::Null);
        let _ = context.add_variable("correlation", Json::Null);
        Self { context }
    }

    /// A scope for one rule's condition: `rule`.
    #[must_use]
    pub fn for_condition<'a>(&'a self, rule: &str) -> cel::Context<'a, 'static> {
        let mut scope = self.context.new_inner_scope();
        let _ = scope.add_variable("rule", rule);
        scope
    }

    /// A scope for one rule's responses: `rule` and `firing` (`id`, `rule`, `response`).
    #[must_use]
    pub fn for_rule<'a>(
        &'a self,
        rule: &str,
        firing_id: &str,
        response: &str,
    ) -> cel::Context<'a, 'static> {
        let mut scope = self.context.new_inner_scope();
        let _ = scope.add_variable("rule", rule);
        let _ = scope.add_variable(
            "firing",
            json!({"id": firing_id, "rule": rule, "response": response}),
        );
        scope
    }
}

impl Variables {
    /// A scope for one response: `rule`, `firing`, and the extra variables (`output`,
    /// `correlation`) of `extra`, a JSON object.
    #[must_use]
    pub fn for_step<'a>(
        &'a self,
        rule: &str,
        firing_id: &str,
        response: &str,
        extra: &Json,
    ) -> cel::Context<'a, 'static> {
        let mut scope = self.for_rule(rule, firing_id, response);
        if let Some(map) = extra.as_object() {
            for (k, v) in map {
                let _ = scope.add_variable(k.as_str(), v.clone());
            }
        }
        scope
    }
}

/// A key expression's value as text (strings as they are, the rest as JSON); a null key is
/// an error (the event has none).
///
/// # Errors
/// When it fails to evaluate or gives null.
pub fn value_text(
    program: &Arc<cel::Program>,
    context: &cel::Context<'_, '_>,
) -> Result<String, String> {
    match program.execute(context) {
        Ok(cel::Value::Null) => Err("gave null".to_owned()),
        Ok(value) => Ok(text(&value)),
        Err(e) => Err(e.to_string()),
    }
}

/// The stimulus as a webhook's default body: its attributes, headers and data (parsed JSON
/// when it is JSON, else its text).
#[must_use]
pub fn stimulus_json(event: &bus::Event) -> String {
    json!({
        "id": event.id,
        "subject": event.subject,
        "type": event.r#type,
        "source": event.source,
        "time": rfc3339(event.time.as_ref()),
        "correlation_id": event.correlation_id,
        "content_type": event.content_type,
        "headers": event.headers.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "data": data_value(event),
    })
    .to_string()
}

/// Runs a condition or guard: it must give a boolean.
///
/// # Errors
/// A message when it fails or gives something else.
pub fn holds(program: &Arc<cel::Program>, context: &cel::Context<'_, '_>) -> Result<bool, String> {
    match program.execute(context) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("gave {other:?}, not a boolean")),
        Err(e) => Err(e.to_string()),
    }
}

/// A value as template text: strings as they are, null as nothing, the rest as JSON.
fn text(value: &cel::Value) -> String {
    match value {
        cel::Value::String(s) => s.to_string(),
        cel::Value::Null => String::new(),
        cel::Value::Int(i) => i.to_string(),
        cel::Value::UInt(u) => u.to_string(),
        cel::Value::Float(f) => f.to_string(),
        cel::Value::Bool(b) => b.to_string(),
        cel::Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        other => other
            .json()
            .map(|j| j.to_string())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

/// Renders a template.
///
/// # Errors
/// The first part that fails to evaluate.
pub fn render(template: &Template, context: &cel::Context<'_, '_>) -> Result<String, String> {
    let mut out = String::new();
    for part in &template.0 {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Expr(p) => out.push_str(&text(&p.execute(context).map_err(|e| e.to_string())?)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::model::template;

    fn event() -> bus::Event {
        bus::Event {
            id: "e1".into(),
            subject: "orders.created".into(),
            r#type: "order.created".into(),
            data: br#"{"amount": 1500, "customer": {"id": "c-7"}, "items": ["a", "b"]}"#.to_vec(),
            headers: [("region".to_owned(), "eu".to_owned())].into(),
            ..bus::Event::default()
        }
    }

    #[test]
    fn test_conditions_see_the_event_its_headers_and_its_json_data() {
        let vars = Variables::new(&event());
        let scope = vars.for_rule("big-orders", "big-orders/e1/alert", "alert");
        for (source, expected) in [
            ("data.amount > 1000", true),
            ("data.amount > 2000", false),
            (
                r#"event.type == "order.created" && headers.region == "eu""#,
                true,
            ),
            (r#"event.subject.startsWith("orders.")"#, true),
            ("size(data.items) == 2", true),
            (r#"data.customer.id == "c-7""#, true),
            (r#"rule == "big-orders""#, true),
            (r#"event.priority == "NORMAL""#, true),
        ] {
            let program = Arc::new(cel::Program::compile(source).expect(source));
            assert_eq!(holds(&program, &scope), Ok(expected), "{source}");
        }
        let not_bool = Arc::new(cel::Program::compile("data.amount").expect("compile"));
        assert!(holds(&not_bool, &scope).is_err());
        let missing = Arc::new(cel::Program::compile("data.nothing > 1").expect("compile"));
        assert!(holds(&missing, &scope).is_err());
    }

    #[test]
    fn test_event_times_are_rfc3339() {
        let t = prost_types::Timestamp {
            seconds: 1_796_409_234,
            nanos: 123_000_000,
        };
        assert_eq!(rfc3339(Some(&t)), "2026-12-04T18:33:54.123Z");
        assert_eq!(rfc3339(None), "");
    }

    #[test]
    fn test_templates_render_strings_numbers_and_json() {
        let vars = Variables::new(&event());
        let scope = vars.for_rule("r", "r/e1/x", "x");
        let mut errors = Vec::new();
        let t = template(
            "t",
            r#"alerts.${headers.region}: ${data.amount} by ${data.customer} ($${literal}) ${firing.id}"#,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            render(&t, &scope).expect("render"),
            r#"alerts.eu: 1500 by {"id":"c-7"} (${literal}) r/e1/x"#
        );
        let braces = template("t", r#"${ {"k": "}"}.k }"#, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(render(&braces, &scope).expect("render"), "}");
        template("t.open", "x ${data.amount", &mut errors);
        template("t.bad", "${1 +}", &mut errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[1].description.contains("line 1 column"),
            "{errors:?}"
        );
    }
}
