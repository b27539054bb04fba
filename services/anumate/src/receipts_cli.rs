//! `anumate receipt …`: append, list and fetch receipts over gRPC, and verify a
//! receipt bundle offline with only the public keys.
//!
//! `anumate receipt get ID --proof` prints a bundle
//! `{"receipt": <Receipt JSON>, "proof": {"leaf_index", "tree_size",
//! "audit_path"}, "checkpoint": "<signed note>"}` that `anumate receipt verify`
//! checks without a server: the receipt's signature, its inclusion in the
//! checkpoint's tree and the checkpoint's signature.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anumate_crypto::Jwks;
use anumate_proto::receipts::v1 as pb;
use anumate_receipt::{Hash, InclusionProof, verify_receipt_offline};
use clap::{Args, Subcommand, ValueEnum};
use pb::receipts_internal_client::ReceiptsInternalClient;
use pb::receipts_service_client::ReceiptsServiceClient;
use serde_json::{Value, json};

use crate::cli::{Connection, Failure, Output, finish, read_file};

/// `anumate receipt …`
#[derive(Args, Debug)]
pub struct ReceiptCommand {
    #[command(subcommand)]
    pub command: ReceiptSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Receipt kinds on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// One attempt of a step.
    StepExecution,
    /// An approval decision.
    ApprovalDecision,
    /// Revoked capability tokens.
    TokenRevocation,
    /// A run's outcome.
    RunOutcome,
}

impl From<KindArg> for pb::ReceiptKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::StepExecution => pb::ReceiptKind::StepExecution,
            KindArg::ApprovalDecision => pb::ReceiptKind::ApprovalDecision,
            KindArg::TokenRevocation => pb::ReceiptKind::TokenRevocation,
            KindArg::RunOutcome => pb::ReceiptKind::RunOutcome,
        }
    }
}

/// Receipt subcommands.
#[derive(Subcommand, Debug)]
pub enum ReceiptSub {
    /// Issue a receipt: only with a platform service token of the service that
    /// owns the kind (orchestrator: step-execution, run-outcome; approvals:
    /// approval-decision; captokens: token-revocation). People cannot append.
    Append {
        /// What it attests.
        #[arg(long, value_enum)]
        kind: KindArg,
        /// Key that makes retries safe, e.g. step:<run>:<step>:<attempt>.
        #[arg(long)]
        dedupe_key: String,
        /// Run id.
        #[arg(long, default_value = "")]
        run: String,
        /// Step id.
        #[arg(long, default_value = "")]
        step: String,
        /// Attempt number.
        #[arg(long, default_value_t = 0)]
        attempt: i32,
        /// Plan hash (sha256:…).
        #[arg(long, default_value = "")]
        plan_hash: String,
        /// Approval id.
        #[arg(long, default_value = "")]
        approval_id: String,
        /// Revoked token id (repeatable).
        #[arg(long)]
        jti: Vec<String>,
        /// Content: a JSON object, or @file.json.
        #[arg(long)]
        content: Option<String>,
    },
    /// Show a receipt; with --proof, print the bundle `receipt verify` reads.
    Get {
        /// Receipt id.
        id: String,
        /// Include the inclusion proof and the checkpoint (signed note).
        #[arg(long)]
        proof: bool,
    },
    /// List receipts, newest first: all of a run's with `--run`.
    List {
        /// Only receipts about this run.
        #[arg(long, default_value = "")]
        run: String,
        /// Only receipts of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// Only receipts about this plan (`sha256:<hex>`).
        #[arg(long, default_value = "")]
        plan: String,
        /// At most this many receipts.
        #[arg(long, default_value_t = 500)]
        limit: usize,
        /// Print only the receipt ids, one a line.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Verify receipt bundles offline: signature, inclusion, checkpoint
    /// signature; exits 1 if any does not verify.
    Verify {
        /// The bundles from `anumate receipt get ID --proof`, one a file.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// JWKS with the log's public keys (from `anumate receipt jwks`).
        #[arg(long)]
        jwks: PathBuf,
        /// Checkpoint note to verify against instead of the bundle's.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Print the latest (or a given size's) checkpoint as a signed note.
    Checkpoint {
        /// Tree size of a published checkpoint (default: the latest).
        #[arg(long, default_value_t = 0)]
        size: i64,
    },
    /// Print the JWKS that verifies receipts and checkpoints.
    Jwks,
}

fn print_json(value: &Value) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::Local(format!("cannot encode output: {e}")))?;
    println!("{text}");
    Ok(())
}

fn receipt_value(r: &pb::Receipt) -> Result<Value, Failure> {
    anumate_receipts::export::receipt_json(r).map_err(Failure::Remote)
}

fn print_receipt(r: &pb::Receipt, out: Output) -> Result<(), Failure> {
    if out == Output::Json {
        return print_json(&receipt_value(r)?);
    }
    let issued = serde_json::from_str::<Value>(&r.statement_json)
        .ok()
        .and_then(|s| {
            s.get("issue_time")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    println!("receipt:   {}", r.receipt_id);
    println!(
        "kind:      {}",
        pb::ReceiptKind::try_from(r.kind)
            .map(|k| k.as_str_name())
            .unwrap_or("?")
    );
    println!("leaf:      {}", r.leaf_index);
    println!("digest:    {}", r.content_digest);
    println!("issued:    {issued}");
    println!("signed by: {}", r.kid);
    Ok(())
}

/// `RECEIPT KIND SUBJECT LEAF ISSUED` rows.
fn print_receipts(receipts: &[pb::Receipt]) {
    if receipts.is_empty() {
        println!("no receipts");
        return;
    }
    println!(
        "{:<36}  {:<17} {:>6}  {:<24} SUBJECT",
        "RECEIPT", "KIND", "LEAF", "ISSUED"
    );
    for r in receipts {
        let kind = pb::ReceiptKind::try_from(r.kind)
            .map(|k| k.as_str_name().trim_start_matches("RECEIPT_KIND_"))
            .unwrap_or("?");
        let subject = r.subject.clone().unwrap_or_default();
        let mut about = Vec::new();
        if !subject.run_id.is_empty() {
            about.push(format!("run {}", subject.run_id));
        }
        if !subject.step_id.is_empty() {
            about.push(format!("step {}", subject.step_id));
        }
        if subject.attempt > 0 {
            about.push(format!("attempt {}", subject.attempt));
        }
        if !subject.approval_id.is_empty() {
            about.push(format!("approval {}", subject.approval_id));
        }
        if !subject.jtis.is_empty() {
            about.push(format!("{} token(s)", subject.jtis.len()));
        }
        println!(
            "{:<36}  {:<17} {:>6}  {:<24} {}",
            r.receipt_id,
            kind,
            r.leaf_index,
            crate::cli::time(r.issue_time.as_ref()),
            about.join(", ")
        );
    }
}

/// Runs a receipt command and returns the process exit code.
pub async fn run(cmd: ReceiptCommand) -> ExitCode {
    finish(receipt(cmd).await, None)
}

async fn receipt(cmd: ReceiptCommand) -> Result<ExitCode, Failure> {
    let out = cmd.conn.output;
    match cmd.command {
        ReceiptSub::Append {
            kind,
            dedupe_key,
            run,
            step,
            attempt,
            plan_hash,
            approval_id,
            jti,
            content,
        } => {
            let content = match content {
                None => None,
                Some(text) => {
                    let text = match text.strip_prefix('@') {
                        Some(path) => read_file(&PathBuf::from(path))?,
                        None => text,
                    };
                    Some(
                        serde_json::from_str::<pbjson_types::Struct>(&text).map_err(|e| {
                            Failure::Local(format!("--content is not a JSON object: {e}"))
                        })?,
                    )
                }
            };
            let mut client = cmd
                .conn
                .client(ReceiptsInternalClient::with_interceptor)
                .await?;
            let resp = client
                .append_receipt(pb::AppendReceiptRequest {
                    kind: pb::ReceiptKind::from(kind) as i32,
                    subject: Some(pb::ReceiptSubject {
                        run_id: run,
                        step_id: step,
                        attempt,
                        plan_hash,
                        approval_id,
                        jtis: jti,
                    }),
                    content,
                    dedupe_key,
                })
                .await?
                .into_inner();
            let receipt = resp
                .receipt
                .ok_or_else(|| Failure::Local("the server sent no receipt".into()))?;
            if out == Output::Human && !resp.created {
                println!("(existing receipt for this dedupe key)");
            }
            print_receipt(&receipt, out)?;
        }
        ReceiptSub::Get { id, proof } => {
            let mut client = cmd
                .conn
                .client(ReceiptsServiceClient::with_interceptor)
                .await?;
            let receipt = client
                .get_receipt(pb::GetReceiptRequest {
                    receipt_id: id.clone(),
                })
                .await?
                .into_inner()
                .receipt
                .ok_or_else(|| Failure::Local("the server sent no receipt".into()))?;
            if !proof {
                print_receipt(&receipt, out)?;
                return Ok(ExitCode::SUCCESS);
            }
            // A receipt is in a signed checkpoint within about a second of
            // its append: right after a run, wait for that checkpoint rather
            // than fail (the service says FAILED_PRECONDITION until then).
            let deadline = std::time::Instant::now() + CHECKPOINT_WAIT;
            let p = loop {
                match client
                    .get_inclusion_proof(pb::GetInclusionProofRequest {
                        receipt_id: id.clone(),
                        tree_size: 0,
                    })
                    .await
                {
                    Ok(resp) => break resp.into_inner(),
                    Err(status)
                        if status.code() == tonic::Code::FailedPrecondition
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                    Err(status) => return Err(status.into()),
                }
            };
            let checkpoint = p
                .checkpoint
                .ok_or_else(|| Failure::Local("the server sent no checkpoint".into()))?;
            let audit_path = p
                .audit_path
                .iter()
                .map(|h| Hash::try_from(h.as_slice()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| Failure::Local("the server sent a malformed proof".into()))?;
            let inclusion = InclusionProof {
                leaf_index: p.leaf_index as u64,
                tree_size: checkpoint.tree_size as u64,
                audit_path,
            };
            let bundle = json!({
                "receipt": receipt_value(&receipt)?,
                "proof": serde_json::to_value(&inclusion)
                    .map_err(|e| Failure::Local(e.to_string()))?,
                "checkpoint": checkpoint.note,
            });
            print_json(&bundle)?;
        }
        ReceiptSub::List {
            run,
            kind,
            plan,
            limit,
            quiet,
        } => {
            let mut client = cmd
                .conn
                .client(ReceiptsServiceClient::with_interceptor)
                .await?;
            let filter = pb::ReceiptFilter {
                kind: kind.map_or(pb::ReceiptKind::Unspecified, Into::into) as i32,
                run_id: run,
                plan_hash: plan,
                start_time: None,
                end_time: None,
            };
            let mut receipts = Vec::new();
            let mut page_token = String::new();
            loop {
                let page_size = i32::try_from(limit.saturating_sub(receipts.len()).min(500))
                    .unwrap_or(500)
                    .max(1);
                let resp = client
                    .list_receipts(pb::ListReceiptsRequest {
                        page_size,
                        page_token,
                        filter: Some(filter.clone()),
                    })
                    .await?
                    .into_inner();
                receipts.extend(resp.receipts);
                page_token = resp.next_page_token;
                if page_token.is_empty() || receipts.len() >= limit {
                    break;
                }
            }
            receipts.truncate(limit);
            if quiet {
                for r in &receipts {
                    println!("{}", r.receipt_id);
                }
            } else if out == Output::Json {
                let list = receipts
                    .iter()
                    .map(receipt_value)
                    .collect::<Result<Vec<_>, _>>()?;
                print_json(&json!({ "receipts": list }))?;
            } else {
                print_receipts(&receipts);
            }
        }
        ReceiptSub::Verify {
            files,
            jwks,
            checkpoint,
        } => {
            let mut code = ExitCode::SUCCESS;
            for file in &files {
                if verify(file, &jwks, checkpoint.as_ref())? != ExitCode::SUCCESS {
                    code = ExitCode::FAILURE;
                }
            }
            return Ok(code);
        }
        ReceiptSub::Checkpoint { size } => {
            let mut client = cmd
                .conn
                .client(ReceiptsServiceClient::with_interceptor)
                .await?;
            let cp = client
                .get_checkpoint(pb::GetCheckpointRequest { tree_size: size })
                .await?
                .into_inner()
                .checkpoint
                .ok_or_else(|| Failure::Local("the server sent no checkpoint".into()))?;
            print!("{}", cp.note);
        }
        ReceiptSub::Jwks => {
            let mut client = cmd
                .conn
                .client(ReceiptsServiceClient::with_interceptor)
                .await?;
            let jwks = client
                .get_receipt_signing_keys(pb::GetReceiptSigningKeysRequest {})
                .await?
                .into_inner()
                .data;
            let value: Value = serde_json::from_slice(&jwks)
                .map_err(|e| Failure::Local(format!("the server sent a malformed JWKS: {e}")))?;
            print_json(&value)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `receipt get --proof` waits for a checkpoint covering the receipt
/// (checkpoints follow appends within about a second).
const CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Offline verification of a bundle; exit code 1 when it does not verify.
fn verify(file: &Path, jwks: &Path, checkpoint: Option<&PathBuf>) -> Result<ExitCode, Failure> {
    let bundle: Value = serde_json::from_str(&read_file(file)?)
        .map_err(|e| Failure::Local(format!("{} is not JSON: {e}", file.display())))?;
    let jwks: Jwks = serde_json::from_str(&read_file(jwks)?)
        .map_err(|e| Failure::Local(format!("{} is not a JWKS: {e}", jwks.display())))?;
    let receipt = bundle.get("receipt").ok_or_else(|| {
        Failure::Local(format!(
            "{} has no \"receipt\" (make it with `anumate receipt get ID --proof`)",
            file.display()
        ))
    })?;
    let proof: InclusionProof = bundle
        .get("proof")
        .cloned()
        .ok_or_else(|| Failure::Local(format!("{} has no \"proof\"", file.display())))
        .and_then(|p| {
            serde_json::from_value(p)
                .map_err(|e| Failure::Local(format!("malformed proof in {}: {e}", file.display())))
        })?;
    let note = match checkpoint {
        Some(path) => read_file(path)?,
        None => bundle
            .get("checkpoint")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                Failure::Local(format!(
                    "{} has no \"checkpoint\"; pass --checkpoint",
                    file.display()
                ))
            })?,
    };
    match verify_receipt_offline(&receipt.to_string(), &proof, &note, &jwks) {
        Ok(v) => {
            println!(
                "ok: receipt {} ({}) signed by {} is leaf {} of the checkpoint {} size {}, whose signature verifies",
                v.statement.receipt_id,
                v.statement.kind,
                v.statement.kid,
                v.leaf_index,
                v.checkpoint.origin,
                v.checkpoint.size
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("verification failed: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use anumate_crypto::{KeyPair, KeyRing};
    use anumate_receipt::{Checkpoint, NoteSigner, Statement, Subject, Tree};

    /// Writes a bundle for leaf 1 of a 3-leaf log, the JWKS and the note.
    fn fixture(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut tree = Tree::new();
        let mut signed = Vec::new();
        for i in 0..3 {
            let statement = Statement {
                receipt_id: format!("r{i}"),
                tenant_id: "acme".into(),
                kind: "RUN_OUTCOME".into(),
                subject: Subject {
                    run_id: format!("run-{i}"),
                    ..Default::default()
                },
                content_digest: format!("sha256:{}", "0".repeat(64)),
                issue_time: "2026-01-02T03:04:05.000006Z".into(),
                kid: key.kid().into(),
                actor: "svc:orchestrator".into(),
            };
            let s = statement.sign(&key).unwrap();
            tree.append(s.leaf_hash);
            signed.push(s);
        }
        let checkpoint = Checkpoint {
            origin: "anumate.dev/receipts/acme".into(),
            size: 3,
            root: tree.root(),
        };
        let note = NoteSigner::new(&checkpoint.origin, key.clone())
            .unwrap()
            .sign_checkpoint(&checkpoint)
            .unwrap();
        let proof = InclusionProof {
            leaf_index: 1,
            tree_size: 3,
            audit_path: tree.inclusion_proof(1, 3).unwrap(),
        };
        let bundle = json!({
            "receipt": {
                "statementJson": signed[1].statement_json,
                "signature": signed[1].signature,
                "receiptId": "r1",
            },
            "proof": serde_json::to_value(&proof).unwrap(),
            "checkpoint": note,
        });
        let (b, j, c) = (
            dir.join("r.json"),
            dir.join("jwks.json"),
            dir.join("cp.txt"),
        );
        std::fs::write(&b, bundle.to_string()).unwrap();
        std::fs::write(
            &j,
            serde_json::to_string(&KeyRing::new(key).jwks()).unwrap(),
        )
        .unwrap();
        std::fs::write(&c, note).unwrap();
        (b, j, c)
    }

    fn ok(r: Result<ExitCode, Failure>) -> bool {
        matches!(r, Ok(code) if code == ExitCode::SUCCESS)
    }

    #[test]
    fn verifies_a_bundle_offline_and_rejects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let (bundle, jwks, cp) = fixture(dir.path());
        assert!(ok(verify(&bundle, &jwks, None)));
        assert!(ok(verify(&bundle, &jwks, Some(&cp))));
        // Another receipt id than the signed one.
        let text = std::fs::read_to_string(&bundle).unwrap();
        std::fs::write(
            &bundle,
            text.replace("\"receiptId\":\"r1\"", "\"receiptId\":\"r2\""),
        )
        .unwrap();
        assert!(!ok(verify(&bundle, &jwks, None)));
        // A checkpoint from another key set.
        let other = tempfile::tempdir().unwrap();
        let (bundle2, _, other_cp) = fixture(other.path());
        assert!(!ok(verify(&bundle2, &jwks, None)));
        let (bundle3, jwks3, _) = fixture(dir.path());
        assert!(!ok(verify(&bundle3, &jwks3, Some(&other_cp))));
    }
}
