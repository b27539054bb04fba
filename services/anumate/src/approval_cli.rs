//! `anumate approval …`: list, read, decide and follow approvals as the
//! caller's token names them (`anumate auth dev-token --subject user:alice
//! --groups controllers --roles approver` plays an approver locally), and open
//! one by hand (`approval request`, admin) to try the flow without a run.

use std::process::ExitCode;
use std::time::Duration;

use anumate_proto::approvals::v1 as pb;
use clap::{Args, Subcommand, ValueEnum};
use pb::approvals_internal_client::ApprovalsInternalClient;
use pb::approvals_service_client::ApprovalsServiceClient;

use crate::cli::{Authed, Connection, Failure, Output, all_pages, finish, print_json, show, time};

/// `anumate approval …`
#[derive(Args, Debug)]
pub struct ApprovalCommand {
    #[command(subcommand)]
    pub command: ApprovalSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Approval states on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    /// Waiting for decisions.
    Pending,
    /// Every stage reached its quorum.
    Approved,
    /// Somebody rejected it.
    Rejected,
    /// Expired undecided.
    Expired,
    /// Withdrawn with its run.
    Cancelled,
}

impl From<StateArg> for pb::ApprovalState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => pb::ApprovalState::Pending,
            StateArg::Approved => pb::ApprovalState::Approved,
            StateArg::Rejected => pb::ApprovalState::Rejected,
            StateArg::Expired => pb::ApprovalState::Expired,
            StateArg::Cancelled => pb::ApprovalState::Cancelled,
        }
    }
}

/// Approval subcommands.
#[derive(Subcommand, Debug)]
pub enum ApprovalSub {
    /// List approvals, newest first.
    List {
        /// Only pending approvals (same as --state pending).
        #[arg(long, conflicts_with = "state")]
        pending: bool,
        /// Only approvals in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only pending approvals you may decide now (directly, through one of
        /// your token's groups, or as a delegate).
        #[arg(long)]
        mine: bool,
        /// Only approvals of this run.
        #[arg(long, default_value = "")]
        run: String,
        /// Page size (all pages are fetched).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
        /// Print only the approval ids, one a line.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Show an approval: what it is for, its stages and every decision.
    Get {
        /// Approval id.
        id: String,
    },
    /// Approve the current stage as yourself.
    Approve {
        /// Approval id.
        id: String,
        /// Comment recorded with the decision.
        #[arg(long, default_value = "")]
        comment: String,
        /// The arguments hash you reviewed (sha256:<hex>); refused with
        /// APPROVAL_ARGS_MISMATCH if it is not the approval's. Default: the
        /// approval is fetched, summarised on stderr, and its hash is sent.
        #[arg(long)]
        args_sha256: Option<String>,
        /// Only decide if the approval's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Reject the approval as yourself; the run's step fails.
    Reject {
        /// Approval id.
        id: String,
        /// Why (shown to the run's requester).
        #[arg(long)]
        comment: String,
        /// Only decide if the approval's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Hand your place in the current stage to another user or group.
    Delegate {
        /// Approval id.
        id: String,
        /// The delegate: user:<id> or group:<name>.
        #[arg(long)]
        to: String,
        /// Comment recorded with the delegation.
        #[arg(long, default_value = "")]
        comment: String,
        /// Only delegate if the approval's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Follow changes of your tenant's approvals (Ctrl-C to stop).
    Watch {
        /// Only approvals of this run.
        #[arg(long, default_value = "")]
        run: String,
        /// Resume after this sequence (the last one printed).
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Open an approval by hand (admin), as the orchestrator does for a step
    /// a policy sends to approval: to try approvals without a run.
    Request(Box<RequestArgs>),
}

/// Flags of `anumate approval request`.
#[derive(Args, Debug)]
pub struct RequestArgs {
    /// Run id.
    #[arg(long)]
    run: String,
    /// Step id.
    #[arg(long)]
    step: String,
    /// Tool the step calls.
    #[arg(long)]
    tool: String,
    /// The call's arguments as a JSON object: shown to approvers, and hashed
    /// (RFC 8785) into the approval's args_sha256.
    #[arg(long, default_value = "{}")]
    args: String,
    /// Plan hash (sha256:<hex>); default: a placeholder plan.
    #[arg(long)]
    plan_hash: Option<String>,
    /// The stage's approvers, repeatable or comma-separated: user:<id>,
    /// group:<name>. Repeat --stage to add ordered stages instead.
    #[arg(long, value_delimiter = ',', conflicts_with = "stage")]
    approvers: Vec<String>,
    /// Distinct approvals the (single) stage needs.
    #[arg(long, default_value_t = 1, conflicts_with = "stage")]
    quorum: i32,
    /// An ordered stage as QUORUM:APPROVER[,APPROVER…], e.g.
    /// `1:user:alice,user:bob`; repeat for stage 2, 3, …
    #[arg(long)]
    stage: Vec<String>,
    /// How long each stage stays open: 90s, 30m, 4h, 1d (default: the
    /// service's 24 h).
    #[arg(long)]
    expires_after: Option<String>,
    /// Who a stage escalates to when it expires (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    escalate_to: Vec<String>,
    /// Distinct approvals an escalated stage needs (default 1).
    #[arg(long, default_value_t = 0)]
    escalate_quorum: i32,
    /// Principals besides the requester who may not decide (repeatable).
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// The principal who started the run (who may not approve it); taken
    /// from a service token only (`anumate auth service-token --service
    /// orchestrator`), else you are the requester.
    #[arg(long, default_value = "")]
    requester: String,
    /// The tool is destructive (expiry never approves; it only escalates or rejects).
    #[arg(long)]
    destructive: bool,
    /// Policy that asked for the approval.
    #[arg(long, default_value = "manual")]
    policy: String,
    /// Rule of that policy.
    #[arg(long, default_value = "manual")]
    rule: String,
    /// The rule's reason, shown to approvers.
    #[arg(long, default_value = "")]
    reason: String,
    /// Capsule the run executes.
    #[arg(long, default_value = "")]
    capsule: String,
    /// Print only the approval's id (for `ID=$(…)`).
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// Runs `anumate approval …`.
pub async fn run(cmd: ApprovalCommand) -> ExitCode {
    finish(approval(cmd).await.map(|()| ExitCode::SUCCESS), None)
}

async fn approval(cmd: ApprovalCommand) -> Result<(), Failure> {
    let conn = &cmd.conn;
    let out = conn.output;
    let service = async || conn.client(ApprovalsServiceClient::with_interceptor).await;
    match cmd.command {
        ApprovalSub::List {
            pending,
            state,
            mine,
            run,
            page_size,
            quiet,
        } => {
            let mut client = service().await?;
            let state = match (pending, state) {
                (true, _) => pb::ApprovalState::Pending as i32,
                (false, Some(s)) => pb::ApprovalState::from(s) as i32,
                (false, None) => 0,
            };
            let approvals = all_pages(async |page_token| {
                let resp = client
                    .list_approvals(pb::ListApprovalsRequest {
                        page_size,
                        page_token,
                        state,
                        run_id: run.clone(),
                        actionable_by_me: mine,
                    })
                    .await?
                    .into_inner();
                Ok((resp.approvals, resp.next_page_token))
            })
            .await?;
            let listed = pb::ListApprovalsResponse {
                approvals,
                next_page_token: String::new(),
            };
            if quiet {
                for a in &listed.approvals {
                    println!("{}", a.approval_id);
                }
            } else {
                show(out, &listed, |l| print_list(&l.approvals));
            }
        }
        ApprovalSub::Get { id } => {
            let mut client = service().await?;
            let approval = get(&mut client, id).await?;
            show(out, &approval, print_approval);
        }
        ApprovalSub::Approve {
            id,
            comment,
            args_sha256,
            etag,
        } => {
            let mut client = service().await?;
            let args_sha256 = match args_sha256 {
                Some(hash) => hash,
                None => {
                    // Say what is being approved: the decision names this hash.
                    let current = get(&mut client, id.clone()).await?;
                    eprintln!("approving {}", summary(&current));
                    current.args_sha256
                }
            };
            let resp = client
                .approve(pb::ApproveRequest {
                    approval_id: id,
                    comment,
                    etag,
                    args_sha256,
                })
                .await?
                .into_inner();
            decided(out, &resp, resp.approval.as_ref());
        }
        ApprovalSub::Reject { id, comment, etag } => {
            let mut client = service().await?;
            let resp = client
                .reject(pb::RejectRequest {
                    approval_id: id,
                    comment,
                    etag,
                })
                .await?
                .into_inner();
            decided(out, &resp, resp.approval.as_ref());
        }
        ApprovalSub::Delegate {
            id,
            to,
            comment,
            etag,
        } => {
            let mut client = service().await?;
            let resp = client
                .delegate(pb::DelegateRequest {
                    approval_id: id,
                    delegate_to: to,
                    comment,
                    etag,
                })
                .await?
                .into_inner();
            decided(out, &resp, resp.approval.as_ref());
        }
        ApprovalSub::Watch { run, after } => {
            let mut client = service().await?;
            // Said first: the server may answer the call only with its first
            // change.
            if out == Output::Human {
                eprintln!("-- following approvals (Ctrl-C to stop)");
            }
            let mut stream = client
                .watch_approvals(pb::WatchApprovalsRequest {
                    after_sequence: after,
                    run_id: run,
                })
                .await?
                .into_inner();
            while let Some(change) = stream.message().await? {
                print_change(&change, out);
            }
        }
        ApprovalSub::Request(args) => request(conn, *args).await?,
    }
    Ok(())
}

/// `approval request`: opens the approval through `ApprovalsInternal`.
async fn request(conn: &Connection, args: RequestArgs) -> Result<(), Failure> {
    let quiet = args.quiet;
    let request = request_message(args).map_err(Failure::Local)?;
    let mut client = conn
        .client(ApprovalsInternalClient::with_interceptor)
        .await?;
    let resp = client.request_approval(request).await?.into_inner();
    if quiet {
        let id = resp.approval.as_ref().map(|a| a.approval_id.as_str());
        println!("{}", id.unwrap_or_default());
        return Ok(());
    }
    show(conn.output, &resp, |r| {
        if let Some(a) = &r.approval {
            if r.created {
                println!("opened approval {}", a.approval_id);
            } else {
                println!("already open: approval {}", a.approval_id);
            }
            print_approval(a);
        }
    });
    Ok(())
}

async fn get(
    client: &mut ApprovalsServiceClient<Authed>,
    id: String,
) -> Result<pb::Approval, Failure> {
    let resp = client
        .get_approval(pb::GetApprovalRequest { approval_id: id })
        .await?
        .into_inner();
    resp.approval
        .ok_or_else(|| Failure::Local("the server answered without the approval".into()))
}

/// Prints a decision's response: JSON, or the approval's state in a line.
fn decided<R: serde::Serialize>(out: Output, resp: &R, approval: Option<&pb::Approval>) {
    if out == Output::Json {
        print_json(resp);
    } else if let Some(a) = approval {
        println!("{}: {}", a.approval_id, progress(a));
    }
}

/// `PENDING` → `pending`.
fn state_name(state: i32) -> String {
    pb::ApprovalState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("APPROVAL_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn kind_name(kind: i32) -> String {
    pb::DecisionKind::try_from(kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("DECISION_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn risk_name(level: i32) -> String {
    anumate_proto::ghostrun::v1::RiskLevel::try_from(level)
        .map(|l| {
            l.as_str_name()
                .trim_start_matches("RISK_LEVEL_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// `pending, stage 1/2: 1 of 2 approvals` or the final state.
fn progress(a: &pb::Approval) -> String {
    let state = state_name(a.state);
    if a.state != pb::ApprovalState::Pending as i32 {
        return state;
    }
    let current = usize::try_from(a.current_stage).unwrap_or(0);
    match a.stages.get(current) {
        Some(stage) => format!(
            "{state}, stage {}/{}: {} of {} approvals",
            current + 1,
            a.stages.len(),
            stage.approved_count,
            stage.quorum
        ),
        None => state,
    }
}

/// One line naming what an approval is for.
fn summary(a: &pb::Approval) -> String {
    let mut s = format!(
        "{} for {} (run {}, step {}) with args {}",
        a.approval_id, a.tool, a.run_id, a.step_id, a.args_sha256
    );
    if let Some(json) = preview(a) {
        s.push_str(&format!(" = {json}"));
    }
    s
}

/// The arguments preview as JSON, whole numbers without the `.0` a
/// `google.protobuf.Struct` (all numbers doubles) would give them, keys in
/// order (a Struct's map has none), so the same arguments print the same.
fn preview(a: &pb::Approval) -> Option<String> {
    fn whole(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(n) => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
                _ => Value::Number(n),
            },
            Value::Array(items) => Value::Array(items.into_iter().map(whole).collect()),
            Value::Object(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, whole(v))).collect())
            }
            other => other,
        }
    }
    let value = serde_json::to_value(a.args_preview.as_ref()?).ok()?;
    serde_json::to_string(&whole(value)).ok()
}

fn print_list(all: &[pb::Approval]) {
    println!(
        "{:<36}  {:<9}  {:<24}  {:<16}  {:<12}  {:<9}  EXPIRES",
        "ID", "STATE", "TOOL", "RUN", "STEP", "STAGE"
    );
    for a in all {
        let stage = a
            .stages
            .get(usize::try_from(a.current_stage).unwrap_or(0))
            .filter(|_| a.state == pb::ApprovalState::Pending as i32)
            .map(|s| {
                format!(
                    "{}/{} {}/{}",
                    a.current_stage + 1,
                    a.stages.len(),
                    s.approved_count,
                    s.quorum
                )
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<36}  {:<9}  {:<24}  {:<16}  {:<12}  {:<9}  {}",
            a.approval_id,
            state_name(a.state),
            a.tool,
            a.run_id,
            a.step_id,
            stage,
            time(a.expire_time.as_ref())
        );
    }
}

fn print_approval(a: &pb::Approval) {
    println!("approval:   {}", a.approval_id);
    println!("state:      {}", progress(a));
    println!("run:        {}  step {}", a.run_id, a.step_id);
    if !a.capsule.is_empty() {
        println!("capsule:    {} v{}", a.capsule, a.capsule_version);
    }
    println!(
        "tool:       {}{}",
        a.tool,
        if a.destructive { " (destructive)" } else { "" }
    );
    if let Some(rule) = &a.rule {
        println!("rule:       {} / {}", rule.policy, rule.rule);
    }
    if !a.reason.is_empty() {
        println!("reason:     {}", a.reason);
    }
    if a.risk_level != 0 {
        println!("risk:       {} ({})", risk_name(a.risk_level), a.risk_score);
    }
    println!("requester:  {}", a.requester);
    if !a.exclude.is_empty() {
        println!("excluded:   {}", a.exclude.join(", "));
    }
    println!("args:       {}", a.args_sha256);
    if let Some(json) = preview(a) {
        println!("preview:    {json}");
    }
    println!("plan:       {}", a.plan_hash);
    println!("opened:     {}", time(a.create_time.as_ref()));
    if a.decide_time.is_some() {
        println!("decided:    {}", time(a.decide_time.as_ref()));
    } else {
        println!("expires:    {}", time(a.expire_time.as_ref()));
    }
    if !a.escalate_to.is_empty() {
        println!(
            "escalates:  to {} (quorum {})",
            a.escalate_to.join(", "),
            a.escalate_quorum.max(1)
        );
    }
    println!("etag:       {}", a.etag);
    println!("stages:");
    for (i, s) in a.stages.iter().enumerate() {
        let mark = if s.approved {
            "approved"
        } else if i32::try_from(i).is_ok_and(|i| i == a.current_stage) {
            "current"
        } else {
            "waiting"
        };
        println!(
            "  {}. {:<12} {}/{} of {}  [{mark}{}]",
            i + 1,
            s.name,
            s.approved_count,
            s.quorum,
            s.approvers.join(", "),
            if s.escalated { ", escalated" } else { "" }
        );
        if !s.delegates.is_empty() {
            println!("     delegates: {}", s.delegates.join(", "));
        }
    }
    if !a.decisions.is_empty() {
        println!("history:");
        for d in &a.decisions {
            let mut line = format!(
                "  {}  {:<16} {:<8} stage {}",
                time(d.time.as_ref()),
                d.actor,
                kind_name(d.kind),
                d.stage_index + 1
            );
            if !d.delegate_to.is_empty() {
                line.push_str(&format!(" to {}", d.delegate_to));
            }
            if !d.escalate_to.is_empty() {
                line.push_str(&format!(" to {}", d.escalate_to.join(", ")));
            }
            if !d.comment.is_empty() {
                line.push_str(&format!("  {:?}", d.comment));
            }
            if !d.receipt_id.is_empty() {
                line.push_str(&format!("  receipt {}", d.receipt_id));
            }
            println!("{line}");
        }
    }
}

fn print_change(change: &pb::WatchApprovalsResponse, out: Output) {
    if out == Output::Json {
        match serde_json::to_string(change) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode change: {e}"),
        }
        return;
    }
    let event = change
        .event_type
        .trim_start_matches("dev.anumate.")
        .trim_end_matches(".v1");
    match &change.approval {
        Some(a) => println!(
            "#{:<6} {:<20} {}  {}  {}",
            change.sequence,
            event,
            a.approval_id,
            a.tool,
            progress(a)
        ),
        None => println!("#{:<6} {event}", change.sequence),
    }
}

/// The `RequestApproval` message of `approval request`'s flags.
fn request_message(args: RequestArgs) -> Result<pb::RequestApprovalRequest, String> {
    let value: serde_json::Value =
        serde_json::from_str(&args.args).map_err(|e| format!("--args is not JSON: {e}"))?;
    let (_, args_sha256) = anumate_crypto::content_hash(&value);
    let args_preview = match value {
        serde_json::Value::Object(_) => Some(
            serde_json::from_value::<pbjson_types::Struct>(value)
                .map_err(|e| format!("--args: {e}"))?,
        ),
        _ => return Err("--args must be a JSON object".into()),
    };
    let stages = if args.stage.is_empty() {
        vec![pb::StageRequest {
            name: String::new(),
            approvers: args.approvers,
            quorum: args.quorum,
        }]
    } else {
        args.stage
            .iter()
            .map(|s| parse_stage(s))
            .collect::<Result<_, _>>()?
    };
    let expires_after = args
        .expires_after
        .as_deref()
        .map(|s| parse_duration(s).map_err(|e| format!("--expires-after: {e}")))
        .transpose()?
        .map(|d| pbjson_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: 0,
        });
    Ok(pb::RequestApprovalRequest {
        run_id: args.run,
        step_id: args.step,
        plan_hash: args
            .plan_hash
            .unwrap_or_else(|| format!("sha256:{}", "0".repeat(64))),
        args_sha256,
        tool: args.tool,
        destructive: args.destructive,
        rule: Some(anumate_proto::policy::v1::PolicyRuleRef {
            policy: args.policy,
            rule: args.rule,
            ..Default::default()
        }),
        reason: args.reason,
        requester: args.requester,
        stages,
        expires_after,
        escalate_to: args.escalate_to,
        escalate_quorum: args.escalate_quorum,
        exclude: args.exclude,
        capsule: args.capsule,
        args_preview,
        ..Default::default()
    })
}

/// `2:user:alice,group:controllers` → a stage of quorum 2.
fn parse_stage(s: &str) -> Result<pb::StageRequest, String> {
    let (quorum, approvers) = s
        .split_once(':')
        .ok_or_else(|| format!("--stage {s:?}: expected QUORUM:APPROVER[,APPROVER…]"))?;
    let quorum = quorum
        .trim()
        .parse()
        .map_err(|_| format!("--stage {s:?}: {quorum:?} is not a quorum (a number)"))?;
    Ok(pb::StageRequest {
        name: String::new(),
        approvers: approvers
            .split(',')
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect(),
        quorum,
    })
}

/// `90s`, `30m`, `4h`, `1d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 4h or 1d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_and_durations_parse() {
        let stage = parse_stage("2:user:alice, group:controllers").unwrap();
        assert_eq!(stage.quorum, 2);
        assert_eq!(stage.approvers, vec!["user:alice", "group:controllers"]);
        assert!(
            parse_stage("user:alice")
                .unwrap_err()
                .contains("not a quorum")
        );
        assert!(
            parse_stage("alice")
                .unwrap_err()
                .contains("QUORUM:APPROVER")
        );
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("4h").unwrap(), Duration::from_secs(14_400));
        assert!(parse_duration("4w").unwrap_err().contains("unit"));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn previews_print_whole_numbers_as_integers() {
        let a = pb::Approval {
            args_preview: Some(
                serde_json::from_value(
                    serde_json::json!({"amount": 1200, "rate": 0.5, "ids": [7]}),
                )
                .unwrap(),
            ),
            ..Default::default()
        };
        let json: serde_json::Value = serde_json::from_str(&preview(&a).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"amount": 1200, "rate": 0.5, "ids": [7]})
        );
        assert_eq!(preview(&pb::Approval::default()), None);
        // Keys print sorted, however the Struct's map iterates.
        let nested = pb::Approval {
            args_preview: Some(
                serde_json::from_value(serde_json::json!({
                    "to": "bob", "amount": 5, "meta": {"z": 1, "a": 2, "m": 3}, "b": true
                }))
                .unwrap(),
            ),
            ..Default::default()
        };
        assert_eq!(
            preview(&nested).unwrap(),
            r#"{"amount":5,"b":true,"meta":{"a":2,"m":3,"z":1},"to":"bob"}"#
        );
    }

    #[test]
    fn names_drop_their_enum_prefix() {
        assert_eq!(state_name(pb::ApprovalState::Pending as i32), "pending");
        assert_eq!(kind_name(pb::DecisionKind::Delegate as i32), "delegate");
        assert_eq!(state_name(99), "unknown");
    }

    #[test]
    fn progress_names_the_current_stage() {
        let a = pb::Approval {
            state: pb::ApprovalState::Pending as i32,
            current_stage: 1,
            stages: vec![
                pb::ApprovalStage::default(),
                pb::ApprovalStage {
                    quorum: 2,
                    approved_count: 1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(progress(&a), "pending, stage 2/2: 1 of 2 approvals");
        let done = pb::Approval {
            state: pb::ApprovalState::Rejected as i32,
            ..a
        };
        assert_eq!(progress(&done), "rejected");
    }
}
