//! The contract conventions (issue 11), checked on the compiled descriptor
//! set so a new message or RPC cannot drift from them: field behaviours on
//! every field, AIP-158 paging, one digest format, int32 versions and counts,
//! and no type name used twice across packages (one client namespace).
#![allow(clippy::expect_used)] // a test crate: helpers panic on broken contracts

use std::collections::BTreeMap;

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};

fn pool() -> DescriptorPool {
    DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn anumate_messages(pool: &DescriptorPool) -> Vec<MessageDescriptor> {
    pool.all_messages()
        .filter(|m| m.package_name().starts_with("anumate."))
        // Map entries are synthesized by protoc.
        .filter(|m| !m.is_map_entry())
        .collect()
}

#[test]
fn every_field_declares_its_behavior() {
    let pool = pool();
    let ext = pool
        .get_extension_by_name("google.api.field_behavior")
        .expect("google.api.field_behavior is in the pool");
    let mut missing = Vec::new();
    for message in anumate_messages(&pool) {
        // Option messages (authz rules) describe code, not API resources.
        if message.full_name() == "anumate.common.v1.AuthzRule" {
            continue;
        }
        for field in message.fields() {
            let options = field.options();
            let declared = options.has_extension(&ext)
                && options
                    .get_extension(&ext)
                    .as_list()
                    .is_some_and(|l| !l.is_empty());
            if !declared {
                missing.push(field.full_name().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields without (google.api.field_behavior): {missing:#?}"
    );
}

#[test]
fn list_rpcs_page_as_aip_158() {
    let pool = pool();
    for service in pool.services() {
        for method in service.methods() {
            if !method.name().starts_with("List") {
                continue;
            }
            let (input, output) = (method.input(), method.output());
            for (message, field, kind) in [
                (&input, "page_size", Kind::Int32),
                (&input, "page_token", Kind::String),
                (&output, "next_page_token", Kind::String),
            ] {
                let f = message.get_field_by_name(field).unwrap_or_else(|| {
                    panic!(
                        "{}: {} has no top-level {field}",
                        method.full_name(),
                        message.name()
                    )
                });
                assert_eq!(f.kind(), kind, "{}", f.full_name());
            }
        }
    }
    for message in anumate_messages(&pool) {
        for field in message.fields() {
            if let Kind::Message(m) = field.kind() {
                assert!(
                    !matches!(
                        m.full_name(),
                        "anumate.common.v1.PageRequest" | "anumate.common.v1.PageResponse"
                    ),
                    "{} nests paging (AIP-158 wants it top-level)",
                    field.full_name()
                );
            }
        }
    }
}

#[test]
fn versions_and_counts_are_int32() {
    let pool = pool();
    let mut wide = Vec::new();
    for message in anumate_messages(&pool) {
        for field in message.fields() {
            let name = field.name();
            let counted = name == "version"
                || name.ends_with("_version")
                || name.ends_with("_count")
                || name == "quorum";
            if counted && matches!(field.kind(), Kind::Int64 | Kind::Uint64) {
                wide.push(field.full_name().to_string());
            }
        }
    }
    assert!(wide.is_empty(), "versions and counts fit int32: {wide:#?}");
}

#[test]
fn no_type_name_is_declared_twice_across_packages() {
    let pool = pool();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for message in anumate_messages(&pool) {
        if message.parent_message().is_none() {
            seen.entry(message.name().to_string())
                .or_default()
                .push(message.full_name().to_string());
        }
    }
    for e in pool.all_enums() {
        if e.package_name().starts_with("anumate.") && e.parent_message().is_none() {
            seen.entry(e.name().to_string())
                .or_default()
                .push(e.full_name().to_string());
        }
    }
    let twice: Vec<_> = seen.values().filter(|v| v.len() > 1).collect();
    assert!(twice.is_empty(), "names declared twice: {twice:#?}");
    // `Event` would shadow the browser's global in TypeScript clients.
    assert!(!seen.contains_key("Event"));
}
