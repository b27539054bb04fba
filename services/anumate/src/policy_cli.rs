//! `anumate policy …`: run `test` blocks offline, and push, evaluate, list and
//! read policies on a running server. The commands every versioned document
//! shares run through [`crate::cli::versioned`] with [`Policies`]; test and
//! eval are the policy's own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anumate_errors::Error;
use anumate_proto::policy::v1 as pb;
use clap::{Args, Subcommand};
use pb::policy_service_client::PolicyServiceClient;

use crate::cli::versioned::{self, Kind, PageSizeArg, Transition, VersionArg, versioned_kind};
use crate::cli::{Authed, Connection, Failure, Output, all_pages, finish, print_json, read_file};

/// `anumate policy …`
#[derive(Args, Debug)]
pub struct PolicyCommand {
    #[command(subcommand)]
    pub command: PolicySub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Policy subcommands.
#[derive(Subcommand, Debug)]
pub enum PolicySub {
    /// Compile a policy file and run its `test` blocks locally (no server needed).
    Test {
        /// The policy file.
        file: PathBuf,
        /// Run only tests whose name contains this text.
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Validate and store every `policy` block of a file, each as a new
    /// version of the policy it names, all or none.
    Push {
        /// The policy file.
        file: PathBuf,
        /// Publish the new versions at once.
        #[arg(long)]
        publish: bool,
        /// Only push if the policy's etag is still this (a file of one
        /// `policy` block only).
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Evaluate policies against an input and show the decision.
    Eval {
        /// JSON file with the input (`tool`, `args`, `principal`, …).
        #[arg(long)]
        input: PathBuf,
        /// Evaluate this policy file (not stored).
        #[arg(long, conflicts_with = "policy", required_unless_present = "policy")]
        source: Option<PathBuf>,
        /// Evaluate stored policies: NAME (published), NAME@VERSION or NAME@sha256:….
        #[arg(long, num_args = 1..)]
        policy: Vec<String>,
        /// The capsule's tool allow-list (repeatable).
        #[arg(long = "allow-tool")]
        allowed_tools: Vec<String>,
    },
    /// List policies.
    List {
        #[command(flatten)]
        page_size: PageSizeArg,
    },
    /// Show one version (default: the published one).
    Get {
        /// Policy name.
        name: String,
        #[command(flatten)]
        version: VersionArg,
        /// Print only the source.
        #[arg(long)]
        source: bool,
    },
    /// List a policy's versions.
    Versions {
        /// Policy name.
        name: String,
    },
    /// Publish a version.
    Publish {
        /// Policy name.
        name: String,
        /// Version number.
        version: i32,
    },
}

/// Runs a policy command and returns the process exit code.
pub async fn run(cmd: PolicyCommand) -> ExitCode {
    let file = match &cmd.command {
        PolicySub::Test { file, .. } | PolicySub::Push { file, .. } => {
            Some(file.display().to_string())
        }
        PolicySub::Eval {
            source: Some(f), ..
        } => Some(f.display().to_string()),
        _ => None,
    };
    finish(policy(cmd).await, file.as_deref())
}

fn effect_name(e: i32) -> &'static str {
    match pb::Effect::try_from(e) {
        Ok(pb::Effect::Allow) => "allow",
        Ok(pb::Effect::RequireApproval) => "require_approval",
        Ok(pb::Effect::Deny) => "deny",
        _ => "unspecified",
    }
}

fn status_name(s: i32) -> &'static str {
    match pb::PolicyVersionStatus::try_from(s) {
        Ok(pb::PolicyVersionStatus::Draft) => "draft",
        Ok(pb::PolicyVersionStatus::Published) => "published",
        Ok(pb::PolicyVersionStatus::Deprecated) => "deprecated",
        _ => "unknown",
    }
}

fn detector_name(d: i32) -> String {
    pb::Detector::try_from(d).map_or_else(
        |_| d.to_string(),
        |d| {
            d.as_str_name()
                .trim_start_matches("DETECTOR_")
                .to_lowercase()
        },
    )
}

/// `anumate policy test FILE`: compile and run the tests locally.
fn test_offline(file: &Path, filter: &str, out: Output) -> Result<ExitCode, Failure> {
    let src = read_file(file)?;
    let name = file.display().to_string();
    let set = match anumate_policy::compile(&name, &src) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("{e}");
            let n = e.diagnostics.len();
            eprintln!(
                "error: {name} does not compile ({n} problem{})",
                if n == 1 { "" } else { "s" }
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let outcomes: Vec<_> = anumate_policy::run_tests(&set)
        .into_iter()
        .filter(|t| filter.is_empty() || t.name.contains(filter))
        .collect();
    let failed = outcomes.iter().filter(|t| !t.passed()).count();
    if out == Output::Json {
        let results: Vec<_> = outcomes
            .iter()
            .map(|t| {
                serde_json::json!({
                    "policy": t.policy,
                    "name": t.name,
                    "line": t.at.line,
                    "column": t.at.col,
                    "passed": t.passed(),
                    "expected": t.expected.as_str(),
                    "actual": match &t.actual {
                        Ok(d) => serde_json::to_value(d).unwrap_or_default(),
                        Err(e) => serde_json::json!({"error": e.to_string()}),
                    },
                    "diff": t.diff(),
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "file": name,
            "passed": outcomes.len() - failed,
            "failed": failed,
            "results": results,
        }));
    } else {
        for t in &outcomes {
            if t.passed() {
                println!("✓ {}/{}", t.policy, t.name);
            } else {
                println!("✗ {}/{} ({name}:{})", t.policy, t.name, t.at);
                for line in t.diff().lines() {
                    println!("    {line}");
                }
            }
        }
        println!(
            "{} passed, {failed} failed ({} test{})",
            outcomes.len() - failed,
            outcomes.len(),
            if outcomes.len() == 1 { "" } else { "s" }
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn parse_ref(text: &str) -> Result<pb::PolicyRef, Failure> {
    let (name, sel) = text.split_once('@').unwrap_or((text, ""));
    let mut r = pb::PolicyRef {
        name: name.to_string(),
        version: 0,
        content_hash: String::new(),
    };
    if sel.starts_with("sha256:") || sel.starts_with("sha256-") {
        r.content_hash = sel.to_string();
    } else if !sel.is_empty() && sel != "published" {
        r.version = sel.parse().map_err(|_| {
            Failure::Local(format!(
                "bad policy reference {text:?}: want NAME, NAME@VERSION or NAME@sha256:…"
            ))
        })?;
    }
    Ok(r)
}

/// The source line a span starts on.
fn line_of(src: &str, line: i32) -> Option<&str> {
    usize::try_from(line)
        .ok()
        .and_then(|l| src.lines().nth(l.saturating_sub(1)))
}

async fn print_decision(
    client: &mut PolicyServiceClient<Authed>,
    resp: &pb::EvaluatePolicyResponse,
    local: Option<&str>,
) -> Result<(), Failure> {
    let Some(d) = &resp.decision else {
        return Ok(());
    };
    // Sources of stored versions, fetched once each to show rule lines.
    let mut sources: HashMap<(String, i32), String> = HashMap::new();
    println!("effect: {}", effect_name(d.effect));
    if d.denied_by_allow_list {
        println!("denied by the allow-list; no policy ran");
    }
    if d.matched_rules.is_empty() {
        println!("matched rules: none");
    } else {
        println!("matched rules:");
    }
    for m in &d.matched_rules {
        let Some(r) = &m.rule else { continue };
        let span = r.span.clone().unwrap_or_default();
        println!(
            "  {}/{} [{}] priority {} at {}:{}:{}",
            r.policy,
            r.rule,
            effect_name(m.effect),
            m.priority,
            span.source_name,
            span.start_line,
            span.start_column
        );
        let text = match local {
            Some(src) => line_of(src, span.start_line).map(str::to_string),
            None => {
                let key = (r.policy.clone(), r.policy_version);
                if !sources.contains_key(&key) {
                    let got = client
                        .get_policy(pb::GetPolicyRequest {
                            name: r.policy.clone(),
                            version: r.policy_version.to_string(),
                        })
                        .await
                        .ok()
                        .and_then(|g| g.into_inner().version)
                        .map(|v| v.source)
                        .unwrap_or_default();
                    sources.insert(key.clone(), got);
                }
                sources
                    .get(&key)
                    .and_then(|s| line_of(s, span.start_line))
                    .map(str::to_string)
            }
        };
        if let Some(text) = text {
            println!("    {:>4} | {}", span.start_line, text.trim_end());
        }
        if !m.reason.is_empty() {
            println!("    reason: {}", m.reason);
        }
    }
    if let Some(o) = &d.obligations {
        if !o.approvals.is_empty() || !o.redactions.is_empty() {
            println!("obligations:");
        }
        for a in &o.approvals {
            let stages: Vec<_> = a
                .stages
                .iter()
                .map(|s| format!("{}: {} of [{}]", s.name, s.quorum, s.approvers.join(", ")))
                .collect();
            println!("  require_approval {}", stages.join(" then "));
            if !a.reason.is_empty() {
                println!("    reason: {}", a.reason);
            }
        }
        for r in &o.redactions {
            let mut parts = Vec::new();
            if !r.fields.is_empty() {
                parts.push(format!("fields [{}]", r.fields.join(", ")));
            }
            if !r.detectors.is_empty() {
                let names: Vec<_> = r.detectors.iter().map(|&d| detector_name(d)).collect();
                parts.push(format!("detectors [{}]", names.join(", ")));
            }
            if !r.replacement.is_empty() {
                parts.push(format!("with {:?}", r.replacement));
            }
            println!("  redact {}", parts.join(" "));
        }
    }
    if !d.reasons.is_empty() {
        println!("reasons:");
        for r in &d.reasons {
            println!("  - {r}");
        }
    }
    let refs: Vec<_> = resp
        .policies
        .iter()
        .map(|p| format!("{}@{}", p.name, p.version))
        .collect();
    println!("policies: {}", refs.join(", "));
    println!("policy set hash: {}", resp.policy_set_hash);
    println!("fuel used: {}", resp.fuel_used);
    Ok(())
}

/// Policies in the policy service, as a kind of versioned document.
pub(crate) struct Policies;

versioned_kind! {
    Policies: PolicyServiceClient,
    version: pb::PolicyVersion { source: source, status: status_name },
    document: pb::Policy { in: policy },
    push: push_policy(pb::PushPolicyRequest) -> pb::PushPolicyResponse,
    get: get_policy(pb::GetPolicyRequest) -> pb::GetPolicyResponse,
    publish: publish_policy_version(pb::PublishPolicyVersionRequest)
        -> pb::PublishPolicyVersionResponse,
    deprecate: deprecate_policy_version(pb::DeprecatePolicyVersionRequest)
        -> pb::DeprecatePolicyVersionResponse,
}

impl Kind for Policies {
    type Filter = ();
    type Listed = Vec<pb::Policy>;
    type Versions = pb::ListPolicyVersionsResponse;

    async fn list(
        client: &mut Self::Client,
        (): (),
        page_size: i32,
    ) -> Result<Self::Listed, Failure> {
        all_pages(async |page_token| {
            let request = pb::ListPoliciesRequest {
                page_size,
                page_token,
                status: 0,
            };
            let resp = client.list_policies(request).await?.into_inner();
            Ok((resp.policies, resp.next_page_token))
        })
        .await
    }

    /// One call with the server's default page, printed as it came.
    async fn versions(client: &mut Self::Client, name: String) -> Result<Self::Versions, Failure> {
        let request = pb::ListPolicyVersionsRequest {
            name,
            ..Default::default()
        };
        Ok(client.list_policy_versions(request).await?.into_inner())
    }

    fn print_version(p: Option<&pb::Policy>, v: &pb::PolicyVersion) {
        println!("name:         {}", v.name);
        println!("version:      {} ({})", v.version, status_name(v.status));
        if !v.description.is_empty() {
            println!("description:  {}", v.description);
        }
        println!("content hash: {}", v.content_hash);
        println!("created by:   {}", v.created_by);
        if let Some(p) = p {
            println!("etag:         {}", p.etag);
        }
        if !v.rules.is_empty() {
            println!("rules:");
            for r in &v.rules {
                let line = r.span.as_ref().map_or(0, |s| s.start_line);
                println!(
                    "  {} (line {line}, priority {}, {}{})",
                    r.name,
                    r.priority,
                    effect_name(r.effect),
                    if r.enabled { "" } else { ", disabled" }
                );
            }
        }
        println!("tests:        {}", v.test_count);
    }

    fn print_list(all: &Vec<pb::Policy>) {
        println!(
            "{:<32} {:>7} {:>9}  DESCRIPTION",
            "NAME", "LATEST", "PUBLISHED"
        );
        for p in all {
            println!(
                "{:<32} {:>7} {:>9}  {}",
                p.name, p.latest_version, p.published_version, p.description
            );
        }
    }

    fn print_versions(versions: &pb::ListPolicyVersionsResponse) {
        for v in &versions.versions {
            println!(
                "{:>4}  {:<10}  {}  {}",
                v.version,
                status_name(v.status),
                v.content_hash,
                v.created_by
            );
        }
    }
}

/// `push FILE` without an etag: every block of the file in one request
/// (`PushPolicies`), all or none.
async fn push_all(conn: &Connection, file: &Path, publish: bool) -> Result<(), Failure> {
    let request = pb::PushPoliciesRequest {
        source: read_file(file)?,
        source_name: file.display().to_string(),
        publish,
    };
    let mut client = conn.client(PolicyServiceClient::with_interceptor).await?;
    let reply = client.push_policies(request).await?.into_inner();
    crate::cli::show(conn.output, &reply, |reply| {
        for p in &reply.policies {
            let Some(v) = &p.version else { continue };
            let verb = if p.created {
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
            if let Some(d) = &p.policy {
                println!("etag {}", d.etag);
            }
        }
    });
    Ok(())
}

async fn policy(cmd: PolicyCommand) -> Result<ExitCode, Failure> {
    let conn = &cmd.conn;
    let out = conn.output;
    match cmd.command {
        PolicySub::Test { file, filter } => return test_offline(&file, &filter, out),
        PolicySub::Push {
            file,
            publish,
            etag,
        } if !etag.is_empty() => versioned::push::<Policies>(conn, &file, publish, etag).await?,
        PolicySub::Push { file, publish, .. } => push_all(conn, &file, publish).await?,
        PolicySub::Eval {
            input,
            source,
            policy,
            allowed_tools,
        } => {
            use pb::evaluate_policy_request::{Input, Policies as Target};
            let input_json = read_file(&input)?;
            let (target, local, source_name) = match &source {
                Some(f) => {
                    let src = read_file(f)?;
                    (
                        Target::Source(src.clone()),
                        Some(src),
                        f.display().to_string(),
                    )
                }
                None => (
                    Target::PolicySet(pb::PolicySet {
                        policies: policy
                            .iter()
                            .map(|p| parse_ref(p))
                            .collect::<Result<_, _>>()?,
                    }),
                    None,
                    String::new(),
                ),
            };
            let mut client = conn.client(PolicyServiceClient::with_interceptor).await?;
            let resp = client
                .evaluate_policy(pb::EvaluatePolicyRequest {
                    policies: Some(target),
                    source_name,
                    input: Some(Input::InputJson(input_json)),
                    allowed_tools,
                })
                .await
                .map_err(|s| {
                    let mut e = Error::from_status(&s);
                    // Input problems are positioned in the input file.
                    if e.violations.iter().any(|v| v.field.starts_with("input")) {
                        e.message = format!("{}: {}", input.display(), e.message);
                    }
                    Failure::Remote(e)
                })?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else {
                print_decision(&mut client, &resp, local.as_deref()).await?;
            }
        }
        PolicySub::List { page_size } => {
            versioned::list::<Policies>(conn, (), page_size.page_size).await?
        }
        PolicySub::Get {
            name,
            version,
            source,
        } => versioned::get::<Policies>(conn, name, version.version, source).await?,
        PolicySub::Versions { name } => versioned::versions::<Policies>(conn, name).await?,
        PolicySub::Publish { name, version } => {
            let to = Transition::Publish;
            versioned::transition::<Policies>(conn, to, name, version, None).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}
