//! Versioned documents: the one lifecycle of capsules (the registry) and
//! policies (the policy service).
//!
//! A kind of document implements [`VersionedKind`]: where it is stored (an
//! [`anumate_store::versioned::Schema`]), how its rows map to its messages,
//! how a version message is built from a validated document, and which event
//! messages record its changes. [`Documents`] runs the lifecycle over any
//! kind: push (content already stored is not stored again), get by
//! [`VersionSelector`], list, list versions, publish or deprecate
//! ([`Transition`]) and soft delete. Every change bumps the document's etag
//! and appends its events to the outbox in the same transaction.
//!
//! Parsing and validating a document stay with its service, which hands the
//! result to [`Documents::push`] as a [`Draft`].
//!
//! Version numbers are `int32` on the wire (and `i32` here) while the tables
//! keep `BIGINT`: a push that would create version 2^31 is refused, so every
//! stored number converts back ([`wire_version`]).
//!
//! This is a crate of its own rather than a module of `anumate-store`: the
//! lifecycle appends events ([`anumate_events::append`]), and `anumate-events`
//! builds on the store. The SQL stays in [`anumate_store::versioned`].
#![forbid(unsafe_code)]

mod cache;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anumate_errors::{Error, ErrorCode, Reason, Result};
use anumate_store::versioned::{DocumentRow, Schema, Status};
use anumate_store::{DbErr, QueryResult, Store, TenantTx, Value, paging};
use sea_orm::FromQueryResult;
use tokio_util::sync::CancellationToken;

use cache::Cache;
pub use cache::DEFAULT_CAPACITY_BYTES;

/// Who is acting: the tenant and principal from the verified token.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Tenant id.
    pub tenant: String,
    /// Principal subject.
    pub subject: String,
}

/// How a get picks a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSelector {
    /// The highest published version.
    Published,
    /// The highest version in any state.
    Latest,
    /// This exact version.
    Number(i32),
}

impl VersionSelector {
    /// Parses `""`/`"published"`, `"latest"` or a positive number.
    pub fn parse(s: &str) -> Result<VersionSelector> {
        match s {
            "" | "published" => Ok(VersionSelector::Published),
            "latest" => Ok(VersionSelector::Latest),
            n => match n.parse::<i32>() {
                Ok(v) if v > 0 => Ok(VersionSelector::Number(v)),
                _ => Err(Error::invalid_argument(
                    "version",
                    format!("{n:?} is not a version number, \"published\" or \"latest\""),
                )),
            },
        }
    }
}

/// A status change callers may ask of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Draft → published.
    Publish,
    /// Draft or published → deprecated.
    Deprecate,
}

impl Transition {
    /// The status it leads to.
    pub fn status(self) -> Status {
        match self {
            Transition::Publish => Status::Published,
            Transition::Deprecate => Status::Deprecated,
        }
    }
}

/// A validated document, as a push stores it.
#[derive(Debug, Clone, Copy)]
pub struct Draft<'a> {
    /// The document's name.
    pub name: &'a str,
    /// The source as pushed.
    pub source: &'a str,
    /// Canonical JSON of the parsed document.
    pub canonical_json: &'a str,
    /// Hash of `canonical_json`: a push of stored content creates no version.
    pub content_hash: &'a str,
    /// Description, copied to the document row.
    pub description: &'a str,
    /// Labels, copied to the document row (empty for kinds without labels).
    pub labels: &'a BTreeMap<String, String>,
}

/// What the lifecycle decides about a new version.
#[derive(Debug, Clone, Copy)]
pub struct NewVersion<'a> {
    /// Its number: one past the latest.
    pub number: i32,
    /// Draft, or published when the push asked for it.
    pub status: Status,
    /// Subject of the pushing principal.
    pub created_by: &'a str,
    /// Creation time (and publish time when published), Unix microseconds.
    pub now: i64,
}

/// The facts of a pushed, published or deprecated version, for its event.
#[derive(Debug, Clone, Copy)]
pub struct VersionEvent<'a> {
    /// Tenant that owns the document.
    pub tenant_id: &'a str,
    /// Document name.
    pub name: &'a str,
    /// Version number.
    pub version: i32,
    /// The version's content hash.
    pub content_hash: &'a str,
    /// Principal that made the change.
    pub actor: &'a str,
}

/// The facts of a deletion, for its event.
#[derive(Debug, Clone, Copy)]
pub struct DeletionEvent<'a> {
    /// Tenant that owned the document.
    pub tenant_id: &'a str,
    /// Document name.
    pub name: &'a str,
    /// Principal that deleted it.
    pub actor: &'a str,
}

/// A kind of versioned document: its storage, its messages and its events.
///
/// Its version table holds, besides the columns [`Schema`] requires,
/// `canonical_json`, `description` and `created_by`; the lifecycle writes
/// those and the kind writes the rest ([`VersionedKind::version_columns`]).
/// The lifecycle reads `version`, `status` and `content_hash` itself; the
/// kind maps the whole row to its message.
pub trait VersionedKind: Send + Sync + 'static {
    /// The document message (`Capsule`, `Policy`).
    type Document: prost::Message + Clone + Send + Sync;
    /// The version message (`CapsuleVersion`, `PolicyVersion`).
    type Version: prost::Message + Clone + Send + Sync;
    /// A version row as [`Schema::version_columns`] reads it.
    type Row: FromQueryResult + Into<Self::Version> + Send + Sync;
    /// Event: a version was pushed.
    type Pushed: prost::Message + prost::Name + anumate_events::EventKey;
    /// Event: a version was published.
    type Published: prost::Message + prost::Name + anumate_events::EventKey;
    /// Event: a version was deprecated.
    type Deprecated: prost::Message + prost::Name + anumate_events::EventKey;
    /// Event: the document was deleted.
    type Deleted: prost::Message + prost::Name + anumate_events::EventKey;

    /// Where documents of this kind are stored; its `kind` is their word in
    /// messages ("capsule").
    const SCHEMA: Schema;
    /// The collection in resource names and event subjects ("capsules").
    const COLLECTION: &'static str;
    /// Why a document of this name is not there (`CAPSULE_NOT_FOUND`).
    const NOT_FOUND: Reason;
    /// Why a version of a document is not there (`CAPSULE_VERSION_NOT_FOUND`).
    const VERSION_NOT_FOUND: Reason;

    /// Checks a document name from a request (`INVALID_ARGUMENT` naming
    /// `name`); DNS labels unless the kind names its documents otherwise.
    fn check_name(name: &str) -> Result<()> {
        anumate_errors::check_dns_label("name", name)
    }
    /// The document message of a row.
    fn document(row: &DocumentRow) -> Self::Document;
    /// The message of a new version of `draft`.
    fn new_version(&self, draft: &Draft<'_>, new: &NewVersion<'_>) -> Self::Version;
    /// The kind's own version columns and their values.
    fn version_columns(version: &Self::Version) -> Vec<(&'static str, Value)>;
    /// Records a status change at `now` (Unix microseconds) in the message.
    fn record_status(version: &mut Self::Version, status: Status, now: i64);
    /// The pushed event.
    fn pushed(e: &VersionEvent<'_>) -> Self::Pushed;
    /// The published event.
    fn published(e: &VersionEvent<'_>) -> Self::Published;
    /// The deprecated event.
    fn deprecated(e: &VersionEvent<'_>) -> Self::Deprecated;
    /// The deleted event.
    fn deleted(e: &DeletionEvent<'_>) -> Self::Deleted;
}

/// Result of a push.
pub struct Pushed<K: VersionedKind> {
    /// The new or existing version.
    pub version: K::Version,
    /// Whether a version was created.
    pub created: bool,
    /// The document afterwards.
    pub document: K::Document,
}

/// The lifecycle of one kind's documents in a store.
#[derive(Clone)]
pub struct Documents<K: VersionedKind> {
    store: Store,
    kind: K,
    /// Reads served from memory (see the `cache` module).
    cache: Arc<Cache<K::Document, K::Version>>,
}

impl<K: VersionedKind> Documents<K> {
    /// The documents of `kind` in `store`, with a read cache of
    /// [`DEFAULT_CAPACITY_BYTES`].
    pub fn new(store: Store, kind: K) -> Self {
        Self::with_cache_bytes(store, kind, DEFAULT_CAPACITY_BYTES)
    }

    /// The documents of `kind` in `store`, with a read cache of `bytes`
    /// (0: none). On PostgreSQL the cache serves only while
    /// [`Documents::follow_changes`] runs: other processes may change the
    /// documents.
    pub fn with_cache_bytes(store: Store, kind: K, bytes: u64) -> Self {
        let single_process = store.backend() == anumate_store::Backend::Sqlite;
        Documents {
            cache: Arc::new(Cache::new(bytes, single_process && bytes > 0)),
            store,
            kind,
        }
    }

    /// The notification channel of this kind's changes (`anumate_capsules`).
    fn channel() -> String {
        format!("anumate_{}", K::COLLECTION)
    }

    /// Keeps the read cache true to changes other processes make, until
    /// `cancel`: subscribes to their notifications (PostgreSQL) and drops
    /// what each names. The cache serves reads only while subscribed. On
    /// SQLite, whose one process sees its own writes, it only waits.
    /// Meant to run as a supervised background task of the service.
    pub async fn follow_changes(
        &self,
        cancel: CancellationToken,
    ) -> std::result::Result<(), anumate_store::StoreError> {
        if self.store.backend() != anumate_store::Backend::Postgres {
            cancel.cancelled().await;
            return Ok(());
        }
        let channel = Self::channel();
        let channels = [channel.as_str()];
        let mut backoff = Duration::from_millis(100);
        loop {
            let listening = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                l = self.store.listen(&channels) => l,
            };
            match listening {
                Ok(Some(mut listener)) => {
                    // Subscribed: what was cached before may have missed changes.
                    self.cache.reset(true);
                    backoff = Duration::from_millis(100);
                    loop {
                        let next = tokio::select! {
                            _ = cancel.cancelled() => {
                                self.cache.reset(false);
                                return Ok(());
                            }
                            n = listener.recv() => n,
                        };
                        match next {
                            Ok(Some(n)) => self.cache.invalidate(&n.payload),
                            // Reconnected; changes in between are unknown.
                            Ok(None) => self.cache.reset(true),
                            Err(e) => {
                                self.cache.reset(false);
                                tracing::warn!(error = %e, channel, "lost the change notifications; reads go to the database until subscribed again");
                                break;
                            }
                        }
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.cache.reset(false);
                    tracing::warn!(error = %e, channel, retry_in = ?backoff, "cannot subscribe to change notifications; reads go to the database");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Commits a change to document `name`: tells the other processes (in
    /// the transaction) and this one's cache (after it).
    async fn commit_change(&self, tx: TenantTx, name: &str) -> Result<()> {
        let key = Cache::<K::Document, K::Version>::key(tx.tenant_id(), name);
        tx.notify(&Self::channel(), &key).await?;
        let committed = tx.commit().await;
        // Even when the commit's outcome is unknown: forgetting is harmless.
        self.cache.invalidate(&key);
        Ok(committed?)
    }

    /// Commits changes to several documents (none: just ends `tx`).
    async fn commit_changes(&self, tx: TenantTx, names: &[&str]) -> Result<()> {
        let keys: Vec<String> = names
            .iter()
            .map(|name| Cache::<K::Document, K::Version>::key(tx.tenant_id(), name))
            .collect();
        for key in &keys {
            tx.notify(&Self::channel(), key).await?;
        }
        let committed = tx.commit().await;
        for key in &keys {
            self.cache.invalidate(key);
        }
        Ok(committed?)
    }

    /// Whether reads are served from memory now (for tests and metrics).
    pub fn cache_is_live(&self) -> bool {
        self.cache.is_live()
    }

    /// Stores a new version (or returns the identical existing one, publishing
    /// it when asked).
    pub async fn push(
        &self,
        actor: &Actor,
        draft: &Draft<'_>,
        etag: &str,
        publish: bool,
    ) -> Result<Pushed<K>> {
        // One retry covers two first pushes of a new name racing on its primary key.
        match self.push_once(actor, draft, etag, publish).await {
            Err(e) if e.code == ErrorCode::AlreadyExists => {
                self.push_once(actor, draft, etag, publish).await
            }
            other => other,
        }
    }

    /// Stores new versions of several documents in one transaction: all of
    /// them or none. Each draft is pushed as [`Documents::push`] would
    /// (without an etag); the results are in the drafts' order.
    pub async fn push_all(
        &self,
        actor: &Actor,
        drafts: &[Draft<'_>],
        publish: bool,
    ) -> Result<Vec<Pushed<K>>> {
        match self.push_all_once(actor, drafts, publish).await {
            Err(e) if e.code == ErrorCode::AlreadyExists => {
                self.push_all_once(actor, drafts, publish).await
            }
            other => other,
        }
    }

    async fn push_all_once(
        &self,
        actor: &Actor,
        drafts: &[Draft<'_>],
        publish: bool,
    ) -> Result<Vec<Pushed<K>>> {
        // Documents are locked in name order, so concurrent pushes of
        // overlapping sets cannot deadlock.
        let mut order: Vec<usize> = (0..drafts.len()).collect();
        order.sort_by_key(|&i| drafts[i].name);
        let tx = self.store.write(&actor.tenant).await?;
        let mut results: Vec<Option<Pushed<K>>> = drafts.iter().map(|_| None).collect();
        let mut changed = Vec::new();
        for i in order {
            let (pushed, change) = self.push_in(&tx, actor, &drafts[i], "", publish).await?;
            if change {
                changed.push(drafts[i].name);
            }
            results[i] = Some(pushed);
        }
        self.commit_changes(tx, &changed).await?;
        Ok(results.into_iter().flatten().collect())
    }

    async fn push_once(
        &self,
        actor: &Actor,
        draft: &Draft<'_>,
        etag: &str,
        publish: bool,
    ) -> Result<Pushed<K>> {
        let tx = self.store.write(&actor.tenant).await?;
        let (pushed, changed) = self.push_in(&tx, actor, draft, etag, publish).await?;
        if changed {
            self.commit_change(tx, draft.name).await?;
        }
        Ok(pushed)
    }

    /// A push in `tx`, not committed; true when it changed anything.
    async fn push_in(
        &self,
        tx: &TenantTx,
        actor: &Actor,
        draft: &Draft<'_>,
        etag: &str,
        publish: bool,
    ) -> Result<(Pushed<K>, bool)> {
        let (kind, name) = (K::SCHEMA.kind, draft.name);
        let existing = K::SCHEMA.lock_document(tx, name).await?;
        if let Some(doc) = &existing {
            if doc.deleted() {
                return Err(Error::because(
                    Reason::DocumentDeleted,
                    format!("{kind} {name} was deleted; choose another name"),
                ));
            }
            check_etag(kind, doc, etag)?;
            let same: Option<Stored<K::Row>> =
                K::SCHEMA.find_by_hash(tx, name, draft.content_hash).await?;
            if let Some(same) = same {
                return self.push_identical(tx, actor, doc, same, publish).await;
            }
        } else if !etag.is_empty() {
            return Err(Error::new(
                ErrorCode::EtagMismatch,
                format!("{kind} {name} does not exist yet; push without an etag to create it"),
            ));
        }

        let new = NewVersion {
            number: next_number(kind, name, existing.as_ref())?,
            status: if publish {
                Status::Published
            } else {
                Status::Draft
            },
            created_by: &actor.subject,
            now: anumate_store::now_micros(),
        };
        let version = self.kind.new_version(draft, &new);
        if existing.is_none() {
            K::SCHEMA.insert_document(tx, name, new.now).await?;
        }
        insert_version::<K>(tx, draft, &new, &version).await?;
        let published = if publish {
            i64::from(new.number)
        } else {
            existing.as_ref().map_or(0, |d| d.published_version)
        };
        let row = K::SCHEMA
            .update_after_push(
                tx,
                existing.as_ref(),
                name,
                draft.description,
                draft.labels,
                i64::from(new.number),
                published,
                new.now,
            )
            .await?;

        let event = VersionEvent {
            tenant_id: &actor.tenant,
            name,
            version: new.number,
            content_hash: draft.content_hash,
            actor: &actor.subject,
        };
        let subject = version_subject::<K>(name, new.number);
        append(tx, &K::pushed(&event), &subject).await?;
        if publish {
            append(tx, &K::published(&event), &subject).await?;
        }
        tracing::info!(tenant = %actor.tenant, kind, name, version = new.number, hash = draft.content_hash, "{kind} version pushed");
        Ok((
            Pushed {
                version,
                created: true,
                document: K::document(&row),
            },
            true,
        ))
    }

    /// A push of content that version `same` already holds: publishes it when
    /// asked and it is a draft, refuses when asked and it is deprecated.
    async fn push_identical(
        &self,
        tx: &TenantTx,
        actor: &Actor,
        doc: &DocumentRow,
        same: Stored<K::Row>,
        publish: bool,
    ) -> Result<(Pushed<K>, bool)> {
        let (number, status, hash) = (wire_version(same.number), same.status, same.content_hash);
        let mut version = same.row.into();
        let (document, changed) = match status {
            Status::Draft if publish => {
                let updated = self
                    .set_status(
                        tx,
                        actor,
                        &doc.name,
                        (number, &hash),
                        &mut version,
                        Status::Published,
                    )
                    .await?;
                (updated, true)
            }
            Status::Deprecated if publish => {
                return Err(Error::because(
                    Reason::VersionDeprecated,
                    format!(
                        "identical content is version {number} which is deprecated; it cannot be published again"
                    ),
                ));
            }
            _ => (K::document(doc), false),
        };
        Ok((
            Pushed {
                version,
                created: false,
                document,
            },
            changed,
        ))
    }

    /// Reads one version of a visible document.
    pub async fn get(
        &self,
        actor: &Actor,
        name: &str,
        selector: VersionSelector,
    ) -> Result<(K::Document, K::Version)> {
        K::check_name(name)?;
        let key = Cache::<K::Document, K::Version>::key(&actor.tenant, name);
        let epoch = self.cache.epoch();
        let cached = self.cache.get(&key);
        if let Some(snapshot) = &cached {
            let number = select::<K>(name, selector, snapshot.latest, snapshot.published)?;
            if let Some(version) = snapshot.version(number) {
                return Ok((snapshot.document.clone(), version.clone()));
            }
        }
        let tx = self.store.read(&actor.tenant).await?;
        let doc = visible_row::<K>(&tx, name).await?;
        let (latest, published) = (
            wire_version(doc.latest_version),
            wire_version(doc.published_version),
        );
        let number = select::<K>(name, selector, latest, published)?;
        let version = Self::version(&tx, name, number).await?;
        drop(tx);
        let document = K::document(&doc);
        let snapshot = cache::with_version(
            cached.as_deref(),
            document.clone(),
            (latest, published),
            number,
            version.clone(),
        );
        self.cache.insert(key, snapshot, epoch);
        Ok((document, version))
    }

    /// Lists visible documents by name: those carrying every label in
    /// `labels` and, with `status`, having a version in that state; paged as
    /// AIP-158 (`page_size`, `page_token`).
    pub async fn list(
        &self,
        actor: &Actor,
        labels: &[(String, String)],
        status: Option<Status>,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<K::Document>, String)> {
        let (size, after) = paging::page_params(page_size, page_token)?;
        let tx = self.store.read(&actor.tenant).await?;
        let (rows, next) = K::SCHEMA
            .list_documents(&tx, labels, status, size, after.as_deref())
            .await?;
        Ok((rows.iter().map(K::document).collect(), next))
    }

    /// Lists a document's versions, newest first, without their sources (the
    /// page token is the last version number).
    pub async fn list_versions(
        &self,
        actor: &Actor,
        name: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<K::Version>, String)> {
        K::check_name(name)?;
        let (size, after) = paging::page_params(page_size, page_token)?;
        let before = after
            .map(|token| token.parse::<i64>().map_err(|_| paging::malformed_token()))
            .transpose()?;
        let tx = self.store.read(&actor.tenant).await?;
        visible_row::<K>(&tx, name).await?;
        let (rows, next) = K::SCHEMA
            .list_versions(&tx, name, size, before, |v: &Stored<K::Row>| v.number)
            .await?;
        Ok((rows.into_iter().map(|v| v.row.into()).collect(), next))
    }

    /// Publishes or deprecates a version; asking for its current status
    /// changes nothing, and a deprecated version is never published again.
    pub async fn transition(
        &self,
        actor: &Actor,
        name: &str,
        number: i32,
        etag: &str,
        to: Transition,
    ) -> Result<(K::Document, K::Version)> {
        K::check_name(name)?;
        let tx = self.store.write(&actor.tenant).await?;
        let doc = lock_visible::<K>(&tx, name).await?;
        check_etag(K::SCHEMA.kind, &doc, etag)?;
        let stored = stored_version::<K>(&tx, name, number).await?;
        let (current, target, hash) = (stored.status, to.status(), stored.content_hash);
        let mut version = stored.row.into();
        if current == target {
            return Ok((K::document(&doc), version)); // no-op
        }
        if target == Status::Published && current == Status::Deprecated {
            return Err(Error::because(
                Reason::VersionDeprecated,
                format!(
                    "version {number} of {name} is deprecated and cannot be published again; push a new version"
                ),
            ));
        }
        let updated = self
            .set_status(&tx, actor, name, (number, &hash), &mut version, target)
            .await?;
        self.commit_change(tx, name).await?;
        Ok((updated, version))
    }

    /// Moves version `number` (content `hash`, message `version`) to `target`
    /// (published or deprecated), recomputes the document's published version
    /// and appends the matching event.
    async fn set_status(
        &self,
        tx: &TenantTx,
        actor: &Actor,
        name: &str,
        (number, hash): (i32, &str),
        version: &mut K::Version,
        target: Status,
    ) -> Result<K::Document> {
        let now = anumate_store::now_micros();
        K::SCHEMA
            .set_version_status(tx, name, i64::from(number), target, now)
            .await?;
        K::record_status(version, target, now);
        let row = K::SCHEMA.touch_document(tx, name, now).await?;
        let event = VersionEvent {
            tenant_id: &actor.tenant,
            name,
            version: number,
            content_hash: hash,
            actor: &actor.subject,
        };
        let subject = version_subject::<K>(name, number);
        if target == Status::Published {
            append(tx, &K::published(&event), &subject).await?;
        } else {
            append(tx, &K::deprecated(&event), &subject).await?;
        }
        Ok(K::document(&row))
    }

    /// Soft-deletes a document; returns its row as deleted (a new etag).
    pub async fn delete(&self, actor: &Actor, name: &str, etag: &str) -> Result<K::Document> {
        K::check_name(name)?;
        let tx = self.store.write(&actor.tenant).await?;
        let doc = lock_visible::<K>(&tx, name).await?;
        check_etag(K::SCHEMA.kind, &doc, etag)?;
        K::SCHEMA
            .soft_delete(&tx, name, anumate_store::now_micros())
            .await?;
        let event = K::deleted(&DeletionEvent {
            tenant_id: &actor.tenant,
            name,
            actor: &actor.subject,
        });
        append(&tx, &event, &format!("{}/{name}", K::COLLECTION)).await?;
        // The row as deleted: its new etag and update time.
        let deleted = K::SCHEMA.lock_document(&tx, name).await?.unwrap_or(doc);
        self.commit_change(tx, name).await?;
        Ok(K::document(&deleted))
    }

    /// A document that exists and is not deleted, or [`VersionedKind::NOT_FOUND`].
    pub async fn visible(tx: &TenantTx, name: &str) -> Result<K::Document> {
        Ok(K::document(&visible_row::<K>(tx, name).await?))
    }

    /// One version, with its source, or [`VersionedKind::VERSION_NOT_FOUND`].
    pub async fn version(tx: &TenantTx, name: &str, number: i32) -> Result<K::Version> {
        Ok(stored_version::<K>(tx, name, number).await?.row.into())
    }

    /// The oldest version with this content hash, if any.
    pub async fn find_by_hash(tx: &TenantTx, name: &str, hash: &str) -> Result<Option<K::Version>> {
        let stored: Option<Stored<K::Row>> = K::SCHEMA.find_by_hash(tx, name, hash).await?;
        Ok(stored.map(|v| v.row.into()))
    }
}

/// A version row with the columns the lifecycle reads itself.
struct Stored<R> {
    number: i64,
    status: Status,
    content_hash: String,
    row: R,
}

impl<R: FromQueryResult> FromQueryResult for Stored<R> {
    fn from_query_result(res: &QueryResult, pre: &str) -> std::result::Result<Self, DbErr> {
        let status: String = res.try_get(pre, "status")?;
        Ok(Stored {
            number: res.try_get(pre, "version")?,
            status: Status::from_name(&status),
            content_hash: res.try_get(pre, "content_hash")?,
            row: R::from_query_result(res, pre)?,
        })
    }
}

/// One version, or [`VersionedKind::VERSION_NOT_FOUND`].
async fn stored_version<K: VersionedKind>(
    tx: &TenantTx,
    name: &str,
    number: i32,
) -> Result<Stored<K::Row>> {
    K::SCHEMA
        .get_version(tx, name, i64::from(number))
        .await?
        .ok_or_else(|| {
            Error::because(
                K::VERSION_NOT_FOUND,
                format!("{} {name} has no version {number}", K::SCHEMA.kind),
            )
        })
}

/// The version number `selector` picks in a document whose latest and
/// published versions are these (0: none published).
fn select<K: VersionedKind>(
    name: &str,
    selector: VersionSelector,
    latest: i32,
    published: i32,
) -> Result<i32> {
    match selector {
        VersionSelector::Number(n) => Ok(n),
        VersionSelector::Latest => Ok(latest),
        VersionSelector::Published if published > 0 => Ok(published),
        VersionSelector::Published => Err(Error::because(
            K::VERSION_NOT_FOUND,
            format!(
                "{} {name} has no published version (latest is {latest}; ask for \"latest\" or a number)",
                K::SCHEMA.kind,
            ),
        )),
    }
}

/// A stored version number as the contract carries it. Pushes never create a
/// number above `i32::MAX` ([`next_number`]), so this never saturates.
pub fn wire_version(number: i64) -> i32 {
    i32::try_from(number).unwrap_or(i32::MAX)
}

/// The number of the version a push creates: one past the latest, refused
/// with `RESOURCE_EXHAUSTED` past `i32::MAX` (the contract's `int32`).
fn next_number(kind: &str, name: &str, existing: Option<&DocumentRow>) -> Result<i32> {
    let latest = existing.map_or(0, |d| d.latest_version);
    i32::try_from(latest + 1).map_err(|_| {
        Error::because(
            Reason::ResourceExhausted,
            format!("{kind} {name} has {latest} versions, the most a document can have"),
        )
        .with_metadata("limit", "versions")
    })
}

/// A document row that exists and is not deleted, or
/// [`VersionedKind::NOT_FOUND`].
async fn visible_row<K: VersionedKind>(tx: &TenantTx, name: &str) -> Result<DocumentRow> {
    K::SCHEMA
        .any_document(tx, name)
        .await?
        .filter(|d| !d.deleted())
        .ok_or_else(|| not_found::<K>(name))
}

/// No (visible) document of this name.
fn not_found<K: VersionedKind>(name: &str) -> Error {
    Error::because(K::NOT_FOUND, format!("{} {name} not found", K::SCHEMA.kind))
}

/// Refuses a change that carries an etag other than the document's current one.
fn check_etag(kind: &str, doc: &DocumentRow, expected: &str) -> Result<()> {
    let etag = doc.etag();
    if !expected.is_empty() && etag != expected {
        return Err(Error::new(
            ErrorCode::EtagMismatch,
            format!(
                "{kind} {} changed: etag is {etag}, request carried {expected}; re-read and retry",
                doc.name
            ),
        )
        .with_metadata("current_etag", etag));
    }
    Ok(())
}

/// A document row that is not deleted, locked for the transaction, or
/// [`VersionedKind::NOT_FOUND`].
async fn lock_visible<K: VersionedKind>(tx: &TenantTx, name: &str) -> Result<DocumentRow> {
    K::SCHEMA
        .lock_document(tx, name)
        .await?
        .filter(|d| !d.deleted())
        .ok_or_else(|| not_found::<K>(name))
}

/// Inserts a version row: the lifecycle's columns and the kind's own.
async fn insert_version<K: VersionedKind>(
    tx: &TenantTx,
    draft: &Draft<'_>,
    new: &NewVersion<'_>,
    version: &K::Version,
) -> Result<()> {
    let published_at = (new.status == Status::Published).then_some(new.now);
    let mut columns = vec![
        "name",
        "version",
        "status",
        "canonical_json",
        "content_hash",
        "description",
        "created_by",
        "created_at",
        "published_at",
    ];
    let mut values: Vec<Value> = vec![
        draft.name.into(),
        new.number.into(),
        new.status.as_str().into(),
        draft.canonical_json.into(),
        draft.content_hash.into(),
        draft.description.into(),
        new.created_by.into(),
        new.now.into(),
        published_at.into(),
    ];
    for (column, value) in K::version_columns(version) {
        columns.push(column);
        values.push(value);
    }
    K::SCHEMA.insert_version(tx, &columns, values).await
}

/// The event subject of a version: `capsules/refund/versions/3`.
fn version_subject<K: VersionedKind>(name: &str, number: i32) -> String {
    format!("{}/{name}/versions/{number}", K::COLLECTION)
}

/// Appends one event to the outbox (keyed `tenant/name`, as its proto declares).
async fn append<M: prost::Message + prost::Name + anumate_events::EventKey>(
    tx: &TenantTx,
    event: &M,
    subject: &str,
) -> Result<()> {
    let ctx = anumate_events::EventContext {
        subject,
        ..Default::default()
    };
    anumate_events::append(tx, event, ctx).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_names_and_positive_numbers() {
        assert_eq!(
            VersionSelector::parse("").ok(),
            Some(VersionSelector::Published)
        );
        assert_eq!(
            VersionSelector::parse("published").ok(),
            Some(VersionSelector::Published)
        );
        assert_eq!(
            VersionSelector::parse("latest").ok(),
            Some(VersionSelector::Latest)
        );
        assert_eq!(
            VersionSelector::parse("7").ok(),
            Some(VersionSelector::Number(7))
        );
        for bad in ["0", "-1", "v2", "Latest", "2147483648"] {
            let err = VersionSelector::parse(bad).err().map(|e| e.code);
            assert_eq!(err, Some(ErrorCode::InvalidArgument), "{bad}");
        }
    }

    #[test]
    fn transitions_lead_to_published_or_deprecated() {
        assert_eq!(Transition::Publish.status(), Status::Published);
        assert_eq!(Transition::Deprecate.status(), Status::Deprecated);
    }
}
