use serde_json::{Value, json};

use super::*;
use crate::ast::Segment;

/// Paths resolve in `known` (a JSON object of roots); absent ones are unknown.
fn when(src: &str, known: &Value) -> Partial {
    let e = crate::parse_expr(src).unwrap_or_else(|e| panic!("{e}"));
    let resolve = |p: &Path| {
        let mut cur = match known.get(&p.root) {
            Some(v) => v,
            None => return Partial::Unknown,
        };
        for s in &p.segments {
            let next = match s {
                Segment::Field(k) | Segment::Key(k) => cur.get(k.as_str()),
                Segment::Index(i) => usize::try_from(*i).ok().and_then(|i| cur.get(i)),
            };
            match next {
                Some(v) => cur = v,
                None => return Partial::Unknown,
            }
        }
        Partial::Known(cur.clone())
    };
    eval_partial(&e, &resolve)
}

const T: Partial = Partial::Known(Value::Bool(true));
const F: Partial = Partial::Known(Value::Bool(false));

#[test]
fn a_known_operand_decides_and_or_not() {
    let k = json!({"tool": "payments.refund"});
    assert_eq!(
        when("tool == 'payments.refund' or principal.id == 'a'", &k),
        T
    );
    assert_eq!(when("tool == 'email.send' and principal.id == 'a'", &k), F);
    assert_eq!(
        when("tool == 'payments.refund' and principal.id == 'a'", &k),
        Partial::Unknown
    );
    assert_eq!(
        when("not (principal.roles contains 'lead')", &k),
        Partial::Unknown
    );
    assert_eq!(when("not (tool == 'x')", &k), T);
}

#[test]
fn calls_arithmetic_and_mixed_kinds_are_unknown() {
    let k = json!({"args": {"n": 1, "s": "1", "l": [1, "a"], "o": {"k": 1}}});
    assert_eq!(when("args.n == '1'", &k), Partial::Unknown);
    assert_eq!(when("args.n < 'a'", &k), Partial::Unknown);
    assert_eq!(when("args.n + 1 == 2", &k), Partial::Unknown);
    assert_eq!(when("lower(args.s) == '1'", &k), Partial::Unknown);
    assert_eq!(when("args.o == {k: 1}", &k), Partial::Unknown);
    // 'b' might equal an element of another kind at run time? No, but an
    // element of another kind is not decided here: unknown, unless found.
    assert_eq!(when("'b' in args.l", &k), Partial::Unknown);
    assert_eq!(when("'a' in args.l", &k), T);
    assert_eq!(when("args.n in 5", &k), Partial::Unknown);
}

#[test]
fn known_comparisons_follow_the_evaluator() {
    let k = json!({"args": {"amount": 9, "big": 9007199254740993_i64, "cur": "INR",
                            "tags": ["a", "b"], "meta": {"k": 1}, "f": 2.5}});
    assert_eq!(when("args.amount > 5", &k), T);
    assert_eq!(when("args.amount == 9.0", &k), T);
    assert_eq!(when("args.f >= 2.5", &k), T);
    assert_eq!(when("args.cur != 'INR'", &k), F);
    assert_eq!(when("args.cur < 'USD'", &k), T);
    // Integers compare exactly, as the evaluator does (not through f64).
    assert_eq!(when("args.big == 9007199254740992", &k), F);
    assert_eq!(when("args.tags contains 'b'", &k), T);
    assert_eq!(when("'c' in args.tags", &k), F);
    assert_eq!(when("args.cur contains 'N'", &k), T);
    assert_eq!(when("args.meta contains 'k'", &k), T);
    assert_eq!(when("args.cur matches '^I'", &k), T);
    assert_eq!(when("args.cur matches '('", &k), Partial::Unknown);
}

/// Wherever the three-valued answer is known on a fully known input, the real
/// evaluator gives the same answer.
#[test]
fn known_answers_agree_with_the_real_evaluator() {
    let input = json!({"tool": "payments.refund", "args": {"amount": 9, "cur": "INR",
                       "tags": ["a", "b"], "big": 9007199254740993_i64}});
    for cond in [
        "args.amount > 5",
        "args.amount <= 8.5",
        "args.cur == 'INR' and args.amount != 9",
        "args.cur in ['USD', 'INR']",
        "args.tags contains 'c' or tool == 'payments.refund'",
        "args.big == 9007199254740992",
        "args.cur matches 'N+'",
        "not (args.cur < 'ABC')",
    ] {
        let src = format!("policy \"p\" {{ rule \"r\" {{ when {cond} then deny }} }}");
        let set = crate::compile("t", &src).unwrap_or_else(|e| panic!("{cond}: {e}"));
        let real = set.evaluate(&input).unwrap().effect == crate::Effect::Deny;
        assert_eq!(
            when(cond, &input),
            Partial::Known(Value::Bool(real)),
            "{cond}"
        );
    }
}
