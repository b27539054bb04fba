//! `anumate run …`: start runs of plans on the orchestrator, follow them live,
//! control them (pause, resume, cancel, kill, retry a step) and read their
//! journal.
//!
//! `run start CAPSULE[@VERSION]|sha256:PLAN` compiles a capsule first (the
//! stored plan comes back when nothing changed), then calls `Execute` with an
//! idempotency key: the one given, or a fresh random one printed on stderr so
//! the same start can be retried without starting a second run.
//! `run watch` (and `run start --watch`) prints a step table that redraws in
//! place on a terminal, one line per change otherwise (NDJSON with `-o
//! json`), resumes from the last sequence after a lost stream, and exits 0
//! when the run SUCCEEDED, 1 when it ended otherwise.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anumate_proto::compiler::v1 as cpb;
use anumate_proto::orchestrator::v1 as pb;
use clap::{Args, Subcommand, ValueEnum};
use pb::orchestrator_service_client::OrchestratorServiceClient;
use pb::watch_run_response::Change;

use crate::cli::{Authed, Connection, Failure, Output, finish, print_json, read_file, time};
use crate::dev_state;

/// `anumate run …`
#[derive(Args, Debug)]
pub struct RunCommand {
    #[command(subcommand)]
    pub command: RunSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Run subcommands.
#[derive(Subcommand, Debug)]
pub enum RunSub {
    /// Start a run of a capsule (compiled first) or of a compiled plan.
    Start(StartArgs),
    /// Show a run: its state, steps and their attempts.
    Get {
        /// Run id.
        id: String,
    },
    /// List runs, newest first.
    List {
        /// Only runs in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only runs of this plan (`sha256:<hex>`).
        #[arg(long, default_value = "")]
        plan: String,
        /// Only runs of this capsule.
        #[arg(long, default_value = "")]
        capsule: String,
        /// Only runs you started (the subject of your token).
        #[arg(long)]
        mine: bool,
        /// Only runs carrying this label (`key=value`, repeatable).
        #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Follow a run live until it ends; exits 0 when it SUCCEEDED, 1 otherwise.
    Watch {
        /// Run id.
        id: String,
        /// Resume after this sequence number instead of starting with a snapshot.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Stop as soon as the run is in this state and exit 0 (e.g.
        /// `waiting-approval`, to decide its approvals next); a run that ends
        /// in another state exits as without it.
        #[arg(long, value_enum)]
        until: Option<StateArg>,
    },
    /// Pause a run: no new step or attempt starts.
    Pause(ControlArgs),
    /// Resume a paused run.
    Resume(ControlArgs),
    /// Cancel a run: stop scheduling, run the declared compensations.
    Cancel(ControlArgs),
    /// Kill a run at once: no compensation.
    Kill(ControlArgs),
    /// Retry a step that needs attention (its outcome is unknown) with the same idempotency key; a failed run has ended and is refused (RUN_TERMINAL).
    Retry {
        /// Run id.
        id: String,
        /// Step id.
        step: String,
        /// Why (recorded on the step, in the journal and the receipt).
        #[arg(long, default_value = "retried with anumate run retry")]
        reason: String,
        /// Only if the run's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// Settle a step that needs attention by hand: mark it succeeded (with the
    /// output someone checked) or failed.
    Resolve {
        /// Run id.
        id: String,
        /// Step id.
        step: String,
        /// Mark the step succeeded or failed.
        #[arg(long, value_enum)]
        mark: Mark,
        /// The step's output (JSON), with `--mark succeeded`.
        #[arg(long)]
        output: Option<String>,
        /// Why (recorded on the step, in the journal and the receipt).
        #[arg(long)]
        reason: String,
        /// Only if the run's etag is still this.
        #[arg(long, default_value = "")]
        etag: String,
    },
    /// The run's journal: every change, oldest first, with who caused it.
    History {
        /// Run id.
        id: String,
    },
}

/// `run start` arguments.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// `NAME[@VERSION]` of a capsule (VERSION: a number, `published` (the
    /// default) or `latest`), compiled first; or a plan hash (`sha256:<hex>`).
    pub target: String,
    /// JSON file with the run inputs (an object). Integers beyond 2^53 must be
    /// written as strings. Default: no inputs.
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Preflight report to cite (required when the tenant's
    /// `require_preflight` is on, the default).
    #[arg(long, default_value = "")]
    pub preflight: String,
    /// Key that makes the start safe to retry: the same key returns the same
    /// run. Default: a fresh random key, printed on stderr.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// Label for finding the run later (`key=value`, repeatable).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Fail the run if it has not ended this long after it was accepted
    /// (`90s`, `30m`, `4h`, `7d`, `1h30m`).
    #[arg(long)]
    pub timeout: Option<String>,
    /// Follow the run until it ends; exit 0 when it SUCCEEDED, 1 otherwise.
    #[arg(long)]
    pub watch: bool,
    /// Print only the run id.
    #[arg(long, short = 'q', conflicts_with = "watch")]
    pub quiet: bool,
}

/// Arguments of pause, resume, cancel and kill.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// Run id.
    pub id: String,
    /// Why (recorded on the run and in the event; not for resume).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Only if the run's etag is still this.
    #[arg(long, default_value = "")]
    pub etag: String,
}

/// How `run resolve` settles a step.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mark {
    /// Record the step as succeeded with `--output`.
    Succeeded,
    /// Fail the step (and the run).
    Failed,
}

/// Run states on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    Pending,
    Running,
    WaitingApproval,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for pb::RunState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => pb::RunState::Pending,
            StateArg::Running => pb::RunState::Running,
            StateArg::WaitingApproval => pb::RunState::WaitingApproval,
            StateArg::Paused => pb::RunState::Paused,
            StateArg::Succeeded => pb::RunState::Succeeded,
            StateArg::Failed => pb::RunState::Failed,
            StateArg::Cancelled => pb::RunState::Cancelled,
        }
    }
}

/// Runs a run command and returns the process exit code.
pub async fn run(cmd: RunCommand) -> ExitCode {
    let file = match &cmd.command {
        RunSub::Start(args) => args.inputs.as_ref().map(|p| p.display().to_string()),
        _ => None,
    };
    finish(run_command(cmd).await, file.as_deref())
}

async fn orchestrator(conn: &Connection) -> Result<OrchestratorServiceClient<Authed>, Failure> {
    conn.client(|channel, token| {
        OrchestratorServiceClient::with_interceptor(channel, token)
            .max_decoding_message_size(64 * 1024 * 1024)
    })
    .await
}

async fn run_command(cmd: RunCommand) -> Result<ExitCode, Failure> {
    let conn = &cmd.conn;
    let out = conn.output;
    match cmd.command {
        RunSub::Start(args) => return start(conn, args).await,
        RunSub::Get { id } => {
            let resp = orchestrator(conn)
                .await?
                .get_run(pb::GetRunRequest { run_id: id })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if let Some(run) = &resp.run {
                print_run(run);
            }
        }
        RunSub::List {
            state,
            plan,
            capsule,
            mine,
            labels,
            limit,
        } => {
            let created_by = if mine {
                subject(conn).map_err(Failure::Local)?
            } else {
                String::new()
            };
            let labels = parse_labels(&labels).map_err(Failure::Local)?;
            let mut client = orchestrator(conn).await?;
            let mut runs = Vec::new();
            let mut page_token = String::new();
            loop {
                let page_size = i32::try_from(limit.saturating_sub(runs.len()).min(500))
                    .unwrap_or(500)
                    .max(1);
                let resp = client
                    .list_runs(pb::ListRunsRequest {
                        page_size,
                        page_token,
                        state: state.map_or(pb::RunState::Unspecified, Into::into) as i32,
                        plan_hash: plan.clone(),
                        capsule_name: capsule.clone(),
                        created_by: created_by.clone(),
                        labels: labels.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                runs.extend(resp.runs);
                page_token = resp.next_page_token;
                if page_token.is_empty() || runs.len() >= limit {
                    break;
                }
            }
            runs.truncate(limit);
            let listed = pb::ListRunsResponse {
                runs,
                next_page_token: String::new(),
            };
            if out == Output::Json {
                print_json(&listed);
            } else {
                print_list(&listed.runs);
            }
        }
        RunSub::Watch { id, after, until } => {
            return watch(conn, id, after, until.map(Into::into)).await;
        }
        RunSub::Pause(a) => {
            let resp = orchestrator(conn)
                .await?
                .pause_run(pb::PauseRunRequest {
                    run_id: a.id,
                    reason: a.reason,
                    etag: a.etag,
                })
                .await?
                .into_inner();
            controlled(out, &resp, resp.run.as_ref(), "pause");
        }
        RunSub::Resume(a) => {
            let resp = orchestrator(conn)
                .await?
                .resume_run(pb::ResumeRunRequest {
                    run_id: a.id,
                    etag: a.etag,
                })
                .await?
                .into_inner();
            controlled(out, &resp, resp.run.as_ref(), "resume");
        }
        RunSub::Cancel(a) => {
            let resp = orchestrator(conn)
                .await?
                .cancel_run(pb::CancelRunRequest {
                    run_id: a.id,
                    reason: a.reason,
                    etag: a.etag,
                })
                .await?
                .into_inner();
            controlled(out, &resp, resp.run.as_ref(), "cancel");
        }
        RunSub::Kill(a) => {
            let resp = orchestrator(conn)
                .await?
                .kill_run(pb::KillRunRequest {
                    run_id: a.id,
                    reason: a.reason,
                    etag: a.etag,
                })
                .await?
                .into_inner();
            controlled(out, &resp, resp.run.as_ref(), "kill");
        }
        RunSub::Retry {
            id,
            step,
            reason,
            etag,
        } => {
            let resp = orchestrator(conn)
                .await?
                .resolve_step(pb::ResolveStepRequest {
                    run_id: id,
                    step_id: step,
                    action: pb::ResolveAction::Retry as i32,
                    output: None,
                    reason,
                    etag,
                })
                .await?
                .into_inner();
            controlled(out, &resp, resp.run.as_ref(), "retry");
        }
        RunSub::Resolve {
            id,
            step,
            mark,
            output,
            reason,
            etag,
        } => {
            let req = resolve_request(id, step, mark, output.as_deref(), reason, etag)
                .map_err(Failure::Local)?;
            let resp = orchestrator(conn)
                .await?
                .resolve_step(req)
                .await?
                .into_inner();
            controlled(out, &resp, resp.run.as_ref(), "resolve");
        }
        RunSub::History { id } => {
            let mut client = orchestrator(conn).await?;
            let entries = crate::cli::all_pages(async |page_token| {
                let resp = client
                    .list_run_history(pb::ListRunHistoryRequest {
                        run_id: id.clone(),
                        page_size: 1000,
                        page_token,
                    })
                    .await?
                    .into_inner();
                Ok((resp.entries, resp.next_page_token))
            })
            .await?;
            let resp = pb::ListRunHistoryResponse {
                entries,
                next_page_token: String::new(),
            };
            if out == Output::Json {
                print_json(&resp);
            } else {
                print_history(&resp.entries);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The `ResolveStep` request of `run resolve`.
fn resolve_request(
    id: String,
    step: String,
    mark: Mark,
    output: Option<&str>,
    reason: String,
    etag: String,
) -> Result<pb::ResolveStepRequest, String> {
    let (action, output) = match (mark, output) {
        (Mark::Failed, Some(_)) => {
            return Err("--output goes with --mark succeeded".into());
        }
        (Mark::Failed, None) => (pb::ResolveAction::MarkFailed, None),
        (Mark::Succeeded, None) => (pb::ResolveAction::MarkSucceeded, None),
        (Mark::Succeeded, Some(text)) => {
            let value: pbjson_types::Value =
                serde_json::from_str(text).map_err(|e| format!("--output is not JSON: {e}"))?;
            (pb::ResolveAction::MarkSucceeded, Some(value))
        }
    };
    Ok(pb::ResolveStepRequest {
        run_id: id,
        step_id: step,
        action: action as i32,
        output,
        reason,
        etag,
    })
}

/// Prints a control call's answer: JSON, or the run's state in a line.
fn controlled<R: serde::Serialize>(out: Output, resp: &R, run: Option<&pb::Run>, what: &str) {
    if out == Output::Json {
        print_json(resp);
    } else if let Some(r) = run {
        println!("{what}: run {} is {}", r.run_id, run_state_line(r));
    }
}

// ---------------------------------------------------------------------------
// start
// ---------------------------------------------------------------------------

/// What `run start` names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// A compiled plan.
    Plan(String),
    /// A capsule name and version (`published`, `latest` or a number).
    Capsule { name: String, version: String },
}

/// `sha256:…`, `sha256-…` or 64 hex digits is a plan; anything else a capsule
/// `NAME[@VERSION]`.
fn parse_target(target: &str) -> Result<Target, String> {
    if target.starts_with("sha256:")
        || target.starts_with("sha256-")
        || (target.len() == 64 && target.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Ok(Target::Plan(target.to_string()));
    }
    let (name, version) = match target.split_once('@') {
        Some((name, version)) => (name, version),
        None => (target, "published"),
    };
    if name.is_empty() {
        return Err(format!(
            "{target:?}: name a capsule (NAME[@VERSION]) or a plan (sha256:<hex>)"
        ));
    }
    let version_ok = matches!(version, "published" | "latest")
        || (!version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()));
    if !version_ok {
        return Err(format!(
            "{target:?}: the version after @ is a number, `published` or `latest`"
        ));
    }
    Ok(Target::Capsule {
        name: name.to_string(),
        version: version.to_string(),
    })
}

/// Largest integer a JSON number keeps exactly in a `google.protobuf.Struct`.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// The inputs file as a Struct: a JSON object whose integers all fit a
/// double exactly (larger ones must be strings, or they would silently change).
fn parse_inputs(text: &str, name: &str) -> Result<pbjson_types::Struct, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{name}: not JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!("{name}: the inputs must be a JSON object"));
    }
    fn check(v: &serde_json::Value, path: &str, name: &str) -> Result<(), String> {
        match v {
            serde_json::Value::Number(n) => {
                let big = n.as_u64().is_some_and(|u| u > MAX_SAFE_INTEGER)
                    || n.as_i64()
                        .is_some_and(|i| i.unsigned_abs() > MAX_SAFE_INTEGER)
                    || (n.as_u64().is_none()
                        && n.as_i64().is_none()
                        && n.as_f64()
                            .is_some_and(|f| f.fract() == 0.0 && f.abs() > 9.0e15));
                if big {
                    return Err(format!(
                        "{name}: {path} = {n} is beyond 2^53 and would change in transit; write it as a string (\"{n}\")"
                    ));
                }
                Ok(())
            }
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, x)| check(x, &format!("{path}[{i}]"), name)),
            serde_json::Value::Object(map) => map
                .iter()
                .try_for_each(|(k, x)| check(x, &format!("{path}.{k}"), name)),
            _ => Ok(()),
        }
    }
    check(&value, "inputs", name)?;
    serde_json::from_value(value).map_err(|e| format!("{name}: {e}"))
}

/// `key=value` labels.
fn parse_labels(labels: &[String]) -> Result<std::collections::HashMap<String, String>, String> {
    let mut map = std::collections::HashMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| format!("label {l:?} is not key=value"))?;
        if map.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("label {k:?} given twice"));
        }
    }
    Ok(map)
}

/// Seconds of `90s`, `30m`, `4h`, `7d`, `1h30m`.
fn parse_duration(s: &str) -> Result<i64, String> {
    let shape = || format!("{s:?} is not a duration like 90s, 30m, 4h, 7d or 1h30m");
    let mut total: i64 = 0;
    let mut number = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(shape()),
        };
        let n: i64 = number.parse().map_err(|_| shape())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long"))?;
        number.clear();
    }
    if !number.is_empty() || s.is_empty() {
        return Err(shape());
    }
    Ok(total)
}

/// A fresh idempotency key: `cli-` and a random UUID.
fn fresh_key() -> String {
    format!("cli-{}", uuid::Uuid::new_v4())
}

async fn start(conn: &Connection, args: StartArgs) -> Result<ExitCode, Failure> {
    let out = conn.output;
    let target = parse_target(&args.target).map_err(Failure::Local)?;
    let inputs = match &args.inputs {
        Some(path) => Some(
            parse_inputs(&read_file(path)?, &path.display().to_string()).map_err(Failure::Local)?,
        ),
        None => None,
    };
    let labels = parse_labels(&args.labels).map_err(Failure::Local)?;
    let timeout = match &args.timeout {
        Some(t) => Some(pbjson_types::Duration {
            seconds: parse_duration(t).map_err(|e| Failure::Local(format!("--timeout: {e}")))?,
            nanos: 0,
        }),
        None => None,
    };
    let plan_hash = match target {
        Target::Plan(hash) => hash,
        Target::Capsule { name, version } => {
            let mut compiler = conn
                .client(|channel, token| {
                    cpb::compiler_service_client::CompilerServiceClient::with_interceptor(
                        channel, token,
                    )
                    .max_decoding_message_size(64 * 1024 * 1024)
                })
                .await?;
            let resp = compiler
                .compile(cpb::CompileRequest {
                    capsule_name: name.clone(),
                    version: version.clone(),
                })
                .await?
                .into_inner();
            let plan = resp
                .plan
                .ok_or_else(|| Failure::Local("the compiler answered without a plan".into()))?;
            if out == Output::Human && !args.quiet {
                eprintln!(
                    "compiled {name} version {} into plan {}",
                    plan.capsule_version, plan.plan_hash
                );
            }
            plan.plan_hash
        }
    };
    let key = if args.idempotency_key.is_empty() {
        let key = fresh_key();
        eprintln!("idempotency key: {key} (retry this start safely with --idempotency-key {key})");
        key
    } else {
        args.idempotency_key.clone()
    };
    let resp = orchestrator(conn)
        .await?
        .execute(pb::ExecuteRequest {
            plan_hash,
            inputs,
            preflight_id: args.preflight.clone(),
            idempotency_key: key,
            labels,
            timeout,
        })
        .await?
        .into_inner();
    let run = resp
        .run
        .clone()
        .ok_or_else(|| Failure::Local("the server answered without the run".into()))?;
    if args.quiet {
        println!("{}", run.run_id);
        return Ok(ExitCode::SUCCESS);
    }
    match (out, args.watch) {
        (Output::Json, true) => println!("{}", compact(&resp)),
        (Output::Json, false) => print_json(&resp),
        (Output::Human, _) => {
            if resp.created {
                println!("started run {}", run.run_id);
            } else {
                println!(
                    "run {} already started with this idempotency key",
                    run.run_id
                );
            }
            if !args.watch {
                println!("state: {}", run_state_line(&run));
                println!("follow it with: anumate run watch {}", run.run_id);
            }
        }
    }
    if args.watch {
        return watch(conn, run.run_id, 0, None).await;
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// watch
// ---------------------------------------------------------------------------

/// Exit code of a terminal run: 0 for SUCCEEDED, 1 otherwise.
fn exit_code(state: pb::RunState) -> ExitCode {
    if state == pb::RunState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn is_terminal_state(state: pb::RunState) -> bool {
    matches!(
        state,
        pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
    )
}

/// Whether a failed stream is worth watching again: the connection, not the
/// request, was at fault.
fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::Internal
    ) && anumate_errors::Error::from_status(status).reason.as_str() != "RUN_NOT_FOUND"
}

/// How long `watch` keeps trying to get its stream back.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// What the watcher knows of the run, rebuilt from the stream.
#[derive(Default)]
struct Watched {
    run: Option<pb::Run>,
    /// Last sequence seen (resume point).
    sequence: i64,
}

impl Watched {
    /// Applies one message; `true` when it changed what is shown.
    fn apply(&mut self, msg: &pb::WatchRunResponse) -> bool {
        self.sequence = self.sequence.max(msg.sequence);
        match &msg.change {
            Some(Change::Snapshot(run)) => {
                self.run = Some(run.clone());
                true
            }
            Some(Change::Run(run)) => {
                let (steps, inputs) = match self.run.take() {
                    Some(old) => (old.steps, old.inputs),
                    None => (Vec::new(), None),
                };
                let mut run = run.clone();
                run.steps = steps;
                run.inputs = inputs;
                self.run = Some(run);
                true
            }
            Some(Change::Step(step)) => {
                let run = self.run.get_or_insert_with(pb::Run::default);
                match run.steps.iter_mut().find(|s| s.step_id == step.step_id) {
                    Some(s) => *s = step.clone(),
                    None => run.steps.push(step.clone()),
                }
                true
            }
            Some(Change::Heartbeat(_)) | None => false,
        }
    }

    fn state(&self) -> pb::RunState {
        self.run
            .as_ref()
            .map_or(pb::RunState::Unspecified, pb::Run::state)
    }

    /// Whether the run is in `state`; a step waiting for approval counts as
    /// the run waiting for it, as the stream may say so only of the step.
    fn reached(&self, state: pb::RunState) -> bool {
        self.state() == state
            || (state == pb::RunState::WaitingApproval
                && matches!(self.state(), pb::RunState::Pending | pb::RunState::Running)
                && self.run.as_ref().is_some_and(|r| {
                    r.steps
                        .iter()
                        .any(|s| s.state() == pb::StepState::WaitingApproval)
                }))
    }
}

/// Redraws the run in place on a terminal.
struct Screen {
    /// Lines printed by the last draw.
    lines: usize,
}

impl Screen {
    fn draw(&mut self, run: &pb::Run) {
        let text = run_table(run, true);
        let mut stdout = std::io::stdout().lock();
        if self.lines > 0 {
            // Up to the first line of the last draw, then clear to the end.
            let _ = write!(stdout, "\x1b[{}A\r\x1b[J", self.lines);
        }
        let _ = write!(stdout, "{text}");
        let _ = stdout.flush();
        self.lines = text.lines().count();
    }
}

async fn watch(
    conn: &Connection,
    id: String,
    after: i64,
    until: Option<pb::RunState>,
) -> Result<ExitCode, Failure> {
    let out = conn.output;
    let tty = out == Output::Human && std::io::stdout().is_terminal();
    let mut screen = Screen { lines: 0 };
    let mut seen = Watched {
        run: None,
        sequence: after,
    };
    let mut failing_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let mut client = orchestrator(conn).await?;
            let stream = client
                .watch_run(pb::WatchRunRequest {
                    run_id: id.clone(),
                    after_sequence: seen.sequence,
                })
                .await?
                .into_inner();
            Ok::<_, Failure>(stream)
        }
        .await;
        let broke: String = match attempt {
            Err(Failure::Remote(e)) => return Err(Failure::Remote(e)),
            Err(Failure::Local(msg)) => msg,
            Ok(mut stream) => {
                let ended = loop {
                    match stream.message().await {
                        Ok(Some(msg)) => {
                            failing_since = None;
                            backoff = Duration::from_millis(200);
                            let changed = seen.apply(&msg);
                            match out {
                                Output::Json => println!("{}", compact(&msg)),
                                Output::Human if tty => {
                                    if changed && let Some(run) = &seen.run {
                                        screen.draw(run);
                                    }
                                }
                                Output::Human => print_change(&msg),
                            }
                            if until.is_some_and(|u| seen.reached(u)) {
                                return Ok(ExitCode::SUCCESS);
                            }
                        }
                        Ok(None) => break None,
                        Err(status) if transient(&status) => {
                            break Some(format!("{}: {}", status.code(), status.message()));
                        }
                        Err(status) => return Err(status.into()),
                    }
                };
                if is_terminal_state(seen.state()) {
                    return Ok(exit_code(seen.state()));
                }
                ended.unwrap_or_else(|| "the server ended the stream".into())
            }
        };
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RECONNECT_FOR {
            return Err(Failure::Local(format!(
                "lost the watch of run {id} after sequence {} and could not get it back for {}s: {broke}",
                seen.sequence,
                RECONNECT_FOR.as_secs()
            )));
        }
        if out == Output::Human {
            eprintln!(
                "-- stream lost ({broke}); watching again after sequence {}",
                seen.sequence
            );
            screen.lines = 0;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One line per change, for a pipe.
fn print_change(msg: &pb::WatchRunResponse) {
    let at = time(msg.time.as_ref());
    match &msg.change {
        Some(Change::Snapshot(run)) => {
            println!(
                "#{} {at} run {} {}",
                msg.sequence,
                run.run_id,
                run_state_line(run)
            );
            for s in &run.steps {
                println!("#{} {at} step {}", msg.sequence, step_line(s));
            }
        }
        Some(Change::Run(run)) => {
            println!(
                "#{} {at} run {} {}",
                msg.sequence,
                run.run_id,
                run_state_line(run)
            );
        }
        Some(Change::Step(s)) => println!("#{} {at} step {}", msg.sequence, step_line(s)),
        Some(Change::Heartbeat(_)) | None => {}
    }
}

fn compact<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

// ---------------------------------------------------------------------------
// rendering
// ---------------------------------------------------------------------------

/// `RUNNING` from `RUN_STATE_RUNNING`.
fn run_state_name(state: i32) -> &'static str {
    pb::RunState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .strip_prefix("RUN_STATE_")
                .unwrap_or("UNSPECIFIED")
        })
        .unwrap_or("UNKNOWN")
}

fn step_state_name(state: i32) -> &'static str {
    pb::StepState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .strip_prefix("STEP_STATE_")
                .unwrap_or("UNSPECIFIED")
        })
        .unwrap_or("UNKNOWN")
}

fn attempt_state_name(state: i32) -> &'static str {
    pb::AttemptState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .strip_prefix("ATTEMPT_STATE_")
                .unwrap_or("UNSPECIFIED")
        })
        .unwrap_or("UNKNOWN")
}

fn failure_text(f: &pb::Failure) -> String {
    let kind = pb::FailureKind::try_from(f.kind)
        .map(|k| {
            k.as_str_name()
                .strip_prefix("FAILURE_KIND_")
                .unwrap_or("")
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let mut s = kind;
    if !f.code.is_empty() {
        s.push_str(&format!(" {}", f.code));
    }
    if !f.message.is_empty() {
        s.push_str(&format!(": {}", f.message));
    }
    s
}

/// `SUCCEEDED`, `PAUSED (from WAITING_APPROVAL)`, `FAILED: tool_error …`.
fn run_state_line(r: &pb::Run) -> String {
    let mut s = run_state_name(r.state).to_string();
    if r.state == pb::RunState::Paused as i32 {
        s.push_str(&format!(" (from {})", run_state_name(r.paused_from)));
    }
    if r.killed {
        s.push_str(" (killed)");
    } else if r.cancel_requested && !is_terminal_state(r.state()) {
        s.push_str(" (cancelling)");
    }
    if let Some(f) = &r.failure {
        let at = if f.step_id.is_empty() {
            String::new()
        } else {
            format!(" in step {}", f.step_id)
        };
        s.push_str(&format!(": {}{at}", failure_text(f)));
    }
    s
}

/// What a step's state needs said beside it.
fn step_detail(s: &pb::StepRun) -> String {
    let state = pb::StepState::try_from(s.state).unwrap_or(pb::StepState::Unspecified);
    match state {
        pb::StepState::WaitingApproval => format!("approval {}", s.approval_ids.join(", ")),
        pb::StepState::WaitingRetry => {
            let last = s
                .attempts
                .last()
                .and_then(|a| a.failure.as_ref())
                .map(failure_text)
                .unwrap_or_default();
            format!("next attempt {} {last}", time(s.next_attempt_time.as_ref()))
                .trim()
                .to_string()
        }
        pb::StepState::Failed => s.failure.as_ref().map(failure_text).unwrap_or_default(),
        _ if !s.state_reason.is_empty() => s.state_reason.clone(),
        pb::StepState::Succeeded => s
            .attempts
            .last()
            .filter(|a| !a.receipt_id.is_empty())
            .map(|a| format!("receipt {}", a.receipt_id))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn step_line(s: &pb::StepRun) -> String {
    let detail = step_detail(s);
    let mut line = format!(
        "{} ({}) {} attempts {}",
        s.step_id,
        s.tool,
        step_state_name(s.state),
        s.attempts.len()
    );
    if !detail.is_empty() {
        line.push_str(&format!(": {detail}"));
    }
    line
}

/// Cells laid out in columns two spaces apart (the last one unpadded).
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let pad = w.saturating_sub(c.chars().count());
                s.push_str(c);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(head.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// At most `max` characters, with `…` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// The run's header line and its step table (details clipped on a terminal,
/// so a redraw never wraps).
fn run_table(r: &pb::Run, clipped: bool) -> String {
    let mut out = format!("run {}: {}\n", r.run_id, run_state_line(r));
    let rows: Vec<Vec<String>> = r
        .steps
        .iter()
        .map(|s| {
            let detail = step_detail(s);
            vec![
                s.step_id.clone(),
                s.tool.clone(),
                step_state_name(s.state).to_string(),
                s.attempts.len().to_string(),
                if clipped { clip(&detail, 60) } else { detail },
            ]
        })
        .collect();
    out.push_str(&table(
        &["STEP", "TOOL", "STATE", "ATTEMPTS", "DETAIL"],
        &rows,
    ));
    out
}

fn print_run(r: &pb::Run) {
    println!("run:       {}", r.run_id);
    println!("state:     {}", run_state_line(r));
    if !r.state_reason.is_empty() {
        println!("reason:    {}", r.state_reason);
    }
    println!(
        "capsule:   {} version {}",
        r.capsule_name, r.capsule_version
    );
    println!("plan:      {}", r.plan_hash);
    println!("inputs:    {}", r.inputs_hash);
    if !r.preflight_id.is_empty() {
        println!("preflight: {}", r.preflight_id);
    }
    if !r.labels.is_empty() {
        let labels: BTreeMap<_, _> = r.labels.iter().collect();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("labels:    {}", labels.join(","));
    }
    println!("key:       {}", r.idempotency_key);
    println!(
        "created:   {} by {}",
        time(r.create_time.as_ref()),
        r.created_by
    );
    if r.start_time.is_some() {
        println!("started:   {}", time(r.start_time.as_ref()));
    }
    if r.end_time.is_some() {
        println!("ended:     {}", time(r.end_time.as_ref()));
    }
    if r.deadline.is_some() {
        println!("deadline:  {}", time(r.deadline.as_ref()));
    }
    if !r.receipt_id.is_empty() {
        println!("receipt:   {}", r.receipt_id);
    }
    println!("etag:      {}  sequence {}", r.etag, r.sequence);
    println!();
    print!(
        "{}",
        run_table(r, false).split_once('\n').map_or("", |x| x.1)
    );
    let attempts: Vec<Vec<String>> = r
        .steps
        .iter()
        .flat_map(|s| {
            s.attempts
                .iter()
                .chain(&s.compensation_attempts)
                .map(move |a| {
                    let kind = if a.kind == pb::AttemptKind::Compensation as i32 {
                        "compensation"
                    } else {
                        "call"
                    };
                    let effect = a
                        .decision
                        .as_ref()
                        .map(|d| {
                            d.effect()
                                .as_str_name()
                                .strip_prefix("EFFECT_")
                                .unwrap_or("")
                                .to_ascii_lowercase()
                        })
                        .unwrap_or_else(|| "-".into());
                    let or_dash = |s: &str| {
                        if s.is_empty() {
                            "-".to_string()
                        } else {
                            s.to_string()
                        }
                    };
                    vec![
                        s.step_id.clone(),
                        format!("{} {kind}", a.attempt),
                        attempt_state_name(a.state).to_string(),
                        effect,
                        or_dash(&a.token_jti),
                        or_dash(&a.receipt_id),
                    ]
                })
        })
        .collect();
    if !attempts.is_empty() {
        println!();
        print!(
            "{}",
            table(
                &["STEP", "ATTEMPT", "STATE", "DECISION", "TOKEN", "RECEIPT"],
                &attempts
            )
        );
    }
}

fn print_list(runs: &[pb::Run]) {
    if runs.is_empty() {
        println!("no runs");
        return;
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.run_id.clone(),
                run_state_name(r.state).to_string(),
                format!("{}@{}", r.capsule_name, r.capsule_version),
                time(r.create_time.as_ref()),
                r.created_by.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["RUN", "STATE", "CAPSULE", "CREATED", "BY"], &rows)
    );
}

fn print_history(entries: &[pb::RunHistoryEntry]) {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let what = match (e.step_id.is_empty(), e.attempt) {
                (true, _) => "-".to_string(),
                (false, 0) => e.step_id.clone(),
                (false, n) => format!("{} #{n}", e.step_id),
            };
            let state = if e.step_id.is_empty() {
                run_state_name(e.run_state).to_string()
            } else {
                step_state_name(e.step_state).to_string()
            };
            vec![
                e.sequence.to_string(),
                time(e.time.as_ref()),
                e.r#type.clone(),
                what,
                state,
                e.actor.clone(),
                e.message.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["SEQ", "TIME", "TYPE", "STEP", "STATE", "ACTOR", "MESSAGE"],
            &rows
        )
    );
}

// ---------------------------------------------------------------------------
// who am I
// ---------------------------------------------------------------------------

/// The `sub` claim of the token the commands send (`--token`, `ANUMATE_TOKEN`
/// or the dev token), read without verifying: the server checks the token;
/// this only names whose runs to list.
fn subject(conn: &Connection) -> Result<String, String> {
    let token = conn
        .token
        .clone()
        .or_else(|| dev_state::read(&conn.data_dir).map(|s| s.token))
        .ok_or_else(|| "--mine needs a token: pass --token or set ANUMATE_TOKEN".to_string())?;
    jwt_subject(&token)
}

fn jwt_subject(token: &str) -> Result<String, String> {
    let bad = || "the token is not a JWT with a subject".to_string();
    let payload = token.split('.').nth(1).ok_or_else(bad)?;
    let bytes = base64url_decode(payload).ok_or_else(bad)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(bad)
}

/// Unpadded base64url (RFC 4648 §5), as JWTs use.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_are_capsules_with_versions_or_plans() {
        let hash = format!("sha256:{}", "a".repeat(64));
        assert_eq!(parse_target(&hash).unwrap(), Target::Plan(hash.clone()));
        assert_eq!(
            parse_target(&"b".repeat(64)).unwrap(),
            Target::Plan("b".repeat(64))
        );
        let capsule = |name: &str, version: &str| Target::Capsule {
            name: name.into(),
            version: version.into(),
        };
        assert_eq!(
            parse_target("transfer").unwrap(),
            capsule("transfer", "published")
        );
        assert_eq!(
            parse_target("transfer@3").unwrap(),
            capsule("transfer", "3")
        );
        assert_eq!(
            parse_target("transfer@latest").unwrap(),
            capsule("transfer", "latest")
        );
        for bad in ["@3", "transfer@", "transfer@v3", "transfer@-1"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inputs_are_objects_whose_integers_survive() {
        let s = parse_inputs(
            r#"{"to": "acct_1", "amount": 5000, "n": [1, {"x": 2}]}"#,
            "f",
        )
        .unwrap();
        assert_eq!(s.fields.len(), 3);
        assert!(
            parse_inputs("[1]", "f")
                .unwrap_err()
                .contains("JSON object")
        );
        assert!(parse_inputs("{", "f").unwrap_err().contains("not JSON"));
        let err = parse_inputs(r#"{"a": {"b": [9007199254740993]}}"#, "f").unwrap_err();
        assert!(err.contains("inputs.a.b[0]"), "{err}");
        assert!(err.contains("as a string"), "{err}");
        assert!(parse_inputs(r#"{"a": -9007199254740993}"#, "f").is_err());
        assert!(parse_inputs(r#"{"a": 9007199254740991}"#, "f").is_ok());
        assert!(parse_inputs(r#"{"a": "9007199254740993"}"#, "f").is_ok());
    }

    #[test]
    fn labels_durations_and_keys() {
        let l = parse_labels(&["env=prod".into(), "ticket=OPS-1=2".into()]).unwrap();
        assert_eq!(l["env"], "prod");
        assert_eq!(l["ticket"], "OPS-1=2");
        assert!(parse_labels(&["env".into()]).is_err());
        assert!(parse_labels(&["a=1".into(), "a=2".into()]).is_err());
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        for bad in ["", "30", "1w", "h", "1.5h", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let (a, b) = (fresh_key(), fresh_key());
        assert_ne!(a, b);
        assert!(a.starts_with("cli-") && a.len() <= 128, "{a}");
    }

    #[test]
    fn resolve_requests() {
        let r = resolve_request(
            "r".into(),
            "s".into(),
            Mark::Succeeded,
            Some(r#"{"transfer_id": "tr_1"}"#),
            "checked the bank".into(),
            String::new(),
        )
        .unwrap();
        assert_eq!(r.action, pb::ResolveAction::MarkSucceeded as i32);
        assert!(r.output.is_some());
        let r = resolve_request(
            "r".into(),
            "s".into(),
            Mark::Failed,
            None,
            "no".into(),
            "e1".into(),
        )
        .unwrap();
        assert_eq!(r.action, pb::ResolveAction::MarkFailed as i32);
        assert!(
            resolve_request(
                "r".into(),
                "s".into(),
                Mark::Failed,
                Some("1"),
                "x".into(),
                "".into()
            )
            .is_err()
        );
        assert!(
            resolve_request(
                "r".into(),
                "s".into(),
                Mark::Succeeded,
                Some("{"),
                "x".into(),
                "".into()
            )
            .is_err()
        );
    }

    #[test]
    fn jwt_subjects() {
        // {"alg":"none"}.{"sub":"user:alice","x":"é"}.sig
        let payload = "eyJzdWIiOiJ1c2VyOmFsaWNlIiwieCI6IsOpIn0";
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.c2ln");
        assert_eq!(jwt_subject(&token).unwrap(), "user:alice");
        assert!(jwt_subject("nope").is_err());
        assert!(jwt_subject("a.!!!.c").is_err());
        assert_eq!(base64url_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64url_decode("_-8").unwrap(), [0xff, 0xef]);
    }

    fn step(id: &str, state: pb::StepState) -> pb::StepRun {
        pb::StepRun {
            step_id: id.into(),
            tool: "payments.transfer".into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn the_watcher_rebuilds_the_run_from_changes() {
        let mut w = Watched::default();
        let mut run = pb::Run {
            run_id: "r1".into(),
            state: pb::RunState::Running as i32,
            steps: vec![
                step("lookup", pb::StepState::Running),
                step("transfer", pb::StepState::Pending),
            ],
            ..Default::default()
        };
        let msg = |sequence, change| pb::WatchRunResponse {
            sequence,
            time: None,
            change: Some(change),
        };
        assert!(w.apply(&msg(3, Change::Snapshot(run.clone()))));
        assert_eq!(w.sequence, 3);
        let mut waiting = step("transfer", pb::StepState::WaitingApproval);
        waiting.approval_ids = vec!["ap1".into()];
        assert!(w.apply(&msg(4, Change::Step(waiting))));
        run.state = pb::RunState::WaitingApproval as i32;
        run.steps.clear();
        assert!(w.apply(&msg(5, Change::Run(run.clone()))));
        assert!(!w.apply(&msg(
            5,
            Change::Heartbeat(pb::WatchHeartbeat {
                state: pb::RunState::WaitingApproval as i32
            })
        )));
        let shown = w.run.as_ref().unwrap();
        assert_eq!(shown.steps.len(), 2, "a run change keeps the steps");
        assert_eq!(w.state(), pb::RunState::WaitingApproval);
        assert_eq!(w.sequence, 5);
        let text = run_table(shown, true);
        assert!(text.starts_with("run r1: WAITING_APPROVAL\n"), "{text}");
        assert!(
            text.lines().any(|l| l.starts_with("transfer")
                && l.ends_with("WAITING_APPROVAL  0         approval ap1")),
            "{text}"
        );
        assert!(!is_terminal_state(w.state()));
        assert_eq!(exit_code(pb::RunState::Succeeded), ExitCode::SUCCESS);
        assert_eq!(exit_code(pb::RunState::Cancelled), ExitCode::FAILURE);
    }

    #[test]
    fn states_and_failures_read_well() {
        let r = pb::Run {
            state: pb::RunState::Failed as i32,
            failure: Some(pb::Failure {
                kind: pb::FailureKind::PolicyDenied as i32,
                code: String::new(),
                message: "transfers above 1,000,000 are not automated".into(),
                retryable: false,
                step_id: "transfer".into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            run_state_line(&r),
            "FAILED: policy_denied: transfers above 1,000,000 are not automated in step transfer"
        );
        let p = pb::Run {
            state: pb::RunState::Paused as i32,
            paused_from: pb::RunState::WaitingApproval as i32,
            ..Default::default()
        };
        assert_eq!(run_state_line(&p), "PAUSED (from WAITING_APPROVAL)");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
        assert!(transient(&tonic::Status::unavailable("gone")));
        assert!(!transient(&tonic::Status::not_found("x")));
    }
}
