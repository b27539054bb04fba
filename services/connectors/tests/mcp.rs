#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `mcp:<server>` connector against a real MCP server: the `mcp_echo`
//! example (an rmcp stdio server) started by the hub as `[[connectors.mcp]]`
//! declares it, called through `ConnectorHubInternal.Invoke` over gRPC with
//! real capability tokens, on SQLite and PostgreSQL. The server's call log
//! (`$MCP_ECHO_LOG`) shows what reached it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anumate_auth::{BearerToken, Role};
use anumate_captokens::{ArgsBinding, Capability, IssueRequest, Issuer};
use anumate_connectors::{McpServerConfig, McpServers};
use anumate_crypto::KeyRing;
use anumate_errors::{Error, Reason};
use anumate_proto::connectors::v1 as pb;
use anumate_proto::registry::v1 as rpb;
use anumate_service::{Context, KeysConfig, ServiceModule};
use anumate_testing::{Backend, DevAuth, Layers, expect_reason, migrated_store};
use serde_json::{Value, json};
use tonic::transport::Endpoint;

const SECRET: &str = "s3cr3t-mcp-token-value";

/// The `mcp_echo` example, built once per test binary (a no-op when fresh).
pub fn echo_server() -> PathBuf {
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
            let source =
                modified(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mcp_echo.rs"));
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

fn servers(log: &std::path::Path) -> McpServers {
    let secrets = HashMap::from([("ECHO_TOKEN".to_owned(), SECRET.to_owned())]);
    McpServers::from_config(
        &[
            echo_config(log),
            McpServerConfig {
                name: "ghost".into(),
                command: "/nonexistent/mcp-server".into(),
                ..Default::default()
            },
        ],
        &secrets,
    )
    .unwrap()
}

fn echo_config(log: &std::path::Path) -> McpServerConfig {
    McpServerConfig {
        name: "echo".into(),
        command: echo_server().display().to_string(),
        env: [
            ("MCP_ECHO_LOG".to_owned(), log.display().to_string()),
            (
                "MCP_ECHO_TOKEN".to_owned(),
                "${{ secrets.ECHO_TOKEN }}".to_owned(),
            ),
        ]
        .into(),
        timeout_ms: 3000,
        ..Default::default()
    }
}

/// The tool names that reached the server, in order.
fn calls(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_calls_a_real_mcp_server() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let servers = servers(&log);
    let echo = servers.get("echo").unwrap();

    // Structured content is the output.
    let out = echo
        .call_tool("add", &json!({"a": 2, "b": 3}))
        .await
        .unwrap();
    assert_eq!(out, json!({"sum": 5}));
    // Text content that is JSON is parsed; other text is a string.
    let args = json!({"x": [1, "y"], "nested": {"ok": true}});
    assert_eq!(echo.call_tool("echo", &args).await.unwrap(), args);
    assert_eq!(
        echo.call_tool("Say Hello", &json!({"name": "bob"}))
            .await
            .unwrap(),
        json!("hello bob")
    );
    // One session serves every call: one process, its log in call order.
    assert_eq!(calls(&log), ["add", "echo", "Say Hello"]);

    // isError: not retryable; the secret the server echoed is scrubbed.
    let e = echo.call_tool("fail", &json!({})).await.unwrap_err();
    assert!(!e.retryable);
    assert!(e.message.contains("boom"), "{}", e.message);
    assert!(e.message.contains("[secret]"), "{}", e.message);
    assert!(!e.message.contains(SECRET), "{}", e.message);
    // A tool the server does not have: its JSON-RPC error is permanent.
    let e = echo
        .call_tool("no_such_tool", &json!({}))
        .await
        .unwrap_err();
    assert!(!e.retryable, "{e:?}");
    // Arguments must be an object.
    let e = echo.call_tool("add", &json!([1, 2])).await.unwrap_err();
    assert!(!e.retryable, "{e:?}");

    // The server dies mid-call: retryable; the next call starts a new session.
    let e = echo.call_tool("crash", &json!({})).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
    let out = echo
        .call_tool("add", &json!({"a": 1, "b": 1}))
        .await
        .unwrap();
    assert_eq!(out, json!({"sum": 2}));

    // Over the server's timeout: retryable, and the session still serves.
    let started = std::time::Instant::now();
    let e = echo
        .call_tool("slow", &json!({"ms": 10_000}))
        .await
        .unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert!(e.message.contains("3000 ms"), "{}", e.message);
    assert!(started.elapsed() < Duration::from_secs(8));
    let out = echo.call_tool("slow", &json!({"ms": 1})).await.unwrap();
    assert_eq!(out, json!({"slept": true}));

    // A server that cannot be started: retryable, its command not named.
    let ghost = servers.get("ghost").unwrap();
    let e = ghost.call_tool("add", &json!({})).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert!(e.message.contains("MCP server ghost"), "{}", e.message);
    assert!(!e.message.contains("/nonexistent"), "{}", e.message);
    let e = ghost.list_tools().await.unwrap_err();
    assert_eq!(e.reason, Reason::ConnectorRetryable);

    // Listing: every tool with its schemas and hints.
    let tools = echo.list_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["add", "echo", "Say Hello", "fail", "crash", "slow"]);
    let add = &tools[0];
    assert_eq!(add.description, "Adds two numbers");
    assert!(add.read_only && add.idempotent && !add.destructive);
    assert_eq!(add.input_schema["required"], json!(["a", "b"]));
    assert_eq!(
        add.output_schema.as_ref().unwrap()["properties"]["sum"],
        json!({"type": "number"})
    );
    assert!(tools[3].destructive);
    assert!(tools[1].output_schema.is_none());
    let e = servers.get("nope").unwrap_err();
    assert_eq!(e.reason, Reason::McpServerNotFound);
}

/// The `mcp_echo` example serving streamable HTTP, requiring `token` as its
/// bearer: the child (killed on drop) and its `/mcp` URL.
fn http_echo(token: &str) -> (KillOnDrop, String) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(echo_server())
        .args(["--http", "127.0.0.1:0"])
        .env("MCP_ECHO_TOKEN", token)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = format!("http://{}/mcp", line.trim());
    (KillOnDrop(child), url)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The connector over streamable HTTP against a real server: calls and
/// listing round-trip, the `Authorization` header carries the resolved
/// secret, and a wrong secret is refused without being shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_calls_a_streamable_http_server() {
    let (_child, url) = http_echo(SECRET);
    let server = |secret: &str| {
        McpServers::from_config(
            &[McpServerConfig {
                name: "web".into(),
                url: url.clone(),
                headers: [("Authorization".into(), "Bearer ${{ secrets.WEB }}".into())].into(),
                timeout_ms: 5000,
                ..Default::default()
            }],
            &HashMap::from([("WEB".to_owned(), secret.to_owned())]),
        )
        .unwrap()
    };
    let servers = server(SECRET);
    let web = servers.get("web").unwrap();
    let out = web
        .call_tool("add", &json!({"a": 20, "b": 22}))
        .await
        .unwrap();
    assert_eq!(out, json!({"sum": 42}));
    let args = json!({"deep": {"list": [1, 2, {"x": "y"}]}});
    assert_eq!(web.call_tool("echo", &args).await.unwrap(), args);
    let e = web.call_tool("no_such_tool", &json!({})).await.unwrap_err();
    assert!(!e.retryable, "{e:?}");
    let tools = web.list_tools().await.unwrap();
    assert_eq!(tools.len(), 6);
    assert_eq!(tools[0].name, "add");
    // The session survives between calls.
    let out = web
        .call_tool("add", &json!({"a": 1, "b": 2}))
        .await
        .unwrap();
    assert_eq!(out, json!({"sum": 3}));

    let wrong = server("not-the-token");
    let e = wrong
        .get("web")
        .unwrap()
        .call_tool("add", &json!({"a": 1, "b": 2}))
        .await
        .unwrap_err();
    assert!(!e.message.contains("not-the-token"), "{}", e.message);
    assert!(!e.message.contains(SECRET), "{}", e.message);
}

/// A server limited to some tenants does not exist for the others.
#[test]
fn a_server_serves_only_its_tenants() {
    let servers = McpServers::from_config(
        &[
            McpServerConfig {
                name: "private".into(),
                command: "srv".into(),
                tenants: vec!["t1".into()],
                ..Default::default()
            },
            McpServerConfig {
                name: "shared".into(),
                command: "srv".into(),
                ..Default::default()
            },
        ],
        &HashMap::new(),
    )
    .unwrap();
    assert!(servers.get_for(Some("t1"), "private").is_ok());
    assert_eq!(
        servers.get_for(Some("t2"), "private").unwrap_err().reason,
        Reason::McpServerNotFound
    );
    assert!(servers.get_for(Some("t2"), "shared").is_ok());
    let empty = McpServers::from_config(
        &[McpServerConfig {
            name: "x".into(),
            command: "srv".into(),
            tenants: vec![String::new()],
            ..Default::default()
        }],
        &HashMap::new(),
    )
    .unwrap_err();
    assert!(
        empty.to_string().contains("connectors.mcp[x].tenants"),
        "{empty}"
    );
}

/// A streamable HTTP server that does not answer: retryable, fast, with
/// neither its URL nor its secret header in the message (https builds the
/// TLS client on the ring provider the hub installs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_http_server_is_retryable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let secrets = HashMap::from([("WEB".to_owned(), SECRET.to_owned())]);
    for scheme in ["http", "https"] {
        let servers = McpServers::from_config(
            &[McpServerConfig {
                name: "web".into(),
                url: format!("{scheme}://127.0.0.1:{port}/mcp"),
                headers: [("Authorization".into(), "Bearer ${{ secrets.WEB }}".into())].into(),
                timeout_ms: 5000,
                ..Default::default()
            }],
            &secrets,
        )
        .unwrap();
        let web = servers.get("web").unwrap();
        let started = std::time::Instant::now();
        let e = web.call_tool("add", &json!({})).await.unwrap_err();
        assert!(e.retryable, "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(6));
        assert!(!e.message.contains(SECRET), "{}", e.message);
        let e = web.list_tools().await.unwrap_err();
        assert_eq!(e.reason, Reason::ConnectorRetryable);
    }
}

#[test]
fn bad_server_declarations_are_refused_without_their_secrets() {
    let secrets = HashMap::from([("T".to_owned(), "hunter2".to_owned())]);
    let check = |cfg: McpServerConfig| {
        McpServers::from_config(&[cfg], &secrets)
            .unwrap_err()
            .to_string()
    };
    let both = check(McpServerConfig {
        name: "x".into(),
        command: "srv".into(),
        url: "https://mcp.example/mcp".into(),
        ..Default::default()
    });
    assert!(both.contains("exactly one of command"), "{both}");
    let neither = check(McpServerConfig {
        name: "x".into(),
        ..Default::default()
    });
    assert!(neither.contains("exactly one of command"), "{neither}");
    let name = check(McpServerConfig {
        name: "Bad_Name".into(),
        command: "srv".into(),
        ..Default::default()
    });
    assert!(name.contains("not a server name"), "{name}");
    let scheme = check(McpServerConfig {
        name: "x".into(),
        url: "file:///etc/passwd".into(),
        ..Default::default()
    });
    assert!(scheme.contains("http or https"), "{scheme}");
    let missing = check(McpServerConfig {
        name: "x".into(),
        url: "https://mcp.example/mcp".into(),
        headers: [("Authorization".into(), "Bearer ${{ secrets.NOPE }}".into())].into(),
        ..Default::default()
    });
    assert!(missing.contains("connectors.mcp[x].headers"), "{missing}");
    let header = check(McpServerConfig {
        name: "x".into(),
        url: "https://mcp.example/mcp".into(),
        headers: [("Bad Header".into(), "${{ secrets.T }}".into())].into(),
        ..Default::default()
    });
    assert!(!header.contains("hunter2"), "{header}");
    let twice = McpServers::from_config(
        &[
            McpServerConfig {
                name: "x".into(),
                command: "a".into(),
                ..Default::default()
            },
            McpServerConfig {
                name: "x".into(),
                command: "b".into(),
                ..Default::default()
            },
        ],
        &secrets,
    )
    .unwrap_err();
    assert!(twice.to_string().contains("declared twice"), "{twice}");
}

#[test]
fn mcp_tools_become_tool_documents_that_validate() {
    let tools = vec![
        anumate_connectors::McpToolInfo {
            name: "Create Issue".into(),
            title: String::new(),
            description: "Opens an issue".into(),
            input_schema: json!({"type": "object", "properties": {"title": {"type": "string"}}}),
            output_schema: Some(json!({"type": "object"})),
            read_only: false,
            destructive: false,
            idempotent: false,
        },
        anumate_connectors::McpToolInfo {
            name: "9lives".into(),
            title: "Cat facts".into(),
            description: String::new(),
            input_schema: json!({"type": "object"}),
            output_schema: None,
            read_only: true,
            destructive: false,
            idempotent: true,
        },
    ];
    let file = anumate_connectors::tools_file("github", "gh", &tools);
    let parsed = anumate_tools::parse(&file, &anumate_tools::Limits::default()).unwrap();
    let first = &parsed[0].tool;
    assert_eq!(first.name(), "gh.create_issue");
    assert_eq!(first.spec.connector.as_string(), "mcp:github");
    assert_eq!(first.spec.side_effect.as_str(), "write");
    let mcp = first.spec.mcp.as_ref().unwrap();
    assert_eq!(
        (mcp.server.as_str(), mcp.tool.as_str()),
        ("github", "Create Issue")
    );
    let second = &parsed[1].tool;
    assert_eq!(second.name(), "gh.t9lives");
    assert_eq!(second.spec.side_effect.as_str(), "read");
    assert!(second.spec.idempotent);
    assert_eq!(second.metadata.description, "Cat facts");
}

fn retryable(e: &Error) -> Option<&str> {
    e.metadata
        .iter()
        .find(|(k, _)| k == "retryable")
        .map(|(_, v)| v.as_str())
}

/// `anumate dev`'s composition (registry, captokens, connector hub in one
/// server, `[[connectors.mcp]]` in its configuration): the server's tools
/// listed with `ListMcpTools`, pushed as Tool documents with `PushTools`,
/// then called through `ConnectorHubInternal.Invoke` with real tokens.
async fn imported_mcp_tools_are_invoked_through_the_hub(backend: Backend) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let modules: Vec<Box<dyn ServiceModule>> = vec![
        anumate_registry::module(),
        anumate_captokens_service::module(),
        anumate_connectors::module(),
    ];
    // The registry's own list brings the outbox its events go through.
    let mut migrations = anumate_registry::migrations();
    for m in &modules[1..] {
        migrations.extend(m.migrations());
    }
    let (_db, store) = migrated_store(backend, &migrations).await;
    let auth = DevAuth::with_service_issuer("orchestrator");
    let keys_dir = auth.dir.path().join("keys");
    let log = auth.dir.path().join("calls.log");
    let secret_file = auth.dir.path().join("echo-token");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let listener = anumate_testing::bind().await;
    let own_url = format!("http://{}", listener.local_addr().unwrap());
    let ctx = Context::new(
        json!({"connectors": {
            "secrets": {"ECHO_TOKEN": format!("file:{}", secret_file.display())},
            "mcp": [serde_json::to_value(McpServerConfig {
                tenants: vec!["t1".into()],
                ..echo_config(&log)
            })
            .unwrap()],
        }}),
        Some(store),
        KeysConfig {
            generate_missing: true,
            ..KeysConfig::default()
        },
        keys_dir.clone(),
        auth.services.clone(),
        own_url,
    );
    let layers = Layers::platform(
        anumate_testing::GrpcConfig::default(),
        auth.authenticator.clone(),
    )
    .unwrap();
    let server = anumate_testing::serve_modules(listener, &modules, ctx, layers).await;
    let channel = Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let user_of = |tenant: &str, role: Role| {
        BearerToken(
            auth.issuer
                .mint(tenant, "user:someone", &[role], Duration::from_secs(300))
                .unwrap(),
        )
    };
    let user = |role: Role| user_of("t1", role);

    // Import: list (as an author), turn into documents, push.
    let mut listing = pb::connector_hub_service_client::ConnectorHubServiceClient::with_interceptor(
        channel.clone(),
        user(Role::Author),
    );
    let listed = listing
        .list_mcp_tools(pb::ListMcpToolsRequest {
            server: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tools;
    assert_eq!(listed.len(), 6);
    // Pages of 4: then the last 2.
    let first = listing
        .list_mcp_tools(pb::ListMcpToolsRequest {
            server: "echo".into(),
            page_size: 4,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.tools.len(), 4);
    let rest = listing
        .list_mcp_tools(pb::ListMcpToolsRequest {
            server: "echo".into(),
            page_size: 4,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = rest.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["crash", "slow"]);
    assert!(rest.next_page_token.is_empty());
    let tools: Vec<anumate_connectors::McpToolInfo> = listed
        .iter()
        .map(|t| anumate_connectors::McpToolInfo {
            name: t.name.clone(),
            title: t.title.clone(),
            description: t.description.clone(),
            input_schema: anumate_engine::json::struct_json(t.input_schema.as_ref().unwrap())
                .unwrap(),
            output_schema: t
                .output_schema
                .as_ref()
                .map(|s| anumate_engine::json::struct_json(s).unwrap()),
            read_only: t.read_only_hint,
            destructive: t.destructive_hint,
            idempotent: t.idempotent_hint,
        })
        .collect();
    let mut registry = rpb::tools_service_client::ToolsServiceClient::with_interceptor(
        channel.clone(),
        user(Role::Author),
    );
    let pushed = registry
        .push_tools(rpb::PushToolsRequest {
            source_yaml: anumate_connectors::tools_file("echo", "echo", &tools),
            source_name: "mcp:echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = pushed
        .tools
        .iter()
        .map(|p| p.version.as_ref().unwrap().name.as_str())
        .collect();
    assert!(
        names.contains(&"echo.add") && names.contains(&"echo.say_hello"),
        "{names:?}"
    );
    // A tenant the server does not serve cannot see it, nor call it through
    // tools of its own naming it.
    let mut other = pb::connector_hub_service_client::ConnectorHubServiceClient::with_interceptor(
        channel.clone(),
        user_of("t2", Role::Author),
    );
    expect_reason(
        other
            .list_mcp_tools(pb::ListMcpToolsRequest {
                server: "echo".into(),
                ..Default::default()
            })
            .await,
        Reason::McpServerNotFound,
    );
    rpb::tools_service_client::ToolsServiceClient::with_interceptor(
        channel.clone(),
        user_of("t2", Role::Author),
    )
    .push_tools(rpb::PushToolsRequest {
        source_yaml: anumate_connectors::tools_file("echo", "echo", &tools),
        source_name: "mcp:echo".into(),
    })
    .await
    .unwrap();
    // Operators may not list a server's tools; an undeclared server is named.
    let mut operator =
        pb::connector_hub_service_client::ConnectorHubServiceClient::with_interceptor(
            channel.clone(),
            user(Role::Operator),
        );
    let status = operator
        .list_mcp_tools(pb::ListMcpToolsRequest {
            server: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    expect_reason(
        listing
            .list_mcp_tools(pb::ListMcpToolsRequest {
                server: "nope".into(),
                ..Default::default()
            })
            .await,
        Reason::McpServerNotFound,
    );

    // Invoke as the orchestrator, with tokens signed by the captokens key.
    let orchestrator = auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint("t1", Duration::from_secs(300))
        .unwrap();
    let hub_channel = channel.clone();
    let mut hub = pb::connector_hub_internal_client::ConnectorHubInternalClient::with_interceptor(
        channel,
        BearerToken(orchestrator),
    );
    let ring = KeyRing::load_or_create(&keys_dir, "captokens").unwrap();
    let request_of = |tenant: &str, tool: &str, args: &Value, key: &str| {
        let token = Issuer::new("test")
            .issue(
                &ring,
                IssueRequest {
                    subject: "user:alice",
                    audience: &anumate_connectors::ConnectorsConfig::default().audience,
                    tenant,
                    run: "run-9",
                    step: "s",
                    plan_hash: &format!("sha256:{}", "0".repeat(64)),
                    args: ArgsBinding::Args(args),
                    capability: &Capability {
                        tool: tool.into(),
                        actions: vec!["call".into()],
                        constraints: Default::default(),
                    },
                    ttl: None,
                    single_use: true,
                    now: None,
                },
            )
            .unwrap()
            .token;
        pb::InvokeRequest {
            tool: tool.into(),
            args: Some(serde_json::from_value(args.clone()).unwrap()),
            idempotency_key: key.into(),
            capability_token: token,
        }
    };
    let request = |tool: &str, args: &Value, key: &str| request_of("t1", tool, args, key);
    let output = |r: &pb::InvokeResponse| {
        anumate_engine::json::struct_json(r.output.as_ref().unwrap()).unwrap()
    };
    let args = json!({"a": 2, "b": 3});
    let r = hub
        .invoke(request("echo.add", &args, "add-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output(&r), json!({"sum": 5}));
    assert_eq!(r.connector, "mcp:echo");
    assert!(!r.replayed);
    // The same key again: the recorded result, the server not reached.
    let r = hub
        .invoke(request("echo.add", &args, "add-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.replayed);
    assert_eq!(output(&r), json!({"sum": 5}));
    assert_eq!(calls(&log), ["add"]);
    // A string output travels as {"value": …}.
    let r = hub
        .invoke(request("echo.say_hello", &json!({"name": "bob"}), "hi-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output(&r), json!({"value": "hello bob"}));
    // t2's own echo.add names a server that does not serve t2: refused
    // before anything happens, and the server never sees it.
    let t2 = auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint("t2", Duration::from_secs(300))
        .unwrap();
    let mut t2_hub =
        pb::connector_hub_internal_client::ConnectorHubInternalClient::with_interceptor(
            hub_channel.clone(),
            BearerToken(t2),
        );
    let e = expect_reason(
        t2_hub
            .invoke(request_of(
                "t2",
                "echo.add",
                &json!({"a": 1, "b": 1}),
                "t2-add",
            ))
            .await,
        Reason::ConnectorFailed,
    );
    assert!(
        e.message.contains("not available to this tenant"),
        "{}",
        e.message
    );
    assert_eq!(calls(&log), ["add", "Say Hello"]);

    // isError: failed for good and recorded; the secret never shows.
    let e = expect_reason(
        hub.invoke(request("echo.fail", &json!({}), "fail-1")).await,
        Reason::ConnectorFailed,
    );
    assert_eq!(retryable(&e), Some("false"));
    assert!(!e.message.contains(SECRET), "{}", e.message);
    let e = expect_reason(
        hub.invoke(request("echo.fail", &json!({}), "fail-1")).await,
        Reason::ConnectorFailed,
    );
    assert!(!e.message.contains(SECRET), "{}", e.message);
    assert_eq!(calls(&log).iter().filter(|c| *c == "fail").count(), 1);

    // The server gone: retryable, and the key free for a retry that acts.
    let e = expect_reason(
        hub.invoke(request("echo.crash", &json!({}), "crash-1"))
            .await,
        Reason::ConnectorRetryable,
    );
    assert_eq!(retryable(&e), Some("true"));
    let r = hub
        .invoke(request("echo.add", &json!({"a": 1, "b": 1}), "add-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output(&r), json!({"sum": 2}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_mcp_tools_sqlite() {
    imported_mcp_tools_are_invoked_through_the_hub(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_mcp_tools_postgres() {
    imported_mcp_tools_are_invoked_through_the_hub(Backend::Postgres).await;
}
