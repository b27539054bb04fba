//! Group commit for [`Store::write_text`] on PostgreSQL: writes sent at the
//! same moment by concurrent requests share one transaction, one round
//! trip and (durable ones) one WAL flush. A write is one `write_text`
//! statement or the statements of one `write_deferred` transaction (with
//! the durable writes).
//!
//! Each write waits for its group's commit before it returns, exactly as it
//! waited for its own, so what a caller observes is unchanged: its write is
//! committed (and, unless relaxed, flushed) when `write_text` returns, and
//! not before. Within a group each write runs under its own tenant
//! (`app.tenant_id` is set before each one, so row-level security sees only
//! that tenant's rows), in arrival order, as if the writes had committed one
//! after another.
//!
//! There is no timer: a write that finds nothing of its kind running goes
//! to the server at once, from its caller's task, as it did before groups.
//! Writes that arrive while [`IN_FLIGHT`] groups (or lone writes) of their
//! kind are at the server queue, and the next group takes every write
//! queued by then: only writes that would have waited anyway are grouped. When
//! the server refuses a group (a constraint, a deadlock, any statement
//! error: the whole transaction rolled back, nothing was written), each of
//! its writes runs again alone and gets its own answer. A lost connection
//! is told to every write of the group as it would be to one alone.
//!
//! Groups run in tasks of their own: a caller that goes away while its
//! group runs cancels nothing for the others.

use std::sync::{Arc, Mutex};

use futures::TryStreamExt as _;
use sea_orm::QueryResult;
use sea_orm::sqlx::{self, Either, Row as _, postgres::PgRow};

use crate::StoreError;

/// Groups of one kind (durable or relaxed) running at once. Two let the
/// server use both cores while the next group gathers.
const IN_FLIGHT: usize = 2;
/// Writes in one group at most.
const MAX_GROUP: usize = 64;
/// The alias of the `set_config` of the tenant before each write
/// ([`crate::push_begin`]'s for the first): the rows between two of them
/// are one write's.
pub(crate) const MARK: &str = "anumate_group_item";

/// One write waiting for its group.
struct Item {
    tenant: String,
    /// The statement with its values as literals.
    sql: String,
    reply: tokio::sync::oneshot::Sender<Result<Vec<QueryResult>, StoreError>>,
}

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    running: usize,
}

/// The queue of one kind of write, and where it goes.
pub(crate) struct Group {
    queue: Mutex<Queue>,
    ctx: Ctx,
}

/// What a group needs of the store.
pub(crate) struct Ctx {
    pub(crate) pool: sqlx::PgPool,
    pub(crate) role: Option<String>,
    pub(crate) relaxed: bool,
}

impl Group {
    pub(crate) fn new(ctx: Ctx) -> Group {
        Group {
            queue: Mutex::default(),
            ctx,
        }
    }

    /// Queues `sql` (one statement, values already literals) for `tenant`
    /// and waits for its group's commit; its rows.
    pub(crate) async fn write(
        self: &Arc<Group>,
        tenant: &str,
        sql: String,
    ) -> Result<Vec<QueryResult>, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let item = Item {
            tenant: tenant.to_owned(),
            sql,
            reply,
        };
        let item = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.running == 0 && q.items.is_empty() {
                // Nothing else is writing: this write goes alone, from this
                // task (no hop); writes arriving meanwhile queue behind it.
                q.running = 1;
                Some(item)
            } else {
                q.items.push(item);
                if q.running < IN_FLIGHT {
                    q.running += 1;
                    drop(q);
                    self.clone().spawn_drain();
                }
                None
            }
        };
        if let Some(item) = item {
            let alone = Alone(self.clone());
            let answer = one(&self.ctx, &item).await;
            drop(alone);
            return answer;
        }
        answer
            .await
            .map_err(|_| lost("the group commit task stopped before answering".into()))?
    }

    /// Runs groups until the queue is empty.
    async fn drain(self: Arc<Group>) {
        loop {
            let items = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.items.is_empty() {
                    q.running -= 1;
                    return;
                }
                let n = q.items.len().min(MAX_GROUP);
                q.items.drain(..n).collect::<Vec<_>>()
            };
            run(&self.ctx, items).await;
        }
    }
}

/// A write going alone from its caller's task: when it is done (or its
/// caller went away), the writes that queued meanwhile get a task.
struct Alone(Arc<Group>);

impl Drop for Alone {
    fn drop(&mut self) {
        let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.items.is_empty() {
            q.running -= 1;
            return;
        }
        drop(q);
        self.0.clone().spawn_drain();
    }
}

impl Group {
    /// Hands the queue to a task of its own (holding a running slot).
    /// Without a runtime (shutting down), the queued writes are told the
    /// store is unavailable: none was sent.
    fn spawn_drain(self: Arc<Group>) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(self.drain());
            }
            Err(_) => {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.running -= 1;
                for item in q.items.drain(..) {
                    let _ = item
                        .reply
                        .send(Err(lost("the runtime is shutting down: not sent".into())));
                }
            }
        }
    }
}

/// `BEGIN`, per write its tenant (the first with the role and commit mode,
/// as every transaction of the store begins) and the write, and `COMMIT`,
/// as one simple-query batch.
fn batch_sql(ctx: &Ctx, items: &[Item]) -> String {
    let mut sql = String::with_capacity(64 + items.iter().map(|i| i.sql.len() + 96).sum::<usize>());
    for (i, item) in items.iter().enumerate() {
        if i == 0 {
            crate::push_begin(&mut sql, &item.tenant, ctx.role.as_deref(), ctx.relaxed);
        } else {
            sql.push_str("; SELECT set_config('app.tenant_id', ");
            crate::push_literal(&mut sql, &item.tenant);
            sql.push_str(", true) AS ");
            sql.push_str(MARK);
        }
        sql.push_str("; ");
        sql.push_str(&item.sql);
    }
    sql.push_str("; COMMIT");
    sql
}

async fn run(ctx: &Ctx, items: Vec<Item>) {
    if items.len() == 1 {
        // Alone: no other write to answer for.
        for item in items {
            let answer = one(ctx, &item).await;
            let _ = item.reply.send(answer);
        }
        return;
    }
    match group(ctx, &items).await {
        Ok(rows) => {
            for (item, rows) in items.into_iter().zip(rows) {
                let _ = item.reply.send(Ok(rows));
            }
        }
        Err(Failed::Refused(e)) => {
            // The server refused a statement and rolled the group back:
            // nothing was written; each write again alone, for its answer.
            tracing::debug!(error = %e, writes = items.len(), "store: group refused, writes run alone");
            for item in items {
                let answer = one(ctx, &item).await;
                let _ = item.reply.send(answer);
            }
        }
        Err(Failed::Lost(e)) => {
            // The connection: whether the group committed is unknown, as it
            // would be for each write alone.
            let text = e.to_string();
            for item in items {
                let _ = item.reply.send(Err(lost(text.clone())));
            }
        }
    }
}

/// Why a batch failed.
enum Failed {
    /// The server refused a statement: the transaction rolled back.
    Refused(StoreError),
    /// The connection failed: the outcome is unknown.
    Lost(StoreError),
}

impl From<Failed> for StoreError {
    fn from(f: Failed) -> StoreError {
        match f {
            Failed::Refused(e) | Failed::Lost(e) => e,
        }
    }
}

fn lost(text: String) -> StoreError {
    StoreError::Db(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::Internal(text)))
}

/// One write alone: `BEGIN`, its tenant, it, `COMMIT`.
async fn one(ctx: &Ctx, item: &Item) -> Result<Vec<QueryResult>, StoreError> {
    let rows = execute(ctx, batch_sql(ctx, std::slice::from_ref(item))).await?;
    Ok(split(rows, 1).pop().unwrap_or_default())
}

/// The group in one transaction: each write's rows, in order.
async fn group(ctx: &Ctx, items: &[Item]) -> Result<Vec<Vec<QueryResult>>, Failed> {
    let rows = execute(ctx, batch_sql(ctx, items)).await?;
    let split = split(rows, items.len());
    if split.len() != items.len() {
        // Committed, but the answers cannot be told apart.
        return Err(Failed::Lost(lost(format!(
            "group commit: {} writes answered for {}",
            split.len(),
            items.len()
        ))));
    }
    Ok(split)
}

/// Sends `sql` and reads every row; a statement error is a query error
/// (the transaction is rolled back: the connection is closed, never handed
/// back inside it), anything else a connection error.
async fn execute(ctx: &Ctx, sql: String) -> Result<Vec<PgRow>, Failed> {
    let mut conn = ctx
        .pool
        .acquire()
        .await
        .map_err(|e| Failed::Lost(StoreError::Db(crate::acquire_err(e))))?;
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_many(&mut *conn)
        .try_filter_map(|step| async move {
            Ok(match step {
                Either::Left(_) => None,
                Either::Right(row) => Some(row),
            })
        })
        .try_collect::<Vec<PgRow>>()
        .await;
    match result {
        Ok(rows) => Ok(rows),
        Err(e) => {
            conn.close_on_drop();
            Err(match e {
                e @ sqlx::Error::Database(_) => Failed::Refused(crate::query_err(e)),
                other => Failed::Lost(StoreError::Db(sea_orm::DbErr::Conn(
                    sea_orm::RuntimeErr::SqlxError(other.into()),
                ))),
            })
        }
    }
}

/// The rows after each mark, per write.
fn split(rows: Vec<PgRow>, writes: usize) -> Vec<Vec<QueryResult>> {
    let mut out: Vec<Vec<QueryResult>> = Vec::with_capacity(writes);
    for row in rows {
        let first = row.columns().first().map(sqlx::Column::name);
        match first {
            Some(MARK) => out.push(Vec::new()),
            _ => {
                if let Some(last) = out.last_mut() {
                    last.push(QueryResult::from(row));
                }
            }
        }
    }
    out
}
