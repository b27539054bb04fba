//! Nesting is bounded (issue 9): a deep expression is a precise error at its
//! position, never a stack overflow, and the deepest accepted expressions
//! parse, check, evaluate and print on a small thread stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anumate_policy::ast::{BinaryOp, Expr, ExprKind, Path, PolicyFile, UnaryOp};
use anumate_policy::{
    CompileError, MAX_NESTING, Span, TEMPLATE_INPUT, TemplateScope, compile, compile_file,
    compile_template_expr, parse, parse_expr, run_tests,
};
use serde_json::json;

fn nesting_message() -> String {
    format!("nesting deeper than {MAX_NESTING}")
}

/// A policy whose one rule's condition is `when`.
fn policy(when: &str) -> String {
    format!("policy \"p\" {{\n  rule \"r\" {{\n    when {when}\n    then deny()\n  }}\n}}\n")
}

/// The single diagnostic of a failed compile, as (line, col, message).
fn one_diag(e: &CompileError) -> (u32, u32, String) {
    assert_eq!(e.diagnostics.len(), 1, "{e}");
    let d = &e.diagnostics[0];
    (d.at.line, d.at.col, d.message.clone())
}

fn deep_error(src: &str) -> (u32, u32, String) {
    match compile("t.policy", src) {
        Ok(_) => panic!("expected a nesting error"),
        Err(e) => one_diag(&e),
    }
}

/// Runs `f` on a thread with half the default stack: what passes here in
/// a debug build has a wide margin on the 2 MiB stacks of tokio workers
/// (measured: about 9 KiB per level in the worst case, calls, in debug).
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(SMALL_STACK)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

/// Half a default thread stack.
const SMALL_STACK: usize = 1024 * 1024;

#[test]
fn thousands_of_parentheses_are_an_error_at_the_first_level_too_deep() {
    // The audit's input: 3,000 nested parentheses (6 KB) aborted the process.
    let when = format!("{}tool == 'x'{}", "(".repeat(3000), ")".repeat(3000));
    let (line, col, msg) = on_small_stack(move || deep_error(&policy(&when)));
    assert_eq!(msg, nesting_message());
    // `when` is at column 10 of line 3; the error points at the first `(`
    // that would open a level past the limit.
    assert_eq!((line, col), (3, 10 + MAX_NESTING as u32 - 1));

    let e = parse_expr(&format!("{}1{}", "(".repeat(3000), ")".repeat(3000))).unwrap_err();
    assert_eq!(one_diag(&e), (1, MAX_NESTING as u32, nesting_message()));
}

#[test]
fn deep_prefix_operators_lists_objects_calls_and_chains_are_errors() {
    let n = 5000;
    let cases = [
        ("not", format!("{}true", "not ".repeat(n))),
        ("neg", format!("{}args.n == 1", "-".repeat(n))),
        ("neg spaced", format!("{}args.n == 1", "- ".repeat(n))),
        ("list", format!("{}1{} == 1", "[".repeat(n), "]".repeat(n))),
        (
            "object",
            format!("{}1{} == 1", "{a: ".repeat(n), "}".repeat(n)),
        ),
        (
            "call",
            format!("{}tool{} == 'x'", "lower(".repeat(n), ")".repeat(n)),
        ),
        ("left chain +", format!("{}1 == 1", "args.n + ".repeat(n))),
        ("left chain or", "tool == 'x' or ".repeat(n) + "true"),
        (
            "right chain",
            format!("{}1{} == 1", "1 + (".repeat(n), ")".repeat(n)),
        ),
        (
            "mixed",
            format!("{}true{}", "not [(".repeat(n), ")]".repeat(n)),
        ),
    ];
    for (what, when) in cases {
        let (_, _, msg) = on_small_stack(move || deep_error(&policy(&when)));
        assert_eq!(msg, nesting_message(), "{what}");
    }
    // A `given` block of a policy test and an action argument too.
    let given = format!("{{args: {}1{}}}", "[".repeat(n), "]".repeat(n));
    let src = format!(
        "policy \"p\" {{\n  rule \"r\" {{ when true then allow() }}\n  test \"t\" {{ given {given} expect allow }}\n}}\n"
    );
    let (line, _, msg) = on_small_stack(move || deep_error(&src));
    assert_eq!((line, msg.as_str()), (3, nesting_message().as_str()));
    let arg = format!("{}'x'{}", "[".repeat(n), "]".repeat(n));
    let src = format!("policy \"p\" {{ rule \"r\" {{ when true then deny(reason: {arg}) }} }}");
    let (_, _, msg) = on_small_stack(move || deep_error(&src));
    assert_eq!(msg, nesting_message());
}

#[test]
fn deep_template_expressions_are_errors() {
    let src = format!("{}inputs.a{}", "(".repeat(3000), ")".repeat(3000));
    let e = on_small_stack(move || {
        let scope = TemplateScope {
            inputs: &["a"],
            ..TemplateScope::default()
        };
        compile_template_expr(&src, &scope).unwrap_err()
    });
    assert_eq!(one_diag(&e).2, nesting_message());
}

/// The largest `n` for which `make(n)` compiles; `make(n + 1)` must fail
/// with the nesting error.
fn deepest(make: &dyn Fn(usize) -> String) -> usize {
    let mut n = 1;
    while compile("t.policy", &make(n + 1)).is_ok() {
        n += 1;
        assert!(n <= MAX_NESTING, "no limit reached");
    }
    assert!(compile("t.policy", &make(n)).is_ok());
    let e = compile("t.policy", &make(n + 1)).unwrap_err();
    assert_eq!(one_diag(&e).2, nesting_message(), "{}", make(n + 1));
    n
}

#[test]
fn the_deepest_accepted_expressions_compile_evaluate_and_print_on_a_small_stack() {
    type Make = fn(usize) -> String;
    let makes: [(&str, Make); 9] = [
        ("parens", |n| {
            policy(&format!("{}tool == 'x'{}", "(".repeat(n), ")".repeat(n)))
        }),
        ("not", |n| {
            policy(&format!("{}(tool == 'x')", "not ".repeat(n)))
        }),
        ("neg", |n| policy(&format!("{}args.n == 1", "-".repeat(n)))),
        ("list", |n| {
            policy(&format!("{}tool{} == 1", "[".repeat(n), "]".repeat(n)))
        }),
        ("object", |n| {
            policy(&format!("{}tool{} == 1", "{a: ".repeat(n), "}".repeat(n)))
        }),
        ("call", |n| {
            policy(&format!(
                "{}tool{} == 'x'",
                "lower(".repeat(n),
                ")".repeat(n)
            ))
        }),
        ("left chain", |n| {
            policy(&format!("{}args.n == 1", "args.n + ".repeat(n)))
        }),
        ("right chain", |n| {
            policy(&format!(
                "{}args.n{} == 1",
                "args.n + (".repeat(n),
                ")".repeat(n)
            ))
        }),
        ("or chain", |n| {
            policy(&("tool == 'y' or ".repeat(n) + "tool == 'x'"))
        }),
    ];
    for (what, make) in makes {
        let n = deepest(&make);
        // Real documents nest a handful of levels; the limit leaves room.
        assert!(n >= MAX_NESTING / 2 - 2, "{what}: only {n} levels accepted");
        on_small_stack(move || {
            let src = make(n);
            let set = compile("t.policy", &src).unwrap();
            let d = set
                .evaluate(&json!({"tool": "x", "args": {"n": 1}}))
                .unwrap();
            let _ = d.effect;
            // The pretty-printer walks the same tree.
            let printed = parse("t.policy", &src).unwrap().to_string();
            assert!(compile("t.policy", &printed).is_ok(), "{what}: {printed}");
        });
    }
}

#[test]
fn deep_given_blocks_at_the_limit_run_on_a_small_stack() {
    let n = MAX_NESTING - 4;
    let given = format!("{{args: {{a: {}1{}}}}}", "[".repeat(n), "]".repeat(n));
    let src = format!(
        "policy \"p\" {{\n  rule \"r\" {{ when args.a == args.a then deny() }}\n  test \"t\" {{ given {given} expect deny }}\n}}\n"
    );
    on_small_stack(move || {
        let set = compile("t.policy", &src).unwrap();
        let outcomes = run_tests(&set);
        assert!(outcomes.iter().all(|o| o.passed()));
    });
}

/// `not not … true`, built without the parser and without recursion.
fn hand_built(levels: usize) -> Expr {
    let mut e = Expr {
        kind: ExprKind::Bool(true),
        span: Span::new(0, 4),
    };
    for _ in 0..levels {
        e = Expr {
            kind: ExprKind::Unary(UnaryOp::Not, Box::new(e)),
            span: Span::new(0, 4),
        };
    }
    e
}

#[test]
fn trees_not_made_by_the_parser_are_checked_too() {
    let (line, msg) = on_small_stack(|| {
        let mut file = parse(
            "t.policy",
            "policy \"p\" { rule \"r\" { when true then deny() } }",
        )
        .unwrap();
        let deep = hand_built(20_000);
        // A deep `when` with an equally deep right-hand side of `and`.
        file.policies[0].rules[0].when = Expr {
            kind: ExprKind::Binary(
                BinaryOp::And,
                Box::new(Expr {
                    kind: ExprKind::Path(Path {
                        root: "tool".into(),
                        segments: Vec::new(),
                    }),
                    span: Span::new(0, 4),
                }),
                Box::new(deep),
            ),
            span: Span::new(0, 4),
        };
        let r = compile_file("t.policy", "true", &file);
        let (line, _, msg) = one_diag(&r.unwrap_err());
        // Dropping a 20,000-deep tree recurses too; that is the builder's
        // stack, not ours: keep it alive.
        std::mem::forget::<PolicyFile>(file);
        (line, msg)
    });
    assert_eq!((line, msg), (1, nesting_message()));
    assert!(hand_built(MAX_NESTING - 1).too_deep().is_none());
    assert!(hand_built(MAX_NESTING).too_deep().is_some());
    let _ = TEMPLATE_INPUT;
}
