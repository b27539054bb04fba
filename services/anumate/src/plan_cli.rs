//! `anumate plan …`: compile capsules into plans and read stored plans on a
//! running server.

use std::process::ExitCode;

use anumate_proto::compiler::v1 as pb;
use clap::{Args, Subcommand};
use pb::compiler_service_client::CompilerServiceClient;

use crate::cli::{Connection, Failure, Output, finish, print_json, time};

/// `anumate plan …`
#[derive(Args, Debug)]
pub struct PlanCommand {
    #[command(subcommand)]
    pub command: PlanSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Plan subcommands.
#[derive(Subcommand, Debug)]
pub enum PlanSub {
    /// Compile a capsule version into a plan (or get the stored one).
    Compile {
        /// Capsule name.
        name: String,
        /// Version number, `published` (default) or `latest`.
        #[arg(long, short = 'v', default_value = "published")]
        version: String,
    },
    /// Show a stored plan.
    Get {
        /// Plan hash (`sha256:<hex>`; `sha256-<hex>` and bare hex too).
        hash: String,
    },
    /// List stored plans, newest first.
    List {
        /// Only plans of this capsule.
        #[arg(long, default_value = "")]
        capsule: String,
        /// Page size (all pages are fetched).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
    },
}

/// Runs a plan command and returns the process exit code.
pub async fn run(cmd: PlanCommand) -> ExitCode {
    finish(plan(cmd).await.map(|()| ExitCode::SUCCESS), None)
}

fn duration(d: Option<&pbjson_types::Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) => {
            let ms = d.seconds * 1000 + i64::from(d.nanos) / 1_000_000;
            if ms % 1000 == 0 {
                format!("{}s", ms / 1000)
            } else {
                format!("{:.3}s", ms as f64 / 1000.0)
            }
        }
    }
}

fn certainty(c: i32) -> &'static str {
    match pb::ApprovalCertainty::try_from(c) {
        Ok(pb::ApprovalCertainty::Always) => "always",
        Ok(pb::ApprovalCertainty::Conditional) => "conditional",
        _ => "unspecified",
    }
}

fn side_effect(s: i32) -> &'static str {
    match pb::SideEffect::try_from(s) {
        Ok(pb::SideEffect::Read) => "read",
        Ok(pb::SideEffect::Write) => "write",
        Ok(pb::SideEffect::Destructive) => "destructive",
        _ => "unspecified",
    }
}

fn print_summary(p: &pb::ExecutablePlan) {
    println!("plan:         {}", p.plan_hash);
    println!(
        "capsule:      {} version {} ({})",
        p.capsule_name, p.capsule_version, p.capsule_content_hash
    );
    let policies: Vec<_> = p
        .policies
        .iter()
        .map(|r| format!("{}@{}", r.name, r.version))
        .collect();
    println!(
        "policies:     {}",
        if policies.is_empty() {
            "none".to_string()
        } else {
            policies.join(", ")
        }
    );
    println!("policy set:   {}", p.policy_set_hash);
    println!(
        "created:      {} by {}",
        time(p.create_time.as_ref()),
        p.created_by
    );
    println!("compiler:     {}", p.compiler_version);
}

fn print_plan(p: &pb::ExecutablePlan) {
    print_summary(p);
    println!("tools:        {}", p.allowed_tools.join(", "));
    for b in &p.tool_bindings {
        println!(
            "  {} -> {} v{} ({}{})",
            b.tool,
            b.connector,
            b.tool_version,
            side_effect(b.side_effect),
            if b.idempotent { ", idempotent" } else { "" }
        );
    }
    println!(
        "steps:        {} in {} levels",
        p.steps.len(),
        p.levels.len()
    );
    for (i, level) in p.levels.iter().enumerate() {
        println!("  level {i}:");
        for id in &level.step_ids {
            let Some(s) = p.steps.iter().find(|s| &s.id == id) else {
                continue;
            };
            let mut extra = vec![format!("timeout {}", duration(s.timeout.as_ref()))];
            if let Some(r) = &s.retry
                && r.max_attempts > 1
            {
                extra.push(format!("{} attempts", r.max_attempts));
            }
            if !s.needs.is_empty() {
                extra.push(format!("needs {}", s.needs.join(", ")));
            }
            println!("    {} [{}] {}", s.id, s.tool, extra.join(", "));
            if !s.condition.is_empty() {
                println!("      if: {}", s.condition);
            }
        }
    }
    if p.approval_needs.is_empty() {
        println!("approvals:    none");
    } else {
        println!("approvals:");
        for n in &p.approval_needs {
            let Some(o) = &n.obligation else { continue };
            let stages: Vec<_> = o
                .stages
                .iter()
                .map(|s| format!("{}: {} of [{}]", s.name, s.quorum, s.approvers.join(", ")))
                .collect();
            let rule = o
                .rule
                .as_ref()
                .map(|r| format!(" ({}/{})", r.policy, r.rule))
                .unwrap_or_default();
            println!(
                "  {} {}: {}{rule}",
                n.step_id,
                certainty(n.certainty),
                stages.join(" then ")
            );
            if !o.reason.is_empty() {
                println!("    reason: {}", o.reason);
            }
        }
    }
    if let Some(e) = &p.estimate {
        let cost = if e.currency.is_empty() {
            "no declared cost".to_string()
        } else {
            format!("{:.6} {}", e.cost_micros as f64 / 1e6, e.currency)
        };
        println!(
            "estimate:     ~{} expected, ≤{} worst case, {cost}",
            duration(e.expected_duration.as_ref()),
            duration(e.max_duration.as_ref())
        );
        for note in &e.notes {
            println!("  note: {note}");
        }
    }
}

async fn plan(cmd: PlanCommand) -> Result<(), Failure> {
    let out = cmd.conn.output;
    let mut client = cmd
        .conn
        .client(|channel, token| {
            CompilerServiceClient::with_interceptor(channel, token)
                .max_decoding_message_size(64 * 1024 * 1024)
        })
        .await?;
    match cmd.command {
        PlanSub::Compile { name, version } => {
            let resp = client
                .compile(pb::CompileRequest {
                    capsule_name: name,
                    version,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if let Some(p) = &resp.plan {
                println!(
                    "{} {}",
                    if resp.cache_hit {
                        "cached (compiled before):"
                    } else {
                        "compiled:"
                    },
                    p.plan_hash
                );
                print_plan(p);
            }
        }
        PlanSub::Get { hash } => {
            let resp = client
                .get_plan(pb::GetPlanRequest { plan_hash: hash })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if let Some(p) = &resp.plan {
                print_plan(p);
            }
        }
        PlanSub::List { capsule, page_size } => {
            let mut plans = Vec::new();
            let mut token = String::new();
            loop {
                let resp = client
                    .list_plans(pb::ListPlansRequest {
                        page_size,
                        page_token: token,
                        capsule_name: capsule.clone(),
                        capsule_version: 0,
                    })
                    .await?
                    .into_inner();
                plans.extend(resp.plans);
                token = resp.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            if out == Output::Json {
                print_json(&pb::ListPlansResponse {
                    plans,
                    next_page_token: String::new(),
                });
            } else if plans.is_empty() {
                println!("no plans");
            } else {
                for p in &plans {
                    println!(
                        "{}  {}@{}  {}",
                        p.plan_hash,
                        p.capsule_name,
                        p.capsule_version,
                        time(p.create_time.as_ref())
                    );
                }
            }
        }
    }
    Ok(())
}
