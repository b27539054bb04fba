//! `anumate connector …`: what the connector hub's mock connector did (one
//! entry per effect, with how many times it was delivered), for tests, demos
//! and crash drills.

use std::process::ExitCode;

use anumate_proto::connectors::v1 as pb;
use clap::{Args, Subcommand};
use pb::connector_hub_service_client::ConnectorHubServiceClient;

use crate::cli::{Connection, Failure, all_pages, finish, show};

/// `anumate connector …`
#[derive(Args, Debug)]
pub struct ConnectorCommand {
    #[command(subcommand)]
    pub command: ConnectorSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Connector subcommands.
#[derive(Subcommand, Debug)]
pub enum ConnectorSub {
    /// List the mock connector's calls, newest first: one line per (tool,
    /// idempotency key), with deliveries and whether it acted.
    Calls {
        /// Only calls of this run.
        #[arg(long, default_value = "")]
        run: String,
        /// Only calls of this tool.
        #[arg(long, default_value = "")]
        tool: String,
        /// Page size (all pages are fetched).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
    },
}

/// Runs a connector command and returns the process exit code.
pub async fn run(cmd: ConnectorCommand) -> ExitCode {
    finish(connector(cmd).await.map(|()| ExitCode::SUCCESS), None)
}

async fn connector(cmd: ConnectorCommand) -> Result<(), Failure> {
    let conn = &cmd.conn;
    let mut client = conn
        .client(ConnectorHubServiceClient::with_interceptor)
        .await?;
    match cmd.command {
        ConnectorSub::Calls {
            run,
            tool,
            page_size,
        } => {
            let calls = all_pages(async |page_token| {
                let request = pb::ListMockCallsRequest {
                    page_size,
                    page_token,
                    run_id: run.clone(),
                    tool: tool.clone(),
                };
                let resp = client.list_mock_calls(request).await?.into_inner();
                Ok((resp.calls, resp.next_page_token))
            })
            .await?;
            let reply = pb::ListMockCallsResponse {
                calls,
                next_page_token: String::new(),
            };
            show(conn.output, &reply, |reply| {
                if reply.calls.is_empty() {
                    println!("no mock calls");
                    return;
                }
                println!(
                    "{:<28} {:<24} {:<16} {:>10}  {:<5} OUTPUT",
                    "TOOL", "IDEMPOTENCY KEY", "RUN", "DELIVERIES", "ACTED"
                );
                for c in &reply.calls {
                    let output = c
                        .output
                        .as_ref()
                        .and_then(|o| serde_json::to_string(o).ok())
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<28} {:<24} {:<16} {:>10}  {:<5} {}",
                        c.tool,
                        c.idempotency_key,
                        c.run_id,
                        c.deliveries,
                        if c.acted { "yes" } else { "no" },
                        output
                    );
                }
            });
        }
    }
    Ok(())
}
