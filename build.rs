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
    Ok(())
}
