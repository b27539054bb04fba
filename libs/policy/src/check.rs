//! The checking pass: resolves names and types against an input schema and
//! lowers the tree to the evaluation form in the same walk.

use regex::Regex;
use serde_json::Value;

use crate::ast::*;
use crate::builtins;
use crate::diag::{Diagnostic, Span};
use crate::eval::{Node, Seg};

/// The static type of a schema field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldTy {
    /// A string.
    Str,
    /// A number.
    Num,
    /// A boolean.
    Bool,
    /// A list of strings.
    StrList,
    /// Any JSON, any keys (`args`, `output`, `env`).
    Open,
    /// An object with exactly these fields.
    Object(&'static [(&'static str, FieldTy)]),
}

/// The roots an expression may start from, with their types.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// Root names and types; a root's index is its evaluation slot.
    pub roots: &'static [(&'static str, FieldTy)],
}

/// The input a policy sees (SPEC §3). `now` is an RFC 3339 UTC timestamp string,
/// so string comparison orders it.
pub static POLICY_INPUT: Schema = Schema {
    roots: &[
        ("tenant", FieldTy::Str),
        (
            "principal",
            FieldTy::Object(&[
                ("id", FieldTy::Str),
                ("roles", FieldTy::StrList),
                ("groups", FieldTy::StrList),
            ]),
        ),
        (
            "capsule",
            FieldTy::Object(&[
                ("name", FieldTy::Str),
                ("version", FieldTy::Num),
                ("labels", FieldTy::Open),
            ]),
        ),
        ("plan_hash", FieldTy::Str),
        (
            "step",
            FieldTy::Object(&[("id", FieldTy::Str), ("tool", FieldTy::Str)]),
        ),
        ("tool", FieldTy::Str),
        ("args", FieldTy::Open),
        ("output", FieldTy::Open),
        ("env", FieldTy::Open),
        ("now", FieldTy::Str),
    ],
};

/// The roots of capsule template expressions: `inputs.*` and `steps.<id>.*`.
pub static TEMPLATE_INPUT: Schema = Schema {
    roots: &[("inputs", FieldTy::Open), ("steps", FieldTy::Open)],
};

/// What a capsule template expression may reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct TemplateScope<'a> {
    /// Declared input names.
    pub inputs: &'a [&'a str],
    /// Steps upstream of the expression's step (transitively via `needs`).
    pub steps_upstream: &'a [&'a str],
    /// Every step id in the capsule; empty means "same as upstream".
    pub steps_known: &'a [&'a str],
}

/// A statically known type; `Any` when it cannot be seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// Unknown.
    Any,
    /// `null`.
    Null,
    /// A boolean.
    Bool,
    /// A number.
    Num,
    /// A string.
    Str,
    /// A list.
    List,
    /// An object.
    Obj,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Any => "a value",
            Ty::Null => "null",
            Ty::Bool => "a boolean",
            Ty::Num => "a number",
            Ty::Str => "a string",
            Ty::List => "a list",
            Ty::Obj => "an object",
        }
    }

    fn is(self, want: Ty) -> bool {
        self == Ty::Any || want == Ty::Any || self == want
    }
}

fn field_ty(f: FieldTy) -> Ty {
    match f {
        FieldTy::Str => Ty::Str,
        FieldTy::Num => Ty::Num,
        FieldTy::Bool => Ty::Bool,
        FieldTy::StrList => Ty::List,
        FieldTy::Open => Ty::Any,
        FieldTy::Object(_) => Ty::Obj,
    }
}

/// The checker/lowerer: collects diagnostics, produces nodes.
pub(crate) struct Checker<'a> {
    pub file: &'a str,
    pub src: &'a str,
    pub schema: &'a Schema,
    pub template: Option<TemplateScope<'a>>,
    pub diags: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(file: &'a str, src: &'a str, schema: &'a Schema) -> Self {
        Checker {
            file,
            src,
            schema,
            template: None,
            diags: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, span: Span, message: impl Into<String>) {
        self.diags
            .push(Diagnostic::new(self.file, self.src, span, message));
    }

    fn root_names(&self) -> String {
        self.schema
            .roots
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// False, with a diagnostic, when `e` nests deeper than [`MAX_NESTING`]:
    /// the recursive passes (this checker, [`literal_json`], the evaluator)
    /// only ever see trees that passed this check.
    pub(crate) fn nesting_ok(&mut self, e: &Expr) -> bool {
        match e.too_deep() {
            None => true,
            Some(deep) => {
                self.error(deep.span, format!("nesting deeper than {MAX_NESTING}"));
                false
            }
        }
    }

    /// Checks and lowers `e`, returning its node and static type. `e` has
    /// passed [`Checker::nesting_ok`].
    pub(crate) fn expr(&mut self, e: &Expr) -> (Node, Ty) {
        let (node, ty) = self.expr_inner(e);
        (node.fold(), ty)
    }

    fn expect(&mut self, e: &Expr, got: Ty, want: Ty, what: &str) {
        if !got.is(want) {
            self.error(
                e.span,
                format!("{what} needs {}, found {}", want.name(), got.name()),
            );
        }
    }

    fn expr_inner(&mut self, e: &Expr) -> (Node, Ty) {
        match &e.kind {
            ExprKind::Null => (Node::Const(Value::Null), Ty::Null),
            ExprKind::Bool(b) => (Node::Const(Value::Bool(*b)), Ty::Bool),
            ExprKind::Int(i) => (Node::Const(Value::from(*i)), Ty::Num),
            ExprKind::Float(x) => (
                Node::Const(serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number)),
                Ty::Num,
            ),
            ExprKind::Str(s) => (Node::Const(Value::String(s.clone())), Ty::Str),
            ExprKind::List(items) => {
                let nodes = items.iter().map(|x| self.expr(x).0).collect();
                (Node::List(nodes), Ty::List)
            }
            ExprKind::Object(fields) => {
                let mut seen = std::collections::HashSet::new();
                let mut nodes = Vec::with_capacity(fields.len());
                for (k, v) in fields {
                    if !seen.insert(k.as_str()) {
                        self.error(v.span, format!("duplicate key `{k}`"));
                    }
                    nodes.push((k.clone().into_boxed_str(), self.expr(v).0));
                }
                (Node::Object(nodes.into_boxed_slice()), Ty::Obj)
            }
            ExprKind::Path(p) => self.path(p, e.span),
            ExprKind::Unary(UnaryOp::Not, a) => {
                let (n, t) = self.expr(a);
                self.expect(a, t, Ty::Bool, "`not`");
                (Node::Not(Box::new(n)), Ty::Bool)
            }
            ExprKind::Unary(UnaryOp::Neg, a) => {
                let (n, t) = self.expr(a);
                self.expect(a, t, Ty::Num, "`-`");
                (Node::Neg(Box::new(n)), Ty::Num)
            }
            ExprKind::Binary(BinaryOp::Matches, a, b) => {
                let (n, t) = self.expr(a);
                self.expect(a, t, Ty::Str, "`matches`");
                let ExprKind::Str(pattern) = &b.kind else {
                    self.error(b.span, "`matches` needs a string literal pattern");
                    return (Node::Const(Value::Bool(false)), Ty::Bool);
                };
                match Regex::new(pattern) {
                    Ok(re) => (Node::Matches(Box::new(n), Box::new(re)), Ty::Bool),
                    Err(err) => {
                        let msg = err.to_string();
                        let last = msg.lines().last().unwrap_or("invalid pattern").trim();
                        let last = last.strip_prefix("error: ").unwrap_or(last);
                        self.error(b.span, format!("bad regex: {last}"));
                        (Node::Const(Value::Bool(false)), Ty::Bool)
                    }
                }
            }
            ExprKind::Binary(op, a, b) => {
                let (na, ta) = self.expr(a);
                let (nb, tb) = self.expr(b);
                let ty = self.binary_types(*op, a, ta, b, tb, e.span);
                (Node::binary(*op, na, nb), ty)
            }
            ExprKind::Call(name, args) => {
                let name_span = Span::new(e.span.start, e.span.start + name.len());
                let Some(sig) = builtins::lookup(name) else {
                    let all: Vec<_> = builtins::FUNCTIONS.iter().map(|s| s.name).collect();
                    self.error(
                        name_span,
                        format!("unknown function `{name}` (known: {})", all.join(", ")),
                    );
                    for a in args {
                        self.expr(a);
                    }
                    return (Node::Const(Value::Null), Ty::Any);
                };
                if args.len() != sig.args.len() {
                    self.error(
                        name_span,
                        format!(
                            "`{name}` takes {} argument{}, found {}",
                            sig.args.len(),
                            if sig.args.len() == 1 { "" } else { "s" },
                            args.len()
                        ),
                    );
                }
                let mut nodes = Vec::with_capacity(args.len());
                for (i, a) in args.iter().enumerate() {
                    let (n, t) = self.expr(a);
                    if let Some(want) = sig.args.get(i) {
                        self.expect(a, t, *want, &format!("`{name}`"));
                    }
                    nodes.push(n);
                }
                (Node::Call(sig.builtin, nodes.into_boxed_slice()), sig.ret)
            }
        }
    }

    fn binary_types(&mut self, op: BinaryOp, a: &Expr, ta: Ty, b: &Expr, tb: Ty, span: Span) -> Ty {
        let word = format!("`{}`", op.as_str());
        match op {
            BinaryOp::And | BinaryOp::Or => {
                self.expect(a, ta, Ty::Bool, &word);
                self.expect(b, tb, Ty::Bool, &word);
                Ty::Bool
            }
            BinaryOp::Eq | BinaryOp::Ne => {
                let scalar = |t: Ty| matches!(t, Ty::Bool | Ty::Num | Ty::Str);
                if scalar(ta) && scalar(tb) && ta != tb {
                    self.error(
                        span,
                        format!(
                            "comparing {} with {} is always {}",
                            ta.name(),
                            tb.name(),
                            op == BinaryOp::Ne
                        ),
                    );
                }
                Ty::Bool
            }
            BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
                let ordered = |t: Ty| matches!(t, Ty::Any | Ty::Num | Ty::Str);
                if !ordered(ta) {
                    self.error(
                        a.span,
                        format!("{word} needs a number or a string, found {}", ta.name()),
                    );
                } else if !ordered(tb) {
                    self.error(
                        b.span,
                        format!("{word} needs a number or a string, found {}", tb.name()),
                    );
                } else if ta != Ty::Any && tb != Ty::Any && ta != tb {
                    self.error(
                        span,
                        format!("cannot order {} against {}", ta.name(), tb.name()),
                    );
                }
                Ty::Bool
            }
            BinaryOp::In | BinaryOp::Contains => {
                let (container, ct) = if op == BinaryOp::In { (b, tb) } else { (a, ta) };
                if !matches!(ct, Ty::Any | Ty::List | Ty::Str | Ty::Obj) {
                    self.error(
                        container.span,
                        format!(
                            "{word} needs a list, a string or an object, found {}",
                            ct.name()
                        ),
                    );
                }
                Ty::Bool
            }
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div => {
                self.expect(a, ta, Ty::Num, &word);
                self.expect(b, tb, Ty::Num, &word);
                Ty::Num
            }
            BinaryOp::Matches => Ty::Bool,
        }
    }

    fn path(&mut self, p: &Path, span: Span) -> (Node, Ty) {
        let Some(slot) = self.schema.roots.iter().position(|(n, _)| *n == p.root) else {
            let msg = format!(
                "unknown field `{}` (the input has {})",
                p.root,
                self.root_names()
            );
            self.error(Span::new(span.start, span.start + p.root.len()), msg);
            return (Node::Const(Value::Null), Ty::Any);
        };
        let mut ty = self.schema.roots[slot].1;
        if let Some(scope) = self.template {
            self.template_refs(scope, p, span);
        }
        let mut shown = p.root.clone();
        for s in &p.segments {
            let name = match s {
                Segment::Field(n) | Segment::Key(n) => Some(n.as_str()),
                Segment::Index(_) => None,
            };
            ty = match ty {
                FieldTy::Open => FieldTy::Open,
                FieldTy::Object(fields) => {
                    match name.and_then(|n| fields.iter().find(|(f, _)| *f == n)) {
                        Some((_, t)) => *t,
                        None => {
                            let known: Vec<_> = fields.iter().map(|(f, _)| *f).collect();
                            let what = name.map_or_else(
                                || "an index".to_string(),
                                |n| format!("`{shown}.{n}`"),
                            );
                            self.error(
                                span,
                                format!(
                                    "unknown field {what} (`{shown}` has {})",
                                    known.join(", ")
                                ),
                            );
                            return (Node::Const(Value::Null), Ty::Any);
                        }
                    }
                }
                FieldTy::StrList => {
                    let is_index = matches!(s, Segment::Index(_))
                        || name.is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
                    if !is_index {
                        self.error(span, format!("`{shown}` is a list; index it with `[n]`"));
                        return (Node::Const(Value::Null), Ty::Any);
                    }
                    FieldTy::Str
                }
                scalar => {
                    self.error(
                        span,
                        format!("`{shown}` is {} and has no fields", field_ty(scalar).name()),
                    );
                    return (Node::Const(Value::Null), Ty::Any);
                }
            };
            match s {
                Segment::Field(n) => {
                    shown.push('.');
                    shown.push_str(n);
                }
                Segment::Key(n) => shown.push_str(&format!("[{n:?}]")),
                Segment::Index(i) => shown.push_str(&format!("[{i}]")),
            }
        }
        let slot8 = u8::try_from(slot).unwrap_or(u8::MAX);
        let node = if p.segments.is_empty() {
            Node::Root(slot8)
        } else {
            let segs = p
                .segments
                .iter()
                .map(|s| match s {
                    Segment::Field(n) | Segment::Key(n) => {
                        Seg::Key(n.clone().into_boxed_str(), n.parse::<usize>().ok())
                    }
                    Segment::Index(i) => Seg::Index(*i),
                })
                .collect();
            Node::Path(slot8, segs)
        };
        (node, field_ty(ty))
    }

    fn template_refs(&mut self, scope: TemplateScope<'_>, p: &Path, span: Span) {
        let first = match p.segments.first() {
            Some(Segment::Field(n) | Segment::Key(n)) => n.as_str(),
            _ => {
                self.error(span, format!("`{}` needs a name after it", p.root));
                return;
            }
        };
        if p.root == "inputs" {
            if !scope.inputs.contains(&first) {
                self.error(span, format!("unknown input `{first}`"));
            }
            return;
        }
        let known = if scope.steps_known.is_empty() {
            scope.steps_upstream
        } else {
            scope.steps_known
        };
        if !known.contains(&first) {
            self.error(span, format!("unknown step `{first}`"));
        } else if !scope.steps_upstream.contains(&first) {
            self.error(
                span,
                format!("step `{first}` is not upstream of this step (add it to `needs`)"),
            );
        } else if let Some(Segment::Field(n) | Segment::Key(n)) = p.segments.get(1)
            && n != "output"
            && n != "status"
        {
            self.error(
                span,
                format!("`steps.{first}` has `output` and `status`, not `{n}`"),
            );
        }
    }
}

/// The JSON value of a literal expression, if it is one (`e` has passed
/// [`Checker::nesting_ok`]).
pub(crate) fn literal_json(e: &Expr) -> Option<Value> {
    Some(match &e.kind {
        ExprKind::Null => Value::Null,
        ExprKind::Bool(b) => Value::Bool(*b),
        ExprKind::Int(i) => Value::from(*i),
        ExprKind::Float(x) => Value::Number(serde_json::Number::from_f64(*x)?),
        ExprKind::Str(s) => Value::String(s.clone()),
        ExprKind::List(items) => {
            Value::Array(items.iter().map(literal_json).collect::<Option<_>>()?)
        }
        ExprKind::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Some((k.clone(), literal_json(v)?)))
                .collect::<Option<_>>()?,
        ),
        ExprKind::Unary(UnaryOp::Neg, a) => match literal_json(a)? {
            Value::Number(n) => match n.as_i64() {
                Some(i) => Value::from(i.checked_neg()?),
                None => Value::Number(serde_json::Number::from_f64(-n.as_f64()?)?),
            },
            _ => return None,
        },
        _ => return None,
    })
}
