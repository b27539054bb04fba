//! Three-valued evaluation of a condition when only some of its input is
//! known (the compiler's static approval needs: what a rule will do to a
//! step before the step runs).
//!
//! The caller says what each path is ([`Partial::Known`] value or
//! [`Partial::Unknown`]); literals are known; function calls, arithmetic and
//! negation are unknown. `and`/`or` are decided by a known operand when it
//! suffices (`false and ?` is `false`, `true or ?` is `true`). Comparisons of
//! known values use the evaluator's own rules ([`crate::eval`]), but only
//! where run time could not mean something else: equality between two
//! values of the same scalar kind, ordering between two numbers or two
//! strings, membership of a scalar in a list (an element of another kind is
//! unknown), a string in a string or a key in an object. Anything else is
//! unknown: unknown is the safe answer.
//!
//! Recursion follows the expression, which comes from a checked policy
//! (nesting bounded by [`MAX_NESTING`](crate::ast::MAX_NESTING)).

use serde_json::Value;

use crate::ast::{BinaryOp, Expr, ExprKind, Path, UnaryOp};
use crate::eval::{compare_json, contains_json};

/// What is known about a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Partial {
    /// Its value.
    Known(Value),
    /// Only run time will tell.
    Unknown,
}

impl Partial {
    /// `Some(b)` when known to be the boolean `b`.
    pub fn known_bool(&self) -> Option<bool> {
        match self {
            Partial::Known(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }
}

/// Evaluates `e` three-valued; `path` says what each input path is.
pub fn eval_partial(e: &Expr, path: &dyn Fn(&Path) -> Partial) -> Partial {
    use Partial::{Known, Unknown};
    match &e.kind {
        ExprKind::Null => Known(Value::Null),
        ExprKind::Bool(b) => Known(Value::Bool(*b)),
        ExprKind::Int(i) => Known(Value::from(*i)),
        ExprKind::Float(x) => {
            serde_json::Number::from_f64(*x).map_or(Unknown, |n| Known(Value::Number(n)))
        }
        ExprKind::Str(s) => Known(Value::from(s.as_str())),
        ExprKind::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for i in items {
                match eval_partial(i, path) {
                    Known(v) => out.push(v),
                    Unknown => return Unknown,
                }
            }
            Known(Value::Array(out))
        }
        ExprKind::Object(members) => {
            let mut out = serde_json::Map::new();
            for (k, v) in members {
                match eval_partial(v, path) {
                    Known(v) => {
                        out.insert(k.clone(), v);
                    }
                    Unknown => return Unknown,
                }
            }
            Known(Value::Object(out))
        }
        ExprKind::Path(p) => path(p),
        ExprKind::Unary(UnaryOp::Not, x) => match eval_partial(x, path).known_bool() {
            Some(b) => Known(Value::Bool(!b)),
            None => Unknown,
        },
        ExprKind::Unary(UnaryOp::Neg, _) | ExprKind::Call(..) => Unknown,
        ExprKind::Binary(op, a, b) => binary(*op, a, b, path),
    }
}

fn binary(op: BinaryOp, a: &Expr, b: &Expr, path: &dyn Fn(&Path) -> Partial) -> Partial {
    use Partial::{Known, Unknown};
    let (x, y) = (eval_partial(a, path), eval_partial(b, path));
    let boolean = |r: Option<bool>| r.map_or(Unknown, |b| Known(Value::Bool(b)));
    match op {
        BinaryOp::And => match (x.known_bool(), y.known_bool()) {
            (Some(false), _) | (_, Some(false)) => Known(Value::Bool(false)),
            (Some(true), Some(true)) => Known(Value::Bool(true)),
            _ => Unknown,
        },
        BinaryOp::Or => match (x.known_bool(), y.known_bool()) {
            (Some(true), _) | (_, Some(true)) => Known(Value::Bool(true)),
            (Some(false), Some(false)) => Known(Value::Bool(false)),
            _ => Unknown,
        },
        _ => {
            let (Known(x), Known(y)) = (x, y) else {
                return Unknown;
            };
            match op {
                BinaryOp::Eq | BinaryOp::Ne => boolean(
                    same_scalar_kind(&x, &y)
                        .then(|| compare_json(op, &x, &y))
                        .flatten(),
                ),
                BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
                    let ordered = matches!(
                        (&x, &y),
                        (Value::Number(_), Value::Number(_)) | (Value::String(_), Value::String(_))
                    );
                    boolean(ordered.then(|| compare_json(op, &x, &y)).flatten())
                }
                BinaryOp::In => boolean(membership(&x, &y)),
                BinaryOp::Contains => boolean(membership(&y, &x)),
                BinaryOp::Matches => match (x.as_str(), y.as_str()) {
                    (Some(s), Some(re)) => {
                        boolean(regex::Regex::new(re).ok().map(|r| r.is_match(s)))
                    }
                    _ => Unknown,
                },
                _ => Unknown,
            }
        }
    }
}

/// Both null, both booleans, both numbers or both strings.
fn same_scalar_kind(a: &Value, b: &Value) -> bool {
    matches!(
        (a, b),
        (Value::Null, Value::Null)
            | (Value::Bool(_), Value::Bool(_))
            | (Value::Number(_), Value::Number(_))
            | (Value::String(_), Value::String(_))
    )
}

/// `needle in hay`, when decidable.
fn membership(needle: &Value, hay: &Value) -> Option<bool> {
    match hay {
        Value::Array(items) => {
            let mut out = Some(false);
            for item in items {
                if !same_scalar_kind(needle, item) {
                    out = None;
                } else if compare_json(BinaryOp::Eq, needle, item) == Some(true) {
                    return Some(true);
                }
            }
            out
        }
        Value::String(_) | Value::Object(_) if needle.is_string() => {
            Some(contains_json(hay, needle))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
