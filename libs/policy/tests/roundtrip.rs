//! Property tests: the parser never panics, and pretty-printing round-trips.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anumate_policy::ast::*;
use anumate_policy::{Span, parse, parse_expr};
use proptest::prelude::*;

const REFUND: &str = include_str!("../testdata/refund.policy");

fn sp() -> Span {
    Span::default()
}

fn e(kind: ExprKind) -> Expr {
    Expr { kind, span: sp() }
}

fn ident() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_]{0,6}".prop_filter("not a keyword", |s| !KEYWORDS.contains(&s.as_str()))
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        "[a-z0-9_]{1,4}(-[a-z0-9]{1,3}){0,2}".prop_map(Segment::Field),
        any::<String>().prop_map(Segment::Key),
        any::<i64>().prop_map(Segment::Index),
    ]
}

fn leaf() -> impl Strategy<Value = Expr> {
    prop_oneof![
        Just(e(ExprKind::Null)),
        any::<bool>().prop_map(|b| e(ExprKind::Bool(b))),
        any::<i64>().prop_map(|i| e(ExprKind::Int(i))),
        (-1e9f64..1e9).prop_map(|x| e(ExprKind::Float(x))),
        prop_oneof![Just(1e300f64), Just(-2.5e-8), Just(0.1)].prop_map(|x| e(ExprKind::Float(x))),
        any::<String>().prop_map(|s| e(ExprKind::Str(s))),
        (ident(), prop::collection::vec(segment(), 0..4))
            .prop_map(|(root, segments)| e(ExprKind::Path(Path { root, segments }))),
    ]
}

fn binop() -> impl Strategy<Value = BinaryOp> {
    prop::sample::select(vec![
        BinaryOp::Or,
        BinaryOp::And,
        BinaryOp::Eq,
        BinaryOp::Ne,
        BinaryOp::Lt,
        BinaryOp::Le,
        BinaryOp::Gt,
        BinaryOp::Ge,
        BinaryOp::In,
        BinaryOp::Contains,
        BinaryOp::Matches,
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
    ])
}

fn object(inner: impl Strategy<Value = Expr> + Clone) -> impl Strategy<Value = Expr> {
    prop::collection::vec((any::<String>(), inner), 0..3).prop_map(|f| e(ExprKind::Object(f)))
}

fn expr() -> impl Strategy<Value = Expr> + Clone {
    leaf().prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(|v| e(ExprKind::List(v))),
            object(inner.clone()),
            (any::<bool>(), inner.clone()).prop_map(|(not, x)| e(ExprKind::Unary(
                if not { UnaryOp::Not } else { UnaryOp::Neg },
                Box::new(x)
            ))),
            (binop(), inner.clone(), inner.clone()).prop_map(|(op, a, b)| e(ExprKind::Binary(
                op,
                Box::new(a),
                Box::new(b)
            ))),
            (ident(), prop::collection::vec(inner, 0..3))
                .prop_map(|(n, args)| e(ExprKind::Call(n, args))),
        ]
    })
}

fn action() -> impl Strategy<Value = Action> {
    (
        prop::sample::select(ActionKind::ALL.to_vec()),
        prop::collection::vec((ident(), expr()), 0..3),
    )
        .prop_map(|(kind, args)| Action {
            kind,
            args: args
                .into_iter()
                .map(|(name, value)| Arg {
                    name,
                    name_span: sp(),
                    value,
                })
                .collect(),
            span: sp(),
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        any::<String>(),
        any::<i64>(),
        any::<bool>(),
        expr(),
        prop::collection::vec(action(), 1..3),
    )
        .prop_map(|(id, priority, enabled, when, actions)| Rule {
            id,
            priority,
            enabled,
            when,
            actions,
            span: sp(),
        })
}

fn test_case() -> impl Strategy<Value = TestCase> {
    (
        any::<String>(),
        object(expr()),
        prop::sample::select(vec![Effect::Allow, Effect::Deny, Effect::RequireApproval]),
    )
        .prop_map(|(name, given, expect)| TestCase {
            name,
            given,
            expect,
            span: sp(),
        })
}

fn file() -> impl Strategy<Value = PolicyFile> {
    prop::collection::vec(
        (
            any::<String>(),
            prop::option::of(any::<String>()),
            prop::collection::vec(rule(), 0..3),
            prop::collection::vec(test_case(), 0..2),
        )
            .prop_map(|(name, description, rules, tests)| Policy {
                name,
                description,
                rules,
                tests,
                span: sp(),
            }),
        1..3,
    )
    .prop_map(|policies| PolicyFile { policies })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_arbitrary_input(s in any::<String>()) {
        let _ = parse("x", &s);
        let _ = parse_expr(&s);
    }

    #[test]
    fn parser_never_panics_on_grammar_soup(s in "[ \n#a-z0-9_.,:(){}\\[\\]'\"=!<>+*/-]{0,80}") {
        let _ = parse("x", &s);
        let _ = parse_expr(&s);
    }

    #[test]
    fn parser_never_panics_on_mutated_sources(cuts in prop::collection::vec((0usize..2000, any::<char>(), any::<bool>()), 1..6)) {
        let mut s: Vec<char> = REFUND.chars().collect();
        for (at, c, insert) in cuts {
            let at = at % (s.len() + 1);
            if insert || at == s.len() { s.insert(at, c) } else { s.remove(at); }
        }
        let s: String = s.into_iter().collect();
        if let Ok(f) = parse("x", &s) {
            // Whatever parses also round-trips.
            let mut a = f.clone();
            let mut b = parse("x", &f.to_string()).unwrap();
            a.clear_spans();
            b.clear_spans();
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn expressions_round_trip(x in expr()) {
        let printed = x.to_string();
        let mut back = parse_expr(&printed).unwrap_or_else(|err| panic!("{printed}\n{err}"));
        clear(&mut back);
        prop_assert_eq!(&back, &x, "printed: {}", printed);
    }

    #[test]
    fn files_round_trip(f in file()) {
        let printed = f.to_string();
        let mut back = parse("x", &printed).unwrap_or_else(|err| panic!("{printed}\n{err}"));
        back.clear_spans();
        prop_assert_eq!(back, f, "printed:\n{}", printed);
    }
}

fn clear(x: &mut Expr) {
    // Wrap in a file to reuse `clear_spans`.
    let mut f = PolicyFile {
        policies: vec![Policy {
            name: String::new(),
            description: None,
            rules: vec![Rule {
                id: String::new(),
                priority: 0,
                enabled: true,
                when: x.clone(),
                actions: vec![],
                span: sp(),
            }],
            tests: vec![],
            span: sp(),
        }],
    };
    f.clear_spans();
    *x = f.policies.remove(0).rules.remove(0).when;
}

#[test]
fn spec_example_round_trips() {
    let mut a = parse("refund.policy", REFUND).unwrap();
    let printed = a.to_string();
    let mut b = parse("printed", &printed).unwrap();
    a.clear_spans();
    b.clear_spans();
    assert_eq!(a, b);
    // Printing is stable.
    assert_eq!(printed, b.to_string());
}

/// Regression (found by `files_round_trip`): a bare root path followed by
/// ` - n` lost the whitespace to the call check, so `-` was not an operator.
#[test]
fn bare_root_minus_number_is_subtraction() {
    let x = parse_expr("A - 5").expect("parses");
    assert!(
        matches!(x.kind, ExprKind::Binary(BinaryOp::Sub, _, _)),
        "{x:?}"
    );
    let x = parse_expr("[A - 5114743]").expect("parses in a list");
    assert!(matches!(x.kind, ExprKind::List(ref items) if items.len() == 1));
    // A call still parses, with or without a space before `(`.
    assert!(matches!(
        parse_expr("lower (x)").expect("call").kind,
        ExprKind::Call(..)
    ));
}
