//! `anumate preflight CAPSULE|sha256:PLAN --inputs inputs.json [--fixtures f.json]
//! [--seed N] [-o json]`: a GhostRun preflight on a running server, printed as
//! a table of steps with their decisions, the risk and its factors. Exits 0
//! for PASS, 2 for WARN, 1 for FAIL (and for errors).

use std::path::PathBuf;
use std::process::ExitCode;

use anumate_proto::ghostrun::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use clap::Args;
use pb::ghost_run_service_client::GhostRunServiceClient;

use crate::cli::{Connection, Failure, Output, finish, print_json, read_file, time};

/// `anumate preflight …`
#[derive(Args, Debug)]
pub struct PreflightCommand {
    /// Capsule name, or a plan hash (`sha256:<hex>`, `sha256-<hex>`).
    pub target: String,
    /// Capsule version: a number, or `published` (default). Not with a plan hash.
    #[arg(long, short = 'v', default_value = "")]
    pub version: String,
    /// JSON file with the run inputs (an object; sent as text, so integers
    /// beyond 2^53 survive). Default: no inputs.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// JSON file with a list of fixtures: `{"step_id"|"tool", "output"|"error",
    /// "fail_times"}` each. A report made with fixtures cannot be cited by a run.
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Seed for generated outputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print only the report id (to cite with `run start --preflight`), the
    /// verdict and risk on stderr; the exit code still says the verdict.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub conn: Connection,
}

/// Runs a preflight; the exit code says the verdict.
pub async fn run(cmd: PreflightCommand) -> ExitCode {
    finish(preflight(cmd).await, None)
}

/// Whether `target` is a plan hash rather than a capsule name.
fn is_plan_hash(target: &str) -> bool {
    target.starts_with("sha256:")
        || target.starts_with("sha256-")
        || (target.len() == 64 && target.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The exit code of a verdict: 0 PASS, 2 WARN, 1 FAIL.
pub fn exit_code(verdict: pb::PreflightVerdict) -> ExitCode {
    match verdict {
        pb::PreflightVerdict::Pass => ExitCode::SUCCESS,
        pb::PreflightVerdict::Warn => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

async fn preflight(cmd: PreflightCommand) -> Result<ExitCode, Failure> {
    let mut req = pb::PreflightRequest {
        seed: cmd.seed,
        ..Default::default()
    };
    if is_plan_hash(&cmd.target) {
        if !cmd.version.is_empty() {
            return Err(Failure::Local(
                "--version goes with a capsule name, not a plan hash".into(),
            ));
        }
        req.plan_hash = cmd.target.clone();
    } else {
        req.capsule_name = cmd.target.clone();
        req.capsule_version = cmd.version.clone();
    }
    if let Some(path) = &cmd.inputs {
        let text = read_file(path)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Failure::Local(format!("{}: not JSON: {e}", path.display())))?;
        if !v.is_object() {
            return Err(Failure::Local(format!(
                "{}: the inputs must be a JSON object",
                path.display()
            )));
        }
        req.inputs_json = text;
    }
    if let Some(path) = &cmd.fixtures {
        let text = read_file(path)?;
        req.fixtures = serde_json::from_str(&text).map_err(|e| {
            Failure::Local(format!(
                "{}: not a list of fixtures ({{\"step_id\" or \"tool\", \"output\" or \"error\", \"fail_times\"}}): {e}",
                path.display()
            ))
        })?;
    }
    let mut client = cmd
        .conn
        .client(|channel, token| {
            GhostRunServiceClient::with_interceptor(channel, token)
                .max_decoding_message_size(64 * 1024 * 1024)
        })
        .await?;
    let resp = client.preflight(req).await?.into_inner();
    let Some(report) = resp.report.as_ref() else {
        return Err(Failure::Local(
            "the server answered without a report".into(),
        ));
    };
    if cmd.quiet {
        println!("{}", report.preflight_id);
        eprintln!(
            "preflight {}: {}  risk {}/100",
            report.preflight_id,
            verdict_name(report.verdict()),
            report.risk.as_ref().map_or(0, |r| r.score)
        );
    } else if cmd.conn.output == Output::Json {
        print_json(&resp);
    } else {
        print_report(report);
    }
    Ok(exit_code(report.verdict()))
}

fn verdict_name(v: pb::PreflightVerdict) -> &'static str {
    match v {
        pb::PreflightVerdict::Pass => "PASS",
        pb::PreflightVerdict::Warn => "WARN",
        pb::PreflightVerdict::Fail => "FAIL",
        pb::PreflightVerdict::Unspecified => "?",
    }
}

fn outcome_name(o: pb::StepOutcome) -> &'static str {
    match o {
        pb::StepOutcome::Runs => "runs",
        pb::StepOutcome::SkippedByCondition => "skipped (if)",
        pb::StepOutcome::SkippedUpstream => "skipped (upstream)",
        pb::StepOutcome::Denied => "DENIED",
        pb::StepOutcome::Fails => "FAILS",
        pb::StepOutcome::WaitsForApproval => "waits for approval",
        pb::StepOutcome::Unspecified => "?",
    }
}

fn effect_name(d: Option<&ppb::Decision>) -> &'static str {
    match d.map(ppb::Decision::effect) {
        Some(ppb::Effect::Allow) => "allow",
        Some(ppb::Effect::RequireApproval) => "require_approval",
        Some(ppb::Effect::Deny) => "deny",
        _ => "-",
    }
}

fn level_name(l: pb::RiskLevel) -> &'static str {
    match l {
        pb::RiskLevel::Low => "low",
        pb::RiskLevel::Medium => "medium",
        pb::RiskLevel::High => "high",
        pb::RiskLevel::Critical => "critical",
        pb::RiskLevel::Unspecified => "?",
    }
}

fn severity_name(s: pb::Severity) -> &'static str {
    match s {
        pb::Severity::Info => "info",
        pb::Severity::Warning => "warning",
        pb::Severity::Error => "error",
        pb::Severity::Unspecified => "?",
    }
}

fn stages(o: &ppb::ApprovalObligation) -> String {
    o.stages
        .iter()
        .map(|s| format!("{} of [{}]", s.quorum, s.approvers.join(", ")))
        .collect::<Vec<_>>()
        .join(" then ")
}

/// The report in words: a table of steps, the risk and its factors, issues,
/// approvals, estimate and hashes.
fn print_report(r: &pb::PreflightReport) {
    let risk = r.risk.clone().unwrap_or_default();
    println!(
        "preflight {}: {}  risk {}/100 ({})",
        r.preflight_id,
        verdict_name(r.verdict()),
        risk.score,
        level_name(risk.level())
    );
    println!("capsule:  {} version {}", r.capsule_name, r.capsule_version);
    println!("plan:     {}", r.plan_hash);
    println!("inputs:   {}", r.inputs_hash);
    println!(
        "seed:     {}{}",
        r.seed,
        if r.fixtures_hash.is_empty() {
            String::new()
        } else {
            format!("  fixtures {}", r.fixtures_hash)
        }
    );
    let rows: Vec<[String; 5]> = r
        .steps
        .iter()
        .map(|s| {
            let rules: Vec<String> = s
                .decision
                .as_ref()
                .map(|d| {
                    d.matched_rules
                        .iter()
                        .filter_map(|m| m.rule.as_ref())
                        .map(|x| match (&x.span, x.policy.is_empty()) {
                            (_, true) => x.rule.clone(),
                            // Where the rule is: `refund-limits/large-refund@1:7`.
                            (Some(at), false) => format!(
                                "{}/{}@{}:{}",
                                x.policy, x.rule, x.policy_version, at.start_line
                            ),
                            (None, false) => format!("{}/{}", x.policy, x.rule),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let approvals: Vec<String> = s.approvals.iter().map(stages).collect();
            [
                s.step_id.clone(),
                s.tool.clone(),
                outcome_name(s.outcome()).to_string()
                    + &if s.attempts > 1 {
                        format!(" ({} attempts)", s.attempts)
                    } else {
                        String::new()
                    },
                format!("{} {}", effect_name(s.decision.as_ref()), rules.join(", "))
                    .trim()
                    .to_string(),
                approvals.join("; "),
            ]
        })
        .collect();
    let head = ["STEP", "TOOL", "OUTCOME", "DECISION", "APPROVALS"];
    let mut width = head.map(str::len);
    for row in &rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    println!();
    line(head);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    if !risk.factors.is_empty() {
        println!("\nrisk factors:");
        for f in &risk.factors {
            println!("  +{:<3} {:<18} {}", f.points, f.code, f.description);
        }
    }
    if !r.issues.is_empty() {
        println!("\nissues:");
        for i in &r.issues {
            let at = match (i.step_id.is_empty(), i.path.is_empty()) {
                (true, _) => String::new(),
                (false, true) => format!(" [{}]", i.step_id),
                (false, false) => format!(" [{} {}]", i.step_id, i.path),
            };
            println!(
                "  {:<7} {}{at}: {}",
                severity_name(i.severity()),
                i.code,
                i.message
            );
        }
    }
    if !r.approvals_needed.is_empty() {
        println!("\napprovals the run will wait for:");
        for a in &r.approvals_needed {
            let Some(o) = &a.obligation else { continue };
            let reason = if o.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", o.reason)
            };
            println!("  {}: {}{reason}", a.step_id, stages(o));
        }
    }
    if let Some(e) = &r.estimate {
        let secs = |d: Option<&pbjson_types::Duration>| {
            d.map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
        };
        let cost = if e.currency.is_empty() {
            "no declared cost".to_string()
        } else {
            format!("{:.6} {}", e.cost_micros as f64 / 1e6, e.currency)
        };
        println!(
            "\nestimate: ~{:.1}s expected, ≤{:.0}s worst case, {cost}",
            secs(e.expected_duration.as_ref()),
            secs(e.max_duration.as_ref())
        );
    }
    println!(
        "citable:  {}",
        if r.citable {
            format!("until {}", time(r.citation_expire_time.as_ref()))
        } else if !r.fixtures_hash.is_empty() {
            "no (made with fixtures)".to_string()
        } else {
            "no".to_string()
        }
    );
    println!("report:   {}", r.report_hash);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_exit_codes() {
        assert!(is_plan_hash(&format!("sha256:{}", "a".repeat(64))));
        assert!(is_plan_hash(&"0".repeat(64)));
        assert!(!is_plan_hash("refund-small-orders"));
        assert_eq!(exit_code(pb::PreflightVerdict::Pass), ExitCode::SUCCESS);
        assert_eq!(exit_code(pb::PreflightVerdict::Warn), ExitCode::from(2));
        assert_eq!(exit_code(pb::PreflightVerdict::Fail), ExitCode::FAILURE);
    }
}
