//! Transport-agnostic clients: one trait per upstream service, implemented
//! in-process by the service's own crate (calling its domain type) and over
//! gRPC here, on channels from the one [`channel`] factory.
//!
//! A service depends on the trait, and the composition decides: the
//! in-process implementation when the upstream runs in the same process
//! (`anumate dev`, `serve all`), else gRPC at its configured address.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anumate_auth::ServiceIssuer;
use anumate_errors::{Error, ErrorCode};
use anumate_proto::approvals::v1 as apb;
use anumate_proto::captokens::v1 as ctpb;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::connectors::v1 as conpb;
use anumate_proto::ghostrun::v1 as gpb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::receipts::v1 as rcpb;
use anumate_proto::registry::v1 as rpb;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long connecting to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a service token minted for one call lives.
const SERVICE_TOKEN_TTL: Duration = Duration::from_secs(60);

/// The process's client TLS (`[tls]`), once [`use_tls`] set it.
static CLIENT_TLS: std::sync::OnceLock<crate::tls::Tls> = std::sync::OnceLock::new();

/// Makes every channel [`channel`] builds from now on connect with mTLS
/// (`[tls]`, the certificates as currently loaded at each new connection);
/// `false` if the process already had its TLS set.
pub fn use_tls(tls: crate::tls::Tls) -> bool {
    CLIENT_TLS.set(tls).is_ok()
}

/// The process's `[tls]`: loaded once (whoever asks first: the server, the
/// gateway), set as the client TLS of every channel (see [`use_tls`]) and
/// reloaded when its files change (a task on the current runtime); `None`
/// when `[tls]` is off.
pub fn process_tls(config: &crate::tls::TlsConfig) -> Result<Option<crate::tls::Tls>, Error> {
    if !config.enabled() {
        return Ok(None);
    }
    if let Some(tls) = CLIENT_TLS.get() {
        return Ok(Some(tls.clone()));
    }
    let tls = crate::tls::Tls::load(config)?;
    if use_tls(tls.clone()) {
        tls.spawn_reloader(tokio_util::sync::CancellationToken::new());
    }
    Ok(CLIENT_TLS.get().cloned())
}

/// The one way a configured address becomes a channel (lazily connected;
/// with mTLS when the process set it with [`use_tls`]). `config_key` names
/// the setting in errors.
pub fn channel(config_key: &str, url: &str) -> Result<Channel, Error> {
    channel_with(config_key, url, CLIENT_TLS.get())
}

/// [`channel`] with `tls` (`None`: plain HTTP/2). With TLS, `http://` and
/// `https://` addresses both connect with TLS, verifying the server's
/// certificate for the address's host.
pub fn channel_with(
    config_key: &str,
    url: &str,
    tls: Option<&crate::tls::Tls>,
) -> Result<Channel, Error> {
    let bad = |e: tonic::transport::Error| {
        Error::invalid_argument(config_key, format!("bad address {url:?}: {e}"))
    };
    match tls {
        None => Endpoint::from_shared(url.to_owned())
            .map(|e| e.connect_timeout(CONNECT_TIMEOUT).connect_lazy())
            .map_err(bad),
        // The connector does the TLS: tonic must not see `https`.
        Some(tls) => Endpoint::from_shared(match url.strip_prefix("https://") {
            Some(rest) => format!("http://{rest}"),
            None => url.to_owned(),
        })
        .map(|e| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector_lazy(tls.connector())
        })
        .map_err(bad),
    }
}

/// On whose behalf an upstream call is made.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A user's request, forwarded: their tenant and subject, and (for the
    /// gRPC hop) their `authorization` header as received.
    User {
        /// Tenant id.
        tenant: String,
        /// Principal subject.
        subject: String,
        /// The caller's `authorization` header value.
        authorization: Option<AsciiMetadataValue>,
    },
    /// This service acting in its own name (`svc:<service>`) in `tenant`.
    Service {
        /// Tenant id.
        tenant: String,
        /// The acting service.
        service: &'static str,
    },
    /// This service acting for `principal` (the person or client whose
    /// request it serves, or who started the work it resumes later). Over
    /// gRPC it presents a delegated service token (`svc:<service>` acting
    /// for the principal, with the principal's roles), minted by the
    /// client's service issuer; a client without one forwards `forward`,
    /// the caller's own `authorization` header, when there is one.
    Delegated {
        /// Whom the service acts for.
        principal: anumate_auth::Principal,
        /// The acting service.
        service: &'static str,
        /// The caller's `authorization` header, for clients without service keys.
        forward: Option<AsciiMetadataValue>,
    },
}

impl Caller {
    /// The tenant the call acts in.
    pub fn tenant(&self) -> &str {
        match self {
            Caller::User { tenant, .. } | Caller::Service { tenant, .. } => tenant,
            Caller::Delegated { principal, .. } => &principal.tenant_id,
        }
    }

    /// The platform service making the call, if a service makes it.
    pub fn service(&self) -> Option<&'static str> {
        match self {
            Caller::User { .. } => None,
            Caller::Service { service, .. } | Caller::Delegated { service, .. } => Some(service),
        }
    }

    /// The acting principal's subject (`svc:<service>` for a service).
    pub fn subject(&self) -> String {
        match self {
            Caller::User { subject, .. } => subject.clone(),
            Caller::Service { service, .. } => anumate_auth::service_subject(service),
            Caller::Delegated { principal, .. } => principal.originator().to_owned(),
        }
    }
}

/// An upstream call that failed: in this process (the domain's error) or
/// over gRPC (the status, as received).
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The in-process service refused or failed.
    #[error("{0}")]
    Local(Error),
    /// The remote service answered with an error, or could not be reached.
    #[error("{}", .0.message())]
    Remote(tonic::Status),
}

impl UpstreamError {
    /// The gRPC code the call would have had over the wire.
    pub fn code(&self) -> tonic::Code {
        match self {
            UpstreamError::Local(e) => e.to_status().code(),
            UpstreamError::Remote(s) => s.code(),
        }
    }

    /// The error with its product code (`UNAVAILABLE` when unreachable).
    pub fn to_error(&self) -> Error {
        match self {
            UpstreamError::Local(e) => e.clone(),
            UpstreamError::Remote(s) => Error::from_status(s),
        }
    }

    /// The message, without code.
    pub fn message(&self) -> String {
        match self {
            UpstreamError::Local(e) => e.message.clone(),
            UpstreamError::Remote(s) => s.message().to_owned(),
        }
    }

    /// True when the service could not be reached over the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, UpstreamError::Remote(_))
    }
}

impl From<Error> for UpstreamError {
    fn from(e: Error) -> Self {
        UpstreamError::Local(e)
    }
}

/// A result of an upstream call.
pub type UpstreamResult<T> = Result<T, UpstreamError>;

/// The registry, as the compiler reads it.
pub trait RegistryClient: Send + Sync {
    /// `GetCapsule`.
    fn get_capsule<'a>(
        &'a self,
        caller: &'a Caller,
        request: rpb::GetCapsuleRequest,
    ) -> BoxFuture<'a, UpstreamResult<rpb::GetCapsuleResponse>>;

    /// `ToolsService.GetTool`: a tool of the tenant's catalogue.
    fn get_tool<'a>(
        &'a self,
        caller: &'a Caller,
        request: rpb::GetToolRequest,
    ) -> BoxFuture<'a, UpstreamResult<rpb::GetToolResponse>>;
}

/// The policy service, as the compiler reads it.
pub trait PolicyClient: Send + Sync {
    /// `GetPolicy`.
    fn get_policy<'a>(
        &'a self,
        caller: &'a Caller,
        request: ppb::GetPolicyRequest,
    ) -> BoxFuture<'a, UpstreamResult<ppb::GetPolicyResponse>>;
}

/// The compiler, as GhostRun (and later the orchestrator) reads plans.
pub trait CompilerClient: Send + Sync {
    /// `Compile`: the plan of a capsule version (compiled, or the stored one).
    fn compile<'a>(
        &'a self,
        caller: &'a Caller,
        request: cpb::CompileRequest,
    ) -> BoxFuture<'a, UpstreamResult<cpb::CompileResponse>>;

    /// `GetPlan`.
    fn get_plan<'a>(
        &'a self,
        caller: &'a Caller,
        request: cpb::GetPlanRequest,
    ) -> BoxFuture<'a, UpstreamResult<cpb::GetPlanResponse>>;
}

/// The receipts service, as services that attest their actions append to it
/// (its service-only `ReceiptsInternal`).
pub trait ReceiptsClient: Send + Sync {
    /// `ReceiptsInternal.AppendReceipt`.
    fn append_receipt<'a>(
        &'a self,
        caller: &'a Caller,
        request: rcpb::AppendReceiptRequest,
    ) -> BoxFuture<'a, UpstreamResult<rcpb::AppendReceiptResponse>>;

    /// Whether [`ReceiptsClient::append_in`] works: the log lives in this
    /// process's store, so a receipt can commit in the same transaction as
    /// the action it attests. A remote service cannot; then the receipt is
    /// appended first ([`append_receipt_first`]).
    fn appends_in_transaction(&self) -> bool {
        false
    }

    /// Validates, redacts and signs a receipt for [`ReceiptsClient::append_in`],
    /// outside any transaction (signing stays out of the log's critical
    /// section, and the receipt's id is known before the transaction).
    /// Only when [`ReceiptsClient::appends_in_transaction`].
    fn prepare_receipt(
        &self,
        _caller: &Caller,
        _request: rcpb::AppendReceiptRequest,
    ) -> Result<PreparedReceipt, Error> {
        Err(Error::internal(
            "this receipts client does not append in the caller's transaction",
        ))
    }

    /// Appends `receipts` (from [`ReceiptsClient::prepare_receipt`]) inside
    /// `tx`, the caller's own transaction on the store the log lives in:
    /// they commit or roll back with it. The log's head stays locked until
    /// `tx` ends, so append last, just before committing; then run
    /// [`AppendedInTx::committed`]. Only when
    /// [`ReceiptsClient::appends_in_transaction`].
    fn append_in<'a>(
        &'a self,
        _tx: &'a anumate_store::TenantTx,
        _receipts: Vec<PreparedReceipt>,
    ) -> BoxFuture<'a, Result<AppendedInTx, Error>> {
        Box::pin(async {
            Err(Error::internal(
                "this receipts client does not append in the caller's transaction",
            ))
        })
    }
}

/// A signed receipt not yet in the log ([`ReceiptsClient::prepare_receipt`]).
pub struct PreparedReceipt {
    /// Its id, unless its dedupe key turns out to be stored already (then
    /// [`ReceiptsClient::append_in`] answers with the stored receipt).
    pub receipt_id: String,
    /// What the receipts service prepared (opaque to the caller).
    pub prepared: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for PreparedReceipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedReceipt")
            .field("receipt_id", &self.receipt_id)
            .finish_non_exhaustive()
    }
}

/// Receipts appended by [`ReceiptsClient::append_in`], inside a transaction
/// that has not committed yet.
pub struct AppendedInTx {
    /// Each request's receipt, in order, or why that one was refused.
    pub receipts: Vec<Result<rcpb::Receipt, Error>>,
    /// Run once the transaction committed (the appender learns the log's
    /// new head); never when it did not commit.
    pub on_commit: Box<dyn FnOnce() + Send>,
}

impl AppendedInTx {
    /// The caller's transaction committed.
    pub fn committed(self) {
        (self.on_commit)();
    }
}

/// The approvals service, as the orchestrator opens and follows approvals
/// (its service-only `ApprovalsInternal`, and `GetApproval`).
pub trait ApprovalsClient: Send + Sync {
    /// `ApprovalsInternal.RequestApproval` (idempotent per run, step and arguments).
    fn request_approval<'a>(
        &'a self,
        caller: &'a Caller,
        request: apb::RequestApprovalRequest,
    ) -> BoxFuture<'a, UpstreamResult<apb::RequestApprovalResponse>>;

    /// `ApprovalsInternal.CancelApproval`.
    fn cancel_approval<'a>(
        &'a self,
        caller: &'a Caller,
        request: apb::CancelApprovalRequest,
    ) -> BoxFuture<'a, UpstreamResult<apb::CancelApprovalResponse>>;

    /// `ApprovalsService.GetApproval`.
    fn get_approval<'a>(
        &'a self,
        caller: &'a Caller,
        request: apb::GetApprovalRequest,
    ) -> BoxFuture<'a, UpstreamResult<apb::GetApprovalResponse>>;
}

/// The connector hub, as the orchestrator calls tools (its service-only
/// `ConnectorHubInternal`).
pub trait ConnectorHubClient: Send + Sync {
    /// `ConnectorHubInternal.Invoke`, answered within `timeout` (sent as the
    /// call's gRPC deadline: the hub answers `CALL_IN_FLIGHT` in time instead
    /// of waiting past it for a key another call holds).
    fn invoke<'a>(
        &'a self,
        caller: &'a Caller,
        request: conpb::InvokeRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, UpstreamResult<conpb::InvokeResponse>>;
}

/// The capability token service (`anumate.captokens.v1`): the orchestrator
/// mints a token for each call (`IssueToken`), the connector hub spends it in
/// the platform's one replay store (`ConsumeToken`, service-only, the hub
/// only) after checking its signature with the public keys (`GetJwks`).
pub trait CapTokensClient: Send + Sync {
    /// `CapabilityTokensInternal.IssueToken`: a token for exactly one call.
    fn issue<'a>(
        &'a self,
        caller: &'a Caller,
        request: ctpb::IssueTokenRequest,
    ) -> BoxFuture<'a, UpstreamResult<ctpb::IssueTokenResponse>>;

    /// `CapabilityTokensInternal.ConsumeToken`: refuses a revoked token and
    /// consumes a single-use one (a refusal is a `verdict`, not an error).
    fn consume<'a>(
        &'a self,
        caller: &'a Caller,
        request: ctpb::ConsumeTokenRequest,
    ) -> BoxFuture<'a, UpstreamResult<ctpb::ConsumeTokenResponse>>;

    /// `CapTokensService.GetJwks`: the JWKS JSON of the keys that verify
    /// tokens (current and retired; public, no credential needed).
    fn jwks(&self) -> BoxFuture<'_, UpstreamResult<String>>;

    /// Whether [`CapTokensClient::consume_in`] works: the replay store lives
    /// in this process's store, so the hub can spend a token in the same
    /// transaction as it claims the call's idempotency key. A remote service
    /// cannot; then the hub calls [`CapTokensClient::consume`].
    fn consumes_in_transaction(&self) -> bool {
        false
    }

    /// [`CapTokensClient::consume`] inside `tx`, the caller's transaction on
    /// the store the replay records live in: the token is spent if and only
    /// if `tx` commits. A refusal is audited in `tx` too, so the caller
    /// commits either way (after undoing its own writes on a refusal). Only
    /// when [`CapTokensClient::consumes_in_transaction`].
    fn consume_in<'a>(
        &'a self,
        _tx: &'a anumate_store::TenantTx,
        _caller: &'a Caller,
        _request: ctpb::ConsumeTokenRequest,
    ) -> BoxFuture<'a, Result<ctpb::ConsumeTokenResponse, Error>> {
        Box::pin(async {
            Err(Error::internal(
                "this capability token client does not spend tokens in the caller's transaction",
            ))
        })
    }
}

/// GhostRun, as the orchestrator checks the preflight a run cites.
pub trait GhostRunClient: Send + Sync {
    /// `GetPreflight`.
    fn get_preflight<'a>(
        &'a self,
        caller: &'a Caller,
        request: gpb::GetPreflightRequest,
    ) -> BoxFuture<'a, UpstreamResult<gpb::GetPreflightResponse>>;
}

/// Appends a receipt that must exist before `action` takes effect and
/// returns its id. A refusal of the receipts service becomes `UNAVAILABLE`
/// saying that `what` could not be appended and that the action did not
/// happen ("the decision's receipt", "nothing was decided"); a local error
/// passes through.
pub async fn append_receipt_first(
    receipts: &dyn ReceiptsClient,
    caller: &Caller,
    request: rcpb::AppendReceiptRequest,
    (what, consequence): (&str, &str),
) -> Result<String, Error> {
    let resp = receipts
        .append_receipt(caller, request)
        .await
        .map_err(|e| match e {
            UpstreamError::Local(e) => e,
            remote @ UpstreamError::Remote(_) => {
                let e = remote.to_error();
                Error::new(
                    ErrorCode::Unavailable,
                    format!(
                        "{what} could not be appended ({}: {}); {consequence}",
                        e.code, e.message
                    ),
                )
            }
        })?;
    resp.receipt
        .map(|r| r.receipt_id)
        .ok_or_else(|| Error::internal("the receipts service sent no receipt"))
}

/// The tenant's settings (`anumate.registry.v1.TenantSettingsService`), as
/// the services that enforce them read them: the caller's tenant's, defaults
/// filled in. In process the registry serves them from a cache that every
/// change invalidates (in every process sharing a PostgreSQL database, by
/// notification); over gRPC each call asks the registry.
pub trait TenantSettingsClient: Send + Sync {
    /// `GetTenantSettings` of `caller`'s tenant.
    fn get_tenant_settings<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> BoxFuture<'a, UpstreamResult<TenantSettings>>;
}

/// A tenant's settings in Rust types, defaults filled in
/// ([`TenantSettings::default`] is what a tenant that never changed anything
/// reads). The contract is `anumate.registry.v1.TenantSettings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSettings {
    /// `Execute` demands a non-FAIL preflight (default true).
    pub require_preflight: bool,
    /// How long a preflight report may be cited (default 1 h).
    pub preflight_citation_ttl: Duration,
    /// Expiry of an approval whose policy names none (default 24 h).
    pub approval_default_expiry: Duration,
    /// How long an `Execute` idempotency key returns the same run (default 24 h).
    pub idempotency_retention: Duration,
    /// How long finished runs are kept (default 30 days).
    pub run_retention: Duration,
    /// The settings' etag (`r0` for the defaults of a tenant that never
    /// changed anything).
    pub etag: String,
}

impl Default for TenantSettings {
    fn default() -> Self {
        TenantSettings {
            require_preflight: true,
            preflight_citation_ttl: Duration::from_secs(3600),
            approval_default_expiry: Duration::from_secs(24 * 3600),
            idempotency_retention: Duration::from_secs(24 * 3600),
            run_retention: Duration::from_secs(30 * 24 * 3600),
            etag: "r0".to_owned(),
        }
    }
}

impl TenantSettings {
    /// The settings of a `GetTenantSettings` answer; a duration the message
    /// lacks (or that is negative) reads as its default.
    pub fn from_proto(msg: &rpb::TenantSettings) -> TenantSettings {
        let d = TenantSettings::default();
        let dur = |v: Option<(i64, i32)>, default: Duration| match v {
            Some((s, n)) if s >= 0 && n >= 0 => Duration::new(s.unsigned_abs(), n.unsigned_abs()),
            _ => default,
        };
        TenantSettings {
            require_preflight: msg.require_preflight.unwrap_or(d.require_preflight),
            preflight_citation_ttl: dur(
                msg.preflight_citation_ttl
                    .as_ref()
                    .map(|d| (d.seconds, d.nanos)),
                d.preflight_citation_ttl,
            ),
            approval_default_expiry: dur(
                msg.approval_default_expiry
                    .as_ref()
                    .map(|d| (d.seconds, d.nanos)),
                d.approval_default_expiry,
            ),
            idempotency_retention: dur(
                msg.idempotency_retention
                    .as_ref()
                    .map(|d| (d.seconds, d.nanos)),
                d.idempotency_retention,
            ),
            run_retention: dur(
                msg.run_retention.as_ref().map(|d| (d.seconds, d.nanos)),
                d.run_retention,
            ),
            etag: msg.etag.clone(),
        }
    }
}

/// Any upstream service over gRPC: a channel, and the service issuer that
/// mints the token of [`Caller::Service`] calls (`None`: such calls fail).
#[derive(Debug, Clone)]
pub struct Grpc {
    channel: Channel,
    issuer: Option<ServiceIssuer>,
}

impl Grpc {
    /// A client over `channel` (see [`channel`]).
    pub fn new(channel: Channel) -> Grpc {
        Grpc {
            channel,
            issuer: None,
        }
    }

    /// Calls made as a service present a token of `issuer`, which must mint
    /// for that service.
    pub fn with_service_issuer(mut self, issuer: ServiceIssuer) -> Grpc {
        self.issuer = Some(issuer);
        self
    }

    /// `msg` with the caller's credentials and the current trace context.
    fn request<T>(&self, caller: &Caller, msg: T) -> UpstreamResult<tonic::Request<T>> {
        let mut req = tonic::Request::new(msg);
        crate::trace::inject(req.metadata_mut());
        match caller {
            Caller::User { authorization, .. } => {
                if let Some(auth) = authorization {
                    req.metadata_mut().insert("authorization", auth.clone());
                }
            }
            Caller::Service { tenant, service } => {
                let token = self.issuer_for(service)?.mint(tenant, SERVICE_TOKEN_TTL)?;
                insert_bearer(&mut req, &token)?;
            }
            Caller::Delegated {
                principal,
                service,
                forward,
            } => match (&self.issuer, forward) {
                (Some(_), _) => {
                    let token = self.issuer_for(service)?.token_for(principal)?;
                    insert_bearer(&mut req, &token)?;
                }
                (None, Some(auth)) => {
                    req.metadata_mut().insert("authorization", auth.clone());
                }
                (None, None) => {
                    self.issuer_for(service)?;
                }
            },
        }
        Ok(req)
    }

    /// This client's issuer, when it mints for `service`.
    fn issuer_for(&self, service: &str) -> UpstreamResult<&ServiceIssuer> {
        match &self.issuer {
            Some(issuer) if issuer.service() == service => Ok(issuer),
            other => Err(UpstreamError::Local(Error::new(
                ErrorCode::Internal,
                format!(
                    "no service issuer for {service:?} (this client mints for {:?})",
                    other.as_ref().map(ServiceIssuer::service)
                ),
            ))),
        }
    }
}

/// Sets `authorization: Bearer <token>` on `req`.
fn insert_bearer<T>(req: &mut tonic::Request<T>, token: &str) -> UpstreamResult<()> {
    let value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|e| UpstreamError::Local(Error::internal(e)))?;
    req.metadata_mut().insert("authorization", value);
    Ok(())
}

impl RegistryClient for Grpc {
    fn get_capsule<'a>(
        &'a self,
        caller: &'a Caller,
        request: rpb::GetCapsuleRequest,
    ) -> BoxFuture<'a, UpstreamResult<rpb::GetCapsuleResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                rpb::registry_service_client::RegistryServiceClient::new(self.channel.clone());
            Ok(client
                .get_capsule(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }

    fn get_tool<'a>(
        &'a self,
        caller: &'a Caller,
        request: rpb::GetToolRequest,
    ) -> BoxFuture<'a, UpstreamResult<rpb::GetToolResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                rpb::tools_service_client::ToolsServiceClient::new(self.channel.clone());
            Ok(client
                .get_tool(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }
}

impl PolicyClient for Grpc {
    fn get_policy<'a>(
        &'a self,
        caller: &'a Caller,
        request: ppb::GetPolicyRequest,
    ) -> BoxFuture<'a, UpstreamResult<ppb::GetPolicyResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                ppb::policy_service_client::PolicyServiceClient::new(self.channel.clone());
            Ok(client
                .get_policy(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }
}

impl CompilerClient for Grpc {
    fn compile<'a>(
        &'a self,
        caller: &'a Caller,
        request: cpb::CompileRequest,
    ) -> BoxFuture<'a, UpstreamResult<cpb::CompileResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                cpb::compiler_service_client::CompilerServiceClient::new(self.channel.clone());
            Ok(client
                .compile(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }

    fn get_plan<'a>(
        &'a self,
        caller: &'a Caller,
        request: cpb::GetPlanRequest,
    ) -> BoxFuture<'a, UpstreamResult<cpb::GetPlanResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                cpb::compiler_service_client::CompilerServiceClient::new(self.channel.clone());
            Ok(client
                .get_plan(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }
}

impl ReceiptsClient for Grpc {
    fn append_receipt<'a>(
        &'a self,
        caller: &'a Caller,
        request: rcpb::AppendReceiptRequest,
    ) -> BoxFuture<'a, UpstreamResult<rcpb::AppendReceiptResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                rcpb::receipts_internal_client::ReceiptsInternalClient::new(self.channel.clone());
            Ok(client
                .append_receipt(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }
}

impl ApprovalsClient for Grpc {
    fn request_approval<'a>(
        &'a self,
        caller: &'a Caller,
        request: apb::RequestApprovalRequest,
    ) -> BoxFuture<'a, UpstreamResult<apb::RequestApprovalResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                apb::approvals_internal_client::ApprovalsInternalClient::new(self.channel.clone());
            Ok(client
                .request_approval(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }

    fn cancel_approval<'a>(
        &'a self,
        caller: &'a Caller,
        request: apb::CancelApprovalRequest,
    ) -> BoxFuture<'a, UpstreamResult<apb::CancelApprovalResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                apb::approvals_internal_client::ApprovalsInternalClient::new(self.channel.clone());
            Ok(client
                .cancel_approval(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }

    fn get_approval<'a>(
        &'a self,
        caller: &'a Caller,
        request: apb::GetApprovalRequest,
    ) -> BoxFuture<'a, UpstreamResult<apb::GetApprovalResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                apb::approvals_service_client::ApprovalsServiceClient::new(self.channel.clone());
            Ok(client
                .get_approval(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }
}

impl ConnectorHubClient for Grpc {
    fn invoke<'a>(
        &'a self,
        caller: &'a Caller,
        request: conpb::InvokeRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, UpstreamResult<conpb::InvokeResponse>> {
        Box::pin(async move {
            let mut req = self.request(caller, request)?;
            req.set_timeout(timeout);
            let mut client = conpb::connector_hub_internal_client::ConnectorHubInternalClient::new(
                self.channel.clone(),
            );
            Ok(client
                .invoke(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }
}

impl CapTokensClient for Grpc {
    fn issue<'a>(
        &'a self,
        caller: &'a Caller,
        request: ctpb::IssueTokenRequest,
    ) -> BoxFuture<'a, UpstreamResult<ctpb::IssueTokenResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                ctpb::capability_tokens_internal_client::CapabilityTokensInternalClient::new(
                    self.channel.clone(),
                );
            Ok(client
                .issue_token(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }

    fn consume<'a>(
        &'a self,
        caller: &'a Caller,
        request: ctpb::ConsumeTokenRequest,
    ) -> BoxFuture<'a, UpstreamResult<ctpb::ConsumeTokenResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                ctpb::capability_tokens_internal_client::CapabilityTokensInternalClient::new(
                    self.channel.clone(),
                );
            Ok(client
                .consume_token(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }

    fn jwks(&self) -> BoxFuture<'_, UpstreamResult<String>> {
        Box::pin(async move {
            let mut client =
                ctpb::cap_tokens_service_client::CapTokensServiceClient::new(self.channel.clone());
            let body = client
                .get_jwks(ctpb::GetJwksRequest {})
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner();
            String::from_utf8(body.data).map_err(|e| {
                UpstreamError::Local(Error::internal(format!("the JWKS is not UTF-8: {e}")))
            })
        })
    }
}

impl GhostRunClient for Grpc {
    fn get_preflight<'a>(
        &'a self,
        caller: &'a Caller,
        request: gpb::GetPreflightRequest,
    ) -> BoxFuture<'a, UpstreamResult<gpb::GetPreflightResponse>> {
        Box::pin(async move {
            let req = self.request(caller, request)?;
            let mut client =
                gpb::ghost_run_service_client::GhostRunServiceClient::new(self.channel.clone());
            Ok(client
                .get_preflight(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner())
        })
    }
}

impl TenantSettingsClient for Grpc {
    fn get_tenant_settings<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> BoxFuture<'a, UpstreamResult<TenantSettings>> {
        Box::pin(async move {
            let req = self.request(caller, rpb::GetTenantSettingsRequest {})?;
            let mut client = rpb::tenant_settings_service_client::TenantSettingsServiceClient::new(
                self.channel.clone(),
            );
            let resp = client
                .get_tenant_settings(req)
                .await
                .map_err(UpstreamError::Remote)?
                .into_inner();
            let settings = resp.settings.ok_or_else(|| {
                UpstreamError::Local(Error::internal("the registry sent no tenant settings"))
            })?;
            Ok(TenantSettings::from_proto(&settings))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_bad_address_names_its_setting() {
        let e = channel("compiler.registry_url", "not a url").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.to_string().contains("compiler.registry_url"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_remote_unavailable() {
        // A port nothing listens on: bind one and drop it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let grpc = Grpc::new(channel("k", &format!("http://127.0.0.1:{port}")).unwrap());
        let caller = Caller::User {
            tenant: "t".into(),
            subject: "user:a".into(),
            authorization: None,
        };
        let e = grpc
            .get_capsule(&caller, rpb::GetCapsuleRequest::default())
            .await
            .unwrap_err();
        assert!(e.is_remote());
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_service_call_without_its_issuer_is_refused_before_sending() {
        let grpc = Grpc::new(channel("k", "http://127.0.0.1:1").unwrap());
        let caller = Caller::Service {
            tenant: "t".into(),
            service: "captokens",
        };
        let e = grpc
            .append_receipt(&caller, rcpb::AppendReceiptRequest::default())
            .await
            .unwrap_err();
        assert!(!e.is_remote());
        assert_eq!(e.code(), tonic::Code::Internal);
    }
}
