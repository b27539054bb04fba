//! The approvals service (SPEC §7): human decisions that gate one planned
//! call, with quorum, ordered stages, delegation, expiry and escalation.
//!
//! - [`rules`] holds the decision rules as plain functions over the domain
//!   [`rules::Approval`], unit-tested directly.
//! - [`Approvals`] stores approvals (one row each, the tenant's own under
//!   row-level security), receipts every decision through the receipts
//!   service (in the decision's own transaction when the log shares the
//!   store) and appends its event to the outbox in the same transaction as
//!   the change (concurrent decisions of a tenant share one commit), runs
//!   the durable timers (expiry, escalation, reminders) and nudges
//!   in-process waiters ([`Approvals::wait`]) after each commit.
//! - [`grpc`] adapts it to `ApprovalsService` and `ApprovalsInternal`.
#![forbid(unsafe_code)]

mod commit;
mod convert;
pub mod grpc;
mod metrics;
mod module;
pub mod notify;
pub mod receipting;
mod repo;
pub mod rules;
mod service;
mod timers;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use anumate_proto::approvals::v1 as pb;
use anumate_service::clients::ReceiptsClient;
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use grpc::ApprovalsGrpc;
pub use module::module;
pub use receipting::RECEIPTS_SERVICE_NAME;
pub use repo::MIGRATIONS as REPO_MIGRATIONS;
pub use service::{Caller, Outcome};

/// Topic of the approval events.
pub const TOPIC: &str = "anumate.approvals";

/// The approvals tables and the notifier's (the outbox's are applied once
/// for all services).
pub fn own_migrations() -> Vec<Migration> {
    repo::MIGRATIONS
        .iter()
        .chain(notify::MIGRATIONS)
        .copied()
        .collect()
}

/// Every migration the service needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(&own_migrations())
}

/// `[approvals]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// How long a stage stays open when the request names no expiry, in
    /// seconds.
    pub default_expiry_secs: u64,
    /// How long before a stage's expiry the reminder goes out when the
    /// request names no lead time, in seconds.
    pub remind_before_secs: u64,
    /// How often the timer worker looks for due timers, in milliseconds.
    pub timer_interval_ms: u64,
    /// How often a `WatchApprovals` stream looks for changes committed by
    /// other replicas, in milliseconds (this replica's wake it at once).
    pub watch_poll_ms: u64,
    /// Concurrent `WatchApprovals` streams per process.
    pub max_watches: usize,
    /// Of those, per tenant (`RESOURCE_EXHAUSTED`, `RATE_LIMITED` beyond), so
    /// one tenant cannot take every stream.
    pub max_watches_per_tenant: usize,
    /// The receipts service, when it does not run in this process (e.g.
    /// `http://receipts:7600`). Empty: the in-process one, if any.
    pub receipts_url: String,
    /// `[approvals.notify]`: webhooks told of new requests, later stages,
    /// escalations and reminders.
    pub notify: notify::NotifyConfig,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            default_expiry_secs: 24 * 3600,
            remind_before_secs: 4 * 3600,
            timer_interval_ms: 1000,
            watch_poll_ms: 1000,
            max_watches: 256,
            max_watches_per_tenant: 16,
            receipts_url: String::new(),
            notify: notify::NotifyConfig::default(),
        }
    }
}

/// Where the service reads the time: the system clock, or a test's.
pub trait Clock: Send + Sync + 'static {
    /// Unix microseconds now.
    fn now_micros(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        anumate_store::now_micros()
    }
}

/// A committed change of one approval, as broadcast to in-process waiters.
#[derive(Debug, Clone)]
pub struct Change {
    /// Tenant.
    pub tenant: String,
    /// Approval id.
    pub approval_id: String,
    /// Its state after the change.
    pub state: pb::ApprovalState,
}

/// The service.
#[derive(Clone)]
pub struct Approvals {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    cfg: ApprovalsConfig,
    clock: Arc<dyn Clock>,
    receipts: Option<Arc<dyn ReceiptsClient>>,
    changes: broadcast::Sender<Change>,
    /// Open watch streams: in total and per tenant.
    watches: Arc<watch::Open>,
    /// Masks PII in free text (comments, reasons) before it is stored,
    /// receipted or evented.
    redactor: Arc<anumate_redaction::Redactor>,
    /// Per-tenant queues of decisions to group-commit.
    lanes: Arc<commit::Lanes>,
}

impl Approvals {
    /// The service over `store` with the system clock and no receipts.
    pub fn new(store: Store, cfg: ApprovalsConfig) -> Approvals {
        let (changes, _) = broadcast::channel(1024);
        Approvals {
            inner: Arc::new(Inner {
                store,
                cfg,
                clock: Arc::new(SystemClock),
                receipts: None,
                changes,
                watches: Arc::default(),
                redactor: Arc::default(),
                lanes: Arc::default(),
            }),
        }
    }

    fn rebuild(self, f: impl FnOnce(&mut Inner)) -> Approvals {
        let mut inner = Inner {
            store: self.inner.store.clone(),
            cfg: self.inner.cfg.clone(),
            clock: self.inner.clock.clone(),
            receipts: self.inner.receipts.clone(),
            changes: self.inner.changes.clone(),
            watches: self.inner.watches.clone(),
            redactor: self.inner.redactor.clone(),
            lanes: self.inner.lanes.clone(),
        };
        f(&mut inner);
        Approvals {
            inner: Arc::new(inner),
        }
    }

    /// Receipts every decision through `receipts` (see [`receipting`]).
    #[must_use]
    pub fn with_receipts(self, receipts: Arc<dyn ReceiptsClient>) -> Approvals {
        self.rebuild(|i| i.receipts = Some(receipts))
    }

    /// Reads the time from `clock` (tests).
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Approvals {
        self.rebuild(|i| i.clock = clock)
    }

    /// Every committed change of this process, as it commits.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// `text` with the PII detectors' matches masked.
    fn redact(&self, text: &str) -> String {
        self.inner.redactor.redact_str(text).into_owned()
    }

    fn now(&self) -> i64 {
        self.inner.clock.now_micros()
    }

    fn timer_interval(&self) -> Duration {
        Duration::from_millis(self.inner.cfg.timer_interval_ms.max(10))
    }

    fn watch_poll(&self) -> Duration {
        Duration::from_millis(self.inner.cfg.watch_poll_ms.max(10))
    }
}
