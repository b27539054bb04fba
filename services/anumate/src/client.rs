//! Client commands: talk to a running server over gRPC with the generated clients.

use std::{path::PathBuf, process::ExitCode};

use anumate_proto::common::v1::PageRequest;
use anumate_proto::registry::v1 as pb;
use clap::{Args, Subcommand, ValueEnum};
use pb::registry_service_client::RegistryServiceClient;

use crate::cli::{Connection, Failure, Output, finish, print_json, read_file};

/// `anumate capsule …`
#[derive(Args, Debug)]
pub struct CapsuleCommand {
    #[command(subcommand)]
    pub command: CapsuleSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Capsule subcommands.
#[derive(Subcommand, Debug)]
pub enum CapsuleSub {
    /// Validate and store a capsule document as a new version.
    Push {
        /// The YAML file.
        file: PathBuf,
        /// Publish the new version at once.
        #[arg(long)]
        publish: bool,
        /// Only push if the capsule's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Check a capsule document without storing it.
    Validate {
        /// The YAML file.
        file: PathBuf,
    },
    /// List capsules.
    List {
        /// Label selector, e.g. team=payments,env=prod.
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
        /// Only capsules with a version in this state.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Page size (all pages are fetched).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
    },
    /// Show one version (default: the published one).
    Get {
        /// Capsule name.
        name: String,
        /// Version number, `published` or `latest`.
        #[arg(long, short = 'v', default_value = "published")]
        version: String,
        /// Print only the source YAML.
        #[arg(long)]
        source: bool,
    },
    /// List a capsule's versions.
    Versions {
        /// Capsule name.
        name: String,
    },
    /// Show what changed between two versions.
    Diff {
        /// Capsule name.
        name: String,
        /// Older version.
        from: i64,
        /// Newer version.
        to: i64,
    },
    /// Publish a version.
    Publish {
        /// Capsule name.
        name: String,
        /// Version number.
        version: i64,
        /// Only if the capsule's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Deprecate a version.
    Deprecate {
        /// Capsule name.
        name: String,
        /// Version number.
        version: i64,
        /// Only if the capsule's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Soft-delete a capsule and all its versions.
    Delete {
        /// Capsule name.
        name: String,
        /// Only if the capsule's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
}

/// Version states on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    Draft,
    Published,
    Deprecated,
}

impl From<StatusArg> for pb::VersionStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Draft => pb::VersionStatus::Draft,
            StatusArg::Published => pb::VersionStatus::Published,
            StatusArg::Deprecated => pb::VersionStatus::Deprecated,
        }
    }
}

fn status_name(s: i32) -> &'static str {
    match pb::VersionStatus::try_from(s) {
        Ok(pb::VersionStatus::Draft) => "draft",
        Ok(pb::VersionStatus::Published) => "published",
        Ok(pb::VersionStatus::Deprecated) => "deprecated",
        _ => "unknown",
    }
}

fn time(ts: &Option<pbjson_types::Timestamp>) -> String {
    ts.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_version(c: Option<&pb::Capsule>, v: &pb::CapsuleVersion) {
    println!("name:         {}", v.name);
    println!("version:      {} ({})", v.version, status_name(v.status));
    if !v.description.is_empty() {
        println!("description:  {}", v.description);
    }
    if !v.labels.is_empty() {
        let mut labels: Vec<_> = v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        println!("labels:       {}", labels.join(","));
    }
    println!("content hash: {}", v.content_hash);
    println!("signed by:    {}", v.kid);
    println!("created:      {} by {}", time(&v.create_time), v.created_by);
    if v.publish_time.is_some() {
        println!("published:    {}", time(&v.publish_time));
    }
    if v.deprecate_time.is_some() {
        println!("deprecated:   {}", time(&v.deprecate_time));
    }
    if let Some(c) = c {
        println!("etag:         {}", c.etag);
    }
}

/// Runs a capsule command and returns the process exit code.
pub async fn run_capsule(cmd: CapsuleCommand) -> ExitCode {
    let file = match &cmd.command {
        CapsuleSub::Push { file, .. } | CapsuleSub::Validate { file } => {
            Some(file.display().to_string())
        }
        _ => None,
    };
    finish(
        capsule(cmd).await.map(|()| ExitCode::SUCCESS),
        file.as_deref(),
    )
}

async fn capsule(cmd: CapsuleCommand) -> Result<(), Failure> {
    let out = cmd.conn.output;
    match cmd.command {
        CapsuleSub::Push {
            file,
            publish,
            etag,
        } => {
            let source = read_file(&file)?;
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let resp = client
                .push_capsule(pb::PushCapsuleRequest {
                    source_yaml: source,
                    source_name: file.display().to_string(),
                    etag,
                    publish,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if let Some(v) = &resp.version {
                let verb = if resp.created {
                    "pushed"
                } else {
                    "unchanged: identical to"
                };
                println!(
                    "{verb} {} version {} ({}) {}",
                    v.name,
                    v.version,
                    status_name(v.status),
                    v.content_hash
                );
                if let Some(c) = &resp.capsule {
                    println!("etag {}", c.etag);
                }
            }
        }
        CapsuleSub::Validate { file } => {
            let source = read_file(&file)?;
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let resp = client
                .validate_capsule(pb::ValidateCapsuleRequest {
                    source_yaml: source,
                    source_name: file.display().to_string(),
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else {
                println!(
                    "{}: valid capsule {} {}",
                    file.display(),
                    resp.name,
                    resp.content_hash
                );
            }
        }
        CapsuleSub::List {
            selector,
            status,
            page_size,
        } => {
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let resp = client
                    .list_capsules(pb::ListCapsulesRequest {
                        page: Some(PageRequest {
                            page_size,
                            page_token: token.clone(),
                        }),
                        label_selector: selector.clone(),
                        status: status.map_or(pb::VersionStatus::Unspecified, Into::into) as i32,
                    })
                    .await?
                    .into_inner();
                all.extend(resp.capsules);
                token = resp.page.map(|p| p.next_page_token).unwrap_or_default();
                if token.is_empty() {
                    break;
                }
            }
            if out == Output::Json {
                print_json(&pb::ListCapsulesResponse {
                    capsules: all,
                    page: None,
                });
            } else if all.is_empty() {
                println!("no capsules");
            } else {
                println!(
                    "{:<32} {:>7} {:>9}  {:<8} DESCRIPTION",
                    "NAME", "LATEST", "PUBLISHED", "ETAG"
                );
                for c in all {
                    let published = if c.published_version > 0 {
                        c.published_version.to_string()
                    } else {
                        "-".into()
                    };
                    println!(
                        "{:<32} {:>7} {:>9}  {:<8} {}",
                        c.name, c.latest_version, published, c.etag, c.description
                    );
                }
            }
        }
        CapsuleSub::Get {
            name,
            version,
            source,
        } => {
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let resp = client
                .get_capsule(pb::GetCapsuleRequest { name, version })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if let Some(v) = &resp.version {
                if source {
                    print!("{}", v.source_yaml);
                } else {
                    print_version(resp.capsule.as_ref(), v);
                }
            }
        }
        CapsuleSub::Versions { name } => {
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let resp = client
                    .list_capsule_versions(pb::ListCapsuleVersionsRequest {
                        name: name.clone(),
                        page: Some(PageRequest {
                            page_size: 200,
                            page_token: token.clone(),
                        }),
                    })
                    .await?
                    .into_inner();
                all.extend(resp.versions);
                token = resp.page.map(|p| p.next_page_token).unwrap_or_default();
                if token.is_empty() {
                    break;
                }
            }
            if out == Output::Json {
                print_json(&pb::ListCapsuleVersionsResponse {
                    versions: all,
                    page: None,
                });
            } else {
                println!(
                    "{:>7}  {:<10} {:<24} {:<20} HASH",
                    "VERSION", "STATUS", "CREATED", "BY"
                );
                for v in all {
                    println!(
                        "{:>7}  {:<10} {:<24} {:<20} {}",
                        v.version,
                        status_name(v.status),
                        time(&v.create_time),
                        v.created_by,
                        v.content_hash
                    );
                }
            }
        }
        CapsuleSub::Diff { name, from, to } => {
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let resp = client
                .diff_capsule_versions(pb::DiffCapsuleVersionsRequest {
                    name,
                    from_version: from,
                    to_version: to,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if resp.changes.is_empty() {
                println!(
                    "versions {from} and {to} have the same content ({})",
                    resp.to_content_hash
                );
            } else {
                print!("{}", resp.unified_diff);
                println!();
                if resp.unified_diff_approximate {
                    println!(
                        "(line diff is approximate: the server's diff deadline was reached; the changed paths below are exact)"
                    );
                }
                println!("{} changed path(s):", resp.changes.len());
                for c in &resp.changes {
                    match pb::ChangeKind::try_from(c.kind) {
                        Ok(pb::ChangeKind::Added) => println!("  + {} = {}", c.path, c.to_json),
                        Ok(pb::ChangeKind::Removed) => {
                            println!("  - {} (was {})", c.path, c.from_json)
                        }
                        _ => println!("  ~ {}: {} -> {}", c.path, c.from_json, c.to_json),
                    }
                }
            }
        }
        CapsuleSub::Publish {
            name,
            version,
            etag,
        } => {
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let resp = client
                .publish_capsule_version(pb::PublishCapsuleVersionRequest {
                    name,
                    version,
                    etag,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if let (Some(v), Some(c)) = (&resp.version, &resp.capsule) {
                println!(
                    "published {} version {} (etag {})",
                    v.name, v.version, c.etag
                );
            }
        }
        CapsuleSub::Deprecate {
            name,
            version,
            etag,
        } => {
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let resp = client
                .deprecate_capsule_version(pb::DeprecateCapsuleVersionRequest {
                    name,
                    version,
                    etag,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if let (Some(v), Some(c)) = (&resp.version, &resp.capsule) {
                println!(
                    "deprecated {} version {} (etag {})",
                    v.name, v.version, c.etag
                );
            }
        }
        CapsuleSub::Delete { name, etag } => {
            let mut client = cmd
                .conn
                .client(RegistryServiceClient::with_interceptor)
                .await?;
            let resp = client
                .delete_capsule(pb::DeleteCapsuleRequest {
                    name: name.clone(),
                    etag,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else {
                println!("deleted {name}");
            }
        }
    }
    Ok(())
}
