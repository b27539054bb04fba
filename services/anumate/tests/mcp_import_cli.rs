#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate tool import --mcp SERVER` as a user runs it: `anumate dev` with
//! `[[connectors.mcp]]` declaring the `mcp_echo` example (a real rmcp stdio
//! server), its tools previewed, imported into the catalogue (again: nothing
//! new), and a capsule using one compiled against it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::{cli, start_dev_env};

/// The `mcp_echo` example of the connector hub, built once (a no-op when fresh).
fn echo_server() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/<this test> → target/<profile>/examples/mcp_echo
            let exe = std::env::current_exe().unwrap();
            let path = exe
                .parent()
                .and_then(|deps| deps.parent())
                .unwrap()
                .join("examples/mcp_echo");
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let source = modified(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("../connectors/examples/mcp_echo.rs"),
            );
            // `cargo test --workspace` builds examples first; `--test` alone does not.
            if modified(&path).is_none() || modified(&path) < source {
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let status = std::process::Command::new(cargo)
                    .args([
                        "build",
                        "-p",
                        "anumate-connectors",
                        "--example",
                        "mcp_echo",
                        "--jobs",
                        "2",
                    ])
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .status()
                    .unwrap();
                assert!(status.success(), "cargo build --example mcp_echo failed");
            }
            assert!(path.exists(), "{} is missing", path.display());
            path
        })
        .clone()
}

#[track_caller]
fn ok(dir: &Path, args: &[&str]) -> String {
    cli(dir, args).ok().stdout
}

const CAPSULE: &str = "apiVersion: anumate.dev/v1
kind: Capsule
metadata: {name: add-numbers}
spec:
  inputs:
    a: {type: integer, required: true}
  tools: [calc.add]
  steps:
    - id: add
      tool: calc.add
      with: {a: \"${{ inputs.a }}\", b: 2}
";

#[test]
fn an_mcp_servers_tools_are_imported_and_compiled_against() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("anumate.toml");
    std::fs::write(
        &config,
        format!(
            "[[connectors.mcp]]\nname = \"echo\"\ncommand = {:?}\n",
            echo_server().display().to_string()
        ),
    )
    .unwrap();
    std::fs::write(d.join("capsule.yaml"), CAPSULE).unwrap();
    let _dev = start_dev_env(d, &[("ANUMATE_CONFIG", config.to_str().unwrap())]);

    // A preview: Tool documents `tool push` takes, nothing stored.
    let preview = ok(d, &["tool", "import", "--mcp", "echo", "--dry-run"]);
    assert!(preview.contains("\"name\": \"echo.add\""), "{preview}");
    assert!(preview.contains("\"connector\": \"mcp:echo\""), "{preview}");
    assert!(preview.contains("\"tool\": \"Say Hello\""), "{preview}");
    std::fs::write(d.join("preview.yaml"), &preview).unwrap();
    ok(d, &["tool", "validate", "preview.yaml"]);
    let out = ok(d, &["tool", "list"]);
    assert!(out.starts_with("no tools"), "{out}");

    let out = ok(d, &["tool", "import", "--mcp", "echo", "--prefix", "calc"]);
    assert!(
        out.contains("pushed calc.add version 1 (mcp:echo, read)"),
        "{out}"
    );
    assert!(
        out.contains("pushed calc.fail version 1 (mcp:echo, destructive)"),
        "{out}"
    );
    assert!(
        out.contains("pushed calc.say_hello version 1 (mcp:echo, write)"),
        "{out}"
    );
    // Again: the same documents, nothing new.
    let out = ok(d, &["tool", "import", "--mcp", "echo", "--prefix", "calc"]);
    assert!(
        out.contains("unchanged: identical to calc.add version 1"),
        "{out}"
    );
    let source = ok(d, &["tool", "get", "calc.add", "--source"]);
    assert!(source.contains("\"required\""), "{source}");
    assert!(source.contains("\"sum\""), "the output schema: {source}");

    let r = cli(d, &["tool", "import", "--mcp", "nope"]).failed();
    assert!(
        r.stderr.contains("error[MCP_SERVER_NOT_FOUND]"),
        "{}",
        r.stderr
    );
    let r = cli(d, &["tool", "import", "--mcp", "echo", "--prefix", "Bad"]).failed();
    assert!(r.stderr.contains("--prefix"), "{}", r.stderr);

    // A capsule using an imported tool compiles against its version.
    ok(d, &["capsule", "push", "capsule.yaml", "--publish"]);
    let plan = cli(d, &["plan", "compile", "add-numbers", "-o", "json"])
        .ok()
        .json();
    let bindings = plan["plan"]["toolBindings"].as_array().unwrap();
    let add = bindings.iter().find(|b| b["tool"] == "calc.add").unwrap();
    assert_eq!(add["toolVersion"], "1");
}
