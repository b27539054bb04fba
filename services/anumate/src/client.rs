//! `anumate capsule …`: capsules in the registry over gRPC. The commands every
//! versioned document shares run through [`crate::cli::versioned`] with
//! [`Capsules`]; validate, diff and delete are the capsule's own.

use std::{path::Path, path::PathBuf, process::ExitCode};

use anumate_proto::registry::v1 as pb;
use clap::{Args, Subcommand, ValueEnum};
use pb::registry_service_client::RegistryServiceClient;

use crate::cli::versioned::{self, Kind, PageSizeArg, Transition, VersionArg, versioned_kind};
use crate::cli::{Connection, Failure, all_pages, finish, read_file, show, time};

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
        #[command(flatten)]
        page_size: PageSizeArg,
    },
    /// Show one version (default: the published one).
    Get {
        /// Capsule name.
        name: String,
        #[command(flatten)]
        version: VersionArg,
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
        from: i32,
        /// Newer version.
        to: i32,
    },
    /// Publish a version.
    Publish {
        /// Capsule name.
        name: String,
        /// Version number.
        version: i32,
        /// Only if the capsule's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Deprecate a version.
    Deprecate {
        /// Capsule name.
        name: String,
        /// Version number.
        version: i32,
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

/// Capsules in the registry, as a kind of versioned document.
pub(crate) struct Capsules;

versioned_kind! {
    Capsules: RegistryServiceClient,
    version: pb::CapsuleVersion { source: source_yaml, status: status_name },
    document: pb::Capsule { in: capsule },
    push: push_capsule(pb::PushCapsuleRequest) -> pb::PushCapsuleResponse,
    get: get_capsule(pb::GetCapsuleRequest) -> pb::GetCapsuleResponse,
    publish: publish_capsule_version(pb::PublishCapsuleVersionRequest)
        -> pb::PublishCapsuleVersionResponse,
    deprecate: deprecate_capsule_version(pb::DeprecateCapsuleVersionRequest)
        -> pb::DeprecateCapsuleVersionResponse,
    warnings: warnings,
}

/// What `capsule list` filters by.
pub(crate) struct CapsuleFilter {
    /// Label selector ("" for all).
    selector: String,
    /// Only capsules with a version in this state.
    status: Option<StatusArg>,
}

impl Kind for Capsules {
    type Filter = CapsuleFilter;
    type Listed = pb::ListCapsulesResponse;
    type Versions = pb::ListCapsuleVersionsResponse;

    async fn list(
        client: &mut Self::Client,
        filter: CapsuleFilter,
        page_size: i32,
    ) -> Result<Self::Listed, Failure> {
        let status = filter
            .status
            .map_or(pb::VersionStatus::Unspecified, Into::into) as i32;
        let capsules = all_pages(async |page_token| {
            let request = pb::ListCapsulesRequest {
                page_size,
                page_token,
                label_selector: filter.selector.clone(),
                status,
            };
            let resp = client.list_capsules(request).await?.into_inner();
            Ok((resp.capsules, resp.next_page_token))
        })
        .await?;
        Ok(pb::ListCapsulesResponse {
            capsules,
            next_page_token: String::new(),
        })
    }

    async fn versions(client: &mut Self::Client, name: String) -> Result<Self::Versions, Failure> {
        let versions = all_pages(async |page_token| {
            let request = pb::ListCapsuleVersionsRequest {
                name: name.clone(),
                page_size: 200,
                page_token,
            };
            let resp = client.list_capsule_versions(request).await?.into_inner();
            Ok((resp.versions, resp.next_page_token))
        })
        .await?;
        Ok(pb::ListCapsuleVersionsResponse {
            versions,
            next_page_token: String::new(),
        })
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
        println!(
            "created:      {} by {}",
            time(v.create_time.as_ref()),
            v.created_by
        );
        if v.publish_time.is_some() {
            println!("published:    {}", time(v.publish_time.as_ref()));
        }
        if v.deprecate_time.is_some() {
            println!("deprecated:   {}", time(v.deprecate_time.as_ref()));
        }
        if let Some(c) = c {
            println!("etag:         {}", c.etag);
        }
    }

    fn print_list(listed: &pb::ListCapsulesResponse) {
        if listed.capsules.is_empty() {
            println!("no capsules");
            return;
        }
        println!(
            "{:<32} {:>7} {:>9}  {:<8} DESCRIPTION",
            "NAME", "LATEST", "PUBLISHED", "ETAG"
        );
        for c in &listed.capsules {
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

    fn print_versions(versions: &pb::ListCapsuleVersionsResponse) {
        println!(
            "{:>7}  {:<10} {:<24} {:<20} HASH",
            "VERSION", "STATUS", "CREATED", "BY"
        );
        for v in &versions.versions {
            println!(
                "{:>7}  {:<10} {:<24} {:<20} {}",
                v.version,
                status_name(v.status),
                time(v.create_time.as_ref()),
                v.created_by,
                v.content_hash
            );
        }
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
    let conn = &cmd.conn;
    match cmd.command {
        CapsuleSub::Push {
            file,
            publish,
            etag,
        } => versioned::push::<Capsules>(conn, &file, publish, etag).await,
        CapsuleSub::Validate { file } => validate(conn, &file).await,
        CapsuleSub::List {
            selector,
            status,
            page_size,
        } => {
            let filter = CapsuleFilter { selector, status };
            versioned::list::<Capsules>(conn, filter, page_size.page_size).await
        }
        CapsuleSub::Get {
            name,
            version,
            source,
        } => versioned::get::<Capsules>(conn, name, version.version, source).await,
        CapsuleSub::Versions { name } => versioned::versions::<Capsules>(conn, name).await,
        CapsuleSub::Diff { name, from, to } => diff(conn, name, from, to).await,
        CapsuleSub::Publish {
            name,
            version,
            etag,
        } => {
            let to = Transition::Publish;
            versioned::transition::<Capsules>(conn, to, name, version, Some(etag)).await
        }
        CapsuleSub::Deprecate {
            name,
            version,
            etag,
        } => {
            let to = Transition::Deprecate;
            versioned::transition::<Capsules>(conn, to, name, version, Some(etag)).await
        }
        CapsuleSub::Delete { name, etag } => delete(conn, name, etag).await,
    }
}

/// `capsule validate FILE`.
async fn validate(conn: &Connection, file: &Path) -> Result<(), Failure> {
    let source = read_file(file)?;
    let mut client = conn.client(RegistryServiceClient::with_interceptor).await?;
    let request = pb::ValidateCapsuleRequest {
        source_yaml: source,
        source_name: file.display().to_string(),
    };
    let resp = client.validate_capsule(request).await?.into_inner();
    show(conn.output, &resp, |resp| {
        println!(
            "{}: valid capsule {} {}",
            file.display(),
            resp.name,
            resp.content_hash
        );
    });
    Ok(())
}

/// `capsule diff NAME FROM TO`: the line diff, then the changed paths.
async fn diff(conn: &Connection, name: String, from: i32, to: i32) -> Result<(), Failure> {
    let mut client = conn.client(RegistryServiceClient::with_interceptor).await?;
    let request = pb::DiffCapsuleVersionsRequest {
        name,
        from_version: from,
        to_version: to,
    };
    let resp = client.diff_capsule_versions(request).await?.into_inner();
    show(conn.output, &resp, |resp| {
        if resp.changes.is_empty() {
            println!(
                "versions {from} and {to} have the same content ({})",
                resp.to_content_hash
            );
            return;
        }
        print!("{}", resp.unified_diff);
        println!();
        if resp.unified_diff_approximate {
            println!(
                "(line diff is approximate: the server's diff deadline was reached; the changed paths below are exact)"
            );
        }
        println!("{} changed path(s):", resp.changes.len());
        for c in &resp.changes {
            match pb::DiffChangeKind::try_from(c.kind) {
                Ok(pb::DiffChangeKind::Added) => println!("  + {} = {}", c.path, c.to_json),
                Ok(pb::DiffChangeKind::Removed) => println!("  - {} (was {})", c.path, c.from_json),
                _ => println!("  ~ {}: {} -> {}", c.path, c.from_json, c.to_json),
            }
        }
    });
    Ok(())
}

/// `capsule delete NAME`: soft-deletes the capsule and all its versions.
async fn delete(conn: &Connection, name: String, etag: String) -> Result<(), Failure> {
    let mut client = conn.client(RegistryServiceClient::with_interceptor).await?;
    let request = pb::DeleteCapsuleRequest {
        name: name.clone(),
        etag,
    };
    let resp = client.delete_capsule(request).await?.into_inner();
    show(conn.output, &resp, |_| println!("deleted {name}"));
    Ok(())
}
