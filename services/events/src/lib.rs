//! The events service (SPEC §10): the per-tenant event history behind
//! `anumate events tail`, paged history, and replay of archived outbox events
//! to Kafka.
//!
//! [`Events`] holds the domain logic and knows nothing of gRPC; [`grpc`]
//! adapts it to the generated `EventsService` trait.
//!
//! ## Where the history comes from
//! - **Kafka configured:** [`kafka::spawn_history_consumer`] reads every
//!   Anumate topic in the consumer group `anumate-event-history` through
//!   [`anumate_events::consumer`] (dedupe by CloudEvent id, retries, DLQ) and
//!   records each CloudEvent.
//! - **Embedded (no Kafka):** [`Events::spawn_outbox_feed`] copies committed
//!   outbox rows of the same database into the history.
//!
//! ## Tenancy
//! Every read is of the caller's tenant, taken from the verified token: a
//! request has no field naming a tenant, and no role reads another's events.
//!
//! ## Live tails
//! Each tail reads the history after the last sequence it sent. It wakes when
//! this process records events (an in-process watch channel) and, as a
//! fallback for events recorded by another replica (mesh mode), every
//! `tail_poll_ms`. A process serves at most `max_tails` tails, and one tenant
//! at most `max_tails_per_tenant` of them, so one tenant cannot take every
//! slot (`RESOURCE_EXHAUSTED`, reason `RATE_LIMITED`, beyond). A tail whose
//! client stops reading holds its slot for at most `tail_idle_timeout_secs`,
//! then ends with `UNAVAILABLE` (reason `STREAM_IDLE`: reconnect and resume).
#![forbid(unsafe_code)]

mod feed;
pub mod grpc;
pub mod history;
pub mod kafka;
mod module;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anumate_errors::{Error, ErrorCode, Reason, Result};
use anumate_proto::events::v1 as pb;
use anumate_store::{Migration, Store};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

pub use grpc::EventsGrpc;
pub use history::{NewEvent, Recorded};
pub use module::module;

/// `content-type` of protobuf event data.
pub const PROTOBUF: &str = anumate_events::cloudevents::PROTOBUF;

/// Every migration the events service needs: the outbox's, the consumer's
/// dedupe table and the history.
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(REPO_MIGRATIONS)
}

/// The events service's own migrations: the consumer's dedupe table and the
/// history (the binary adds the outbox's once for every service).
pub const REPO_MIGRATIONS: &[Migration] = &[
    anumate_events::consumer::MIGRATIONS[0],
    history::MIGRATIONS[0],
];

/// `[events]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsServiceConfig {
    /// Milliseconds between history polls of an idle tail (picks up events
    /// recorded by other replicas).
    pub tail_poll_ms: u64,
    /// Milliseconds between passes of the embedded outbox feeder.
    pub feed_poll_ms: u64,
    /// Most events one `ReplayEvents` call republishes.
    pub max_replay: i64,
    /// Consumer group of the Kafka-fed history.
    pub history_group: String,
    /// Most concurrent tails per process.
    pub max_tails: usize,
    /// Most concurrent tails of one tenant per process (at least 1).
    pub max_tails_per_tenant: usize,
    /// Seconds a tail waits for a client that stopped reading before it is
    /// ended and its slot freed. 0: wait for ever.
    pub tail_idle_timeout_secs: u64,
    /// Hours of history kept per tenant (by event time); older events are
    /// purged as new ones are recorded, at most once a minute per tenant.
    /// 0 keeps everything.
    pub history_retention_hours: u64,
    /// Hours the Kafka history consumer remembers a consumed event id (its
    /// dedupe table, `consumed_events`); older entries are purged every few
    /// minutes. A redelivery older than this is still recorded once: the
    /// history itself is unique per event id. 0 keeps everything.
    pub consumed_retention_hours: u64,
}

impl Default for EventsServiceConfig {
    fn default() -> Self {
        EventsServiceConfig {
            tail_poll_ms: 1000,
            feed_poll_ms: 25,
            max_replay: 10_000,
            history_group: "anumate-event-history".into(),
            max_tails: 256,
            max_tails_per_tenant: 16,
            tail_idle_timeout_secs: 60,
            history_retention_hours: 168,
            consumed_retention_hours: 168,
        }
    }
}

/// Who is reading: from the verified token. Its tenant is the only tenant
/// the service reads for it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Tenant id.
    pub tenant: String,
    /// Principal subject.
    pub subject: String,
}

/// Where a tail's history part starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailStart {
    /// No history: live events only.
    Live,
    /// Events committed at or after this time (Unix microseconds).
    Since(i64),
    /// Events after this history sequence.
    After(i64),
}

/// The events service.
#[derive(Clone)]
pub struct Events {
    store: Store,
    cfg: EventsServiceConfig,
    recorded: Arc<watch::Sender<u64>>,
    tails: Arc<tokio::sync::Semaphore>,
    /// Open tails per tenant.
    tenant_tails: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    replayer: Option<Arc<kafka::Replayer>>,
    /// When each tenant's history was last purged (Unix microseconds).
    purged: Arc<std::sync::Mutex<HashMap<String, i64>>>,
}

/// Least time between two retention purges of one tenant's history.
const PURGE_EVERY_MICROS: i64 = 60_000_000;

/// Event message descriptors by CloudEvents type.
static SCHEMAS: LazyLock<HashMap<String, MessageDescriptor>> = LazyLock::new(|| {
    let Ok(pool) = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET) else {
        return HashMap::new();
    };
    anumate_events::all_event_types()
        .filter_map(|(name, ty)| {
            pool.get_message_by_name(name)
                .map(|m| (ty.cloudevent_type.clone(), m))
        })
        .collect()
});

const MAX_TYPES: usize = 32;
const MAX_TEXT: usize = 256;

fn check_text(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_TEXT {
        return Err(Error::invalid_argument(
            field,
            format!("at most {MAX_TEXT} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid_argument(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Microseconds to a protobuf timestamp.
pub use anumate_proto::timestamp_from_micros as timestamp;

/// A protobuf timestamp to microseconds (checked: `field` names it in errors).
pub fn micros(field: &str, t: &pbjson_types::Timestamp) -> Result<i64> {
    anumate_proto::micros_from_timestamp(t)
        .map_err(|e| Error::invalid_argument(field, e.to_string()))
}

impl Events {
    /// A service over `store`. `replayer` publishes replays (none without Kafka).
    pub fn new(
        store: Store,
        cfg: &EventsServiceConfig,
        replayer: Option<Arc<kafka::Replayer>>,
    ) -> Events {
        let (recorded, _) = watch::channel(0);
        Events {
            store,
            cfg: cfg.clone(),
            recorded: Arc::new(recorded),
            tails: Arc::new(tokio::sync::Semaphore::new(cfg.max_tails.max(1))),
            tenant_tails: Arc::default(),
            replayer,
            purged: Arc::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Records events in the history and wakes the tails; returns how many
    /// were new.
    pub async fn record(&self, events: &[NewEvent]) -> Result<usize> {
        Ok(self.record_at(events, None).await?)
    }

    /// [`Events::record`], saving a feeder's position in the same transaction.
    pub(crate) async fn record_at(
        &self,
        events: &[NewEvent],
        cursor: Option<(&str, i64)>,
    ) -> std::result::Result<usize, anumate_store::StoreError> {
        let purge = self.purge_cutoffs(events);
        let new = history::record(&self.store, events, cursor, &purge).await?;
        if new > 0 {
            self.recorded.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(new)
    }

    /// Retention cutoffs (Unix microseconds) for the tenants in `events`
    /// whose history is due a purge.
    fn purge_cutoffs(&self, events: &[NewEvent]) -> HashMap<String, i64> {
        let mut due = HashMap::new();
        if self.cfg.history_retention_hours == 0 {
            return due;
        }
        let now = anumate_store::now_micros();
        let keep = i64::try_from(self.cfg.history_retention_hours)
            .unwrap_or(i64::MAX / 3_600_000_000)
            .saturating_mul(3_600_000_000);
        let mut purged = match self.purged.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for e in events {
            let last = purged.entry(e.tenant_id.clone()).or_insert(i64::MIN);
            if now.saturating_sub(*last) >= PURGE_EVERY_MICROS {
                *last = now;
                due.insert(e.tenant_id.clone(), now.saturating_sub(keep));
            }
        }
        due
    }

    /// Starts the embedded feeder (outbox → history) on this runtime.
    pub fn spawn_outbox_feed(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(feed::run(
            self.clone(),
            Duration::from_millis(self.cfg.feed_poll_ms.max(1)),
        ))
    }

    /// Takes a tail slot of `tenant`: one of the server's `max_tails` and of
    /// the tenant's `max_tails_per_tenant`.
    fn tail_slot(&self, tenant: &str) -> Result<TailSlot> {
        let quota = self.cfg.max_tails_per_tenant.max(1);
        let mut open = lock(&self.tenant_tails);
        let n = open.get(tenant).copied().unwrap_or(0);
        if n >= quota {
            tracing::warn!(
                tenant,
                open = n,
                quota,
                "tail refused: tenant quota reached"
            );
            return Err(Error::because(
                Reason::RateLimited,
                format!(
                    "too many open tails for this tenant ({n}; at most {quota} per tenant per server): close one and retry"
                ),
            )
            .with_metadata("limit", "max_tails_per_tenant"));
        }
        let permit = self.tails.clone().try_acquire_owned().map_err(|_| {
            Error::because(
                Reason::RateLimited,
                format!(
                    "too many open tails (at most {} per server)",
                    self.cfg.max_tails
                ),
            )
            .with_metadata("limit", "max_tails")
        })?;
        open.insert(tenant.to_string(), n + 1);
        Ok(TailSlot {
            _permit: permit,
            tenant: tenant.to_string(),
            open: self.tenant_tails.clone(),
        })
    }

    /// Validates a filter into a query (without position or times). A key
    /// without `/` names an aggregate of the caller's tenant (`refund` →
    /// `acme/refund`), as events are keyed `tenant/aggregate`.
    fn query_of(tenant: &str, filter: &pb::EventFilter) -> Result<history::Query> {
        if filter.types.len() > MAX_TYPES {
            return Err(Error::invalid_argument(
                "filter.types",
                format!("at most {MAX_TYPES} types"),
            ));
        }
        let mut q = history::Query::default();
        for (i, t) in filter.types.iter().enumerate() {
            let field = format!("filter.types[{i}]");
            let (body, prefix) = match t.strip_suffix('*') {
                Some(p) => (p, true),
                None => (t.as_str(), false),
            };
            if body.is_empty() && !prefix {
                return Err(Error::invalid_argument(&field, "empty type"));
            }
            if body.len() > MAX_TEXT
                || !body
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(Error::invalid_argument(
                    &field,
                    format!(
                        "{t:?} is not a CloudEvents type (letters, digits, '.', '_', '-'; a trailing '*' matches a prefix)"
                    ),
                ));
            }
            if prefix {
                q.type_prefixes.push(body.to_string());
            } else {
                q.types.push(body.to_string());
            }
        }
        check_text("filter.key", &filter.key)?;
        check_text("filter.topic", &filter.topic)?;
        q.key = match filter.key.as_str() {
            "" => None,
            key if key.contains('/') => Some(key.to_string()),
            aggregate => Some(format!("{tenant}/{aggregate}")),
        };
        q.topic = (!filter.topic.is_empty()).then(|| filter.topic.clone());
        Ok(q)
    }

    /// One page of history.
    pub async fn list(
        &self,
        caller: &Caller,
        req: &pb::ListEventsRequest,
    ) -> Result<(Vec<pb::CloudEvent>, String)> {
        let filter = req.filter.clone().unwrap_or_default();
        let tenant = caller.tenant.clone();
        let mut q = Self::query_of(&tenant, &filter)?;
        q.since = req.since.as_ref().map(|t| micros("since", t)).transpose()?;
        q.until = req.until.as_ref().map(|t| micros("until", t)).transpose()?;
        let (size, token) = anumate_store::paging::page_params(req.page_size, &req.page_token)?;
        if let Some(token) = token {
            q.after = token
                .parse()
                .map_err(|_| anumate_store::paging::malformed_token())?;
        }
        let tx = self.store.read(&tenant).await?;
        let rows = history::query(&tx, &q, size + 1).await?;
        drop(tx);
        let (rows, next) = anumate_store::paging::finish_page(rows, size, |r| r.seq.to_string());
        Ok((rows.iter().map(to_proto).collect(), next))
    }

    /// Starts a tail: history from `start`, a `caught_up` marker, then live
    /// events, until the receiver is dropped.
    pub async fn tail(
        &self,
        caller: &Caller,
        filter: &pb::EventFilter,
        start: TailStart,
    ) -> Result<mpsc::Receiver<Result<pb::TailEventsResponse>>> {
        let tenant = caller.tenant.clone();
        let mut q = Self::query_of(&tenant, filter)?;
        let slot = self.tail_slot(&tenant)?;
        match start {
            TailStart::Live => {
                let tx = self.store.read(&tenant).await?;
                q.after = history::last_seq(&tx).await?;
            }
            TailStart::Since(t) => q.since = Some(t),
            TailStart::After(n) => q.after = n.max(0),
        }
        let (out, rx) = mpsc::channel(64);
        let me = self.clone();
        let mut wake = self.recorded.subscribe();
        let idle = match self.cfg.tail_idle_timeout_secs {
            0 => None,
            s => Some(Duration::from_secs(s)),
        };
        tokio::spawn(async move {
            let _slot = slot;
            let poll = Duration::from_millis(me.cfg.tail_poll_ms.max(10));
            let mut caught_up = false;
            loop {
                // Drain everything after the position, a batch at a time.
                loop {
                    wake.mark_unchanged();
                    let rows = match me.store.read(&tenant).await {
                        Ok(tx) => history::query(&tx, &q, 200).await,
                        Err(e) => Err(e.into()),
                    };
                    let rows = match rows {
                        Ok(rows) => rows,
                        Err(e) => {
                            let _ = out.send(Err(e)).await;
                            return;
                        }
                    };
                    let full = rows.len() == 200;
                    for r in &rows {
                        q.after = r.seq;
                        let msg = pb::TailEventsResponse {
                            event: Some(to_proto(r)),
                            caught_up: false,
                        };
                        if !send(&out, msg, idle, &tenant).await {
                            return;
                        }
                    }
                    if !full {
                        break;
                    }
                }
                if !caught_up {
                    caught_up = true;
                    let marker = pb::TailEventsResponse {
                        event: None,
                        caught_up: true,
                    };
                    if !send(&out, marker, idle, &tenant).await {
                        return;
                    }
                }
                tokio::select! {
                    _ = out.closed() => return,
                    _ = wake.changed() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        });
        Ok(rx)
    }

    /// Republishes archived outbox events of the caller's tenant.
    pub async fn replay(
        &self,
        caller: &Caller,
        req: &pb::ReplayEventsRequest,
    ) -> Result<pb::ReplayEventsResponse> {
        if req.topic.is_empty() {
            return Err(Error::invalid_argument(
                "topic",
                "required, e.g. anumate.capsules",
            ));
        }
        check_text("topic", &req.topic)?;
        if !anumate_events::all_event_types().any(|(_, t)| t.topic == req.topic) {
            return Err(Error::invalid_argument(
                "topic",
                format!("{:?} is not an Anumate event topic", req.topic),
            ));
        }
        let origin = match &req.origin {
            None => {
                return Err(Error::invalid_argument(
                    "from_time",
                    "required: from_time or from_sequence",
                ));
            }
            Some(pb::replay_events_request::Origin::FromTime(t)) => {
                kafka::ReplayFrom::Time(micros("from_time", t)?)
            }
            Some(pb::replay_events_request::Origin::FromSequence(s)) if *s < 0 => {
                return Err(Error::invalid_argument(
                    "from_sequence",
                    "must not be negative",
                ));
            }
            Some(pb::replay_events_request::Origin::FromSequence(s)) => {
                kafka::ReplayFrom::Sequence(*s)
            }
        };
        if req.limit < 0 {
            return Err(Error::invalid_argument("limit", "must not be negative"));
        }
        let limit = match req.limit {
            0 => self.cfg.max_replay,
            n => i64::from(n).min(self.cfg.max_replay),
        };
        let Some(replayer) = &self.replayer else {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "replay needs a Kafka broker: none is configured (set [kafka] bootstrap_servers or --kafka)",
            ));
        };
        replayer
            .replay(&self.store, &caller.tenant, &req.topic, origin, limit)
            .await
    }
}

/// The guard of a poisoned mutex too: the maps it guards stay consistent
/// (each update is one insert or remove).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A tail's place in the server-wide and the per-tenant limits; freed when
/// the tail's task ends.
struct TailSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    tenant: String,
    open: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

impl Drop for TailSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(n) = open.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

/// Sends one tail message; false when the tail must end: the client went
/// away, or it has not made room for `idle` (it stopped reading). Messages
/// are queued only with two free places, so one is always left for the
/// final `STREAM_IDLE` error a client that resumes reading will see.
async fn send(
    out: &mpsc::Sender<Result<pb::TailEventsResponse>>,
    msg: pb::TailEventsResponse,
    idle: Option<Duration>,
    tenant: &str,
) -> bool {
    let reserve = out.reserve_many(2);
    let permits = match idle {
        None => reserve.await,
        Some(d) => match tokio::time::timeout(d, reserve).await {
            Ok(r) => r,
            Err(_) => {
                tracing::info!(
                    tenant,
                    idle_secs = d.as_secs(),
                    "tail ended: the client stopped reading"
                );
                let _ = out.try_send(Err(Error::because(
                    Reason::StreamIdle,
                    format!(
                        "tail ended: the client read nothing for {} s; resume with after_sequence",
                        d.as_secs()
                    ),
                )));
                return false;
            }
        },
    };
    match permits {
        Ok(mut permits) => {
            if let Some(p) = permits.next() {
                p.send(Ok(msg));
            }
            true
        }
        Err(_) => false,
    }
}

/// A recorded event as the API shows it.
pub fn to_proto(r: &Recorded) -> pb::CloudEvent {
    let e = &r.event;
    let schema = SCHEMAS.get(&e.event_type);
    let data_json = match schema {
        Some(desc) if e.content_type == PROTOBUF => {
            DynamicMessage::decode(desc.clone(), e.payload.as_slice())
                .ok()
                .and_then(|m| serde_json::to_string(&m).ok())
                .unwrap_or_default()
        }
        _ if e.content_type.starts_with("application/json") => {
            String::from_utf8(e.payload.clone()).unwrap_or_default()
        }
        _ => String::new(),
    };
    pb::CloudEvent {
        sequence: r.seq,
        id: e.event_id.clone(),
        source: e.source.clone(),
        r#type: e.event_type.clone(),
        subject: e.subject.clone(),
        time: Some(timestamp(e.time_micros)),
        tenant_id: e.tenant_id.clone(),
        topic: e.topic.clone(),
        key: e.key.clone(),
        plan_hash: e.plan_hash.clone().unwrap_or_default(),
        traceparent: e.traceparent.clone().unwrap_or_default(),
        data_schema: schema
            .map(|d| d.full_name().to_string())
            .unwrap_or_default(),
        data: e.payload.clone(),
        data_json,
        outbox_sequence: e.outbox_seq.unwrap_or(0),
        replay: e.replay,
    }
}
