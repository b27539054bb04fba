//! `anumate tool …`: push files of Tool documents (SPEC §13) into the
//! tenant's catalogue, import an MCP server's tools, and list, read and
//! deprecate its tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anumate_proto::connectors::v1 as cpb;
use anumate_proto::registry::v1 as pb;
use clap::{Args, Subcommand};
use cpb::connector_hub_service_client::ConnectorHubServiceClient;
use pb::tools_service_client::ToolsServiceClient;

use crate::cli::{Authed, Connection, Failure, all_pages, finish, read_file, show, time};

/// `anumate tool …`
#[derive(Args, Debug)]
pub struct ToolCommand {
    #[command(subcommand)]
    pub command: ToolSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Tool subcommands.
#[derive(Subcommand, Debug)]
pub enum ToolSub {
    /// Validate and store every Tool document of a file (`---` separated),
    /// all or none; each new content is a new, current version.
    Push {
        /// The YAML file.
        file: PathBuf,
    },
    /// Check a file of Tool documents locally (no server needed): every
    /// problem with its `file:line:col`, or each tool's content hash.
    Validate {
        /// The YAML file.
        file: PathBuf,
    },
    /// List the tenant's tools.
    List {
        /// Only tools carrying these labels (`k=v,k2=v2`).
        #[arg(long, default_value = "")]
        label: String,
        /// Page size (all pages are fetched).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
    },
    /// Show one version of a tool (default: the current one).
    Get {
        /// Tool name (`payments.transfer`).
        name: String,
        /// Version number, `current` or `latest`.
        #[arg(long, short = 'v', default_value = "current")]
        version: String,
        /// Print only the document's source.
        #[arg(long)]
        source: bool,
    },
    /// List a tool's versions, newest first.
    Versions {
        /// Tool name.
        name: String,
    },
    /// Bring the tools of an MCP server declared in the connector hub's
    /// configuration (`[[connectors.mcp]]`) into the catalogue: one Tool
    /// document per MCP tool (`connector: mcp:SERVER`, named PREFIX.<tool>,
    /// with its input and output schemas; side effect from the server's
    /// hints: read-only → read, destructive → destructive, else write),
    /// pushed all or none like `tool push`.
    Import {
        /// The server's `name` in `[[connectors.mcp]]`.
        #[arg(long = "mcp", value_name = "SERVER")]
        mcp: String,
        /// Tool name prefix (default: the server's name).
        #[arg(long)]
        prefix: Option<String>,
        /// Print the Tool documents (a file `tool push` takes) instead of pushing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Deprecate a version: the compiler binds the previous current one.
    Deprecate {
        /// Tool name.
        name: String,
        /// Version number.
        version: i32,
    },
}

/// Runs a tool command and returns the process exit code.
pub async fn run(cmd: ToolCommand) -> ExitCode {
    let file = match &cmd.command {
        ToolSub::Push { file } | ToolSub::Validate { file } => Some(file.display().to_string()),
        _ => None,
    };
    finish(tool(cmd).await.map(|()| ExitCode::SUCCESS), file.as_deref())
}

/// `anumate tool validate FILE`: the checks a push makes, offline.
fn validate(file: &std::path::Path, conn: &Connection) -> Result<(), Failure> {
    let source = read_file(file)?;
    let tools = anumate_tools::parse(&source, &anumate_tools::Limits::default())
        .map_err(|rejection| Failure::Remote(rejection.to_error()))?;
    let reply: Vec<serde_json::Value> = tools
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.tool.name(),
                "line": t.position.0,
                "contentHash": t.content_hash,
                "canonicalJson": t.canonical_json,
            })
        })
        .collect();
    show(conn.output, &reply, |_| {
        for t in &tools {
            println!(
                "ok {} ({}, {}) {}",
                t.tool.name(),
                t.tool.spec.connector.as_string(),
                t.tool.spec.side_effect.as_str(),
                t.content_hash
            );
        }
    });
    Ok(())
}

fn status_name(s: i32) -> &'static str {
    match pb::VersionStatus::try_from(s) {
        Ok(pb::VersionStatus::Published) => "current",
        Ok(pb::VersionStatus::Deprecated) => "deprecated",
        Ok(pb::VersionStatus::Draft) => "draft",
        _ => "unknown",
    }
}

/// A version's state as people read it: `current` only for the tool's
/// current version, `superseded` for older ones still in force.
fn state(v: &pb::ToolVersion, current: Option<i32>) -> &'static str {
    match status_name(v.status) {
        "current" if current.is_some_and(|c| c != v.version) => "superseded",
        other => other,
    }
}

fn print_pushed(reply: &pb::PushToolsResponse) {
    for p in &reply.tools {
        let Some(v) = &p.version else { continue };
        let verb = if p.created {
            "pushed"
        } else {
            "unchanged: identical to"
        };
        println!(
            "{verb} {} version {} ({}, {}) {}",
            v.name, v.version, v.connector, v.side_effect, v.content_hash
        );
    }
}

/// A Struct's numbers are doubles: whole ones back to integers (`minimum: 1`).
fn whole_numbers(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(whole_numbers).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, whole_numbers(v)))
                .collect(),
        ),
        other => other,
    }
}

/// `anumate tool import --mcp SERVER`: the hub lists the server's tools
/// (only it reads `[[connectors.mcp]]` and its secrets), the registry stores
/// them.
async fn import(
    conn: &Connection,
    client: &mut ToolsServiceClient<Authed>,
    server: String,
    prefix: Option<String>,
    dry_run: bool,
) -> Result<(), Failure> {
    let prefix = prefix.unwrap_or_else(|| server.clone());
    if !anumate_tools::is_tool_name(&format!("{prefix}.x")) {
        return Err(Failure::Local(format!(
            "--prefix {prefix:?}: dot-separated segments of lowercase letters, digits, '_' and \
             '-', each starting with a letter"
        )));
    }
    let mut hub = conn
        .client(ConnectorHubServiceClient::with_interceptor)
        .await?;
    let listed = all_pages(async |page_token| {
        let resp = hub
            .list_mcp_tools(cpb::ListMcpToolsRequest {
                server: server.clone(),
                page_size: 500,
                page_token,
            })
            .await?
            .into_inner();
        Ok((resp.tools, resp.next_page_token))
    })
    .await?;
    if listed.is_empty() {
        return Err(Failure::Local(format!(
            "MCP server {server:?} lists no tools"
        )));
    }
    let schema = |s: &pbjson_types::Struct| {
        serde_json::to_value(s)
            .map(whole_numbers)
            .map_err(|e| Failure::Local(e.to_string()))
    };
    let tools = listed
        .iter()
        .map(|t| {
            Ok(anumate_connectors::McpToolInfo {
                name: t.name.clone(),
                title: t.title.clone(),
                description: t.description.clone(),
                input_schema: match &t.input_schema {
                    Some(s) => schema(s)?,
                    None => serde_json::json!({"type": "object"}),
                },
                output_schema: t.output_schema.as_ref().map(schema).transpose()?,
                read_only: t.read_only_hint,
                destructive: t.destructive_hint,
                idempotent: t.idempotent_hint,
            })
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    let file = anumate_connectors::tools_file(&server, &prefix, &tools);
    if dry_run {
        print!("{file}");
        return Ok(());
    }
    let request = pb::PushToolsRequest {
        source_yaml: file,
        source_name: format!("mcp:{server}"),
    };
    let reply = client.push_tools(request).await?.into_inner();
    show(conn.output, &reply, print_pushed);
    Ok(())
}

async fn tool(cmd: ToolCommand) -> Result<(), Failure> {
    let conn = &cmd.conn;
    if let ToolSub::Validate { file } = &cmd.command {
        // Offline: no server, no token.
        return validate(file, conn);
    }
    let mut client = conn.client(ToolsServiceClient::with_interceptor).await?;
    match cmd.command {
        ToolSub::Push { file } => {
            let request = pb::PushToolsRequest {
                source_yaml: read_file(&file)?,
                source_name: file.display().to_string(),
            };
            let reply = client.push_tools(request).await?.into_inner();
            show(conn.output, &reply, print_pushed);
        }
        ToolSub::Import {
            mcp,
            prefix,
            dry_run,
        } => import(conn, &mut client, mcp, prefix, dry_run).await?,
        ToolSub::Validate { .. } => {}
        ToolSub::List { label, page_size } => {
            let tools = all_pages(async |page_token| {
                let request = pb::ListToolsRequest {
                    page_size,
                    page_token,
                    label_selector: label.clone(),
                };
                let resp = client.list_tools(request).await?.into_inner();
                Ok((resp.tools, resp.next_page_token))
            })
            .await?;
            let reply = pb::ListToolsResponse {
                tools,
                next_page_token: String::new(),
            };
            show(conn.output, &reply, |reply| {
                if reply.tools.is_empty() {
                    println!("no tools (the built-ins are always there)");
                    return;
                }
                println!(
                    "{:<32} {:>7} {:>6}  {:<8} DESCRIPTION",
                    "NAME", "CURRENT", "LATEST", "ETAG"
                );
                for t in &reply.tools {
                    let current = if t.current_version > 0 {
                        t.current_version.to_string()
                    } else {
                        "-".into()
                    };
                    println!(
                        "{:<32} {:>7} {:>6}  {:<8} {}",
                        t.name, current, t.latest_version, t.etag, t.description
                    );
                }
            });
        }
        ToolSub::Get {
            name,
            version,
            source,
        } => {
            let request = pb::GetToolRequest { name, version };
            let reply = client.get_tool(request).await?.into_inner();
            let Some(v) = &reply.version else {
                return Err(Failure::Local("the server sent no version".into()));
            };
            if source {
                print!("{}", v.source_yaml);
                return Ok(());
            }
            let current = reply.tool.as_ref().map(|t| t.current_version);
            show(conn.output, &reply, |reply| {
                println!("name:         {}", v.name);
                println!("version:      {} ({})", v.version, state(v, current));
                if !v.description.is_empty() {
                    println!("description:  {}", v.description);
                }
                println!("connector:    {}", v.connector);
                println!("side effect:  {}", v.side_effect);
                println!("content hash: {}", v.content_hash);
                println!(
                    "created:      {} by {}",
                    time(v.create_time.as_ref()),
                    v.created_by
                );
                if let Some(t) = &reply.tool {
                    println!("etag:         {}", t.etag);
                }
                println!("---");
                print!("{}", v.source_yaml);
            });
        }
        ToolSub::Versions { name } => {
            let current = client
                .get_tool(pb::GetToolRequest {
                    name: name.clone(),
                    version: "latest".into(),
                })
                .await?
                .into_inner()
                .tool
                .map(|t| t.current_version);
            let request = pb::ListToolVersionsRequest {
                name,
                ..Default::default()
            };
            let reply = client.list_tool_versions(request).await?.into_inner();
            show(conn.output, &reply, |reply| {
                println!(
                    "{:>7}  {:<10} {:<10} {:<11} {:<24} HASH",
                    "VERSION", "STATE", "CONNECTOR", "SIDE EFFECT", "CREATED"
                );
                for v in &reply.versions {
                    println!(
                        "{:>7}  {:<10} {:<10} {:<11} {:<24} {}",
                        v.version,
                        state(v, current),
                        v.connector,
                        v.side_effect,
                        time(v.create_time.as_ref()),
                        v.content_hash
                    );
                }
            });
        }
        ToolSub::Deprecate { name, version } => {
            let request = pb::DeprecateToolVersionRequest {
                name,
                version,
                etag: String::new(),
            };
            let reply = client.deprecate_tool_version(request).await?.into_inner();
            show(conn.output, &reply, |reply| {
                let (Some(v), Some(t)) = (&reply.version, &reply.tool) else {
                    return;
                };
                let now = if t.current_version > 0 {
                    format!("current is now version {}", t.current_version)
                } else {
                    "no version is current: capsules fall back to a built-in of that name, if any"
                        .into()
                };
                println!("deprecated {} version {}; {now}", v.name, v.version);
            });
        }
    }
    Ok(())
}
