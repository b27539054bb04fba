//! JSON redaction: field paths, wildcards, keys, reports.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use anumate_redaction::{Detector, FieldPath, RedactionConfig, Redactor, Replacement};
use serde_json::json;

fn redactor(paths: &[&str]) -> Redactor {
    Redactor::new(RedactionConfig {
        field_paths: paths.iter().map(|p| p.to_string()).collect(),
        ..RedactionConfig::default()
    })
    .unwrap()
}

#[test]
fn field_paths_replace_whole_values() {
    let r = redactor(&["customer.name", "items[*].card", "*.secret", "rows[1]"]);
    let mut doc = json!({
        "customer": {"name": "Jane Doe", "email": "jane@example.com", "age": 41},
        "items": [{"card": {"pan": "x"}, "sku": "A-1"}, {"card": 12, "sku": "B-2"}],
        "a": {"secret": "hunter2", "other": "fine"},
        "b": {"secret": null},
        "rows": ["keep", "drop", "keep"],
        "note": "call +1 415 555 0132"
    });
    let report = r.redact_json(&mut doc);
    assert_eq!(
        doc,
        json!({
            "customer": {"name": "[REDACTED:field]", "email": "[REDACTED:email]", "age": 41},
            "items": [{"card": "[REDACTED:field]", "sku": "A-1"}, {"card": "[REDACTED:field]", "sku": "B-2"}],
            "a": {"secret": "[REDACTED:field]", "other": "fine"},
            "b": {"secret": "[REDACTED:field]"},
            "rows": ["keep", "[REDACTED:field]", "keep"],
            "note": "call [REDACTED:phone]"
        })
    );
    assert_eq!(report.fields, 6);
    assert_eq!(report.counts.get(&Detector::Email), Some(&1));
    assert_eq!(report.counts.get(&Detector::Phone), Some(&1));
    assert_eq!(
        report.paths,
        [
            "customer.name",
            "customer.email",
            "items[0].card",
            "items[1].card",
            "a.secret",
            "b.secret",
            "rows[1]",
            "note"
        ]
    );
    assert_eq!(report.total(), 8);
}

#[test]
fn detectors_scan_nested_strings_keys_and_big_numbers() {
    let r = Redactor::default();
    let mut doc = json!({
        "events": [[{"msg": "from 10.0.0.1"}]],
        "by_user": {"jane@example.com": 1, "[REDACTED:email]": 2},
        "pan": 4111111111111111u64,
        "qty": 12
    });
    let report = r.redact_json(&mut doc);
    assert_eq!(doc["events"][0][0]["msg"], "from [REDACTED:ipv4]");
    assert_eq!(doc["pan"], "[REDACTED:card]");
    assert_eq!(doc["qty"], 12);
    let keys: Vec<&String> = doc["by_user"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["[REDACTED:email]#2", "[REDACTED:email]"]);
    assert_eq!(doc["by_user"]["[REDACTED:email]"], 2);
    assert_eq!(
        report.paths,
        ["events[0][0].msg", "by_user.[REDACTED:email]#2", "pan"]
    );
}

#[test]
fn clean_document_is_unchanged() {
    let r = redactor(&["customer.ssn"]);
    let original = json!({
        "order": "ORD-2024-000123",
        "date": "2024-05-01",
        "version": "1.2.3",
        "customer": {"name": "Jane"},
        "lines": [{"sku": "AB-1234", "qty": 2, "price": 19.99}],
        "hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f0b2b0b822cd15d6c15b0f00a08"
    });
    let mut doc = original.clone();
    let report = r.redact_json(&mut doc);
    assert!(report.is_empty(), "{report:?}");
    assert_eq!(doc, original);
}

#[test]
fn fixed_replacement_applies_to_fields_and_matches() {
    let r = Redactor::new(RedactionConfig {
        detectors: vec![Detector::Email],
        replacement: Replacement::Fixed("[REDACTED]".into()),
        field_paths: vec!["token".into()],
    })
    .unwrap();
    let mut doc = json!({"token": "abc", "to": "jane@example.com"});
    r.redact_json(&mut doc);
    assert_eq!(doc, json!({"token": "[REDACTED]", "to": "[REDACTED]"}));
}

#[test]
fn field_path_syntax() {
    for ok in [
        "a",
        "a.b",
        "*.b",
        "a[*]",
        "a[*].b",
        "a[0][*]",
        "[*].email",
        "a.*.c",
    ] {
        assert!(ok.parse::<FieldPath>().is_ok(), "{ok}");
    }
    for bad in ["", "a..b", "a.", "a[", "a[x]", "a[*]b", "a.[*]", "a*"] {
        assert!(bad.parse::<FieldPath>().is_err(), "{bad}");
    }
    let err = Redactor::new(RedactionConfig {
        field_paths: vec!["a[".into()],
        ..RedactionConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("a["), "{err}");
}

#[test]
fn quoted_keys_name_keys_that_are_not_plain_names() {
    let r = redactor(&["a['odd key']", "b[\"x\"][*]"]);
    let mut v = json!({"a": {"odd key": "secret", "plain": "kept"}, "b": {"x": ["s1", "s2"]}});
    r.redact_json(&mut v);
    assert_ne!(v["a"]["odd key"], json!("secret"));
    assert_eq!(v["a"]["plain"], json!("kept"));
    assert_ne!(v["b"]["x"][0], json!("s1"));
    assert!("a['']".parse::<FieldPath>().is_ok());
}

#[test]
fn a_field_path_matches_the_concrete_paths_it_names() {
    let p = |s: &str| s.parse::<FieldPath>().unwrap();
    assert!(p("customer.email").matches("customer.email"));
    assert!(p("items[*].card").matches("items[3].card"));
    assert!(p("*.ssn").matches("person.ssn"));
    assert!(p("a['odd key']").matches("a.odd key"));
    assert!(!p("customer.email").matches("customer.phone"));
    assert!(!p("items[*].card").matches("items.card"));
    assert!(!p("customer").matches("customer.email"));
    assert!(!p("items[2]").matches("items[3]"));
}
