//! The Anumate policy DSL (SPEC §3) and the expression language it shares
//! with capsule templates (SPEC §2): parser, checker, compiler, evaluator,
//! test runner and pretty-printer.
//!
//! ```text
//! source ──parse──▶ PolicyFile (AST, Display = pretty-printer)
//!        ──compile─▶ CompiledSet (names → slots, paths pre-split, regexes built,
//!                    constants folded, rules sorted for reporting)
//!        ──evaluate(&serde_json::Value)─▶ Decision { effect, matched, obligations, reasons }
//! ```
//!
//! # Why `winnow`
//! The parser is written on `winnow` (the parser-combinator library behind
//! `toml_edit`, already in our dependency tree): it parses `&str` directly
//! with location tracking (`LocatingSlice`), needs no build-time code
//! generation (unlike `pest`/`lalrpop`), is fast, and its *cut* errors let
//! each syntax error stop at the exact token with a message of our own —
//! which is what `file:line:col` + caret diagnostics need. `chumsky` gives
//! richer error recovery but costs far more compile time and a heavier API;
//! one precise error per parse is what the CLI and the service report.
//!
//! # Grammar
//! Whitespace, newlines and `# comments` may separate any two tokens.
//! ```text
//! file      = policy+
//! policy    = "policy" STRING "{" ( "description" ":" STRING | rule | test )* "}"
//! rule      = "rule" STRING [ "priority" INT ] "{"
//!               [ "enabled" ":" ("true" | "false") ]
//!               "when" expr "then" action ( "," action )* "}"
//! action    = ("allow" | "deny" | "require_approval" | "redact" | "log")
//!             [ "(" [ IDENT ":" expr ( "," IDENT ":" expr )* [","] ] ")" ]
//! test      = "test" STRING "{" "given" object "expect" ("allow" | "deny" | "require_approval") "}"
//!
//! expr      = or
//! or        = and ( "or" and )*
//! and       = not ( "and" not )*
//! not       = "not" not | cmp
//! cmp       = add [ ("==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "contains" | "matches") add ]
//! add       = mul ( ("+" | " - ") mul )*          # `-` needs spaces around it
//! mul       = unary ( ("*" | "/") unary )*
//! unary     = "-" unary | operand                  # `-5` is a literal
//! operand   = STRING | NUMBER | "true" | "false" | "null" | list | object
//!           | IDENT "(" [ expr ( "," expr )* [","] ] ")"     # function call
//!           | path | "(" expr ")"
//! path      = IDENT ( "." SEGMENT | "[" (STRING | INT) "]" )*   # no spaces inside
//! SEGMENT   = WORD ( "-" WORD )*                   # steps.fetch-order.output
//! list      = "[" [ expr ( "," expr )* [","] ] "]"
//! object    = "{" [ (IDENT | STRING) ":" expr ( "," … )* [","] ] "}"
//! STRING    = '…' | "…"  with \n \t \r \0 \\ \' \" \u{HEX}; no raw newlines
//! NUMBER    = -?DIGITS [ "." DIGITS ] [ ("e"|"E") [+-] DIGITS ]
//! ```
//! A rule is disabled with `enabled: false` as the first line of its body;
//! a disabled rule is still checked but never evaluated.
//!
//! # Semantics
//! Rule effects: `deny` > `require_approval` > `allow` (`redact`/`log` only
//! add obligations). The decision's effect is the strongest effect of the
//! matched rules, `allow` when none matched. Matched rules are reported by
//! descending `priority`, then source order. Action arguments are literals.
//! Evaluation is bounded by fuel ([`DEFAULT_FUEL`]); running out is
//! [`EvalError::FuelExhausted`], never a deny. See [`eval`](crate::eval) docs
//! for comparison rules and [`builtins`] for functions and detectors.
#![forbid(unsafe_code)]

pub mod ast;
pub mod builtins;
mod check;
mod compile;
mod decision;
mod diag;
mod eval;
mod parse;
pub mod partial;

use anumate_errors::Violation;
use serde_json::Value;

pub use ast::{Effect, MAX_NESTING, PolicyFile};
pub use check::{FieldTy, POLICY_INPUT, Schema, TEMPLATE_INPUT, TemplateScope};
pub use compile::{
    CompiledSet, DEFAULT_FUEL, Decision, MatchedRule, Obligation, SourceSpan, TestOutcome,
    approval_obligation, compile_file, run_tests,
};
pub use decision::{ApprovalStage, AssembledDecision, DecidedRule, decide};
pub use diag::{CompileError, Diagnostic, LineCol, Span, line_col, render_diagnostic};
pub use eval::EvalError;

use crate::check::Checker;
use crate::diag::Diagnostic as Diag;

fn parse_failure(file: &str, src: &str, f: parse::Fail) -> CompileError {
    let mut message = f.message;
    if let Some(open) = f.opened {
        message.push_str(&format!(" (opened at {})", line_col(src, open)));
    }
    let d = Diag::new(file, src, Span::new(f.offset, f.offset + f.len), message);
    CompileError {
        file: file.to_string(),
        diagnostics: vec![d],
    }
}

/// Parses a policy source; `file` names it in diagnostics.
pub fn parse(file: &str, src: &str) -> Result<PolicyFile, CompileError> {
    parse::parse_file(src).map_err(|f| parse_failure(file, src, f))
}

/// Parses, checks and compiles a policy source.
pub fn compile(file: &str, src: &str) -> Result<CompiledSet, CompileError> {
    let ast = parse(file, src)?;
    compile_file(file, src, &ast)
}

/// Parses one expression.
pub fn parse_expr(src: &str) -> Result<ast::Expr, CompileError> {
    parse::parse_expr(src).map_err(|f| parse_failure("expression", src, f))
}

/// A compiled capsule template expression (`${{ … }}` body or step `if:`).
#[derive(Debug)]
pub struct TemplateExpr {
    node: eval::Node,
}

/// Parses and checks a template expression against its scope.
pub fn compile_template_expr(
    src: &str,
    scope: &TemplateScope<'_>,
) -> Result<TemplateExpr, CompileError> {
    let e = parse_expr(src)?;
    let mut cx = Checker::new("expression", src, &TEMPLATE_INPUT);
    cx.template = Some(*scope);
    let node = if cx.nesting_ok(&e) {
        cx.expr(&e).0
    } else {
        eval::Node::Const(Value::Null)
    };
    if cx.diags.is_empty() {
        Ok(TemplateExpr { node })
    } else {
        Err(CompileError {
            file: "expression".into(),
            diagnostics: cx.diags,
        })
    }
}

/// Statically checks a template expression: syntax, unknown inputs, unknown
/// or non-upstream steps, unknown functions, visible type errors. Positions
/// are 1-based within `src`.
pub fn check_template_expr(src: &str, scope: &TemplateScope<'_>) -> Vec<Violation> {
    match compile_template_expr(src, scope) {
        Ok(_) => Vec::new(),
        Err(e) => e
            .diagnostics
            .iter()
            .map(|d| d.violation("expression"))
            .collect(),
    }
}

impl TemplateExpr {
    /// Evaluates with `inputs` (object of input values) and `steps`
    /// (object of step id → `{output, status}`), with [`DEFAULT_FUEL`].
    pub fn eval(&self, inputs: &Value, steps: &Value) -> Result<Value, EvalError> {
        let mut slots = [None; eval::MAX_ROOTS];
        slots[0] = Some(inputs);
        slots[1] = Some(steps);
        let mut fuel = eval::Fuel::new(DEFAULT_FUEL);
        eval::eval(&self.node, &slots, &mut fuel)
            .map(|v| v.to_json())
            .map_err(|_| EvalError::FuelExhausted {
                limit: DEFAULT_FUEL,
                policy: String::new(),
                rule: "template".into(),
            })
    }
}
