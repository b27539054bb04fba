//! Where the hub finds a tool's declaration: the tenant's catalogue in the
//! registry, or (tests, demos) a fixed set.

use std::collections::HashMap;
use std::sync::Arc;

use anumate_errors::{Error, Reason, Result};
use anumate_proto::registry::v1 as rpb;
use anumate_service::clients::{Caller, RegistryClient};
use anumate_tools::Tool;
use futures::future::BoxFuture;

/// Resolves a tool name of a tenant to its current declaration.
pub trait ToolSource: Send + Sync {
    /// The tool, or `NOT_FOUND` (`TOOL_NOT_FOUND`).
    fn tool<'a>(&'a self, tenant: &'a str, name: &'a str) -> BoxFuture<'a, Result<Arc<Tool>>>;
}

fn not_found(name: &str) -> Error {
    Error::because(
        Reason::ToolNotFound,
        format!("no tool {name:?} in the tenant's catalogue"),
    )
}

/// The same tools for every tenant.
#[derive(Default, Clone)]
pub struct StaticTools(HashMap<String, Arc<Tool>>);

impl StaticTools {
    /// A set of `tools`, by name.
    pub fn new(tools: impl IntoIterator<Item = Tool>) -> Self {
        StaticTools(
            tools
                .into_iter()
                .map(|t| (t.name().to_owned(), Arc::new(t)))
                .collect(),
        )
    }
}

impl ToolSource for StaticTools {
    fn tool<'a>(&'a self, _tenant: &'a str, name: &'a str) -> BoxFuture<'a, Result<Arc<Tool>>> {
        Box::pin(async move { self.0.get(name).cloned().ok_or_else(|| not_found(name)) })
    }
}

/// The tenant's catalogue, read with the registry's `GetTool` (current version).
pub struct RegistryTools(pub Arc<dyn RegistryClient>);

impl ToolSource for RegistryTools {
    fn tool<'a>(&'a self, tenant: &'a str, name: &'a str) -> BoxFuture<'a, Result<Arc<Tool>>> {
        Box::pin(async move {
            let caller = Caller::Service {
                tenant: tenant.to_owned(),
                service: crate::SERVICE_IDENTITY,
            };
            let response = self
                .0
                .get_tool(
                    &caller,
                    rpb::GetToolRequest {
                        name: name.to_owned(),
                        version: String::new(),
                    },
                )
                .await
                .map_err(|e| e.to_error())?;
            let version = response.version.ok_or_else(|| not_found(name))?;
            Ok(Arc::new(Tool::from_canonical_json(
                &version.canonical_json,
            )?))
        })
    }
}
