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
//!
//! Recursion is bounded: nodes come only from the checker, which lowers only
//! expressions within [`MAX_NESTING`](crate::ast::MAX_NESTING) levels, so
//! [`eval`] recurses at most a few frames per level; comparing input values
//! recurses per level of the JSON, which `serde_json` (128) and protobuf
//! `Struct` decoding (100) bound before a value reaches here.

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

    /// A copyable view of this value, for comparisons.
    #[inline]
    fn view(&self) -> View<'_> {
        match self {
            Val::Null => View::Null,
            Val::Bool(b) => View::Bool(*b),
            Val::Int(i) => View::Int(*i),
            Val::Float(x) => View::Float(*x),
            Val::Str(s) => View::Str(s),
            Val::Json(v) => View::Json(v),
            Val::List(l) => View::List(l),
            Val::Object(o) => View::Object(o),
        }
    }
}

/// A value seen by the comparison operators: `Copy`, no drop, borrowed
/// straight from the input for paths and constants.
#[derive(Debug, Clone, Copy)]
enum View<'x> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'x str),
    /// A JSON array or object.
    Json(&'x Value),
    List(&'x [Val<'x>]),
    Object(&'x [(&'x str, Val<'x>)]),
}

impl<'x> View<'x> {
    #[inline]
    fn of_json(v: &'x Value) -> View<'x> {
        match v {
            Value::Null => View::Null,
            Value::Bool(b) => View::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => View::Int(i),
                None => View::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => View::Str(s),
            Value::Array(_) | Value::Object(_) => View::Json(v),
        }
    }

    fn as_f64(self) -> Option<f64> {
        match self {
            View::Int(i) => Some(i as f64),
            View::Float(x) => Some(x),
            _ => None,
        }
    }

    fn list_len(self) -> Option<usize> {
        match self {
            View::Json(Value::Array(a)) => Some(a.len()),
            View::List(l) => Some(l.len()),
            _ => None,
        }
    }

    fn list_get(self, i: usize) -> Option<View<'x>> {
        match self {
            View::Json(Value::Array(a)) => a.get(i).map(View::of_json),
            View::List(l) => l.get(i).map(Val::view),
            _ => None,
        }
    }

    fn to_json(self) -> Value {
        match self {
            View::Null => Value::Null,
            View::Bool(b) => Value::Bool(b),
            View::Int(i) => Value::from(i),
            View::Float(x) => serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
            View::Str(s) => Value::String(s.to_string()),
            View::Json(v) => v.clone(),
            View::List(items) => Value::Array(items.iter().map(Val::to_json).collect()),
            View::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

fn num_cmp(a: View<'_>, b: View<'_>) -> Option<Ordering> {
    match (a, b) {
        (View::Int(x), View::Int(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

fn val_eq(a: View<'_>, b: View<'_>) -> bool {
    match (a, b) {
        (View::Null, View::Null) => true,
        (View::Bool(x), View::Bool(y)) => x == y,
        (View::Str(x), View::Str(y)) => x == y,
        (View::Int(_) | View::Float(_), View::Int(_) | View::Float(_)) => {
            num_cmp(a, b) == Some(Ordering::Equal)
        }
        (View::Json(Value::Object(x)), View::Json(Value::Object(y))) => x == y,
        (View::Object(_), _) | (_, View::Object(_)) => a.to_json() == b.to_json(),
        _ => match (a.list_len(), b.list_len()) {
            (Some(n), Some(m)) if n == m => (0..n).all(|i| match (a.list_get(i), b.list_get(i)) {
                (Some(x), Some(y)) => val_eq(x, y),
                _ => false,
            }),
            _ => false,
        },
    }
}

fn compare(op: Cmp, a: View<'_>, b: View<'_>) -> bool {
    let ord = match op {
        Cmp::Eq => return val_eq(a, b),
        Cmp::Ne => return !val_eq(a, b),
        _ => match (a, b) {
            (View::Str(x), View::Str(y)) => Some(x.cmp(y)),
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

/// `a op b` on two JSON values by the evaluator's comparison rules (the
/// module docs); `None` when `op` is not `==`, `!=`, `<`, `<=`, `>` or `>=`.
/// The three-valued evaluator ([`crate::partial`]) decides with this.
pub(crate) fn compare_json(op: BinaryOp, a: &Value, b: &Value) -> Option<bool> {
    let cmp = match op {
        BinaryOp::Eq => Cmp::Eq,
        BinaryOp::Ne => Cmp::Ne,
        BinaryOp::Lt => Cmp::Lt,
        BinaryOp::Le => Cmp::Le,
        BinaryOp::Gt => Cmp::Gt,
        BinaryOp::Ge => Cmp::Ge,
        _ => return None,
    };
    Some(compare(cmp, View::of_json(a), View::of_json(b)))
}

/// `container contains item` on two JSON values by the evaluator's rules,
/// without a fuel limit (the values are a policy's and a plan's literals).
pub(crate) fn contains_json(container: &Value, item: &Value) -> bool {
    let mut fuel = Fuel::new(u64::MAX);
    contains(View::of_json(container), View::of_json(item), &mut fuel).unwrap_or(false)
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

fn contains(container: View<'_>, item: View<'_>, fuel: &mut Fuel) -> Result<bool, OutOfFuel> {
    match (container, item) {
        (View::Str(s), View::Str(sub)) => {
            fuel.burn(s.len() as u64 / 64)?;
            Ok(s.contains(sub))
        }
        (View::Json(Value::Array(items)), _) => {
            fuel.burn(items.len() as u64)?;
            // Fast path for the common string-in-list case.
            if let View::Str(s) = item {
                return Ok(items.iter().any(|v| v.as_str() == Some(s)));
            }
            Ok(items.iter().any(|v| val_eq(View::of_json(v), item)))
        }
        (View::List(items), _) => {
            fuel.burn(items.len() as u64)?;
            Ok(items.iter().any(|v| val_eq(v.view(), item)))
        }
        (View::Json(Value::Object(map)), View::Str(k)) => Ok(get_key(map, k).is_some()),
        (View::Object(fields), View::Str(k)) => Ok(fields.iter().any(|(n, _)| *n == k)),
        _ => Ok(false),
    }
}

/// Objects up to this many entries are searched by comparing keys in
/// order: cheaper than hashing the key (SipHash) for the small objects a
/// policy input is made of.
const LINEAR_KEYS: usize = 16;

#[inline]
fn get_key<'a>(m: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a Value> {
    if m.len() <= LINEAR_KEYS {
        m.iter().find(|(n, _)| n.as_str() == k).map(|(_, v)| v)
    } else {
        m.get(k)
    }
}

#[inline]
fn lookup<'a>(mut v: &'a Value, segs: &[Seg]) -> Option<&'a Value> {
    for s in segs {
        v = match (s, v) {
            (Seg::Key(k, _), Value::Object(m)) => get_key(m, k)?,
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

/// The value of a constant or input path without building a [`Val`]
/// (`None` for other nodes, which cost nothing here). Costs one fuel, like
/// [`eval`].
#[inline]
fn simple<'a>(
    n: &'a Node,
    inp: &Slots<'a>,
    fuel: &mut Fuel,
) -> Result<Option<View<'a>>, OutOfFuel> {
    let Some(v) = peek(n, inp) else {
        return Ok(None);
    };
    fuel.burn(1)?;
    Ok(Some(v))
}

/// Evaluates `$node` to a [`View`] bound to `$name`; a computed value is
/// kept alive in `$keep`.
macro_rules! view {
    ($keep:ident, $name:ident = $node:expr, $inp:expr, $fuel:expr) => {
        let $keep;
        let $name = match simple($node, $inp, $fuel)? {
            Some(v) => v,
            None => {
                $keep = eval($node, $inp, $fuel)?;
                $keep.view()
            }
        };
    };
}

/// Evaluates a node whose value is used as a condition: `Some(b)` when it
/// is the boolean `b`, `None` for any other value. Boolean operators are
/// evaluated here without building a [`Val`]; the fuel spent is the same as
/// [`eval`]'s.
pub(crate) fn eval_bool<'a>(
    n: &'a Node,
    inp: &Slots<'a>,
    fuel: &mut Fuel,
) -> Result<Option<bool>, OutOfFuel> {
    Ok(match n {
        Node::And(p) => {
            fuel.burn(1)?;
            Some(
                eval_bool(&p.0, inp, fuel)? == Some(true)
                    && eval_bool(&p.1, inp, fuel)? == Some(true),
            )
        }
        Node::Or(p) => {
            fuel.burn(1)?;
            Some(
                eval_bool(&p.0, inp, fuel)? == Some(true)
                    || eval_bool(&p.1, inp, fuel)? == Some(true),
            )
        }
        Node::Not(a) => {
            fuel.burn(1)?;
            eval_bool(a, inp, fuel)?.map(|b| !b)
        }
        Node::Const(Value::Bool(b)) => {
            fuel.burn(1)?;
            Some(*b)
        }
        _ => leaf(n, inp, fuel)?,
    })
}

/// The value of a constant or input path, without fuel; `None` for other
/// nodes.
#[inline(always)]
fn peek<'a>(n: &'a Node, inp: &Slots<'a>) -> Option<View<'a>> {
    let v = match n {
        Node::Const(v) => Some(v),
        Node::Root(slot) => inp.get(usize::from(*slot)).copied().flatten(),
        Node::Path(slot, segs) => inp
            .get(usize::from(*slot))
            .copied()
            .flatten()
            .and_then(|v| lookup(v, segs)),
        _ => return None,
    };
    Some(v.map_or(View::Null, View::of_json))
}

/// A comparison, membership test, regex match or boolean builtin whose
/// operands are constants or input paths (the common case): no [`Val`] is
/// built. Anything else goes to [`leaf_slow`]. The fuel spent is the same:
/// one per node.
fn leaf<'a>(n: &'a Node, inp: &Slots<'a>, fuel: &mut Fuel) -> Result<Option<bool>, OutOfFuel> {
    match n {
        Node::Cmp(op, p) => {
            if let (Some(a), Some(b)) = (peek(&p.0, inp), peek(&p.1, inp)) {
                fuel.burn(3)?;
                return Ok(Some(compare(*op, a, b)));
            }
        }
        Node::Contains(p) => {
            if let (Some(c), Some(x)) = (peek(&p.0, inp), peek(&p.1, inp)) {
                fuel.burn(3)?;
                return Ok(Some(contains(c, x, fuel)?));
            }
        }
        Node::Matches(a, re) => {
            if let Some(a) = peek(a, inp) {
                fuel.burn(2)?;
                return Ok(Some(match a {
                    View::Str(s) => {
                        fuel.burn(s.len() as u64 / 16)?;
                        re.is_match(s)
                    }
                    _ => false,
                }));
            }
        }
        Node::Call(f @ (Builtin::StartsWith | Builtin::EndsWith), args) if args.len() == 2 => {
            if let (Some(a), Some(b)) = (peek(&args[0], inp), peek(&args[1], inp)) {
                fuel.burn(3)?;
                if let View::Str(a) = a {
                    fuel.burn(a.len() as u64 / 64)?;
                }
                return Ok(Some(match (a, b) {
                    (View::Str(a), View::Str(b)) => {
                        if *f == Builtin::StartsWith {
                            a.starts_with(b)
                        } else {
                            a.ends_with(b)
                        }
                    }
                    _ => false,
                }));
            }
        }
        _ => {}
    }
    leaf_slow(n, inp, fuel)
}

/// [`leaf`] when an operand is computed: operands are evaluated to
/// [`Val`]s kept alive for the comparison.
#[cold]
#[inline(never)]
fn leaf_slow<'a>(n: &'a Node, inp: &Slots<'a>, fuel: &mut Fuel) -> Result<Option<bool>, OutOfFuel> {
    Ok(match n {
        Node::Cmp(op, p) => {
            fuel.burn(1)?;
            view!(ka, a = &p.0, inp, fuel);
            view!(kb, b = &p.1, inp, fuel);
            Some(compare(*op, a, b))
        }
        Node::Contains(p) => {
            fuel.burn(1)?;
            view!(kc, c = &p.0, inp, fuel);
            view!(kx, x = &p.1, inp, fuel);
            Some(contains(c, x, fuel)?)
        }
        Node::Matches(a, re) => {
            fuel.burn(1)?;
            view!(ka, a = a, inp, fuel);
            Some(match a {
                View::Str(s) => {
                    fuel.burn(s.len() as u64 / 16)?;
                    re.is_match(s)
                }
                _ => false,
            })
        }
        Node::Call(f @ (Builtin::StartsWith | Builtin::EndsWith | Builtin::Detect(_)), args)
            if !args.is_empty() && args.len() <= 2 =>
        {
            // The boolean builtins, on views: no `Val` built or dropped.
            fuel.burn(1)?;
            view!(k0, a = &args[0], inp, fuel);
            let s0 = match a {
                View::Str(s) => {
                    fuel.burn(s.len() as u64 / 64)?;
                    Some(s)
                }
                _ => None,
            };
            let k1;
            let b = match args.get(1) {
                Some(n) => match simple(n, inp, fuel)? {
                    Some(v) => v,
                    None => {
                        k1 = eval(n, inp, fuel)?;
                        k1.view()
                    }
                },
                None => View::Null,
            };
            let s1 = match b {
                View::Str(s) => Some(s),
                _ => None,
            };
            Some(match (f, s0, s1) {
                (Builtin::StartsWith, Some(a), Some(b)) => a.starts_with(b),
                (Builtin::EndsWith, Some(a), Some(b)) => a.ends_with(b),
                (Builtin::Detect(d), Some(a), _) => d.detect(a),
                _ => false,
            })
        }
        _ => match eval(n, inp, fuel)? {
            Val::Bool(b) => Some(b),
            _ => None,
        },
    })
}

/// Evaluates `n` against the input slots.
pub(crate) fn eval<'a>(
    n: &'a Node,
    inp: &Slots<'a>,
    fuel: &mut Fuel,
) -> Result<Val<'a>, OutOfFuel> {
    if let Node::And(_)
    | Node::Or(_)
    | Node::Not(_)
    | Node::Cmp(..)
    | Node::Contains(_)
    | Node::Matches(..) = n
    {
        return Ok(eval_bool(n, inp, fuel)?.map_or(Val::Null, Val::Bool));
    }
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
        Node::Neg(a) => match eval(a, inp, fuel)? {
            Val::Int(i) => i.checked_neg().map_or(Val::Float(-(i as f64)), Val::Int),
            Val::Float(x) => Val::Float(-x),
            _ => Val::Null,
        },
        Node::Arith(op, p) => {
            let a = eval(&p.0, inp, fuel)?;
            let b = eval(&p.1, inp, fuel)?;
            arith(*op, &a, &b)
        }
        Node::And(_)
        | Node::Or(_)
        | Node::Not(_)
        | Node::Cmp(..)
        | Node::Contains(_)
        | Node::Matches(..) => Val::Null, // handled by `eval_bool` above
        Node::Call(f, args) if args.len() <= 2 => {
            // Every builtin takes at most two arguments: no allocation.
            let mut vals = [Val::Null, Val::Null];
            for (v, a) in vals.iter_mut().zip(args.iter()) {
                *v = eval(a, inp, fuel)?;
            }
            call(*f, &vals[..args.len()], fuel)?
        }
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
