//! The evaluation form and its interpreter.
//!
//! Nodes refer to input roots by slot number and to nested fields by
//! pre-split segments; regexes are compiled; constant subtrees are folded.
//! Every node visited costs one unit of fuel, scanning a list or a string
//! costs in proportion to its length; running out is [`EvalError::FuelExhausted`].
//!
//! Semantics worth knowing: a missing field reads as `null`; comparing values
//! of different kinds is `false` (`!=` is `true`); ordering works on numbers
//! and on strings; arithmetic on non-numbers gives `null`; a rule matches only
//! when its condition is exactly `true`.

use std::borrow::Cow;
use std::cmp::Ordering;

use regex::Regex;
use serde_json::Value;

use crate::ast::BinaryOp;
use crate::builtins::Builtin;

/// Why an evaluation stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// The fixed fuel ran out: the decision is unknown, not a deny.
    #[error("evaluation ran out of fuel (limit {limit}) in rule `{policy}/{rule}`")]
    FuelExhausted {
        /// The fuel the evaluation had.
        limit: u64,
        /// The policy being evaluated.
        policy: String,
        /// The rule being evaluated.
        rule: String,
    },
    /// The input was not a JSON object.
    #[error("the input must be a JSON object")]
    InputNotObject,
}

/// The most roots any schema has.
pub(crate) const MAX_ROOTS: usize = 12;

/// Input roots by slot.
pub(crate) type Slots<'a> = [Option<&'a Value>; MAX_ROOTS];

/// One segment of a compiled path.
#[derive(Debug)]
pub(crate) enum Seg {
    /// An object key; also an array index when it is all digits.
    Key(Box<str>, Option<usize>),
    /// An array index; negative counts from the end.
    Index(i64),
}

/// Comparison operators.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Arithmetic operators.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

/// A compiled expression.
#[derive(Debug)]
pub(crate) enum Node {
    Const(Value),
    Root(u8),
    Path(u8, Box<[Seg]>),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Box<(Node, Node)>),
    Or(Box<(Node, Node)>),
    Cmp(Cmp, Box<(Node, Node)>),
    Arith(Arith, Box<(Node, Node)>),
    /// `container contains item` (`item in container` is compiled to this).
    Contains(Box<(Node, Node)>),
    Matches(Box<Node>, Box<Regex>),
    Call(Builtin, Box<[Node]>),
    List(Box<[Node]>),
    Object(Box<[(Box<str>, Node)]>),
}

impl Node {
    pub(crate) fn binary(op: BinaryOp, a: Node, b: Node) -> Node {
        let pair = |a, b| Box::new((a, b));
        match op {
            BinaryOp::Or => Node::Or(pair(a, b)),
            BinaryOp::And => Node::And(pair(a, b)),
            BinaryOp::Eq => Node::Cmp(Cmp::Eq, pair(a, b)),
            BinaryOp::Ne => Node::Cmp(Cmp::Ne, pair(a, b)),
            BinaryOp::Lt => Node::Cmp(Cmp::Lt, pair(a, b)),
            BinaryOp::Le => Node::Cmp(Cmp::Le, pair(a, b)),
            BinaryOp::Gt => Node::Cmp(Cmp::Gt, pair(a, b)),
            BinaryOp::Ge => Node::Cmp(Cmp::Ge, pair(a, b)),
            BinaryOp::In => Node::Contains(pair(b, a)),
            BinaryOp::Contains => Node::Contains(pair(a, b)),
            BinaryOp::Add => Node::Arith(Arith::Add, pair(a, b)),
            BinaryOp::Sub => Node::Arith(Arith::Sub, pair(a, b)),
            BinaryOp::Mul => Node::Arith(Arith::Mul, pair(a, b)),
            BinaryOp::Div => Node::Arith(Arith::Div, pair(a, b)),
            // `matches` is compiled by the checker, which owns the regex.
            BinaryOp::Matches => Node::Const(Value::Null),
        }
    }

    fn is_const(&self) -> bool {
        matches!(self, Node::Const(_))
    }

    /// Replaces this node by its value when it depends on no input.
    pub(crate) fn fold(self) -> Node {
        let foldable = match &self {
            Node::Const(_) | Node::Root(_) | Node::Path(..) => false,
            Node::Not(a) | Node::Neg(a) | Node::Matches(a, _) => a.is_const(),
            Node::And(p)
            | Node::Or(p)
            | Node::Cmp(_, p)
            | Node::Arith(_, p)
            | Node::Contains(p) => p.0.is_const() && p.1.is_const(),
            Node::Call(_, args) | Node::List(args) => args.iter().all(Node::is_const),
            Node::Object(fields) => fields.iter().all(|(_, n)| n.is_const()),
        };
        if !foldable {
            return self;
        }
        let slots: Slots<'_> = [None; MAX_ROOTS];
        let mut fuel = Fuel::new(u64::MAX);
        match eval(&self, &slots, &mut fuel) {
            Ok(v) => Node::Const(v.to_json()),
            Err(_) => self,
        }
    }
}

/// Remaining fuel.
pub(crate) struct Fuel {
    pub left: u64,
}

/// Fuel ran out.
#[derive(Debug)]
pub(crate) struct OutOfFuel;

impl Fuel {
    pub(crate) fn new(limit: u64) -> Self {
        Fuel { left: limit }
    }

    #[inline]
    fn burn(&mut self, n: u64) -> Result<(), OutOfFuel> {
        match self.left.checked_sub(n) {
            Some(l) => {
                self.left = l;
                Ok(())
            }
            None => {
                self.left = 0;
                Err(OutOfFuel)
            }
        }
    }
}

/// A value during evaluation; borrows from the input or the compiled program.
#[derive(Debug, Clone)]
pub(crate) enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    /// A JSON array or object.
    Json(&'a Value),
    /// A list built by the expression.
    List(Vec<Val<'a>>),
    /// An object built by the expression.
    Object(Vec<(&'a str, Val<'a>)>),
}

impl<'a> Val<'a> {
    #[inline]
    pub(crate) fn from_json(v: &'a Value) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Val::Int(i),
                None => Val::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Val::Str(Cow::Borrowed(s)),
            Value::Array(_) | Value::Object(_) => Val::Json(v),
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Int(i) => Value::from(*i),
            Val::Float(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
            Val::Str(s) => Value::String(s.to_string()),
            Val::Json(v) => (*v).clone(),
            Val::List(items) => Value::Array(items.iter().map(Val::to_json).collect()),
            Val::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Val::Int(i) => Some(*i as f64),
            Val::Float(x) => Some(*x),
            _ => None,
        }
    }

    /// Elements when this is a list.
    fn list_len(&self) -> Option<usize> {
        match self {
            Val::Json(Value::Array(a)) => Some(a.len()),
            Val::List(l) => Some(l.len()),
            _ => None,
        }
    }

    fn list_get(&self, i: usize) -> Option<Val<'a>> {
        match self {
            Val::Json(Value::Array(a)) => a.get(i).map(Val::from_json),
            Val::List(l) => l.get(i).cloned(),
            _ => None,
        }
    }
}

fn num_cmp(a: &Val<'_>, b: &Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

fn val_eq(a: &Val<'_>, b: &Val<'_>) -> bool {
    match (a, b) {
        (Val::Null, Val::Null) => true,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::Int(_) | Val::Float(_), Val::Int(_) | Val::Float(_)) => {
            num_cmp(a, b) == Some(Ordering::Equal)
        }
        (Val::Json(Value::Object(x)), Val::Json(Value::Object(y))) => x == y,
        (Val::Object(_), _) | (_, Val::Object(_)) => a.to_json() == b.to_json(),
        _ => match (a.list_len(), b.list_len()) {
            (Some(n), Some(m)) if n == m => (0..n).all(|i| match (a.list_get(i), b.list_get(i)) {
                (Some(x), Some(y)) => val_eq(&x, &y),
                _ => false,
            }),
            _ => false,
        },
    }
}

fn compare(op: Cmp, a: &Val<'_>, b: &Val<'_>) -> bool {
    let ord = match op {
        Cmp::Eq => return val_eq(a, b),
        Cmp::Ne => return !val_eq(a, b),
        _ => match (a, b) {
            (Val::Str(x), Val::Str(y)) => Some(x.as_ref().cmp(y.as_ref())),
            _ => num_cmp(a, b),
        },
    };
    match ord {
        None => false,
        Some(o) => match op {
            Cmp::Lt => o == Ordering::Less,
            Cmp::Le => o != Ordering::Greater,
            Cmp::Gt => o == Ordering::Greater,
            _ => o != Ordering::Less,
        },
    }
}

fn arith<'a>(op: Arith, a: &Val<'_>, b: &Val<'_>) -> Val<'a> {
    if let (Val::Int(x), Val::Int(y)) = (a, b) {
        let exact = match op {
            Arith::Add => x.checked_add(*y),
            Arith::Sub => x.checked_sub(*y),
            Arith::Mul => x.checked_mul(*y),
            Arith::Div => {
                if *y != 0 && x.checked_rem(*y) == Some(0) {
                    x.checked_div(*y)
                } else {
                    None
                }
            }
        };
        if let Some(v) = exact {
            return Val::Int(v);
        }
    }
    let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
        return Val::Null;
    };
    let r = match op {
        Arith::Add => x + y,
        Arith::Sub => x - y,
        Arith::Mul => x * y,
        Arith::Div => x / y,
    };
    if r.is_finite() {
        Val::Float(r)
    } else {
        Val::Null
    }
}

fn contains(container: &Val<'_>, item: &Val<'_>, fuel: &mut Fuel) -> Result<bool, OutOfFuel> {
    match (container, item) {
        (Val::Str(s), Val::Str(sub)) => {
            fuel.burn(s.len() as u64 / 64)?;
            Ok(s.contains(sub.as_ref()))
        }
        (Val::Json(Value::Array(items)), _) => {
            fuel.burn(items.len() as u64)?;
            // Fast path for the common string-in-list case.
            if let Val::Str(s) = item {
                return Ok(items.iter().any(|v| v.as_str() == Some(s.as_ref())));
            }
            Ok(items.iter().any(|v| val_eq(&Val::from_json(v), item)))
        }
        (Val::List(items), _) => {
            fuel.burn(items.len() as u64)?;
            Ok(items.iter().any(|v| val_eq(v, item)))
        }
        (Val::Json(Value::Object(map)), Val::Str(k)) => Ok(map.contains_key(k.as_ref())),
        (Val::Object(fields), Val::Str(k)) => Ok(fields.iter().any(|(n, _)| *n == k.as_ref())),
        _ => Ok(false),
    }
}

#[inline]
fn lookup<'a>(mut v: &'a Value, segs: &[Seg]) -> Option<&'a Value> {
    for s in segs {
        v = match (s, v) {
            (Seg::Key(k, _), Value::Object(m)) => m.get(k.as_ref())?,
            (Seg::Key(_, Some(i)), Value::Array(a)) => a.get(*i)?,
            (Seg::Index(i), Value::Array(a)) => {
                let idx = if *i < 0 {
                    a.len()
                        .checked_sub(usize::try_from(i.unsigned_abs()).ok()?)?
                } else {
                    usize::try_from(*i).ok()?
                };
                a.get(idx)?
            }
            _ => return None,
        };
    }
    Some(v)
}

/// Evaluates `n` against the input slots.
pub(crate) fn eval<'a>(
    n: &'a Node,
    inp: &Slots<'a>,
    fuel: &mut Fuel,
) -> Result<Val<'a>, OutOfFuel> {
    fuel.burn(1)?;
    Ok(match n {
        Node::Const(v) => Val::from_json(v),
        Node::Root(slot) => inp
            .get(usize::from(*slot))
            .copied()
            .flatten()
            .map_or(Val::Null, Val::from_json),
        Node::Path(slot, segs) => inp
            .get(usize::from(*slot))
            .copied()
            .flatten()
            .and_then(|v| lookup(v, segs))
            .map_or(Val::Null, Val::from_json),
        Node::Not(a) => match eval(a, inp, fuel)? {
            Val::Bool(b) => Val::Bool(!b),
            _ => Val::Null,
        },
        Node::Neg(a) => match eval(a, inp, fuel)? {
            Val::Int(i) => i.checked_neg().map_or(Val::Float(-(i as f64)), Val::Int),
            Val::Float(x) => Val::Float(-x),
            _ => Val::Null,
        },
        Node::And(p) => match eval(&p.0, inp, fuel)? {
            Val::Bool(true) => Val::Bool(matches!(eval(&p.1, inp, fuel)?, Val::Bool(true))),
            _ => Val::Bool(false),
        },
        Node::Or(p) => match eval(&p.0, inp, fuel)? {
            Val::Bool(true) => Val::Bool(true),
            _ => Val::Bool(matches!(eval(&p.1, inp, fuel)?, Val::Bool(true))),
        },
        Node::Cmp(op, p) => {
            let a = eval(&p.0, inp, fuel)?;
            let b = eval(&p.1, inp, fuel)?;
            Val::Bool(compare(*op, &a, &b))
        }
        Node::Arith(op, p) => {
            let a = eval(&p.0, inp, fuel)?;
            let b = eval(&p.1, inp, fuel)?;
            arith(*op, &a, &b)
        }
        Node::Contains(p) => {
            let c = eval(&p.0, inp, fuel)?;
            let x = eval(&p.1, inp, fuel)?;
            Val::Bool(contains(&c, &x, fuel)?)
        }
        Node::Matches(a, re) => match eval(a, inp, fuel)? {
            Val::Str(s) => {
                fuel.burn(s.len() as u64 / 16)?;
                Val::Bool(re.is_match(&s))
            }
            _ => Val::Bool(false),
        },
        Node::Call(f, args) => {
            let mut vals = Vec::with_capacity(args.len());
            for a in args.iter() {
                vals.push(eval(a, inp, fuel)?);
            }
            call(*f, &vals, fuel)?
        }
        Node::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for a in items.iter() {
                out.push(eval(a, inp, fuel)?);
            }
            Val::List(out)
        }
        Node::Object(fields) => {
            let mut out = Vec::with_capacity(fields.len());
            for (k, a) in fields.iter() {
                out.push((k.as_ref(), eval(a, inp, fuel)?));
            }
            Val::Object(out)
        }
    })
}

fn call<'a>(f: Builtin, args: &[Val<'a>], fuel: &mut Fuel) -> Result<Val<'a>, OutOfFuel> {
    let s0 = match args.first() {
        Some(Val::Str(s)) => Some(s.as_ref()),
        _ => None,
    };
    if let Some(s) = s0 {
        fuel.burn(s.len() as u64 / 64)?;
    }
    let s1 = match args.get(1) {
        Some(Val::Str(s)) => Some(s.as_ref()),
        _ => None,
    };
    Ok(match f {
        Builtin::Lower => s0.map_or(Val::Null, |s| Val::Str(Cow::Owned(s.to_lowercase()))),
        Builtin::Upper => s0.map_or(Val::Null, |s| Val::Str(Cow::Owned(s.to_uppercase()))),
        Builtin::Trim => match args.first() {
            Some(Val::Str(Cow::Borrowed(s))) => Val::Str(Cow::Borrowed(s.trim())),
            _ => s0.map_or(Val::Null, |s| Val::Str(Cow::Owned(s.trim().to_string()))),
        },
        Builtin::Len => match args.first() {
            Some(Val::Str(s)) => Val::Int(i64::try_from(s.chars().count()).unwrap_or(i64::MAX)),
            Some(Val::Json(Value::Object(m))) => {
                Val::Int(i64::try_from(m.len()).unwrap_or(i64::MAX))
            }
            Some(Val::Object(m)) => Val::Int(i64::try_from(m.len()).unwrap_or(i64::MAX)),
            Some(v) => v.list_len().map_or(Val::Null, |n| {
                Val::Int(i64::try_from(n).unwrap_or(i64::MAX))
            }),
            None => Val::Null,
        },
        Builtin::StartsWith => match (s0, s1) {
            (Some(a), Some(b)) => Val::Bool(a.starts_with(b)),
            _ => Val::Bool(false),
        },
        Builtin::EndsWith => match (s0, s1) {
            (Some(a), Some(b)) => Val::Bool(a.ends_with(b)),
            _ => Val::Bool(false),
        },
        Builtin::Detect(d) => Val::Bool(s0.is_some_and(|s| d.detect(s))),
    })
}
