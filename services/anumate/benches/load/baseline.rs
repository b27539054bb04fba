//! The baseline: the floor our layers are measured against. A bare tonic
//! server (no tracing, metrics, limits or error-detail layers; no module
//! system) answering the bench's read RPCs on the same paths, with the
//! generated request and response types, and doing per call what the real
//! request needs at the least: the same ES256 bearer token checked by the
//! same `anumate_auth::Authenticator` (the dev issuer's JWKS, default
//! `[auth]` settings, so the same verified-token cache) and the RPC's roles,
//! then the same SELECTs in a tenant-scoped transaction with plain sqlx: on
//! PostgreSQL BEGIN, `set_config('app.tenant_id', …, true)` with the switch
//! to the non-owner serving role (row-level security applies), the SELECTs,
//! COMMIT; on SQLite BEGIN, the SELECTs, COMMIT. Rows become the response
//! messages as directly as they can.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anumate_auth::{AuthConfig, Authenticator, DevIssuer, Principal, Role};
use anumate_proto::compiler::v1 as compiler;
use anumate_proto::receipts::v1 as receipts;
use anumate_proto::registry::v1 as registry;
use anyhow::Context as _;
use sea_orm::sqlx::{self, Row as _};
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

/// What the baseline prints once it listens (then its address).
pub const SERVING: &str = "baseline: serving on http://";

/// The flags of the baseline process (hidden: the bench passes them).
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Serve the baseline instead of running the bench.
    #[arg(long, hide = true)]
    pub serve_baseline: bool,
    /// The store: the serving login's PostgreSQL URL or the SQLite file's.
    #[arg(long, hide = true, default_value = "")]
    pub baseline_store_url: String,
    /// The directory holding the dev issuer's key.
    #[arg(long, hide = true)]
    pub baseline_keys_dir: Option<PathBuf>,
    /// PostgreSQL: the role switched to in each transaction.
    #[arg(long, hide = true, default_value = "")]
    pub baseline_app_role: String,
}

/// The store, as plain sqlx pools sized as the real store's.
enum Db {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

struct State {
    auth: Authenticator,
    db: Db,
    role: String,
}

/// The pool size of `[store] max_connections`' default.
const POOL: u32 = 10;

/// Serves until killed.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let keys = args.baseline_keys_dir.context("--baseline-keys-dir")?;
    let issuer = DevIssuer::load_or_create(&keys).context("the dev issuer's key")?;
    let auth = Authenticator::new(AuthConfig::default())?
        .with_static_issuer(issuer.issuer(), issuer.jwks());
    let url = args.baseline_store_url;
    let timeout = Duration::from_secs(10);
    let db = if url.starts_with("postgres") {
        Db::Postgres(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(POOL)
                .acquire_timeout(timeout)
                .connect(&url)
                .await
                .context("connecting to PostgreSQL")?,
        )
    } else {
        let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().context("SQLite URL")?;
        let opts = opts
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(timeout)
            .foreign_keys(true);
        Db::Sqlite(
            sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(POOL)
                .acquire_timeout(timeout)
                .connect_with(opts)
                .await
                .context("opening SQLite")?,
        )
    };
    let state = Arc::new(State {
        auth,
        db,
        role: args.baseline_app_role,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{SERVING}{}", listener.local_addr()?);
    let routes = tonic::service::Routes::new(Bare::<REGISTRY>(state.clone()))
        .add_service(Bare::<COMPILER>(state.clone()))
        .add_service(Bare::<RECEIPTS>(state));
    let incoming = {
        use tokio_stream::StreamExt as _;
        tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
            let s = s?;
            s.set_nodelay(true)?;
            Ok::<_, std::io::Error>(s)
        })
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(256)
        .add_routes(routes)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

const REGISTRY: u8 = 0;
const COMPILER: u8 = 1;
const RECEIPTS: u8 = 2;

/// One gRPC service of the baseline, routed by its full name.
#[derive(Clone)]
struct Bare<const S: u8>(Arc<State>);

impl NamedService for Bare<REGISTRY> {
    const NAME: &'static str = "anumate.registry.v1.RegistryService";
}
impl NamedService for Bare<COMPILER> {
    const NAME: &'static str = "anumate.compiler.v1.CompilerService";
}
impl NamedService for Bare<RECEIPTS> {
    const NAME: &'static str = "anumate.receipts.v1.ReceiptsService";
}

impl<const S: u8> tonic::codegen::Service<http::Request<Body>> for Bare<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move { Ok(route(state, req).await) })
    }
}

/// Dispatches by path.
async fn route(state: Arc<State>, req: http::Request<Body>) -> http::Response<Body> {
    match req.uri().path() {
        "/anumate.registry.v1.RegistryService/GetCapsule" => {
            unary(req, move |r| get_capsule(state, r)).await
        }
        "/anumate.registry.v1.RegistryService/ListCapsules" => {
            unary(req, move |r| list_capsules(state, r)).await
        }
        "/anumate.compiler.v1.CompilerService/GetPlan" => {
            unary(req, move |r| get_plan(state, r)).await
        }
        "/anumate.receipts.v1.ReceiptsService/GetReceipt" => {
            unary(req, move |r| get_receipt(state, r)).await
        }
        path => Status::unimplemented(format!("the baseline does not serve {path}")).into_http(),
    }
}

/// A one-shot handler as tonic's unary service.
struct Handler<F>(Option<F>);

impl<Req, Resp, F, Fut> UnaryService<Req> for Handler<F>
where
    F: FnOnce(Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
{
    type Response = Resp;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Resp>, Status>> + Send>>;

    fn call(&mut self, req: Request<Req>) -> Self::Future {
        match self.0.take() {
            Some(f) => Box::pin(f(req)),
            None => Box::pin(async { Err(Status::internal("handler called twice")) }),
        }
    }
}

/// Decodes, runs `f`, encodes: tonic's unary path with the prost codec.
async fn unary<Req, Resp, F, Fut>(req: http::Request<Body>, f: F) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnOnce(Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
{
    let codec = tonic_prost::ProstCodec::<Resp, Req>::default();
    Grpc::new(codec).unary(Handler(Some(f)), req).await
}

/// The caller, if its bearer token verifies and it holds one of `roles`.
async fn authorize<T>(
    state: &State,
    req: &Request<T>,
    roles: &[Role],
) -> Result<Principal, Status> {
    let token = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
    let principal = state
        .auth
        .authenticate(token)
        .await
        .map_err(|e| e.to_status())?;
    principal.require_any(roles).map_err(|e| e.to_status())?;
    Ok(principal)
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Runs `$body` (which reads through `$tx`) in a transaction scoped to
/// `$tenant`, committed after it; written out per backend, as plain sqlx
/// code would be.
macro_rules! in_tenant_tx {
    ($state:expr, $tenant:expr, |$tx:ident| $body:block) => {
        match &$state.db {
            Db::Postgres(pool) => {
                let mut $tx = pool.begin().await.map_err(internal)?;
                sqlx::query(
                    "SELECT set_config('app.tenant_id', $1, true), set_config('role', $2, true)",
                )
                .bind($tenant)
                .bind(&$state.role)
                .fetch_one(&mut *$tx)
                .await
                .map_err(internal)?;
                let out = $body;
                $tx.commit().await.map_err(internal)?;
                out
            }
            Db::Sqlite(pool) => {
                let mut $tx = pool.begin().await.map_err(internal)?;
                let out = $body;
                $tx.commit().await.map_err(internal)?;
                out
            }
        }
    };
}

const READERS: [Role; 5] = [
    Role::Admin,
    Role::Author,
    Role::Operator,
    Role::Approver,
    Role::Auditor,
];

/// A timestamp from microseconds since the epoch.
fn timestamp(micros: i64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

fn labels(json: &str) -> HashMap<String, String> {
    serde_json::from_str(json).unwrap_or_default()
}

/// A `capsules` row.
struct DocRow {
    name: String,
    description: String,
    labels: String,
    latest_version: i64,
    published_version: i64,
    revision: i64,
    created_at: i64,
    updated_at: i64,
}

macro_rules! doc_row {
    ($row:expr) => {{
        let row = $row;
        let deleted: Option<i64> = row.try_get("deleted_at").map_err(internal)?;
        if deleted.is_some() {
            return Err(Status::not_found("capsule deleted"));
        }
        DocRow {
            name: row.try_get("name").map_err(internal)?,
            description: row.try_get("description").map_err(internal)?,
            labels: row.try_get("labels").map_err(internal)?,
            latest_version: row.try_get("latest_version").map_err(internal)?,
            published_version: row.try_get("published_version").map_err(internal)?,
            revision: row.try_get("revision").map_err(internal)?,
            created_at: row.try_get("created_at").map_err(internal)?,
            updated_at: row.try_get("updated_at").map_err(internal)?,
        }
    }};
}

fn capsule(d: DocRow) -> registry::Capsule {
    registry::Capsule {
        labels: labels(&d.labels),
        name: d.name,
        description: d.description,
        latest_version: i32::try_from(d.latest_version).unwrap_or(i32::MAX),
        published_version: i32::try_from(d.published_version).unwrap_or(i32::MAX),
        etag: format!("r{}", d.revision),
        create_time: Some(timestamp(d.created_at)),
        update_time: Some(timestamp(d.updated_at)),
    }
}

async fn get_capsule(
    state: Arc<State>,
    req: Request<registry::GetCapsuleRequest>,
) -> Result<Response<registry::GetCapsuleResponse>, Status> {
    let principal = authorize(&state, &req, &READERS).await?;
    let name = req.into_inner().name;
    let tenant = principal.tenant_id.as_str();
    let (doc, version) = in_tenant_tx!(state, tenant, |tx| {
        let row = sqlx::query(
            "SELECT name, description, labels, latest_version, published_version, revision, \
             created_at, updated_at, deleted_at FROM capsules WHERE tenant_id = $1 AND name = $2",
        )
        .bind(tenant)
        .bind(&name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(internal)?
        .ok_or_else(|| Status::not_found("capsule not found"))?;
        let doc = doc_row!(row);
        let row = sqlx::query(
            "SELECT name, version, status, source_yaml, canonical_json, content_hash, signature, kid, \
             description, labels, created_by, created_at, published_at, deprecated_at \
             FROM capsule_versions WHERE tenant_id = $1 AND name = $2 AND version = $3",
        )
        .bind(tenant)
        .bind(&name)
        .bind(doc.published_version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(internal)?
        .ok_or_else(|| Status::not_found("capsule version not found"))?;
        let status: String = row.try_get("status").map_err(internal)?;
        let labels_json: String = row.try_get("labels").map_err(internal)?;
        let version = registry::CapsuleVersion {
            name: row.try_get("name").map_err(internal)?,
            version: i32::try_from(row.try_get::<i64, _>("version").map_err(internal)?)
                .unwrap_or(i32::MAX),
            status: match status.as_str() {
                "published" => registry::VersionStatus::Published,
                "deprecated" => registry::VersionStatus::Deprecated,
                _ => registry::VersionStatus::Draft,
            } as i32,
            source_yaml: row.try_get("source_yaml").map_err(internal)?,
            canonical_json: row.try_get("canonical_json").map_err(internal)?,
            content_hash: row.try_get("content_hash").map_err(internal)?,
            signature: row.try_get("signature").map_err(internal)?,
            kid: row.try_get("kid").map_err(internal)?,
            description: row.try_get("description").map_err(internal)?,
            labels: labels(&labels_json),
            created_by: row.try_get("created_by").map_err(internal)?,
            create_time: Some(timestamp(row.try_get("created_at").map_err(internal)?)),
            publish_time: row
                .try_get::<Option<i64>, _>("published_at")
                .map_err(internal)?
                .map(timestamp),
            deprecate_time: row
                .try_get::<Option<i64>, _>("deprecated_at")
                .map_err(internal)?
                .map(timestamp),
        };
        (doc, version)
    });
    Ok(Response::new(registry::GetCapsuleResponse {
        capsule: Some(capsule(doc)),
        version: Some(version),
    }))
}

async fn list_capsules(
    state: Arc<State>,
    req: Request<registry::ListCapsulesRequest>,
) -> Result<Response<registry::ListCapsulesResponse>, Status> {
    const PAGE: i64 = 50;
    let principal = authorize(&state, &req, &READERS).await?;
    let tenant = principal.tenant_id.as_str();
    let mut docs = in_tenant_tx!(state, tenant, |tx| {
        let rows = sqlx::query(
            "SELECT name, description, labels, latest_version, published_version, revision, \
             created_at, updated_at, deleted_at FROM capsules c \
             WHERE c.tenant_id = $1 AND c.deleted_at IS NULL ORDER BY c.name LIMIT $2",
        )
        .bind(tenant)
        .bind(PAGE + 1)
        .fetch_all(&mut *tx)
        .await
        .map_err(internal)?;
        let mut docs = Vec::with_capacity(rows.len());
        for row in rows {
            docs.push(doc_row!(row));
        }
        docs
    });
    let next_page_token = if docs.len() as i64 > PAGE {
        docs.truncate(PAGE as usize);
        docs.last().map(|d| d.name.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok(Response::new(registry::ListCapsulesResponse {
        capsules: docs.into_iter().map(capsule).collect(),
        next_page_token,
    }))
}

async fn get_plan(
    state: Arc<State>,
    req: Request<compiler::GetPlanRequest>,
) -> Result<Response<compiler::GetPlanResponse>, Status> {
    let principal = authorize(&state, &req, &READERS).await?;
    let hash = req.into_inner().plan_hash;
    let tenant = principal.tenant_id.as_str();
    let (json, created_by, created_at): (String, String, i64) = in_tenant_tx!(
        state,
        tenant,
        |tx| {
            let row = sqlx::query(
                "SELECT plan_json, created_by, created_at FROM plans WHERE tenant_id = $1 AND plan_hash = $2",
            )
            .bind(tenant)
            .bind(&hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found("plan not found"))?;
            (
                row.try_get("plan_json").map_err(internal)?,
                row.try_get("created_by").map_err(internal)?,
                row.try_get("created_at").map_err(internal)?,
            )
        }
    );
    let plan = compiler::ExecutablePlan {
        created_by,
        create_time: Some(timestamp(created_at)),
        ..serde_json::from_str(&json).map_err(internal)?
    };
    Ok(Response::new(compiler::GetPlanResponse {
        plan: Some(plan),
    }))
}

async fn get_receipt(
    state: Arc<State>,
    req: Request<receipts::GetReceiptRequest>,
) -> Result<Response<receipts::GetReceiptResponse>, Status> {
    let principal = authorize(&state, &req, &[Role::Admin, Role::Auditor, Role::Operator]).await?;
    let id = req.into_inner().receipt_id;
    let tenant = principal.tenant_id.as_str();
    let (leaf_index, issued_at, statement_json, signature, kid, leaf_hash, content_json): (
        i64,
        i64,
        String,
        String,
        String,
        String,
        String,
    ) = in_tenant_tx!(state, tenant, |tx| {
        let row = sqlx::query(
            "SELECT leaf_index, issued_at, statement_json, signature, kid, leaf_hash, \
             CASE WHEN content_json <> '' THEN content_json ELSE COALESCE((SELECT c.body \
             FROM receipt_contents c WHERE c.tenant_id = receipts.tenant_id \
             AND c.receipt_id = receipts.receipt_id), '') END AS content_json \
             FROM receipts WHERE tenant_id = $1 AND receipt_id = $2",
        )
        .bind(tenant)
        .bind(&id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(internal)?
        .ok_or_else(|| Status::not_found("receipt not found"))?;
        (
            row.try_get("leaf_index").map_err(internal)?,
            row.try_get("issued_at").map_err(internal)?,
            row.try_get("statement_json").map_err(internal)?,
            row.try_get("signature").map_err(internal)?,
            row.try_get("kid").map_err(internal)?,
            row.try_get("leaf_hash").map_err(internal)?,
            row.try_get("content_json").map_err(internal)?,
        )
    });
    let statement: serde_json::Value = serde_json::from_str(&statement_json).map_err(internal)?;
    let text = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let subject = statement.get("subject").cloned().unwrap_or_default();
    let archived = content_json.is_empty();
    let content = if archived {
        None
    } else {
        Some(serde_json::from_str(&content_json).map_err(internal)?)
    };
    let receipt = receipts::Receipt {
        receipt_id: text(&statement, "receipt_id"),
        tenant_id: text(&statement, "tenant_id"),
        subject: Some(receipts::ReceiptSubject {
            run_id: text(&subject, "run_id"),
            step_id: text(&subject, "step_id"),
            plan_hash: text(&subject, "plan_hash"),
            ..Default::default()
        }),
        content_digest: text(&statement, "content_digest"),
        issue_time: Some(timestamp(issued_at)),
        kid,
        signature,
        leaf_index,
        leaf_hash: hex(&leaf_hash),
        content,
        content_archived: archived,
        actor: text(&statement, "actor"),
        statement_json,
        ..Default::default()
    };
    Ok(Response::new(receipts::GetReceiptResponse {
        receipt: Some(receipt),
    }))
}

/// Bytes from lowercase hex (empty when it is not hex).
fn hex(text: &str) -> Vec<u8> {
    let digit = |c: u8| (c as char).to_digit(16);
    text.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(u8::try_from(digit(*hi)? * 16 + digit(*lo)?).ok()?),
            _ => None,
        })
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_default()
}
