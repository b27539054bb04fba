//! Generates the contracts from `proto/` with protox (pure Rust, no system `protoc`).
//!
//! The encoded descriptor set is written next to the generated code and embedded by
//! `src/lib.rs`: reflection and the REST gateway read it, and unlike
//! `Compiler::file_descriptor_set()` the encoded bytes keep extension options such as
//! `google.api.http` and `anumate.events.v1.cloudevent_type`.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");

    let mut files = Vec::new();
    collect_protos(Path::new("proto/anumate"), &mut files)?;
    let relative: Vec<PathBuf> = files
        .iter()
        .map(|f| f.strip_prefix("proto").map(Path::to_path_buf))
        .collect::<Result<_, _>>()?;

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&relative)?;
    let encoded = compiler.encode_file_descriptor_set();
    fs::write(out_dir.join("anumate_descriptor.bin"), &encoded)?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // `prost::Name` on every message: the outbox looks event types up by full name.
        .compile_fds_with_config(compiler.file_descriptor_set(), {
            let mut config = tonic_prost_build::Config::new();
            config.enable_type_names();
            config
        })?;

    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .build(&[".anumate", ".google.api"])?;

    fs::write(out_dir.join("event_types.rs"), event_types(&encoded)?)?;
    Ok(())
}

/// One event message as its options declare it.
struct EventDecl {
    message: String,
    rust_type: String,
    cloudevent_type: String,
    topic: String,
    key_fields: Vec<String>,
}

/// The event registry as Rust: the `EVENT_TYPES` table and an `EventKey` impl
/// per event message, read from the `(cloudevent_type)`, `(topic)` and `(key)`
/// options, so no consumer (nor the outbox) needs reflection to key an event.
fn event_types(encoded: &[u8]) -> Result<String, Box<dyn std::error::Error>> {
    use prost_reflect::{DescriptorPool, Value};
    use std::fmt::Write;

    let pool = DescriptorPool::decode(encoded)?;
    let ext = |name: &str| {
        pool.get_extension_by_name(name)
            .ok_or_else(|| format!("extension {name} is not in the descriptor set"))
    };
    let (type_ext, topic_ext, key_ext) = (
        ext("anumate.events.v1.cloudevent_type")?,
        ext("anumate.events.v1.topic")?,
        ext("anumate.events.v1.key")?,
    );
    let string_option = |options: &prost_reflect::DynamicMessage, e| match options
        .has_extension(e)
        .then(|| options.get_extension(e))
        .as_deref()
    {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let mut decls = Vec::new();
    for message in pool.all_messages() {
        let options = message.options();
        let Some(cloudevent_type) = string_option(&options, &type_ext) else {
            continue;
        };
        let topic = string_option(&options, &topic_ext)
            .ok_or_else(|| format!("{} has a type but no topic", message.full_name()))?;
        let mut fields: Vec<_> = message
            .fields()
            .filter(|f| {
                let o = f.options();
                o.has_extension(&key_ext)
                    && matches!(o.get_extension(&key_ext).as_ref(), Value::Bool(true))
            })
            .collect();
        fields.sort_by_key(|f| f.number());
        let key_fields: Vec<String> = fields.iter().map(|f| f.name().to_string()).collect();
        if key_fields.first().map(String::as_str) != Some("tenant_id") || key_fields.len() > 2 {
            return Err(format!(
                "{}: the key must be tenant_id and at most one more field, marked (key) (got {key_fields:?})",
                message.full_name()
            )
            .into());
        }
        if fields
            .iter()
            .any(|f| f.is_list() || f.kind() != prost_reflect::Kind::String)
        {
            return Err(format!(
                "{}: key fields must be singular strings",
                message.full_name()
            )
            .into());
        }
        let rust_type = format!(
            "crate::{}::{}",
            message.package_name().replace('.', "::"),
            message.name()
        );
        decls.push(EventDecl {
            message: message.full_name().to_string(),
            rust_type,
            cloudevent_type,
            topic,
            key_fields,
        });
    }
    decls.sort_by(|a, b| a.cloudevent_type.cmp(&b.cloudevent_type));

    let mut out = String::from(
        "// Generated by build.rs from the event options in proto/anumate/events/v1.\n\n",
    );
    out.push_str("/// Every registered event type, sorted by CloudEvents type.\n");
    out.push_str("pub const EVENT_TYPES: &[EventType] = &[\n");
    for d in &decls {
        writeln!(
            out,
            "    EventType {{ cloudevent_type: {:?}, topic: {:?}, message: {:?}, key_fields: &{:?} }},",
            d.cloudevent_type, d.topic, d.message, d.key_fields
        )?;
    }
    out.push_str("];\n\n");
    for d in &decls {
        let parts: Vec<String> = d
            .key_fields
            .iter()
            .map(|f| format!("self.{f}.as_str()"))
            .collect();
        let body = if parts.len() == 1 {
            format!("self.{}.clone()", d.key_fields[0])
        } else {
            format!("[{}].join(\"/\")", parts.join(", "))
        };
        writeln!(
            out,
            "impl EventKey for {} {{\n    fn event_key(&self) -> String {{\n        {body}\n    }}\n}}\n",
            d.rust_type
        )?;
    }
    Ok(out)
}
