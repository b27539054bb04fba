//! `anumate token …`: mint, verify (online or offline with a JWKS) and revoke
//! capability tokens, and print the JWKS that verifies them.
//!
//! `mint` prints only the compact JWS on stdout (so `T=$(anumate token mint …)`
//! works) and a one-line summary on stderr; `-o json` prints the
//! `IssueTokenResponse`. `verify` exits 0 when the verdict is `VALID` and 1
//! otherwise, printing the verdict and why.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anumate_captokens::{Expectation, Verifier};
use anumate_crypto::Jwks;
use anumate_proto::captokens::v1 as pb;
use clap::{Args, Subcommand};
use pb::cap_tokens_service_client::CapTokensServiceClient;
use pb::capability_tokens_internal_client::CapabilityTokensInternalClient;
use serde_json::{Value, json};

use crate::cli::{Connection, Failure, Output, finish, print_json};
use crate::dev_state;

/// `anumate token …`
#[derive(Args, Debug)]
pub struct TokenCommand {
    #[command(subcommand)]
    pub command: TokenSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// What the call is: shared by `mint` (what the token allows) and `verify`
/// (what the verifier is about to do).
#[derive(Args, Debug, Clone)]
pub struct CallArgs {
    /// The connector or tool the call is for (`aud`).
    #[arg(long)]
    audience: String,
    /// Tool name, e.g. payments.refund.
    #[arg(long)]
    tool: String,
    /// Run id.
    #[arg(long, default_value = "")]
    run: String,
    /// Step id.
    #[arg(long, default_value = "")]
    step: String,
    /// Plan hash (sha256:…).
    #[arg(long, default_value = "")]
    plan_hash: String,
    /// The call's arguments: a JSON object or @file.json (hashed with RFC 8785).
    #[arg(long, conflicts_with = "args_sha256")]
    args: Option<String>,
    /// SHA-256 of the arguments' RFC 8785 JSON (sha256:<hex>; sha256-<hex>
    /// or bare hex too), instead of --args.
    #[arg(long)]
    args_sha256: Option<String>,
}

/// Token subcommands.
#[derive(Subcommand, Debug)]
pub enum TokenSub {
    /// Mint a token for exactly one call (admin only, audited as admin-issued;
    /// runs get theirs from the orchestrator).
    Mint {
        #[command(flatten)]
        call: CallArgs,
        /// Allowed action (repeatable; default: call).
        #[arg(long = "action")]
        actions: Vec<String>,
        /// Constraints on the arguments: a JSON object keyed by JSON Pointer,
        /// e.g. '{"/amount": {"max": 500000}}', or @file.json.
        #[arg(long)]
        constraints: Option<String>,
        /// Principal that started the run (`sub`; default: the caller).
        #[arg(long, default_value = "")]
        subject: String,
        /// Lifetime in seconds (at most 300).
        #[arg(long, default_value_t = 60)]
        ttl: i64,
        /// The token can be consumed only once (`token verify --consume`).
        #[arg(long)]
        single_use: bool,
    },
    /// Verify a token for a call: online (VerifyToken) or offline with --jwks.
    Verify {
        /// The token, @file, or - for stdin.
        #[arg(id = "jws", value_name = "TOKEN")]
        token: String,
        #[command(flatten)]
        call: CallArgs,
        /// Action about to be performed (required: a token is for one call).
        #[arg(long)]
        action: String,
        /// Consume a single-use token (online only): later uses are REPLAYED.
        #[arg(long, conflicts_with = "jwks")]
        consume: bool,
        /// Verify offline with this JWKS (from `anumate token jwks`): signature,
        /// time, audience, tenant, binding, capability and arguments, but not
        /// revocation or replay.
        #[arg(long)]
        jwks: Option<PathBuf>,
        /// Tenant expected offline (default: the dev tenant in dev.json).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke one token by id, or every unexpired token of a run.
    Revoke {
        /// Token id.
        #[arg(long, conflicts_with = "run", required_unless_present = "run")]
        jti: Option<String>,
        /// Run id.
        #[arg(long)]
        run: Option<String>,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Print the JWKS that verifies tokens (no credential needed).
    Jwks,
}

/// `text`, or the contents of the file after `@`, or stdin for `-`.
fn text_arg(text: &str, what: &str) -> Result<String, Failure> {
    if text == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Local(format!("cannot read {what} from stdin: {e}")))?;
        return Ok(s);
    }
    match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Failure::Local(format!("cannot read {path}: {e}"))),
        None => Ok(text.to_owned()),
    }
}

fn json_object(text: &str, flag: &str) -> Result<Value, Failure> {
    let value: Value = serde_json::from_str(&text_arg(text, flag)?)
        .map_err(|e| Failure::Local(format!("{flag} is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(Failure::Local(format!("{flag} must be a JSON object")));
    }
    Ok(value)
}

fn to_struct(value: &Value, flag: &str) -> Result<pbjson_types::Struct, Failure> {
    serde_json::from_value(value.clone())
        .map_err(|e| Failure::Local(format!("{flag} is not a JSON object: {e}")))
}

impl CallArgs {
    /// The arguments (parsed) and their hash, from --args or --args-sha256.
    fn args(&self) -> Result<(Option<Value>, Option<String>), Failure> {
        match (&self.args, &self.args_sha256) {
            (Some(text), _) => {
                let value = json_object(text, "--args")?;
                let hash = anumate_captokens::args_sha256(&value).ok_or_else(|| {
                    Failure::Local("--args has no canonical JSON form".to_owned())
                })?;
                Ok((Some(value), Some(hash)))
            }
            (None, Some(hash)) => Ok((None, Some(hash.clone()))),
            (None, None) => Ok((None, None)),
        }
    }
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| secs.to_string())
}

fn ts_secs(t: &Option<pbjson_types::Timestamp>) -> i64 {
    t.as_ref().map_or(0, |t| t.seconds)
}

/// Runs a token command and returns the process exit code.
pub async fn run(cmd: TokenCommand) -> ExitCode {
    finish(token(cmd).await, None)
}

async fn token(cmd: TokenCommand) -> Result<ExitCode, Failure> {
    let out = cmd.conn.output;
    match cmd.command {
        TokenSub::Mint {
            call,
            actions,
            constraints,
            subject,
            ttl,
            single_use,
        } => {
            let (_, args_sha256) = call.args()?;
            let args_sha256 = args_sha256.ok_or_else(|| {
                Failure::Local("pass the call's arguments: --args JSON or --args-sha256 HEX".into())
            })?;
            let constraints = constraints
                .map(|c| {
                    json_object(&c, "--constraints").and_then(|v| to_struct(&v, "--constraints"))
                })
                .transpose()?;
            let actions = if actions.is_empty() {
                vec!["call".to_owned()]
            } else {
                actions
            };
            let mut client = cmd
                .conn
                .client(CapabilityTokensInternalClient::with_interceptor)
                .await?;
            let resp = client
                .issue_token(pb::IssueTokenRequest {
                    audience: call.audience,
                    subject,
                    run_id: call.run,
                    step_id: call.step,
                    plan_hash: call.plan_hash,
                    args_sha256,
                    capability: Some(pb::Capability {
                        tool: call.tool,
                        actions,
                        constraints,
                    }),
                    ttl: Some(pbjson_types::Duration {
                        seconds: ttl,
                        nanos: 0,
                    }),
                    single_use,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else {
                println!("{}", resp.token);
                if let Some(c) = &resp.claims {
                    eprintln!(
                        "minted {} for {} on {} (tenant {}), expires {}{}",
                        c.jti,
                        c.capability.as_ref().map_or("", |k| k.tool.as_str()),
                        c.audience,
                        c.tenant_id,
                        time(ts_secs(&c.expire_time)),
                        if c.single_use { ", single-use" } else { "" }
                    );
                }
            }
        }
        TokenSub::Verify {
            token,
            call,
            action,
            consume,
            jwks,
            tenant,
        } => {
            let token = text_arg(&token, "the token")?.trim().to_owned();
            if call.args.is_none() && call.args_sha256.is_none() {
                return Err(Failure::Local(
                    "pass the call's arguments: --args JSON or --args-sha256 HEX".into(),
                ));
            }
            let action = Some(action);
            return match jwks {
                Some(path) => verify_offline(&cmd.conn, &token, &call, action, &path, tenant, out),
                None => verify_online(&cmd.conn, token, call, action, consume, out).await,
            };
        }
        TokenSub::Revoke { jti, run, reason } => {
            let target = match (jti, run) {
                (Some(jti), _) => pb::revoke_token_request::Target::Jti(jti),
                (None, Some(run)) => pb::revoke_token_request::Target::RunId(run),
                (None, None) => return Err(Failure::Local("pass --jti or --run".into())),
            };
            let mut client = cmd
                .conn
                .client(CapTokensServiceClient::with_interceptor)
                .await?;
            let resp = client
                .revoke_token(pb::RevokeTokenRequest {
                    target: Some(target),
                    reason,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                print_json(&resp);
            } else if resp.revoked_jtis.is_empty() {
                println!("nothing revoked (already revoked or expired)");
            } else {
                println!("revoked {} token(s):", resp.revoked_jtis.len());
                for jti in &resp.revoked_jtis {
                    println!("  {jti}");
                }
                if !resp.receipt_id.is_empty() {
                    println!("receipt: {}", resp.receipt_id);
                }
            }
        }
        TokenSub::Jwks => {
            let mut client = cmd
                .conn
                .client(CapTokensServiceClient::with_interceptor)
                .await?;
            let jwks = client
                .get_jwks(pb::GetJwksRequest {})
                .await?
                .into_inner()
                .data;
            let value: Value = serde_json::from_slice(&jwks)
                .map_err(|e| Failure::Local(format!("the server sent a malformed JWKS: {e}")))?;
            print_json(&value);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify_online(
    conn: &Connection,
    token: String,
    call: CallArgs,
    action: Option<String>,
    consume: bool,
    out: Output,
) -> Result<ExitCode, Failure> {
    let (args, args_sha256) = call.args()?;
    let args = args.map(|a| to_struct(&a, "--args")).transpose()?;
    let mut client = conn
        .client(CapabilityTokensInternalClient::with_interceptor)
        .await?;
    let resp = client
        .verify_token(pb::VerifyTokenRequest {
            token,
            audience: call.audience,
            tool: call.tool,
            action: action.unwrap_or_default(),
            args_sha256: args_sha256.unwrap_or_default(),
            args,
            plan_hash: call.plan_hash,
            run_id: call.run,
            step_id: call.step,
            consume,
        })
        .await?
        .into_inner();
    let valid = resp.verdict == pb::TokenVerdict::Valid as i32;
    if out == Output::Json {
        print_json(&resp);
    } else {
        let verdict = pb::TokenVerdict::try_from(resp.verdict)
            .map(|v| v.as_str_name())
            .unwrap_or("TOKEN_VERDICT_UNSPECIFIED");
        let jti = resp.claims.as_ref().map_or("", |c| c.jti.as_str());
        if valid {
            println!(
                "{verdict}: token {jti}{}",
                if resp.consumed { " (consumed)" } else { "" }
            );
        } else {
            println!("{verdict}: {}", resp.message);
        }
    }
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn verify_offline(
    conn: &Connection,
    token: &str,
    call: &CallArgs,
    action: Option<String>,
    jwks_path: &PathBuf,
    tenant: Option<String>,
    out: Output,
) -> Result<ExitCode, Failure> {
    let text = std::fs::read_to_string(jwks_path)
        .map_err(|e| Failure::Local(format!("cannot read {}: {e}", jwks_path.display())))?;
    let jwks: Jwks = serde_json::from_str(&text)
        .map_err(|e| Failure::Local(format!("{} is not a JWKS: {e}", jwks_path.display())))?;
    let verifier = Verifier::from_jwks(&jwks)
        .map_err(|e| Failure::Local(format!("{}: {e}", jwks_path.display())))?;
    let tenant = tenant
        .or_else(|| dev_state::read(&conn.data_dir).map(|s| s.tenant))
        .ok_or_else(|| Failure::Local("pass --tenant (the tenant the token must be for)".into()))?;
    let (args, args_sha256) = call.args()?;
    let mut expected = Expectation::new(&call.audience, &tenant, &call.tool);
    expected.action = action.as_deref();
    expected.args = args.as_ref();
    // With --args the arguments themselves are checked (constraints and hash).
    if args.is_none() {
        expected.args_sha256 = args_sha256.as_deref();
    }
    expected.plan_hash = nonempty(&call.plan_hash);
    expected.run = nonempty(&call.run);
    expected.step = nonempty(&call.step);
    let (valid, verdict, message, claims, kid) = match verifier.verify(token, &expected) {
        Ok(v) => (
            true,
            "TOKEN_VERDICT_VALID",
            String::new(),
            Some(v.claims),
            v.kid,
        ),
        Err(r) => (
            false,
            r.reason().verdict_name(),
            r.failure.to_string(),
            r.claims.as_deref().cloned(),
            String::new(),
        ),
    };
    if out == Output::Json {
        let mut v = json!({ "verdict": verdict, "offline": true });
        if !message.is_empty() {
            v["message"] = json!(message);
        }
        if let Some(c) = &claims {
            v["claims"] = serde_json::to_value(c).unwrap_or(Value::Null);
        }
        if !kid.is_empty() {
            v["kid"] = json!(kid);
        }
        print_json(&v);
    } else if valid {
        let jti = claims.as_ref().map_or("", |c| c.jti.as_str());
        println!(
            "{verdict}: token {jti} (offline: signature, time, audience, tenant, binding, capability, \
             arguments; not revocation or replay)"
        );
    } else {
        println!("{verdict}: {message}");
    }
    Ok(if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
