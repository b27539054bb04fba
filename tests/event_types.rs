//! Checks on the contracts as compiled into `FILE_DESCRIPTOR_SET`: the
//! CloudEvents type registry in `anumate.events.v1`, and HTTP annotations on
//! every public RPC (the REST gateway is driven by them) and on no RPC of a
//! service-only `…Internal` service, and that every event type is built by
//! some non-test code path.
#![allow(clippy::expect_used)] // a test crate: helpers panic on broken contracts

use std::collections::{BTreeMap, BTreeSet};

use prost_reflect::{DescriptorPool, DynamicMessage, ExtensionDescriptor, Value};

fn pool() -> DescriptorPool {
    DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn extension(pool: &DescriptorPool, name: &str) -> ExtensionDescriptor {
    pool.get_extension_by_name(name)
        .unwrap_or_else(|| panic!("extension {name} is in the pool"))
}

fn string_option(options: &DynamicMessage, ext: &ExtensionDescriptor) -> Option<String> {
    if !options.has_extension(ext) {
        return None;
    }
    match options.get_extension(ext).as_ref() {
        Value::String(s) => Some(s.clone()),
        other => panic!("{} is not a string: {other:?}", ext.full_name()),
    }
}

#[test]
fn every_event_message_has_one_registered_type_and_topic() {
    let pool = pool();
    let type_ext = extension(&pool, "anumate.events.v1.cloudevent_type");
    let topic_ext = extension(&pool, "anumate.events.v1.topic");
    let type_re = regex::Regex::new(r"^dev\.anumate\.[a-z_]+\.[a-z_]+\.v1$").expect("regex");

    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut topic_of_domain: BTreeMap<String, String> = BTreeMap::new();
    let events: Vec<_> = pool
        .all_messages()
        .filter(|m| m.package_name() == "anumate.events.v1")
        // The events service's requests and responses are not events.
        .filter(|m| m.parent_file().services().next().is_none())
        .collect();
    assert!(events.len() >= 30, "only {} event messages", events.len());

    for message in events {
        let name = message.full_name().to_string();
        let options = message.options();
        let ce_type = string_option(&options, &type_ext)
            .unwrap_or_else(|| panic!("{name} has no cloudevent_type option"));
        assert!(!ce_type.is_empty(), "{name}: empty cloudevent_type");
        assert!(
            type_re.is_match(&ce_type),
            "{name}: cloudevent_type {ce_type:?} does not match {type_re}"
        );
        if let Some(previous) = seen.insert(ce_type.clone(), name.clone()) {
            panic!("{ce_type} is registered by both {previous} and {name}");
        }

        let topic = string_option(&options, &topic_ext)
            .unwrap_or_else(|| panic!("{name} has no topic option"));
        assert!(
            topic.starts_with("anumate.") && topic.len() > "anumate.".len(),
            "{name}: topic {topic:?} must start with `anumate.`"
        );

        // All events of one domain go to one topic (ordering per aggregate).
        let domain = ce_type.split('.').nth(2).unwrap_or_default().to_string();
        let known = topic_of_domain
            .entry(domain.clone())
            .or_insert(topic.clone());
        assert_eq!(
            *known, topic,
            "{name}: domain {domain} is published on {known} and {topic}"
        );

        // Every event carries its tenant.
        assert!(
            message.get_field_by_name("tenant_id").is_some(),
            "{name} has no tenant_id field"
        );
    }
}

/// Names of the `{variable}` segments of an HTTP path template
/// (`{name}` or `{name=pattern}`).
fn path_variables(path: &str) -> Vec<String> {
    path.split('{')
        .skip(1)
        .filter_map(|rest| rest.split('}').next())
        .map(|var| var.split('=').next().unwrap_or(var).to_string())
        .collect()
}

/// Services whose name ends in `Internal` are service-only: the REST gateway
/// must not route them, so they carry no HTTP rule. Every other RPC has one.
#[test]
fn every_rpc_has_an_http_annotation_matching_its_request() {
    let pool = pool();
    let http_ext = extension(&pool, "google.api.http");
    let mut services = BTreeSet::new();
    let mut internal = BTreeSet::new();
    let mut routes: BTreeMap<(String, String), String> = BTreeMap::new();

    for service in pool.services() {
        if !service.package_name().starts_with("anumate.") {
            continue;
        }
        if service.name().ends_with("Internal") {
            for method in service.methods() {
                assert!(
                    !method.options().has_extension(&http_ext),
                    "{} is service-only but has a google.api.http option",
                    method.full_name()
                );
            }
            internal.insert(service.full_name().to_string());
            continue;
        }
        services.insert(service.full_name().to_string());
        for method in service.methods() {
            let name = method.full_name().to_string();
            let options = method.options();
            assert!(
                options.has_extension(&http_ext),
                "{name} has no google.api.http option"
            );
            let rule = options.get_extension(&http_ext);
            let rule = rule.as_message().expect("HttpRule is a message");

            let (verb, path) = ["get", "post", "put", "delete", "patch"]
                .into_iter()
                .find_map(|verb| {
                    let value = rule.get_field_by_name(verb)?;
                    let path = value.as_str()?.to_string();
                    (!path.is_empty()).then_some((verb, path))
                })
                .unwrap_or_else(|| panic!("{name}: HttpRule has no get/post/put/delete/patch"));
            assert!(path.starts_with("/v1/"), "{name}: path {path:?}");

            let body = rule
                .get_field_by_name("body")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            match verb {
                "get" | "delete" => assert!(body.is_empty(), "{name}: {verb} with a body"),
                _ => assert_eq!(body, "*", "{name}: {verb} should take body \"*\""),
            }

            let input = method.input();
            for var in path_variables(&path) {
                let mut message = input.clone();
                let segments: Vec<&str> = var.split('.').collect();
                for (i, segment) in segments.iter().enumerate() {
                    let field = message.get_field_by_name(segment).unwrap_or_else(|| {
                        panic!(
                            "{name}: path variable {{{var}}} is not a field of {}",
                            input.full_name()
                        )
                    });
                    if i + 1 < segments.len() {
                        message = field
                            .kind()
                            .as_message()
                            .unwrap_or_else(|| panic!("{name}: {var} goes through a scalar"))
                            .clone();
                    }
                }
            }

            if let Some(other) = routes.insert((verb.to_string(), path.clone()), name.clone()) {
                panic!("{verb} {path} is bound to both {other} and {name}");
            }
        }
    }
    assert!(
        services.len() >= 8,
        "expected the Anumate services, found {services:?}"
    );
    assert!(
        internal.contains("anumate.approvals.v1.ApprovalsInternal"),
        "expected the internal services, found {internal:?}"
    );
}

#[test]
fn enums_have_a_prefixed_unspecified_zero() {
    let pool = pool();
    for e in pool.all_enums() {
        if !e.package_name().starts_with("anumate.") {
            continue;
        }
        let zero = e
            .get_value(0)
            .unwrap_or_else(|| panic!("{} has no 0", e.full_name()));
        assert!(
            zero.name().ends_with("_UNSPECIFIED"),
            "{}: zero value is {}",
            e.full_name(),
            zero.name()
        );
    }
}

/// Event types (full names) or whole topics whose producers have not landed
/// yet: they are registered but no code builds them. When a producer lands,
/// its entry leaves this list (the test below insists).
const WITHOUT_PRODUCER_YET: &[&str] = &[];

fn rust_sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every registered event type is built by some service or library code
/// (not only by tests), so no type in the registry is dead.
#[test]
fn every_event_type_is_produced_by_some_code_path() {
    let pool = pool();
    let topic_ext = extension(&pool, "anumate.events.v1.topic");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for top in ["services", "libs"] {
        let Ok(crates) = std::fs::read_dir(root.join(top)) else {
            continue;
        };
        for krate in crates.flatten() {
            rust_sources(&krate.path().join("src"), &mut files);
        }
    }
    let source: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("readable source"))
        .collect::<Vec<_>>()
        .join("\n");

    let mut missing = Vec::new();
    let mut early = Vec::new();
    for message in pool
        .all_messages()
        .filter(|m| m.package_name() == "anumate.events.v1")
        .filter(|m| m.parent_file().services().next().is_none())
    {
        let Some(topic) = string_option(&message.options(), &topic_ext) else {
            continue;
        };
        let built = regex::Regex::new(&format!(
            r"(\bev|\bpb|events::v1)::{}\s*\{{",
            regex::escape(message.name())
        ))
        .expect("regex")
        .is_match(&source);
        let pending = WITHOUT_PRODUCER_YET.contains(&topic.as_str())
            || WITHOUT_PRODUCER_YET.contains(&message.full_name());
        if !built && !pending {
            missing.push(format!("{} ({topic})", message.full_name()));
        }
        if built && pending {
            early.push(format!("{} ({topic})", message.full_name()));
        }
    }
    assert!(
        missing.is_empty(),
        "event types no service or library builds: {missing:?}"
    );
    assert!(
        early.is_empty(),
        "these events now have a producer: take them out of WITHOUT_PRODUCER_YET: {early:?}"
    );
}

#[test]
fn the_generated_table_matches_the_options_and_keys_lead_with_the_tenant() {
    use anumate_proto::event_types::{EVENT_TYPES, EventKey, event_type};
    let pool = pool();
    let type_ext = extension(&pool, "anumate.events.v1.cloudevent_type");
    let mut from_options: Vec<String> = pool
        .all_messages()
        .filter_map(|m| string_option(&m.options(), &type_ext))
        .collect();
    from_options.sort();
    let table: Vec<String> = EVENT_TYPES
        .iter()
        .map(|t| t.cloudevent_type.to_string())
        .collect();
    assert_eq!(table, from_options, "one row per registered type, sorted");
    for t in EVENT_TYPES {
        assert_eq!(t.key_fields.first(), Some(&"tenant_id"), "{}", t.message);
        assert_eq!(event_type(t.cloudevent_type), Some(t));
    }
    // Two tenants' same-named capsules never share a key.
    let pushed = |tenant: &str| anumate_proto::events::v1::CapsulePushed {
        tenant_id: tenant.into(),
        name: "refund".into(),
        ..Default::default()
    };
    assert_eq!(pushed("acme").event_key(), "acme/refund");
    assert_ne!(pushed("acme").event_key(), pushed("globex").event_key());
    let appended = anumate_proto::events::v1::ReceiptAppended {
        tenant_id: "acme".into(),
        receipt_id: "r1".into(),
        ..Default::default()
    };
    assert_eq!(appended.event_key(), "acme");
}
