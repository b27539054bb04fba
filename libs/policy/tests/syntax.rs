//! Every syntax error class, with its exact position and caret.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anumate_policy::{CompileError, parse};

fn err(src: &str) -> CompileError {
    match parse("t.policy", src) {
        Ok(_) => panic!("expected a parse error for:\n{src}"),
        Err(e) => e,
    }
}

/// (line, col, message fragment)
fn at(src: &str) -> (u32, u32, String) {
    let e = err(src);
    assert_eq!(e.diagnostics.len(), 1);
    let d = &e.diagnostics[0];
    (d.at.line, d.at.col, d.message.clone())
}

fn check(src: &str, line: u32, col: u32, fragment: &str) {
    let (l, c, m) = at(src);
    assert_eq!((l, c), (line, col), "position of {m:?} in:\n{src}");
    assert!(m.contains(fragment), "{m:?} should contain {fragment:?}");
}

#[test]
fn unterminated_string() {
    check("policy \"p {\n}\n", 1, 8, "unterminated string");
    check(
        "policy \"p\" {\n  rule \"r\" {\n    when tool == 'x\n    then deny()\n  }\n}",
        3,
        18,
        "unterminated string",
    );
}

#[test]
fn missing_then() {
    check(
        "policy \"p\" {\n  rule \"r\" {\n    when tool == \"x\"\n    deny()\n  }\n}",
        4,
        5,
        "expected `then`, found `deny`",
    );
}

#[test]
fn unknown_action() {
    check(
        "policy \"p\" {\n  rule \"r\" { when true then frobnicate(x: 1) }\n}",
        2,
        29,
        "unknown action `frobnicate`",
    );
}

#[test]
fn bad_numbers() {
    check(
        "policy \"p\" { rule \"r\" { when args.a > 12x then deny() } }",
        1,
        39,
        "bad number `12x`",
    );
    check(
        "policy \"p\" { rule \"r\" { when args.a > 1.2.3 then deny() } }",
        1,
        39,
        "bad number `1.2.3`",
    );
    check(
        "policy \"p\" { rule \"r\" { when args.a > 99999999999999999999 then deny() } }",
        1,
        39,
        "integers are 64-bit",
    );
    check(
        "policy \"p\" { rule \"r\" priority x { when true then deny() } }",
        1,
        32,
        "expected a number, found `x`",
    );
}

#[test]
fn unexpected_tokens() {
    check("rule \"r\" {}", 1, 1, "expected `policy`, found `rule`");
    check(
        "policy \"p\" {\n  nonsense\n}",
        2,
        3,
        "expected `description`, `rule`, `test` or `}`, found `nonsense`",
    );
    check(
        "policy \"p\" { rule \"r\" { when tool == then deny() } }",
        1,
        38,
        "expected an expression, found keyword `then`",
    );
    check(
        "policy \"p\" { rule \"r\" { when a == b == c then deny() } }",
        1,
        37,
        "comparisons do not chain",
    );
    check(
        "policy \"p\" { rule \"r\" { when tool = \"x\" then deny() } }",
        1,
        35,
        "expected `then`, found `=`",
    );
    check("policy \"p\" { } }", 1, 16, "expected `policy`, found `}`");
    check("", 1, 1, "expected `policy`, found end of input");
    check(
        "policy \"p\" { test \"t\" { given { tool: \"x\" } expect maybe } }",
        1,
        52,
        "expected `allow`, `deny` or `require_approval`",
    );
}

#[test]
fn unclosed_braces_name_the_opening() {
    check(
        "policy \"p\" {\n  rule \"r\" { when true then deny()\n",
        3,
        1,
        "unclosed `{` (opened at 2:12)",
    );
    check("policy \"p\" {\n", 2, 1, "unclosed `{` (opened at 1:12)");
    check(
        "policy \"p\" { rule \"r\" { when (true then deny() } }",
        1,
        36,
        "expected `)`, found `then`",
    );
    check(
        "policy \"p\" { rule \"r\" { when args.x in [1, 2 then deny() } }",
        1,
        46,
        "expected `]`, found `then`",
    );
}

#[test]
fn bad_escape_and_path() {
    check(
        "policy \"p\" { description: \"a\\qb\" }",
        1,
        29,
        "unknown escape",
    );
    check(
        "policy \"p\" { rule \"r\" { when args. == 1 then deny() } }",
        1,
        35,
        "expected a field name after `.`",
    );
}

#[test]
fn comments_and_newlines_are_insignificant() {
    let src = "# top\npolicy \"p\" # after name\n{ rule \"r\"\n priority\n 5 { when\n tool\n ==\n \"x\" # c\n then\n deny ( reason : \"no\" , ) } }";
    let f = parse("t.policy", src).unwrap();
    assert_eq!(f.policies[0].rules[0].priority, 5);
}

#[test]
fn rendering_has_file_line_col_and_caret() {
    let e = err("policy \"p\" {\n  rule \"r\" { when true then nope() }\n}");
    assert_eq!(
        e.to_string(),
        "t.policy:2:29: unknown action `nope` (expected allow, deny, require_approval, redact, log)\n    rule \"r\" { when true then nope() }\n                              ^"
    );
}
