//! The syntax tree of policy files and expressions, and its pretty-printer.
//!
//! `Display` prints source that parses back to the same tree (spans aside):
//! `parse(&x.to_string())` equals `x` once both have had [`PolicyFile::clear_spans`].

use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::diag::Span;

/// A parsed policy file: one or more policies.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyFile {
    /// The policies, in source order.
    pub policies: Vec<Policy>,
}

/// `policy "name" { … }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The policy's name.
    pub name: String,
    /// `description: "…"`.
    pub description: Option<String>,
    /// The rules, in source order.
    pub rules: Vec<Rule>,
    /// The `test` blocks, in source order.
    pub tests: Vec<TestCase>,
    /// From `policy` to the closing brace.
    pub span: Span,
}

/// `rule "id" [priority N] { [enabled: BOOL] when EXPR then ACTION, … }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The rule id, unique within its policy.
    pub id: String,
    /// Reporting order: higher first; 0 when not given.
    pub priority: i64,
    /// `enabled: false` disables the rule entirely.
    pub enabled: bool,
    /// The condition.
    pub when: Expr,
    /// The actions, at least one.
    pub actions: Vec<Action>,
    /// From `rule` to the closing brace.
    pub span: Span,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionKind {
    /// `allow(…)`.
    Allow,
    /// `deny(reason: …)`.
    Deny,
    /// `require_approval(approvers: […], quorum: N, stages: […], reason: …)`.
    RequireApproval,
    /// `redact(fields: […], with: "…")` or `redact(detectors: […])`.
    Redact,
    /// `log(message: "…", level: "…")`.
    Log,
}

impl ActionKind {
    /// Every action, in the order they are listed in messages.
    pub const ALL: [ActionKind; 5] = [
        ActionKind::Allow,
        ActionKind::Deny,
        ActionKind::RequireApproval,
        ActionKind::Redact,
        ActionKind::Log,
    ];

    /// The keyword in source.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Allow => "allow",
            ActionKind::Deny => "deny",
            ActionKind::RequireApproval => "require_approval",
            ActionKind::Redact => "redact",
            ActionKind::Log => "log",
        }
    }

    /// Parses an action keyword.
    pub fn from_name(name: &str) -> Option<ActionKind> {
        ActionKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One action call: `deny(reason: "…")`.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// Which action.
    pub kind: ActionKind,
    /// Named arguments, in source order.
    pub args: Vec<Arg>,
    /// The call's text.
    pub span: Span,
}

/// `name: value` inside an action call.
#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    /// The argument name.
    pub name: String,
    /// Where the name is.
    pub name_span: Span,
    /// The value.
    pub value: Expr,
}

/// The combined outcome of a decision, ordered `Allow < RequireApproval < Deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// The call may go ahead.
    Allow,
    /// The call waits for approval.
    RequireApproval,
    /// The call is refused.
    Deny,
}

impl Effect {
    /// The keyword in source (`allow`, `require_approval`, `deny`).
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::RequireApproval => "require_approval",
            Effect::Deny => "deny",
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `test "name" { given { … } expect EFFECT }`.
#[derive(Debug, Clone, PartialEq)]
pub struct TestCase {
    /// The test's name.
    pub name: String,
    /// The input, an object literal.
    pub given: Expr,
    /// The expected effect.
    pub expect: Effect,
    /// From `test` to the closing brace.
    pub span: Span,
}

/// An expression with its source span.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    /// What the expression is.
    pub kind: ExprKind,
    /// Its text in the source.
    pub span: Span,
}

/// How many levels an expression may nest: parentheses, lists, objects,
/// calls, `not`, `-` and each operator of a chain (`a or b or c` is two
/// levels above `a`) count one. The parser, checker, compiler, evaluator
/// and printer recurse once per level, so this bounds their stack use (a
/// few KiB per level in debug builds, far below a 2 MiB thread stack);
/// written policies and templates stay well below it.
pub const MAX_NESTING: usize = 64;

impl Expr {
    /// The first subexpression (in source order) that sits deeper than
    /// [`MAX_NESTING`] levels, found without recursion: for trees not made
    /// by the parser, which checks as it goes.
    pub fn too_deep(&self) -> Option<&Expr> {
        let mut stack = vec![(self, 1usize)];
        while let Some((e, level)) = stack.pop() {
            if level > MAX_NESTING {
                return Some(e);
            }
            let below = level + 1;
            match &e.kind {
                ExprKind::Unary(_, a) => stack.push((a, below)),
                ExprKind::Binary(_, a, b) => {
                    stack.push((b, below));
                    stack.push((a, below));
                }
                ExprKind::List(items) | ExprKind::Call(_, items) => {
                    stack.extend(items.iter().rev().map(|x| (x, below)));
                }
                ExprKind::Object(fields) => {
                    stack.extend(fields.iter().rev().map(|(_, x)| (x, below)));
                }
                ExprKind::Null
                | ExprKind::Bool(_)
                | ExprKind::Int(_)
                | ExprKind::Float(_)
                | ExprKind::Str(_)
                | ExprKind::Path(_) => {}
            }
        }
        None
    }
}

/// The expression forms.
#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer literal.
    Int(i64),
    /// A float literal.
    Float(f64),
    /// A string literal (`'…'` or `"…"`).
    Str(String),
    /// `[a, b, …]`.
    List(Vec<Expr>),
    /// `{key: value, …}`.
    Object(Vec<(String, Expr)>),
    /// `root.seg['key'][0]…`.
    Path(Path),
    /// A prefix operator.
    Unary(UnaryOp, Box<Expr>),
    /// A binary operator.
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// `name(arg, …)`.
    Call(String, Vec<Expr>),
}

/// A path into the input.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    /// The root field (`args`, `principal`, `steps`, …).
    pub root: String,
    /// The segments after it.
    pub segments: Vec<Segment>,
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    /// `.name` (may contain hyphens: `.fetch-order`).
    Field(String),
    /// `['key']`.
    Key(String),
    /// `[3]`.
    Index(i64),
}

/// Prefix operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    /// `not x`.
    Not,
    /// `-x`.
    Neg,
}

/// Binary operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `or`.
    Or,
    /// `and`.
    And,
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `x in list` (also substring and object key).
    In,
    /// `list contains x` (also substring and object key).
    Contains,
    /// `s matches 'regex'`.
    Matches,
    /// `+` (numbers).
    Add,
    /// `-` (numbers; needs spaces around it).
    Sub,
    /// `*`.
    Mul,
    /// `/`.
    Div,
}

impl BinaryOp {
    /// The operator's text.
    pub fn as_str(self) -> &'static str {
        match self {
            BinaryOp::Or => "or",
            BinaryOp::And => "and",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::In => "in",
            BinaryOp::Contains => "contains",
            BinaryOp::Matches => "matches",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
        }
    }

    /// Binding power: higher binds tighter.
    pub fn precedence(self) -> u8 {
        match self {
            BinaryOp::Or => PREC_OR,
            BinaryOp::And => PREC_AND,
            BinaryOp::Eq
            | BinaryOp::Ne
            | BinaryOp::Lt
            | BinaryOp::Le
            | BinaryOp::Gt
            | BinaryOp::Ge
            | BinaryOp::In
            | BinaryOp::Contains
            | BinaryOp::Matches => PREC_CMP,
            BinaryOp::Add | BinaryOp::Sub => PREC_ADD,
            BinaryOp::Mul | BinaryOp::Div => PREC_MUL,
        }
    }
}

pub(crate) const PREC_OR: u8 = 1;
pub(crate) const PREC_AND: u8 = 2;
pub(crate) const PREC_NOT: u8 = 3;
pub(crate) const PREC_CMP: u8 = 4;
pub(crate) const PREC_ADD: u8 = 5;
pub(crate) const PREC_MUL: u8 = 6;
pub(crate) const PREC_NEG: u8 = 7;
pub(crate) const PREC_ATOM: u8 = 8;

impl Expr {
    /// How tightly this expression binds when printed.
    fn precedence(&self) -> u8 {
        match &self.kind {
            ExprKind::Binary(op, ..) => op.precedence(),
            ExprKind::Unary(UnaryOp::Not, _) => PREC_NOT,
            ExprKind::Unary(UnaryOp::Neg, _) => PREC_NEG,
            // A negative literal printed after a binary `-` is still one token.
            _ => PREC_ATOM,
        }
    }

    fn clear_spans(&mut self) {
        self.span = Span::default();
        match &mut self.kind {
            ExprKind::List(items) | ExprKind::Call(_, items) => {
                items.iter_mut().for_each(Expr::clear_spans)
            }
            ExprKind::Object(fields) => fields.iter_mut().for_each(|(_, e)| e.clear_spans()),
            ExprKind::Unary(_, e) => e.clear_spans(),
            ExprKind::Binary(_, a, b) => {
                a.clear_spans();
                b.clear_spans();
            }
            _ => {}
        }
    }

    /// Whether this expression mentions no input (a literal tree).
    pub fn is_literal(&self) -> bool {
        match &self.kind {
            ExprKind::Null
            | ExprKind::Bool(_)
            | ExprKind::Int(_)
            | ExprKind::Float(_)
            | ExprKind::Str(_) => true,
            ExprKind::List(items) => items.iter().all(Expr::is_literal),
            ExprKind::Object(fields) => fields.iter().all(|(_, e)| e.is_literal()),
            ExprKind::Unary(UnaryOp::Neg, e) => e.is_literal(),
            _ => false,
        }
    }
}

impl PolicyFile {
    /// Sets every span to the default, for comparing trees regardless of layout.
    pub fn clear_spans(&mut self) {
        for p in &mut self.policies {
            p.span = Span::default();
            for r in &mut p.rules {
                r.span = Span::default();
                r.when.clear_spans();
                for a in &mut r.actions {
                    a.span = Span::default();
                    for arg in &mut a.args {
                        arg.name_span = Span::default();
                        arg.value.clear_spans();
                    }
                }
            }
            for t in &mut p.tests {
                t.span = Span::default();
                t.given.clear_spans();
            }
        }
    }
}

/// Whether `s` can be written bare (an identifier).
pub(crate) fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Words that cannot be path roots or function names.
pub const KEYWORDS: &[&str] = &[
    "and", "or", "not", "in", "contains", "matches", "true", "false", "null", "when", "then",
];

/// Writes `s` as a double-quoted string literal.
pub(crate) fn write_str_lit(f: &mut impl fmt::Write, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

fn write_child(f: &mut fmt::Formatter<'_>, e: &Expr, min_prec: u8) -> fmt::Result {
    if e.precedence() < min_prec {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ExprKind::Null => f.write_str("null"),
            ExprKind::Bool(b) => write!(f, "{b}"),
            ExprKind::Int(i) => write!(f, "{i}"),
            ExprKind::Float(x) => write!(f, "{x:?}"),
            ExprKind::Str(s) => write_str_lit(f, s),
            ExprKind::List(items) => {
                f.write_char('[')?;
                for (i, e) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{e}")?;
                }
                f.write_char(']')
            }
            ExprKind::Object(fields) => {
                f.write_char('{')?;
                for (i, (k, e)) in fields.iter().enumerate() {
                    f.write_str(if i > 0 { ", " } else { " " })?;
                    if is_ident(k) {
                        f.write_str(k)?;
                    } else {
                        write_str_lit(f, k)?;
                    }
                    write!(f, ": {e}")?;
                }
                f.write_str(if fields.is_empty() { "}" } else { " }" })
            }
            ExprKind::Path(p) => write!(f, "{p}"),
            ExprKind::Unary(UnaryOp::Not, e) => {
                f.write_str("not ")?;
                write_child(f, e, PREC_NOT)
            }
            ExprKind::Unary(UnaryOp::Neg, e) => {
                f.write_char('-')?;
                // `-5` would read back as a literal. `- -x` (not `-(-x)`)
                // keeps a chain of negations within the nesting limit.
                if let ExprKind::Unary(UnaryOp::Neg, _) = e.kind {
                    return write!(f, " {e}");
                }
                let atomic_non_number = e.precedence() >= PREC_NEG
                    && !matches!(e.kind, ExprKind::Int(_) | ExprKind::Float(_));
                if atomic_non_number {
                    write!(f, "{e}")
                } else {
                    write!(f, "({e})")
                }
            }
            ExprKind::Binary(op, a, b) => {
                let p = op.precedence();
                // Comparisons do not chain; the others are left-associative.
                let left_min = if p == PREC_CMP { p + 1 } else { p };
                write_child(f, a, left_min)?;
                write!(f, " {} ", op.as_str())?;
                write_child(f, b, p + 1)
            }
            ExprKind::Call(name, args) => {
                write!(f, "{name}(")?;
                for (i, e) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{e}")?;
                }
                f.write_char(')')
            }
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.root)?;
        for s in &self.segments {
            match s {
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Key(k) => {
                    f.write_char('[')?;
                    write_str_lit(f, k)?;
                    f.write_char(']')?;
                }
                Segment::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.kind.as_str())?;
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}: {}", a.name, a.value)?;
        }
        f.write_char(')')
    }
}

impl fmt::Display for PolicyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.policies.iter().enumerate() {
            if i > 0 {
                f.write_char('\n')?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("policy ")?;
        write_str_lit(f, &self.name)?;
        f.write_str(" {\n")?;
        if let Some(d) = &self.description {
            f.write_str("  description: ")?;
            write_str_lit(f, d)?;
            f.write_char('\n')?;
        }
        for r in &self.rules {
            f.write_str("  rule ")?;
            write_str_lit(f, &r.id)?;
            if r.priority != 0 {
                write!(f, " priority {}", r.priority)?;
            }
            f.write_str(" {\n")?;
            if !r.enabled {
                f.write_str("    enabled: false\n")?;
            }
            writeln!(f, "    when {}", r.when)?;
            for (i, a) in r.actions.iter().enumerate() {
                let lead = if i == 0 { "    then " } else { ",\n         " };
                write!(f, "{lead}{a}")?;
            }
            f.write_str("\n  }\n")?;
        }
        for t in &self.tests {
            f.write_str("  test ")?;
            write_str_lit(f, &t.name)?;
            writeln!(f, " {{\n    given {}", t.given)?;
            writeln!(f, "    expect {}\n  }}", t.expect)?;
        }
        f.write_str("}\n")
    }
}
