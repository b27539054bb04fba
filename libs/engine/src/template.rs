//! Step arguments with `${{ … }}` expressions, compiled once per plan and
//! rendered per call with the policy crate's evaluator (one evaluator for
//! policies, conditions and arguments).

use anumate_policy::{TemplateExpr, TemplateScope, compile_template_expr};
use serde_json::{Map, Value};

/// A compiled argument tree.
#[derive(Debug)]
pub enum Template {
    /// A value without expressions.
    Literal(Value),
    /// A string that is exactly one expression: its value, typed.
    Expr(TemplateExpr),
    /// Text with embedded expressions: the pieces concatenated.
    Interpolated(Vec<Piece>),
    /// An array of templates.
    Array(Vec<Template>),
    /// An object of templates, in key order.
    Object(Vec<(String, Template)>),
}

/// A piece of an interpolated string.
#[derive(Debug)]
pub enum Piece {
    /// Literal text.
    Text(String),
    /// An expression; strings are inserted as they are, other values as JSON.
    Expr(TemplateExpr),
}

/// Why a template could not be compiled or rendered; `path` is where in the
/// arguments (`args.amount`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TemplateError {
    /// Argument path.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Template {
    /// Compiles `v`, whose strings may hold expressions, against `scope`.
    pub fn compile(
        v: &Value,
        path: &str,
        scope: &TemplateScope<'_>,
    ) -> Result<Self, TemplateError> {
        Ok(match v {
            Value::String(s) => compile_string(s, path, scope)?,
            Value::Array(a) => Template::Array(
                a.iter()
                    .enumerate()
                    .map(|(i, x)| Template::compile(x, &format!("{path}[{i}]"), scope))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => Template::Object(
                m.iter()
                    .map(|(k, x)| {
                        Ok((
                            k.clone(),
                            Template::compile(x, &format!("{path}.{k}"), scope)?,
                        ))
                    })
                    .collect::<Result<_, TemplateError>>()?,
            ),
            other => Template::Literal(other.clone()),
        })
    }

    /// Renders with `inputs` and `steps` (`{id: {output, status}}`).
    pub fn render(
        &self,
        inputs: &Value,
        steps: &Value,
        path: &str,
    ) -> Result<Value, TemplateError> {
        Ok(match self {
            Template::Literal(v) => v.clone(),
            Template::Expr(e) => eval(e, inputs, steps, path)?,
            Template::Interpolated(pieces) => {
                let mut s = String::new();
                for p in pieces {
                    match p {
                        Piece::Text(t) => s.push_str(t),
                        Piece::Expr(e) => match eval(e, inputs, steps, path)? {
                            Value::String(x) => s.push_str(&x),
                            other => s.push_str(&other.to_string()),
                        },
                    }
                }
                Value::String(s)
            }
            Template::Array(a) => Value::Array(
                a.iter()
                    .enumerate()
                    .map(|(i, t)| t.render(inputs, steps, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Template::Object(m) => {
                let mut out = Map::with_capacity(m.len());
                for (k, t) in m {
                    out.insert(k.clone(), t.render(inputs, steps, &format!("{path}.{k}"))?);
                }
                Value::Object(out)
            }
        })
    }
}

fn eval(
    e: &TemplateExpr,
    inputs: &Value,
    steps: &Value,
    path: &str,
) -> Result<Value, TemplateError> {
    e.eval(inputs, steps).map_err(|err| TemplateError {
        path: path.to_string(),
        message: err.to_string(),
    })
}

/// Compiles one expression body.
pub fn compile_expr(
    body: &str,
    path: &str,
    scope: &TemplateScope<'_>,
) -> Result<TemplateExpr, TemplateError> {
    compile_template_expr(body, scope).map_err(|e| TemplateError {
        path: path.to_string(),
        message: e
            .diagnostics
            .first()
            .map_or_else(|| "invalid expression".to_string(), |d| d.message.clone()),
    })
}

fn compile_string(
    s: &str,
    path: &str,
    scope: &TemplateScope<'_>,
) -> Result<Template, TemplateError> {
    let exprs = anumate_capsule::expr::find_expressions(s).map_err(|e| TemplateError {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    if exprs.is_empty() {
        return Ok(Template::Literal(Value::String(s.to_string())));
    }
    if exprs.len() == 1 && exprs[0].start == 0 && exprs[0].end == s.len() {
        return Ok(Template::Expr(compile_expr(exprs[0].body, path, scope)?));
    }
    let mut pieces = Vec::with_capacity(exprs.len() * 2 + 1);
    let mut at = 0;
    for e in exprs {
        if e.start > at {
            pieces.push(Piece::Text(
                s.get(at..e.start).unwrap_or_default().to_string(),
            ));
        }
        pieces.push(Piece::Expr(compile_expr(e.body, path, scope)?));
        at = e.end;
    }
    if at < s.len() {
        pieces.push(Piece::Text(s.get(at..).unwrap_or_default().to_string()));
    }
    Ok(Template::Interpolated(pieces))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope() -> TemplateScope<'static> {
        TemplateScope {
            inputs: &["amount", "name"],
            steps_upstream: &["fetch"],
            steps_known: &["fetch"],
        }
    }

    #[test]
    fn whole_expressions_keep_their_type_and_text_interpolates() {
        let t = Template::compile(
            &json!({"amount": "${{ inputs.amount * 2 }}", "memo": "for ${{ inputs.name }} (${{ inputs.amount }})", "n": 3}),
            "args",
            &scope(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let out = t
            .render(&json!({"amount": 21, "name": "ann"}), &json!({}), "args")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, json!({"amount": 42, "memo": "for ann (21)", "n": 3}));
    }

    #[test]
    fn unknown_inputs_are_refused_at_compile_time_with_their_path() {
        let e = Template::compile(&json!({"x": ["${{ inputs.nope }}"]}), "args", &scope())
            .err()
            .map(|e| e.path);
        assert_eq!(e.as_deref(), Some("args.x[0]"));
    }
}
