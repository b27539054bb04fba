//! Run inputs checked against the plan's `inputs_schema`: every problem at
//! once, one violation per field, in words a user reads
//! (`inputs.amount_cents: must be ≥ 1`).

use anumate_errors::Violation;
use jsonschema::error::ValidationErrorKind;
use serde_json::Value;

/// The compiled inputs schema of a plan.
pub struct InputsSchema {
    validator: Option<jsonschema::Validator>,
    defaults: Vec<(String, Value)>,
}

impl std::fmt::Debug for InputsSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputsSchema")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl InputsSchema {
    /// Compiles `schema` (JSON Schema of the inputs object; `None` or `{}`:
    /// anything goes).
    ///
    /// # Errors
    /// The schema itself is invalid (the compiler should never produce one).
    pub fn new(schema: Option<&Value>) -> Result<Self, String> {
        let Some(schema) = schema.filter(|s| s.as_object().is_some_and(|m| !m.is_empty())) else {
            return Ok(InputsSchema {
                validator: None,
                defaults: Vec::new(),
            });
        };
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(schema)
            .map_err(|e| e.to_string())?;
        let mut defaults = Vec::new();
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                if let Some(d) = p.get("default") {
                    defaults.push((k.clone(), d.clone()));
                }
            }
        }
        defaults.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(InputsSchema {
            validator: Some(validator),
            defaults,
        })
    }

    /// `inputs` with defaults filled in, or every violation (sorted by field).
    ///
    /// # Errors
    /// One [`Violation`] per problem, fields named `inputs.<path>`.
    pub fn check(&self, inputs: &Value) -> Result<Value, Vec<Violation>> {
        if !inputs.is_object() {
            return Err(vec![Violation::new("inputs", "must be an object")]);
        }
        let mut with = inputs.clone();
        if let Value::Object(m) = &mut with {
            for (k, d) in &self.defaults {
                m.entry(k.clone()).or_insert_with(|| d.clone());
            }
        }
        let Some(v) = &self.validator else {
            return Ok(with);
        };
        let mut out: Vec<Violation> = v
            .iter_errors(&with)
            .map(|e| {
                let (field, description) = describe(e.instance_path().as_str(), e.kind());
                Violation::new(field, description)
            })
            .collect();
        if out.is_empty() {
            return Ok(with);
        }
        out.sort_by(|a, b| (&a.field, &a.description).cmp(&(&b.field, &b.description)));
        out.dedup_by(|a, b| a.field == b.field && a.description == b.description);
        Err(out)
    }
}

/// `inputs.a.b[0]` from the JSON pointer `/a/b/0`.
fn field_of(pointer: &str) -> String {
    let mut out = String::from("inputs");
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            out.push('.');
            out.push_str(&seg);
        }
    }
    out
}

fn describe(pointer: &str, kind: &ValidationErrorKind) -> (String, String) {
    let field = field_of(pointer);
    let text = match kind {
        ValidationErrorKind::Required { property } => {
            let name = property
                .as_str()
                .map_or_else(|| property.to_string(), str::to_string);
            let child = if field == "inputs" {
                format!("inputs.{name}")
            } else {
                format!("{field}.{name}")
            };
            return (child, "is required".into());
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            format!("unknown field(s): {}", unexpected.join(", "))
        }
        ValidationErrorKind::Minimum { limit } => format!("must be ≥ {limit}"),
        ValidationErrorKind::Maximum { limit } => format!("must be ≤ {limit}"),
        ValidationErrorKind::ExclusiveMinimum { limit } => format!("must be > {limit}"),
        ValidationErrorKind::ExclusiveMaximum { limit } => format!("must be < {limit}"),
        ValidationErrorKind::MinLength { limit } => format!("must be at least {limit} characters"),
        ValidationErrorKind::MaxLength { limit } => format!("must be at most {limit} characters"),
        ValidationErrorKind::MinItems { limit } => format!("must have at least {limit} items"),
        ValidationErrorKind::MaxItems { limit } => format!("must have at most {limit} items"),
        ValidationErrorKind::Pattern { pattern } => format!("must match /{pattern}/"),
        ValidationErrorKind::Format { format } => format!("must be a valid {format}"),
        ValidationErrorKind::Enum { options } => format!("must be one of {options}"),
        ValidationErrorKind::Constant { expected_value } => format!("must be {expected_value}"),
        ValidationErrorKind::Type { kind } => format!("must be of type {}", type_name(kind)),
        other => format!("{other:?}").chars().take(120).collect(),
    };
    (field, text)
}

fn type_name(kind: &jsonschema::error::TypeKind) -> String {
    match kind {
        jsonschema::error::TypeKind::Single(t) => t.to_string(),
        jsonschema::error::TypeKind::Multiple(ts) => {
            let names: Vec<String> = (*ts).into_iter().map(|t| t.to_string()).collect();
            names.join(" or ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> InputsSchema {
        InputsSchema::new(Some(&json!({
            "type": "object",
            "required": ["amount_cents", "order_id"],
            "additionalProperties": false,
            "properties": {
                "amount_cents": {"type": "integer", "minimum": 1},
                "order_id": {"type": "string", "pattern": "^ord_[0-9]+$"},
                "currency": {"type": "string", "enum": ["EUR", "USD"], "default": "EUR"}
            }
        })))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_problem_is_reported_at_once_by_field() {
        let err = schema()
            .check(&json!({"amount_cents": 0, "currency": "GBP", "extra": 1}))
            .err()
            .unwrap_or_default();
        let got: Vec<String> = err
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        assert_eq!(
            got,
            [
                "inputs: unknown field(s): extra",
                "inputs.amount_cents: must be ≥ 1",
                "inputs.currency: must be one of [\"EUR\",\"USD\"]",
                "inputs.order_id: is required",
            ]
        );
    }

    #[test]
    fn defaults_are_filled_and_valid_inputs_pass() {
        let ok = schema().check(&json!({"amount_cents": 5, "order_id": "ord_1"}));
        assert_eq!(
            ok,
            Ok(json!({"amount_cents": 5, "order_id": "ord_1", "currency": "EUR"}))
        );
    }
}
