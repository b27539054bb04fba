//! The policy DSL: parse, check, compile; evaluate a fixed input and run
//! the file's tests when it compiles; the printed form must parse again.
//! The same text as one template expression, checked and evaluated.
#![no_main]

use anumate_policy::{TemplateScope, compile, compile_template_expr, parse, run_tests};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ast) = parse("fuzz.policy", src) {
        let printed = ast.to_string();
        if let Err(e) = parse("printed.policy", &printed) {
            panic!("the printed form does not parse: {e}\n--- printed:\n{printed}");
        }
    }
    if let Ok(set) = compile("fuzz.policy", src) {
        let input = json!({
            "tenant": "acme",
            "principal": {"id": "u1", "roles": ["operator"], "groups": []},
            "capsule": {"name": "refund", "version": 3, "labels": {"team": "pay"}},
            "tool": "payments.refund",
            "args": {"amount": 120, "card": "4111 1111 1111 1111", "items": [1, [2, {"a": null}]]},
            "env": {"stage": "prod"},
            "now": "2026-01-01T00:00:00Z"
        });
        let _ = set.evaluate(&input);
        let _ = run_tests(&set);
    }
    let scope = TemplateScope {
        inputs: &["order_id", "amount"],
        steps_upstream: &["fetch", "check"],
        steps_known: &["fetch", "check", "later"],
    };
    if let Ok(e) = compile_template_expr(src, &scope) {
        let inputs = json!({"order_id": "o-1", "amount": 12.5});
        let steps = json!({"fetch": {"output": {"x": [1, 2]}, "status": "ok"}});
        let _ = e.eval(&inputs, &steps);
    }
});
