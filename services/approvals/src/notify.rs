//! Webhook notifications of approval requests (`[approvals.notify]`).
//!
//! When an approval or a later stage of it opens, when a stage escalates,
//! and when a stage's reminder is due, [`enqueue`] records one delivery per
//! configured webhook in the transaction that changes the approval, so a
//! notification exists exactly when the change committed. The
//! supervised [`task`] then POSTs each delivery's Slack-compatible JSON
//! (`text` + `blocks`, plus an `anumate` object for other receivers) and
//! records the outcome on its row: attempts, the last HTTP status or error,
//! `delivered_at`, or `failed_at` once it gives up. Failures are retried with
//! exponential backoff up to `max_attempts`; a 4xx other than 408 and 429 is
//! not retried (the receiver refuses the request itself).
//!
//! Delivery is at least once: a row is leased (its next attempt pushed past
//! the request timeout) before it is sent, so a replica that dies mid-send
//! leaves it to be sent again, and two replicas never send it at once. The
//! receiver can drop repeats by the `x-anumate-delivery` header.
//!
//! Rows name their webhook by a fingerprint of its URL, never the URL: a
//! Slack webhook URL is itself a credential. A row whose webhook is no longer
//! configured fails with that reason.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anumate_errors::Error;
use anumate_proto::approvals::v1 as pb;
use anumate_service::{CancellationToken, TaskError};
use anumate_store::{Backend, Migration, QueryResult, Store, TenantTx};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const DDL: &str = "CREATE TABLE approval_notifications (
        delivery_id TEXT NOT NULL PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        approval_id TEXT NOT NULL,
        stage_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        webhook TEXT NOT NULL,
        payload TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_attempt_at BIGINT,
        last_status INTEGER,
        last_error TEXT,
        created_at BIGINT NOT NULL,
        delivered_at BIGINT,
        failed_at BIGINT
      );
      CREATE INDEX approval_notifications_due ON approval_notifications (next_attempt_at);
      CREATE INDEX approval_notifications_approval
        ON approval_notifications (tenant_id, approval_id)";

/// The notifier's table. Like `approval_timers` it is not a tenant table:
/// the delivery task claims due rows across tenants; tenant reads
/// ([`deliveries`]) filter on `tenant_id`.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "approvals_0002_notifications",
    postgres: DDL,
    sqlite: DDL,
    tenant_tables: &[],
}];

/// `[approvals.notify]`: where approval requests are pushed.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Webhook URLs (http or https), each sent every notification; empty:
    /// notifications are off.
    pub webhooks: Vec<String>,
    /// Header sent with `secret` on every delivery (e.g.
    /// `x-anumate-webhook-secret`); empty: none.
    pub secret_header: String,
    /// The header's value (set it through `ANUMATE_APPROVALS__NOTIFY__SECRET`
    /// rather than a file).
    pub secret: String,
    /// The approval's link in a notification: `{id}` and `{tenant}` are
    /// replaced (e.g. `https://console.example.com/t/{tenant}/approvals/{id}`).
    /// Empty: the REST path `/v1/approvals/{id}`, and no button.
    pub approval_url: String,
    /// Timeout of one delivery attempt, in milliseconds.
    pub timeout_ms: u64,
    /// Attempts before a delivery is given up (at least 1).
    pub max_attempts: u32,
    /// Wait before the first retry, in milliseconds; doubled after each failure.
    pub backoff_ms: u64,
    /// Longest wait between retries, in milliseconds.
    pub max_backoff_ms: u64,
    /// How often the delivery task looks for due deliveries, in milliseconds.
    pub poll_interval_ms: u64,
    /// Settled deliveries (delivered or given up) are deleted this many
    /// hours after they settled; 0 keeps them.
    pub retention_hours: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhooks: Vec::new(),
            secret_header: String::new(),
            secret: String::new(),
            approval_url: String::new(),
            timeout_ms: 5_000,
            max_attempts: 8,
            backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            poll_interval_ms: 1_000,
            retention_hours: 168,
        }
    }
}

// By hand so that neither the secret nor webhook URLs (credentials for Slack)
// reach a log.
impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("webhooks", &self.webhooks.len())
            .field("secret_header", &self.secret_header)
            .field("secret", &if self.secret.is_empty() { "" } else { "***" })
            .field("approval_url", &self.approval_url)
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_ms", &self.backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("retention_hours", &self.retention_hours)
            .finish()
    }
}

impl NotifyConfig {
    /// `INVALID_ARGUMENT` naming the setting that cannot work: a webhook that
    /// is not an http(s) URL, a secret without its header (or the reverse), a
    /// header name HTTP refuses, or a zero timeout or attempt count.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &str, why: String| {
            Error::invalid_argument(&format!("approvals.notify.{field}"), why)
        };
        for (i, url) in self.webhooks.iter().enumerate() {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| bad("webhooks", format!("webhooks[{i}] is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(bad(
                    "webhooks",
                    format!("webhooks[{i}] must be http or https"),
                ));
            }
        }
        if self.secret_header.is_empty() != self.secret.is_empty() {
            return Err(bad(
                "secret",
                "secret_header and secret go together: set both or neither".into(),
            ));
        }
        if !self.secret_header.is_empty() {
            reqwest::header::HeaderName::from_bytes(self.secret_header.as_bytes()).map_err(
                |_| {
                    bad(
                        "secret_header",
                        format!("{:?} is not an HTTP header name", self.secret_header),
                    )
                },
            )?;
            reqwest::header::HeaderValue::from_str(&self.secret)
                .map_err(|_| bad("secret", "is not a valid HTTP header value".into()))?;
        }
        if self.timeout_ms == 0 {
            return Err(bad("timeout_ms", "must be at least 1".into()));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1".into()));
        }
        Ok(())
    }

    /// The wait before attempt `attempts + 1` after `attempts` failures:
    /// `backoff_ms` doubled per failure, at most `max_backoff_ms`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u64 << attempts.saturating_sub(1).min(32);
        Duration::from_millis(
            self.backoff_ms
                .saturating_mul(factor)
                .min(self.max_backoff_ms.max(self.backoff_ms)),
        )
    }
}

/// What a notification tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The approval (or a later stage of it) opened.
    Requested,
    /// The current stage escalated to other approvers.
    Escalated,
    /// The current stage is still undecided and expires soon.
    Reminder,
}

impl Kind {
    /// The name stored and sent (`requested`, `escalated`, `reminder`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requested => "requested",
            Kind::Escalated => "escalated",
            Kind::Reminder => "reminder",
        }
    }
}

/// Records the deliveries of `approval`'s notification in `tx` (the
/// transaction that opens it, or a reminder's); a no-op when no webhook is
/// configured or the approval is no longer pending. The first notification
/// of a stage (or of its escalation) announces it; later ones remind.
pub async fn enqueue(
    tx: &TenantTx,
    config: &NotifyConfig,
    approval: &pb::Approval,
) -> Result<(), Error> {
    if config.webhooks.is_empty() || approval.state != pb::ApprovalState::Pending as i32 {
        return Ok(());
    }
    let stage = current_stage(approval);
    let escalated = stage.is_some_and(|s| s.escalated);
    let stage_key = format!(
        "{}{}",
        approval.current_stage,
        if escalated { "-escalated" } else { "" }
    );
    let seen = tx
        .query_one(
            "SELECT COUNT(*) AS n FROM approval_notifications \
             WHERE tenant_id = $1 AND approval_id = $2 AND stage_key = $3",
            vec![
                tx.tenant_id().into(),
                approval.approval_id.as_str().into(),
                stage_key.as_str().into(),
            ],
        )
        .await?
        .map(|row| row.try_get::<i64>("", "n"))
        .transpose()
        .map_err(Error::internal)?
        .unwrap_or(0);
    let kind = match (seen, escalated) {
        (0, true) => Kind::Escalated,
        (0, false) => Kind::Requested,
        _ => Kind::Reminder,
    };
    let payload = payload(tx.tenant_id(), config, approval, kind).to_string();
    let now = anumate_store::now_micros();
    for url in &config.webhooks {
        tx.execute(
            "INSERT INTO approval_notifications (delivery_id, tenant_id, approval_id, stage_key, \
               kind, webhook, payload, attempts, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $8)",
            vec![
                uuid::Uuid::now_v7().to_string().into(),
                tx.tenant_id().into(),
                approval.approval_id.as_str().into(),
                stage_key.as_str().into(),
                kind.as_str().into(),
                fingerprint(url).into(),
                payload.as_str().into(),
                now.into(),
            ],
        )
        .await?;
    }
    Ok(())
}

/// A webhook's name in the table: the first 16 hex digits of its URL's SHA-256.
fn fingerprint(url: &str) -> String {
    anumate_crypto::sha256_hex(url.as_bytes())[..16].to_owned()
}

fn current_stage(a: &pb::Approval) -> Option<&pb::ApprovalStage> {
    usize::try_from(a.current_stage)
        .ok()
        .and_then(|i| a.stages.get(i))
}

/// The approval's link: `approval_url` with `{id}` and `{tenant}` replaced,
/// else its REST path.
pub fn link(config: &NotifyConfig, tenant: &str, approval_id: &str) -> String {
    if config.approval_url.is_empty() {
        format!("/v1/approvals/{approval_id}")
    } else {
        config
            .approval_url
            .replace("{id}", approval_id)
            .replace("{tenant}", tenant)
    }
}

/// Slack's `mrkdwn` treats `&`, `<` and `>` as markup: user text is escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` characters of `text`, with `…` when cut.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn rfc3339(ts: Option<&pbjson_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    chrono::DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).unwrap_or(0))
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
}

/// The notification's JSON: Slack's `text` (the fallback line) and `blocks`
/// (header, what is asked and of whom, the redacted arguments, a button to
/// the approval), and `anumate` with the same facts for other receivers.
pub fn payload(tenant: &str, config: &NotifyConfig, a: &pb::Approval, kind: Kind) -> Value {
    let link = link(config, tenant, &a.approval_id);
    let stage = current_stage(a);
    let approvers = stage.map(|s| s.approvers.join(", ")).unwrap_or_default();
    let quorum = stage.map_or(1, |s| s.quorum);
    let approved = stage.map_or(0, |s| s.approved_count);
    let stages = a.stages.len();
    let expires = rfc3339(a.expire_time.as_ref());
    let headline = match kind {
        Kind::Requested => "Approval needed",
        Kind::Escalated => "Approval escalated",
        Kind::Reminder => "Reminder: approval needed",
    };
    let stage_note = if stages > 1 {
        format!(" (stage {} of {stages})", a.current_stage + 1)
    } else {
        String::new()
    };
    let capsule = if a.capsule.is_empty() {
        String::new()
    } else {
        format!("{} v{} ", a.capsule, a.capsule_version)
    };
    let text = format!(
        "{headline}{stage_note}: {capsule}calls {}{} in run {} (step {}); {approved} of {quorum} from {approvers}{}. {link}",
        a.tool,
        if a.destructive { " (destructive)" } else { "" },
        a.run_id,
        a.step_id,
        expires
            .as_deref()
            .map(|e| format!("; expires {e}"))
            .unwrap_or_default(),
    );

    let mut summary = format!(
        "*{}* wants to call `{}`{}",
        escape(if a.capsule.is_empty() {
            &a.requester
        } else {
            &a.capsule
        }),
        escape(&a.tool),
        if a.destructive {
            " — *destructive*"
        } else {
            ""
        }
    );
    if !a.reason.is_empty() {
        summary.push_str(&format!("\n>{}", escape(&clip(&a.reason, 500))));
    }
    let mut fields = vec![
        field(
            "Run",
            &format!("{} / {}", escape(&a.run_id), escape(&a.step_id)),
        ),
        field(
            "Approvers",
            &format!(
                "{approved} of {quorum}{stage_note} from {}",
                escape(&approvers)
            ),
        ),
        field("Requested by", &escape(&a.requester)),
    ];
    if let Some(e) = &expires {
        fields.push(field("Expires", e));
    }
    let risk = anumate_proto::ghostrun::v1::RiskLevel::try_from(a.risk_level)
        .ok()
        .filter(|r| *r != anumate_proto::ghostrun::v1::RiskLevel::Unspecified)
        .map(|r| {
            format!(
                "{} ({})",
                r.as_str_name()
                    .trim_start_matches("RISK_LEVEL_")
                    .to_ascii_lowercase(),
                a.risk_score
            )
        });
    if let Some(r) = &risk {
        fields.push(field("Risk", r));
    }
    if let Some(rule) = &a.rule {
        fields.push(field(
            "Rule",
            &escape(&format!("{} / {}", rule.policy, rule.rule)),
        ));
    }

    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": clip(&format!("{headline}: {}", a.tool), 150)}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": clip(&summary, 3000)}, "fields": fields}),
    ];
    let args = a
        .args_preview
        .as_ref()
        .and_then(|p| serde_json::to_string_pretty(p).ok());
    if let Some(args) = &args {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("```{}```", clip(&escape(args), 2900))}}));
    }
    if link.starts_with("http://") || link.starts_with("https://") {
        blocks.push(json!({"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": "Review"}, "url": link, "style": "primary"}]}));
    }
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!("approval `{}` · `anumate approval get {}`", a.approval_id, a.approval_id)}]}));

    json!({
        "text": text,
        "blocks": blocks,
        "anumate": {
            "kind": kind.as_str(),
            "tenant": tenant,
            "approval_id": a.approval_id,
            "link": link,
            "run_id": a.run_id,
            "step_id": a.step_id,
            "tool": a.tool,
            "destructive": a.destructive,
            "capsule": a.capsule,
            "capsule_version": a.capsule_version,
            "requester": a.requester,
            "stage": a.current_stage + 1,
            "stages": stages,
            "approvers": stage.map(|s| s.approvers.clone()).unwrap_or_default(),
            "quorum": quorum,
            "approved_count": approved,
            "expire_time": expires,
            "args_sha256": a.args_sha256,
        },
    })
}

fn field(name: &str, value: &str) -> Value {
    json!({"type": "mrkdwn", "text": clip(&format!("*{name}*\n{value}"), 2000)})
}

/// One recorded delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its id (sent as `x-anumate-delivery`).
    pub delivery_id: String,
    /// The approval it is about.
    pub approval_id: String,
    /// `requested`, `escalated` or `reminder`.
    pub kind: String,
    /// The webhook's fingerprint (not its URL).
    pub webhook: String,
    /// The JSON sent.
    pub payload: String,
    /// Attempts made.
    pub attempts: i32,
    /// HTTP status of the last attempt; 0 when it got no response.
    pub last_status: Option<i32>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// When it was delivered (Unix microseconds).
    pub delivered_at: Option<i64>,
    /// When it was given up (Unix microseconds).
    pub failed_at: Option<i64>,
}

const DELIVERY_COLUMNS: &str = "delivery_id, tenant_id, approval_id, kind, webhook, payload, \
     attempts, last_status, last_error, delivered_at, failed_at";

fn delivery(row: &QueryResult) -> Result<Delivery, Error> {
    let get_err = |e: anumate_store::DbErr| Error::internal(format!("approval_notifications: {e}"));
    Ok(Delivery {
        delivery_id: row.try_get("", "delivery_id").map_err(get_err)?,
        approval_id: row.try_get("", "approval_id").map_err(get_err)?,
        kind: row.try_get("", "kind").map_err(get_err)?,
        webhook: row.try_get("", "webhook").map_err(get_err)?,
        payload: row.try_get("", "payload").map_err(get_err)?,
        attempts: row.try_get("", "attempts").map_err(get_err)?,
        last_status: row.try_get("", "last_status").map_err(get_err)?,
        last_error: row.try_get("", "last_error").map_err(get_err)?,
        delivered_at: row.try_get("", "delivered_at").map_err(get_err)?,
        failed_at: row.try_get("", "failed_at").map_err(get_err)?,
    })
}

/// The deliveries recorded for one of the tenant's approvals, oldest first.
pub async fn deliveries(tx: &TenantTx, approval_id: &str) -> Result<Vec<Delivery>, Error> {
    tx.query_all(
        &format!(
            "SELECT {DELIVERY_COLUMNS} FROM approval_notifications \
             WHERE tenant_id = $1 AND approval_id = $2 ORDER BY delivery_id"
        ),
        vec![tx.tenant_id().into(), approval_id.into()],
    )
    .await?
    .iter()
    .map(delivery)
    .collect()
}

/// The supervised task that delivers recorded notifications.
pub type NotifyTask = Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send + 'static>>;

/// The delivery task over `store` (spawn it with `Tasks::spawn`). Idle when
/// no webhook is configured; an invalid configuration ends it with the reason.
pub fn task(store: Store, config: NotifyConfig) -> impl FnOnce(CancellationToken) -> NotifyTask {
    move |cancel: CancellationToken| -> NotifyTask {
        Box::pin(async move {
            if config.webhooks.is_empty() {
                cancel.cancelled().await;
                return Ok(());
            }
            let notifier = Notifier::new(store, config)?;
            notifier.run(cancel).await;
            Ok(())
        })
    }
}

/// Deliveries handled per pass.
const BATCH: i64 = 32;

/// How often settled deliveries past their retention are purged.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Sends due deliveries and records their outcomes.
pub struct Notifier {
    store: Store,
    config: NotifyConfig,
    http: reqwest::Client,
}

impl Notifier {
    /// A notifier for `config` (checked with [`NotifyConfig::validate`]).
    pub fn new(store: Store, config: NotifyConfig) -> Result<Notifier, Error> {
        config.validate()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .user_agent(concat!("anumate-approvals/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::internal(format!("webhook client: {e}")))?;
        Ok(Notifier {
            store,
            config,
            http,
        })
    }

    /// Delivers until `cancel`; a failing pass is logged and retried.
    /// Settled deliveries past `retention_hours` are purged hourly.
    pub async fn run(&self, cancel: CancellationToken) {
        let idle = Duration::from_millis(self.config.poll_interval_ms.max(1));
        let mut purged_at: Option<std::time::Instant> = None;
        loop {
            if self.config.retention_hours > 0
                && purged_at.is_none_or(|t| t.elapsed() >= PURGE_EVERY)
            {
                purged_at = Some(std::time::Instant::now());
                let keep = i64::try_from(self.config.retention_hours)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(3_600_000_000);
                let before = anumate_store::now_micros().saturating_sub(keep);
                if let Err(e) = self.purge_settled_before(before).await {
                    tracing::warn!(error = %e, "approvals notifier: purging old deliveries failed; retried later");
                }
            }
            let busy = match self.deliver_due().await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "approvals notifier: a pass failed; retried");
                    false
                }
            };
            if !busy {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(idle) => {}
                }
            } else if cancel.is_cancelled() {
                return;
            }
        }
    }

    /// Deletes deliveries that were delivered or given up before `before`
    /// (Unix microseconds). Returns how many.
    pub async fn purge_settled_before(&self, before: i64) -> Result<u64, Error> {
        let tx = self.store.system_write().await?;
        let n = tx
            .execute(
                "DELETE FROM approval_notifications \
                 WHERE delivered_at < $1 OR failed_at < $1",
                vec![before.into()],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Sends every delivery due now once. Returns how many were attempted.
    pub async fn deliver_due(&self) -> Result<usize, Error> {
        let due = self.claim().await?;
        for d in &due {
            let outcome = self.send(d).await;
            self.record(d, outcome).await?;
        }
        Ok(due.len())
    }

    /// Due rows, leased: their next attempt is pushed past the send's
    /// timeout so no other pass (or replica) takes them meanwhile.
    async fn claim(&self) -> Result<Vec<Claimed>, Error> {
        let now = anumate_store::now_micros();
        let lease = i64::try_from(self.config.timeout_ms)
            .unwrap_or(i64::MAX / 2_000)
            .saturating_mul(2_000)
            .saturating_add(1_000_000);
        let lock = match self.store.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let tx = self.store.system_write().await?;
        let rows = tx
            .query_all(
                &format!(
                    "SELECT delivery_id, tenant_id, approval_id, webhook, payload, attempts \
                     FROM approval_notifications \
                     WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= $1 \
                     ORDER BY next_attempt_at LIMIT $2{lock}"
                ),
                vec![now.into(), BATCH.into()],
            )
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let get =
                |e: anumate_store::DbErr| Error::internal(format!("approval_notifications: {e}"));
            let c = Claimed {
                delivery_id: row.try_get("", "delivery_id").map_err(get)?,
                tenant: row.try_get("", "tenant_id").map_err(get)?,
                approval_id: row.try_get("", "approval_id").map_err(get)?,
                webhook: row.try_get("", "webhook").map_err(get)?,
                payload: row.try_get("", "payload").map_err(get)?,
                attempts: row.try_get("", "attempts").map_err(get)?,
            };
            tx.execute(
                "UPDATE approval_notifications SET next_attempt_at = $2 WHERE delivery_id = $1",
                vec![
                    c.delivery_id.as_str().into(),
                    now.saturating_add(lease).into(),
                ],
            )
            .await?;
            claimed.push(c);
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// One attempt: the POST and what came of it.
    async fn send(&self, d: &Claimed) -> Outcome {
        let Some(url) = self
            .config
            .webhooks
            .iter()
            .find(|u| fingerprint(u) == d.webhook)
        else {
            return Outcome::GiveUp {
                status: 0,
                error: "webhook is no longer configured".into(),
            };
        };
        let mut request = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-anumate-delivery", &d.delivery_id)
            .body(d.payload.clone());
        if !self.config.secret_header.is_empty() {
            request = request.header(&self.config.secret_header, &self.config.secret);
        }
        match request.send().await {
            Ok(resp) if resp.status().is_success() => Outcome::Delivered {
                status: i32::from(resp.status().as_u16()),
            },
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                let error = format!("HTTP {status}: {}", clip(body.trim(), 200));
                let code = i32::from(status.as_u16());
                if status.is_client_error()
                    && status != reqwest::StatusCode::REQUEST_TIMEOUT
                    && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                {
                    Outcome::GiveUp {
                        status: code,
                        error,
                    }
                } else {
                    Outcome::Retry {
                        status: code,
                        error,
                    }
                }
            }
            Err(e) => Outcome::Retry {
                status: 0,
                // Without the URL: it may carry a credential.
                error: clip(&e.without_url().to_string(), 200),
            },
        }
    }

    /// Records the attempt: delivered, retried after the backoff, or given up.
    async fn record(&self, d: &Claimed, outcome: Outcome) -> Result<(), Error> {
        let now = anumate_store::now_micros();
        let attempts = d.attempts.saturating_add(1);
        let done = u32::try_from(attempts).unwrap_or(u32::MAX) >= self.config.max_attempts;
        let tx = self.store.system_write().await?;
        match &outcome {
            Outcome::Delivered { status } => {
                tx.execute(
                    "UPDATE approval_notifications SET attempts = $2, last_status = $3, \
                       last_error = NULL, next_attempt_at = NULL, delivered_at = $4 \
                     WHERE delivery_id = $1",
                    vec![
                        d.delivery_id.as_str().into(),
                        attempts.into(),
                        (*status).into(),
                        now.into(),
                    ],
                )
                .await?;
                tracing::debug!(tenant = %d.tenant, approval = %d.approval_id, attempts, "approval notification delivered");
            }
            Outcome::Retry { status, error } if !done => {
                let wait = self
                    .config
                    .backoff(u32::try_from(attempts).unwrap_or(u32::MAX));
                let next = now.saturating_add(i64::try_from(wait.as_micros()).unwrap_or(i64::MAX));
                tx.execute(
                    "UPDATE approval_notifications SET attempts = $2, last_status = $3, \
                       last_error = $4, next_attempt_at = $5 WHERE delivery_id = $1",
                    vec![
                        d.delivery_id.as_str().into(),
                        attempts.into(),
                        (*status).into(),
                        error.as_str().into(),
                        next.into(),
                    ],
                )
                .await?;
                tracing::info!(tenant = %d.tenant, approval = %d.approval_id, attempts, status, error = %error, retry_in_ms = wait.as_millis() as u64, "approval notification failed; retrying");
            }
            Outcome::Retry { status, error } | Outcome::GiveUp { status, error } => {
                tx.execute(
                    "UPDATE approval_notifications SET attempts = $2, last_status = $3, \
                       last_error = $4, next_attempt_at = NULL, failed_at = $5 \
                     WHERE delivery_id = $1",
                    vec![
                        d.delivery_id.as_str().into(),
                        attempts.into(),
                        (*status).into(),
                        error.as_str().into(),
                        now.into(),
                    ],
                )
                .await?;
                tracing::warn!(tenant = %d.tenant, approval = %d.approval_id, attempts, status, error = %error, "approval notification given up");
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// A leased delivery.
struct Claimed {
    delivery_id: String,
    tenant: String,
    approval_id: String,
    webhook: String,
    payload: String,
    attempts: i32,
}

/// What one attempt came to.
enum Outcome {
    Delivered { status: i32 },
    Retry { status: i32, error: String },
    GiveUp { status: i32, error: String },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use anumate_errors::ErrorCode;

    fn approval() -> pb::Approval {
        pb::Approval {
            approval_id: "018f-a".into(),
            state: pb::ApprovalState::Pending as i32,
            run_id: "run-1".into(),
            step_id: "refund".into(),
            tool: "payments.refund".into(),
            destructive: true,
            requester: "user:oscar".into(),
            reason: "refunds <above> 1000 & more".into(),
            capsule: "refund-small-orders".into(),
            capsule_version: 3,
            stages: vec![pb::ApprovalStage {
                name: "stage-1".into(),
                approvers: vec!["user:alice".into(), "group:controllers".into()],
                quorum: 2,
                ..Default::default()
            }],
            expire_time: Some(pbjson_types::Timestamp {
                seconds: 1_796_000_000,
                nanos: 0,
            }),
            args_preview: Some(
                serde_json::from_value(json!({"amount": 1200, "email": "[REDACTED:email]"}))
                    .unwrap(),
            ),
            risk_level: anumate_proto::ghostrun::v1::RiskLevel::High as i32,
            risk_score: 62,
            ..Default::default()
        }
    }

    #[test]
    fn payload_is_slack_blocks_with_the_link_and_summary() {
        let config = NotifyConfig {
            approval_url: "https://console.example/t/{tenant}/approvals/{id}".into(),
            ..Default::default()
        };
        let p = payload("acme", &config, &approval(), Kind::Requested);
        let text = p["text"].as_str().unwrap();
        assert!(
            text.starts_with(
                "Approval needed: refund-small-orders v3 calls payments.refund (destructive) in run run-1 (step refund); 0 of 2 from user:alice, group:controllers; expires 2026-"
            ),
            "{text}"
        );
        assert!(text.ends_with("https://console.example/t/acme/approvals/018f-a"));
        let blocks = p["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(
            blocks[0]["text"]["text"],
            "Approval needed: payments.refund"
        );
        let summary = blocks[1]["text"]["text"].as_str().unwrap();
        assert!(
            summary.contains("refunds &lt;above&gt; 1000 &amp; more"),
            "user text is escaped: {summary}"
        );
        let fields: Vec<&str> = blocks[1]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["text"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&"*Approvers*\n0 of 2 from user:alice, group:controllers"));
        assert!(fields.contains(&"*Risk*\nhigh (62)"));
        assert!(fields.contains(&"*Requested by*\nuser:oscar"));
        assert!(
            blocks[2]["text"]["text"]
                .as_str()
                .unwrap()
                .contains("[REDACTED:email]")
        );
        assert_eq!(blocks[3]["type"], "actions");
        assert_eq!(
            blocks[3]["elements"][0]["url"],
            "https://console.example/t/acme/approvals/018f-a"
        );
        assert_eq!(p["anumate"]["kind"], "requested");
        assert_eq!(p["anumate"]["quorum"], 2);

        // Without a console URL: the REST path, and no button.
        let p = payload(
            "acme",
            &NotifyConfig::default(),
            &approval(),
            Kind::Reminder,
        );
        assert!(
            p["text"]
                .as_str()
                .unwrap()
                .starts_with("Reminder: approval needed")
        );
        assert_eq!(p["anumate"]["link"], "/v1/approvals/018f-a");
        assert!(
            p["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["type"] != "actions")
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = NotifyConfig {
            backoff_ms: 100,
            max_backoff_ms: 1_000,
            ..Default::default()
        };
        let waits: Vec<u128> = (1..=6).map(|n| c.backoff(n).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(c.backoff(u32::MAX).as_millis(), 1_000);
    }

    #[test]
    fn configuration_is_checked_and_secrets_stay_out_of_debug() {
        let ok = NotifyConfig {
            webhooks: vec!["https://hooks.slack.com/services/T/B/SECRET".into()],
            secret_header: "x-anumate-webhook-secret".into(),
            secret: "s3cret".into(),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let shown = format!("{ok:?}");
        assert!(
            !shown.contains("SECRET") && !shown.contains("s3cret"),
            "{shown}"
        );
        let cases = [
            (
                NotifyConfig {
                    webhooks: vec!["ftp://x".into()],
                    ..Default::default()
                },
                "approvals.notify.webhooks",
            ),
            (
                NotifyConfig {
                    webhooks: vec!["not a url".into()],
                    ..Default::default()
                },
                "approvals.notify.webhooks",
            ),
            (
                NotifyConfig {
                    secret: "x".into(),
                    ..Default::default()
                },
                "approvals.notify.secret",
            ),
            (
                NotifyConfig {
                    secret_header: "bad header".into(),
                    secret: "x".into(),
                    ..Default::default()
                },
                "approvals.notify.secret_header",
            ),
            (
                NotifyConfig {
                    max_attempts: 0,
                    ..Default::default()
                },
                "approvals.notify.max_attempts",
            ),
        ];
        for (config, field) in cases {
            let e = config.validate().unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert_eq!(e.violations[0].field, field, "{e:?}");
        }
    }
}
