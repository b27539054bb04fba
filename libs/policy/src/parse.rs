//! The parser: policy files and expressions, on `winnow`.
//!
//! Whitespace (including newlines) and `#` comments may appear between any
//! two tokens, except inside a path (`steps.fetch-order.output['x']`) and
//! between a `-` and the digits of a negative number. Errors are *cut*: the
//! first one stops parsing and carries the byte offset where it was seen.
//!
//! Expressions nest at most [`MAX_NESTING`] levels (parentheses, lists,
//! objects, calls, `not`, `-` and each operator of a chain count one): the
//! parser recurses once per level, and so does every later pass, so the
//! bound is checked here, while descending and while folding operator
//! chains, before a deep tree can exist.

use winnow::combinator::opt;
use winnow::error::{ContextError, ErrMode};
use winnow::prelude::*;
use winnow::stream::{LocatingSlice, Location, Stream};
use winnow::token::{literal, take_till, take_while};

use crate::ast::*;
use crate::diag::Span;

type In<'s> = LocatingSlice<&'s str>;
type PResult<T> = winnow::ModalResult<T, ContextError<Fail>>;

/// A parse failure: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    /// Byte offset of the problem.
    pub offset: usize,
    /// Byte length of the offending token (at least 1 for carets).
    pub len: usize,
    /// What is wrong.
    pub message: String,
    /// For an unclosed group: the offset of its opening delimiter.
    pub opened: Option<usize>,
}

fn fail<T>(offset: usize, len: usize, message: impl Into<String>) -> PResult<T> {
    let mut e = ContextError::new();
    e.push(Fail {
        offset,
        len: len.max(1),
        message: message.into(),
        opened: None,
    });
    Err(ErrMode::Cut(e))
}

fn run<T>(src: &str, mut p: impl FnMut(&mut In<'_>) -> PResult<T>) -> Result<T, Fail> {
    let mut input = LocatingSlice::new(src);
    let result = (|i: &mut In<'_>| {
        let out = p(i)?;
        ws(i)?;
        if !i.is_empty() {
            let (o, len, found) = found(i);
            return fail(o, len, format!("unexpected {found}"));
        }
        Ok(out)
    })(&mut input);
    result.map_err(|e| {
        let offset = input.current_token_start();
        match e {
            ErrMode::Backtrack(c) | ErrMode::Cut(c) => {
                c.context().next().cloned().unwrap_or(Fail {
                    offset,
                    len: 1,
                    message: "unexpected input".into(),
                    opened: None,
                })
            }
            ErrMode::Incomplete(_) => Fail {
                offset,
                len: 1,
                message: "unexpected end of input".into(),
                opened: None,
            },
        }
    })
}

/// Parses a policy file.
pub fn parse_file(src: &str) -> Result<PolicyFile, Fail> {
    run(src, file)
}

/// Parses one expression (a capsule template body or a step `if:`).
pub fn parse_expr(src: &str) -> Result<Expr, Fail> {
    run(src, top_expr)
}

// ---------------------------------------------------------------- tokens

fn pos(i: &In<'_>) -> usize {
    i.current_token_start()
}

/// Skips whitespace and `#` comments.
fn ws(i: &mut In<'_>) -> PResult<()> {
    loop {
        take_while(0.., char::is_whitespace).parse_next(i)?;
        if opt('#').parse_next(i)?.is_none() {
            return Ok(());
        }
        take_till(0.., '\n').parse_next(i)?;
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Describes the next token for messages: (offset, length, text).
fn found(i: &In<'_>) -> (usize, usize, String) {
    let o = pos(i);
    let rest: &str = i;
    let Some(c) = rest.chars().next() else {
        return (o, 1, "end of input".into());
    };
    let word: &str = if is_ident_char(c) {
        let n = rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
        &rest[..n]
    } else {
        &rest[..c.len_utf8()]
    };
    (o, word.len(), format!("`{word}`"))
}

fn expected<T>(i: &In<'_>, what: &str) -> PResult<T> {
    let (o, len, f) = found(i);
    fail(o, len, format!("expected {what}, found {f}"))
}

/// Consumes the symbol `s` after whitespace, if present.
fn sym(i: &mut In<'_>, s: &'static str) -> PResult<bool> {
    ws(i)?;
    Ok(opt(literal(s)).parse_next(i)?.is_some())
}

fn expect_sym(i: &mut In<'_>, s: &'static str) -> PResult<()> {
    if sym(i, s)? {
        Ok(())
    } else {
        expected(i, &format!("`{s}`"))
    }
}

/// Closing delimiter `close` of a group opened at `open`.
fn expect_close(i: &mut In<'_>, close: &'static str, open: usize) -> PResult<()> {
    if sym(i, close)? {
        return Ok(());
    }
    if i.is_empty() {
        let open_ch = match close {
            "}" => '{',
            "]" => '[',
            _ => '(',
        };
        let mut e = ContextError::new();
        e.push(Fail {
            offset: pos(i),
            len: 1,
            message: format!("unclosed `{open_ch}`"),
            opened: Some(open),
        });
        return Err(ErrMode::Cut(e));
    }
    expected(i, &format!("`{close}`"))
}

/// Peeks an identifier-like word after whitespace (does not consume).
fn peek_word<'s>(i: &mut In<'s>) -> PResult<&'s str> {
    ws(i)?;
    let rest: &'s str = i;
    let n = match rest.chars().next() {
        Some(c) if is_ident_start(c) => {
            rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len())
        }
        _ => 0,
    };
    Ok(&rest[..n])
}

/// Consumes keyword `k` (a whole word) if it is next.
fn kw(i: &mut In<'_>, k: &str) -> PResult<bool> {
    if peek_word(i)? == k {
        i.next_slice(k.len());
        Ok(true)
    } else {
        Ok(false)
    }
}

fn expect_kw(i: &mut In<'_>, k: &'static str) -> PResult<()> {
    if kw(i, k)? {
        Ok(())
    } else {
        expected(i, &format!("`{k}`"))
    }
}

/// An identifier: `[A-Za-z_][A-Za-z0-9_]*`.
fn ident<'s>(i: &mut In<'s>, what: &str) -> PResult<(&'s str, Span)> {
    let w = peek_word(i)?;
    if w.is_empty() {
        return expected(i, what);
    }
    let start = pos(i);
    i.next_slice(w.len());
    Ok((w, Span::new(start, start + w.len())))
}

/// A string literal in `'…'` or `"…"`; no raw newlines.
fn string_lit(i: &mut In<'_>) -> PResult<(String, Span)> {
    ws(i)?;
    let start = pos(i);
    let quote = match i.peek_token() {
        Some(q @ ('"' | '\'')) => q,
        _ => return expected(i, "a string"),
    };
    i.next_token();
    let mut out = String::new();
    loop {
        let chunk = take_till(0.., |c| c == quote || c == '\\' || c == '\n').parse_next(i)?;
        out.push_str(chunk);
        match i.peek_token() {
            Some(c) if c == quote => {
                i.next_token();
                return Ok((out, Span::new(start, pos(i))));
            }
            Some('\\') => {
                let esc_at = pos(i);
                i.next_token();
                match i.next_token() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some('0') => out.push('\0'),
                    Some(c @ ('\\' | '"' | '\'')) => out.push(c),
                    Some('u') => {
                        let ok = opt('{').parse_next(i)?.is_some();
                        let hex: Option<&str> =
                            opt(take_while(1..=6, |c: char| c.is_ascii_hexdigit()))
                                .parse_next(i)?;
                        let close = opt('}').parse_next(i)?.is_some();
                        let ch = hex
                            .filter(|_| ok && close)
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .and_then(char::from_u32);
                        match ch {
                            Some(c) => out.push(c),
                            None => {
                                return fail(esc_at, 2, "bad unicode escape (use `\\u{1F600}`)");
                            }
                        }
                    }
                    _ => return fail(esc_at, 2, "unknown escape in string"),
                }
            }
            _ => return fail(start, 1, "unterminated string"),
        }
    }
}

/// A number literal, with an optional leading `-` glued to the digits.
fn number(i: &mut In<'_>) -> PResult<(ExprKind, Span)> {
    ws(i)?;
    let start = pos(i);
    let rest: &str = i;
    let b = rest.as_bytes();
    let mut n = usize::from(b.first() == Some(&b'-'));
    let digits = |n: &mut usize| {
        let s = *n;
        while b.get(*n).is_some_and(u8::is_ascii_digit) {
            *n += 1;
        }
        *n > s
    };
    if !digits(&mut n) {
        return expected(i, "a number");
    }
    let mut float = false;
    if b.get(n) == Some(&b'.') && b.get(n + 1).is_some_and(u8::is_ascii_digit) {
        n += 1;
        let _ = digits(&mut n);
        float = true;
    }
    if matches!(b.get(n), Some(b'e' | b'E')) {
        let mut m = n + 1;
        if matches!(b.get(m), Some(b'+' | b'-')) {
            m += 1;
        }
        if digits(&mut m) {
            n = m;
            float = true;
        }
    }
    // Anything word-like glued to the number makes it a bad literal: `12x`, `1.2.3`.
    let mut end = n;
    while b
        .get(end)
        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
    {
        end += 1;
    }
    let text = &rest[..end];
    if end != n {
        return fail(start, end, format!("bad number `{text}`"));
    }
    let kind = if float {
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() => ExprKind::Float(x),
            _ => return fail(start, end, format!("bad number `{text}` (out of range)")),
        }
    } else {
        match text.parse::<i64>() {
            Ok(x) => ExprKind::Int(x),
            Err(_) => {
                return fail(
                    start,
                    end,
                    format!("bad number `{text}` (integers are 64-bit)"),
                );
            }
        }
    };
    i.next_slice(end);
    Ok((kind, Span::new(start, start + end)))
}

// ---------------------------------------------------------------- policies

fn file(i: &mut In<'_>) -> PResult<PolicyFile> {
    let mut policies = Vec::new();
    loop {
        ws(i)?;
        if i.is_empty() {
            break;
        }
        policies.push(policy(i)?);
    }
    if policies.is_empty() {
        return fail(pos(i), 1, "expected `policy`, found end of input");
    }
    Ok(PolicyFile { policies })
}

fn policy(i: &mut In<'_>) -> PResult<Policy> {
    ws(i)?;
    let start = pos(i);
    expect_kw(i, "policy")?;
    let (name, _) = string_lit(i)?;
    ws(i)?;
    let open = pos(i);
    expect_sym(i, "{")?;
    let mut p = Policy {
        name,
        description: None,
        rules: Vec::new(),
        tests: Vec::new(),
        span: Span::default(),
    };
    loop {
        if sym(i, "}")? {
            break;
        }
        let at = pos(i);
        match peek_word(i)? {
            "description" => {
                if p.description.is_some() {
                    return fail(at, 11, "duplicate `description`");
                }
                i.next_slice(11);
                expect_sym(i, ":")?;
                p.description = Some(string_lit(i)?.0);
            }
            "rule" => p.rules.push(rule(i)?),
            "test" => p.tests.push(test(i)?),
            _ if i.is_empty() => {
                expect_close(i, "}", open)?;
                break;
            }
            _ => return expected(i, "`description`, `rule`, `test` or `}`"),
        }
    }
    p.span = Span::new(start, pos(i));
    Ok(p)
}

fn rule(i: &mut In<'_>) -> PResult<Rule> {
    ws(i)?;
    let start = pos(i);
    expect_kw(i, "rule")?;
    let (id, _) = string_lit(i)?;
    let mut priority = 0;
    if kw(i, "priority")? {
        match number(i)? {
            (ExprKind::Int(n), _) => priority = n,
            (_, sp) => return fail(sp.start, sp.end - sp.start, "priority must be an integer"),
        }
    }
    ws(i)?;
    let open = pos(i);
    expect_sym(i, "{")?;
    let mut enabled = true;
    if kw(i, "enabled")? {
        expect_sym(i, ":")?;
        enabled = if kw(i, "true")? {
            true
        } else if kw(i, "false")? {
            false
        } else {
            return expected(i, "`true` or `false`");
        };
    }
    if !kw(i, "when")? {
        return expected(
            i,
            if enabled {
                "`enabled` or `when`"
            } else {
                "`when`"
            },
        );
    }
    let when = top_expr(i)?;
    expect_kw(i, "then")?;
    let mut actions = vec![action(i)?];
    while sym(i, ",")? {
        actions.push(action(i)?);
    }
    expect_close(i, "}", open)?;
    Ok(Rule {
        id,
        priority,
        enabled,
        when,
        actions,
        span: Span::new(start, pos(i)),
    })
}

fn action(i: &mut In<'_>) -> PResult<Action> {
    ws(i)?;
    let start = pos(i);
    let (name, name_span) = ident(i, "an action")?;
    let Some(kind) = ActionKind::from_name(name) else {
        let all: Vec<_> = ActionKind::ALL.iter().map(|k| k.as_str()).collect();
        return fail(
            name_span.start,
            name.len(),
            format!("unknown action `{name}` (expected {})", all.join(", ")),
        );
    };
    let mut args = Vec::new();
    ws(i)?;
    let open = pos(i);
    if sym(i, "(")? {
        loop {
            if sym(i, ")")? {
                break;
            }
            let (n, name_span) = ident(i, "an argument name or `)`")?;
            expect_sym(i, ":")?;
            let value = top_expr(i)?;
            args.push(Arg {
                name: n.to_string(),
                name_span,
                value,
            });
            if !sym(i, ",")? {
                expect_close(i, ")", open)?;
                break;
            }
        }
    }
    Ok(Action {
        kind,
        args,
        span: Span::new(start, pos(i)),
    })
}

fn test(i: &mut In<'_>) -> PResult<TestCase> {
    ws(i)?;
    let start = pos(i);
    expect_kw(i, "test")?;
    let (name, _) = string_lit(i)?;
    ws(i)?;
    let open = pos(i);
    expect_sym(i, "{")?;
    expect_kw(i, "given")?;
    ws(i)?;
    if i.peek_token() != Some('{') {
        return expected(i, "`{` (the input object)");
    }
    let (given, _) = operand(i, 0)?;
    expect_kw(i, "expect")?;
    let expect = if kw(i, "allow")? {
        Effect::Allow
    } else if kw(i, "deny")? {
        Effect::Deny
    } else if kw(i, "require_approval")? {
        Effect::RequireApproval
    } else {
        return expected(i, "`allow`, `deny` or `require_approval`");
    };
    expect_close(i, "}", open)?;
    Ok(TestCase {
        name,
        given,
        expect,
        span: Span::new(start, pos(i)),
    })
}

// ---------------------------------------------------------------- expressions

/// The binary operator next in the input, without consuming it.
fn peek_binop(i: &mut In<'_>) -> PResult<Option<(BinaryOp, usize)>> {
    let cp = i.checkpoint();
    let found = binop_after_ws(i);
    i.reset(&cp);
    found
}

fn binop_after_ws(i: &mut In<'_>) -> PResult<Option<(BinaryOp, usize)>> {
    let before = pos(i);
    ws(i)?;
    let spaced = pos(i) > before;
    let rest: &str = i;
    let sym_op = [
        ("==", BinaryOp::Eq),
        ("!=", BinaryOp::Ne),
        ("<=", BinaryOp::Le),
        (">=", BinaryOp::Ge),
        ("<", BinaryOp::Lt),
        (">", BinaryOp::Gt),
        ("+", BinaryOp::Add),
        ("*", BinaryOp::Mul),
        ("/", BinaryOp::Div),
    ]
    .into_iter()
    .find(|(s, _)| rest.starts_with(s));
    if let Some((s, op)) = sym_op {
        return Ok(Some((op, s.len())));
    }
    // `-` is an operator only with spaces around it: `a-b` is a path segment.
    if spaced && rest.starts_with('-') && rest[1..].starts_with(char::is_whitespace) {
        return Ok(Some((BinaryOp::Sub, 1)));
    }
    let word = peek_word(i)?;
    let op = match word {
        "or" => BinaryOp::Or,
        "and" => BinaryOp::And,
        "in" => BinaryOp::In,
        "contains" => BinaryOp::Contains,
        "matches" => BinaryOp::Matches,
        _ => return Ok(None),
    };
    Ok(Some((op, word.len())))
}

fn is_cmp(op: BinaryOp) -> bool {
    op.precedence() == PREC_CMP
}

/// One level deeper than `depth`, or the nesting error at the next token.
fn nest(i: &mut In<'_>, depth: usize) -> PResult<usize> {
    if depth + 1 >= MAX_NESTING {
        ws(i)?;
        return too_deep(pos(i), 1);
    }
    Ok(depth + 1)
}

// The errors of the recursive functions are built out of line, so that
// their temporaries are not in every frame of a deep recursion.

#[cold]
#[inline(never)]
fn too_deep<T>(offset: usize, len: usize) -> PResult<T> {
    fail(offset, len, format!("nesting deeper than {MAX_NESTING}"))
}

#[cold]
#[inline(never)]
fn chained_comparison<T>(offset: usize, len: usize, op: BinaryOp) -> PResult<T> {
    fail(
        offset,
        len,
        format!(
            "comparisons do not chain: add parentheses before `{}`",
            op.as_str()
        ),
    )
}

/// A whole expression: the value of a `when`, an argument, a template.
fn top_expr(i: &mut In<'_>) -> PResult<Expr> {
    Ok(expr(i, 0, 0)?.0)
}

/// Precedence climbing: parses operators binding at least `min_prec`.
///
/// `depth` counts the levels around this expression; the result comes with
/// its height in levels (a leaf is 1), and `depth + height` stays within
/// [`MAX_NESTING`].
fn expr(i: &mut In<'_>, min_prec: u8, depth: usize) -> PResult<(Expr, usize)> {
    ws(i)?;
    let start = pos(i);
    let (mut lhs, mut height) = if kw(i, "not")? {
        let inner = nest(i, depth)?;
        let (e, h) = expr(i, PREC_NOT, inner)?;
        (
            Expr {
                span: Span::new(start, e.span.end),
                kind: ExprKind::Unary(UnaryOp::Not, Box::new(e)),
            },
            h + 1,
        )
    } else {
        unary(i, depth)?
    };
    let mut last_cmp: Option<usize> = None;
    while let Some((op, len)) = peek_binop(i)? {
        let p = op.precedence();
        if p < min_prec {
            break;
        }
        ws(i)?;
        let op_at = pos(i);
        if is_cmp(op) {
            if last_cmp.is_some() {
                return chained_comparison(op_at, len, op);
            }
            last_cmp = Some(op_at);
        } else if p < PREC_CMP {
            last_cmp = None;
        }
        i.next_slice(len);
        let inner = nest(i, depth)?;
        let (rhs, rhs_height) = expr(i, p + 1, inner)?;
        // A chain `a + b + c …` folds to the left: each operator is one
        // more level above the first operand.
        height = height.max(rhs_height) + 1;
        if depth + height > MAX_NESTING {
            return too_deep(op_at, len);
        }
        lhs = Expr {
            span: Span::new(start, rhs.span.end),
            kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
        };
    }
    Ok((lhs, height))
}

/// `-x` or an operand, with its height.
fn unary(i: &mut In<'_>, depth: usize) -> PResult<(Expr, usize)> {
    ws(i)?;
    let start = pos(i);
    let rest: &str = i;
    if rest.starts_with('-') && !rest[1..].starts_with(|c: char| c.is_ascii_digit()) {
        i.next_token();
        let inner = nest(i, depth)?;
        let (e, h) = unary(i, inner)?;
        return Ok((
            Expr {
                span: Span::new(start, e.span.end),
                kind: ExprKind::Unary(UnaryOp::Neg, Box::new(e)),
            },
            h + 1,
        ));
    }
    operand(i, depth)
}

/// An operand, with its height (parentheses count as a level).
///
/// Each form is its own function: this one and the forms that recurse keep
/// small stack frames, since they are on the stack once per nesting level
/// (debug builds give every temporary of a function its own slot).
fn operand(i: &mut In<'_>, depth: usize) -> PResult<(Expr, usize)> {
    ws(i)?;
    match i.peek_token() {
        Some('"' | '\'') => string_operand(i),
        Some(c) if c.is_ascii_digit() || c == '-' => number_operand(i),
        Some('(') => parenthesized(i, depth),
        Some('[') => list(i, depth),
        Some('{') => object(i, depth),
        Some(c) if is_ident_start(c) => word_operand(i, depth),
        _ => expected(i, "an expression"),
    }
}

#[inline(never)]
fn string_operand(i: &mut In<'_>) -> PResult<(Expr, usize)> {
    let (s, span) = string_lit(i)?;
    Ok((
        Expr {
            kind: ExprKind::Str(s),
            span,
        },
        1,
    ))
}

#[inline(never)]
fn number_operand(i: &mut In<'_>) -> PResult<(Expr, usize)> {
    let (kind, span) = number(i)?;
    Ok((Expr { kind, span }, 1))
}

/// `( expr )`; the parentheses count as a level but are not a node.
fn parenthesized(i: &mut In<'_>, depth: usize) -> PResult<(Expr, usize)> {
    let start = pos(i);
    let inner = nest(i, depth)?;
    i.next_token();
    let (mut e, h) = expr(i, 0, inner)?;
    expect_close(i, ")", start)?;
    // The span grows to include the parentheses.
    e.span = Span::new(start, pos(i));
    Ok((e, h + 1))
}

/// The elements of a list or the arguments of a call, up to `close`; the
/// opening delimiter (at `open`) is consumed. Returns the tallest height.
fn elements(
    i: &mut In<'_>,
    depth: usize,
    open: usize,
    close: &'static str,
    items: &mut Vec<Expr>,
) -> PResult<usize> {
    let mut tallest = 0;
    loop {
        if sym(i, close)? {
            break;
        }
        let (e, h) = expr(i, 0, depth)?;
        tallest = tallest.max(h);
        items.push(e);
        if !sym(i, ",")? {
            expect_close(i, close, open)?;
            break;
        }
    }
    Ok(tallest)
}

fn list(i: &mut In<'_>, depth: usize) -> PResult<(Expr, usize)> {
    let start = pos(i);
    let inner = nest(i, depth)?;
    i.next_token();
    let mut items = Vec::new();
    let tallest = elements(i, inner, start, "]", &mut items)?;
    Ok((
        Expr {
            kind: ExprKind::List(items),
            span: Span::new(start, pos(i)),
        },
        tallest + 1,
    ))
}

#[inline(never)]
fn object_key(i: &mut In<'_>) -> PResult<String> {
    ws(i)?;
    let key = match i.peek_token() {
        Some('"' | '\'') => string_lit(i)?.0,
        _ => ident(i, "a key or `}`")?.0.to_string(),
    };
    expect_sym(i, ":")?;
    Ok(key)
}

fn object(i: &mut In<'_>, depth: usize) -> PResult<(Expr, usize)> {
    let start = pos(i);
    let inner = nest(i, depth)?;
    i.next_token();
    let mut fields = Vec::new();
    let mut tallest = 0;
    loop {
        if sym(i, "}")? {
            break;
        }
        let key = object_key(i)?;
        let (e, h) = expr(i, 0, inner)?;
        tallest = tallest.max(h);
        fields.push((key, e));
        if !sym(i, ",")? {
            expect_close(i, "}", start)?;
            break;
        }
    }
    Ok((
        Expr {
            kind: ExprKind::Object(fields),
            span: Span::new(start, pos(i)),
        },
        tallest + 1,
    ))
}

/// A literal word (`true`, `false`, `null`), a call or a path.
fn word_operand(i: &mut In<'_>, depth: usize) -> PResult<(Expr, usize)> {
    let start = pos(i);
    let (word, _) = ident(i, "an expression")?;
    if let Some(e) = word_literal(word, start, pos(i))? {
        return Ok((e, 1));
    }
    // `sym` skips whitespace first; a path followed by ` - x` must keep
    // that whitespace, since it is what makes `-` an operator.
    let before_call = i.checkpoint();
    if !sym(i, "(")? {
        i.reset(&before_call);
        return path_rest(i, word, start);
    }
    let open = pos(i) - 1;
    let inner = nest(i, depth)?;
    let mut args = Vec::new();
    let tallest = elements(i, inner, open, ")", &mut args)?;
    Ok((
        Expr {
            kind: ExprKind::Call(word.to_string(), args),
            span: Span::new(start, pos(i)),
        },
        tallest + 1,
    ))
}

/// `true`, `false` or `null`; an error for another keyword; `None` for a name.
#[inline(never)]
fn word_literal(word: &str, start: usize, end: usize) -> PResult<Option<Expr>> {
    let kind = match word {
        "true" => ExprKind::Bool(true),
        "false" => ExprKind::Bool(false),
        "null" => ExprKind::Null,
        w if KEYWORDS.contains(&w) => {
            return fail(
                start,
                w.len(),
                format!("expected an expression, found keyword `{w}`"),
            );
        }
        _ => return Ok(None),
    };
    Ok(Some(Expr {
        kind,
        span: Span::new(start, end),
    }))
}

/// The segments of a path after its root `word`.
#[inline(never)]
fn path_rest(i: &mut In<'_>, word: &str, start: usize) -> PResult<(Expr, usize)> {
    let mut segments = Vec::new();
    loop {
        match i.peek_token() {
            Some('.') => {
                i.next_token();
                segments.push(Segment::Field(field_segment(i)?));
            }
            Some('[') => {
                let open = pos(i);
                i.next_token();
                ws(i)?;
                let seg = match i.peek_token() {
                    Some('"' | '\'') => Segment::Key(string_lit(i)?.0),
                    Some(c) if c.is_ascii_digit() || c == '-' => match number(i)? {
                        (ExprKind::Int(n), _) => Segment::Index(n),
                        (_, sp) => {
                            return fail(sp.start, sp.end - sp.start, "index must be an integer");
                        }
                    },
                    _ => return expected(i, "a quoted key or an integer index"),
                };
                expect_close(i, "]", open)?;
                segments.push(seg);
            }
            _ => break,
        }
    }
    Ok((
        Expr {
            kind: ExprKind::Path(Path {
                root: word.to_string(),
                segments,
            }),
            span: Span::new(start, pos(i)),
        },
        1,
    ))
}

/// A segment after a dot: word characters joined by single hyphens.
fn field_segment(i: &mut In<'_>) -> PResult<String> {
    let rest: &str = i;
    let b = rest.as_bytes();
    let word = |n: usize| {
        let mut m = n;
        while b
            .get(m)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            m += 1;
        }
        m
    };
    let mut n = word(0);
    if n == 0 {
        return expected(i, "a field name after `.`");
    }
    while b.get(n) == Some(&b'-') {
        let m = word(n + 1);
        if m == n + 1 {
            break;
        }
        n = m;
    }
    Ok(i.next_slice(n).to_string())
}
