//! The registered error reasons (`anumate.common.v1.ErrorReason`): the specific
//! cause sent as `ErrorInfo.reason`, each belonging to one [`ErrorCode`] class.
//! The root crate's contract tests check this table against the proto enum.

use crate::ErrorCode;

/// The specific cause of an error, as registered in `common/v1/common.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// A request field is missing or invalid; `google.rpc.BadRequest` names it.
    InvalidArgument,
    /// A submitted document (capsule YAML, policy source, JSON input) failed to parse or validate; `google.rpc.BadRequest` lists every problem with its `line:column`.
    InvalidDocument,
    /// The request or a document in it exceeds a configured size limit (`limit` in the metadata).
    PayloadTooLarge,
    /// No credential, or one that is malformed, forged or from an unknown issuer.
    Unauthenticated,
    /// The credential was valid but has expired.
    TokenExpired,
    /// The caller may not call this RPC (`required_roles` or `required_services` in the metadata) or act on this resource.
    PermissionDenied,
    /// A resource does not exist for the caller's tenant (used where no more specific reason below applies).
    NotFound,
    /// The resource already exists.
    AlreadyExists,
    /// The `etag` sent is not the resource's current one (`current_etag` in the metadata): re-read and retry.
    EtagMismatch,
    /// The resource is not in a state that allows the operation (used where no more specific reason below applies).
    FailedPrecondition,
    /// A limit or quota was hit (`limit` in the metadata where there is one).
    ResourceExhausted,
    /// The operation is not implemented by this server.
    Unimplemented,
    /// A dependency (database, broker, another service) is unavailable; retry with backoff.
    Unavailable,
    /// The deadline expired before the operation completed.
    DeadlineExceeded,
    /// An unexpected server error; the server log has the details under the request's trace id.
    Internal,
    /// No capsule of that name in the tenant (or it was deleted).
    CapsuleNotFound,
    /// The capsule exists but not that version, or it has no published version when the published one was asked for.
    CapsuleVersionNotFound,
    /// No policy of that name in the tenant (or it was deleted).
    PolicyNotFound,
    /// The policy exists but not that version, or it has no published version when the published one was asked for.
    PolicyVersionNotFound,
    /// No executable plan with that hash in the tenant.
    PlanNotFound,
    /// No receipt with that id (or leaf index) in the tenant.
    ReceiptNotFound,
    /// No signed checkpoint of that tree size yet.
    CheckpointNotFound,
    /// No capability token with that id in the tenant.
    TokenNotFound,
    /// No signing key with that key id.
    SigningKeyNotFound,
    /// The name belongs to a deleted document; choose another name.
    DocumentDeleted,
    /// The version is deprecated: it cannot be published again (push a new version), nor compiled unless named by its number.
    VersionDeprecated,
    /// The versions are longer than the diff limit (`max_lines` in the metadata).
    DiffTooLarge,
    /// A capsule uses a tool the tenant's catalogue does not declare (`tools` in the metadata).
    ToolNotDeclared,
    /// A policy denied the operation (`policy`, `rule` and `verdict` in the metadata).
    PolicyDenied,
    /// A policy evaluation used up its fuel (a step budget that bounds its CPU time).
    FuelExhausted,
    /// The capability token was revoked.
    TokenRevoked,
    /// The single-use capability token was already consumed.
    TokenAlreadyUsed,
    /// The capability token does not cover this call: another audience, tenant, tool or argument hash.
    TokenScopeMismatch,
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused,
    /// The run needs a GhostRun preflight of this plan and inputs first.
    PreflightRequired,
    /// The principal who started a run (or is otherwise excluded) cannot approve it.
    SelfApproval,
    /// The caller is not among the approvers of the current stage, nor a delegate.
    NotAnApprover,
    /// The approval request is already decided, expired or cancelled.
    ApprovalAlreadyDecided,
    /// No approval request with that id in the tenant.
    ApprovalNotFound,
    /// No run with that id in the tenant.
    RunNotFound,
    /// Too many requests or streams at once for this caller or server; retry with backoff.
    RateLimited,
    /// A stream whose client stopped reading was closed after the configured idle time; reconnect and resume from the last sequence received.
    StreamIdle,
    /// No preflight report with that id in the tenant.
    PreflightNotFound,
    /// `Approve` named an `args_sha256` that is not the approval's.
    ApprovalArgsMismatch,
    /// No tool of that name in the tenant's catalogue.
    ToolNotFound,
    /// The tool exists but not that version, or every version is deprecated when the current one was asked for.
    ToolVersionNotFound,
    /// Preflight inputs do not match the plan's `inputs_schema`; `google.rpc.BadRequest` has one violation per field.
    PreflightInputsInvalid,
    /// A preflight fixture names an unknown step or tool, or has the wrong shape.
    PreflightFixtureInvalid,
    /// A connector call failed in a way worth retrying; nothing was recorded for its idempotency key.
    ConnectorRetryable,
    /// A connector call failed for good; the failure is recorded for its idempotency key.
    ConnectorFailed,
    /// No MCP server of that name in the hub's configuration.
    McpServerNotFound,
    /// A control call on a run that has ended.
    RunTerminal,
    /// The run has no step with that id.
    StepNotFound,
    /// `ResolveStep` on a step whose state the action does not apply to.
    StepNotResolvable,
    /// The cited preflight report is for another plan or other inputs.
    PreflightMismatch,
    /// The cited preflight report's verdict is `FAIL`, or it may not be cited.
    PreflightFailed,
    /// The cited preflight report is older than the tenant's citation TTL.
    PreflightExpired,
    /// The hub holds another call with this idempotency key in flight.
    CallInFlight,
    /// The REST gateway has no route for the request's method and path.
    RouteNotFound,
    /// The service a token names is not the mTLS peer's certificate identity.
    ServiceIdentityMismatch,
}

/// Reason, its wire name, its proto number and its class.
const REASONS: &[(Reason, &str, i32, ErrorCode)] = &[
    (
        Reason::InvalidArgument,
        "INVALID_ARGUMENT",
        1,
        ErrorCode::InvalidArgument,
    ),
    (
        Reason::InvalidDocument,
        "INVALID_DOCUMENT",
        2,
        ErrorCode::InvalidDocument,
    ),
    (
        Reason::PayloadTooLarge,
        "PAYLOAD_TOO_LARGE",
        3,
        ErrorCode::PayloadTooLarge,
    ),
    (
        Reason::Unauthenticated,
        "UNAUTHENTICATED",
        4,
        ErrorCode::Unauthenticated,
    ),
    (
        Reason::TokenExpired,
        "TOKEN_EXPIRED",
        5,
        ErrorCode::TokenExpired,
    ),
    (
        Reason::PermissionDenied,
        "PERMISSION_DENIED",
        6,
        ErrorCode::PermissionDenied,
    ),
    (Reason::NotFound, "NOT_FOUND", 7, ErrorCode::NotFound),
    (
        Reason::AlreadyExists,
        "ALREADY_EXISTS",
        8,
        ErrorCode::AlreadyExists,
    ),
    (
        Reason::EtagMismatch,
        "ETAG_MISMATCH",
        9,
        ErrorCode::EtagMismatch,
    ),
    (
        Reason::FailedPrecondition,
        "FAILED_PRECONDITION",
        10,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::ResourceExhausted,
        "RESOURCE_EXHAUSTED",
        11,
        ErrorCode::ResourceExhausted,
    ),
    (
        Reason::Unimplemented,
        "UNIMPLEMENTED",
        12,
        ErrorCode::Unimplemented,
    ),
    (
        Reason::Unavailable,
        "UNAVAILABLE",
        13,
        ErrorCode::Unavailable,
    ),
    (
        Reason::DeadlineExceeded,
        "DEADLINE_EXCEEDED",
        14,
        ErrorCode::DeadlineExceeded,
    ),
    (Reason::Internal, "INTERNAL", 15, ErrorCode::Internal),
    (
        Reason::CapsuleNotFound,
        "CAPSULE_NOT_FOUND",
        16,
        ErrorCode::NotFound,
    ),
    (
        Reason::CapsuleVersionNotFound,
        "CAPSULE_VERSION_NOT_FOUND",
        17,
        ErrorCode::NotFound,
    ),
    (
        Reason::PolicyNotFound,
        "POLICY_NOT_FOUND",
        18,
        ErrorCode::NotFound,
    ),
    (
        Reason::PolicyVersionNotFound,
        "POLICY_VERSION_NOT_FOUND",
        19,
        ErrorCode::NotFound,
    ),
    (
        Reason::PlanNotFound,
        "PLAN_NOT_FOUND",
        20,
        ErrorCode::NotFound,
    ),
    (
        Reason::ReceiptNotFound,
        "RECEIPT_NOT_FOUND",
        21,
        ErrorCode::NotFound,
    ),
    (
        Reason::CheckpointNotFound,
        "CHECKPOINT_NOT_FOUND",
        22,
        ErrorCode::NotFound,
    ),
    (
        Reason::TokenNotFound,
        "TOKEN_NOT_FOUND",
        23,
        ErrorCode::NotFound,
    ),
    (
        Reason::SigningKeyNotFound,
        "SIGNING_KEY_NOT_FOUND",
        24,
        ErrorCode::NotFound,
    ),
    (
        Reason::DocumentDeleted,
        "DOCUMENT_DELETED",
        25,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::VersionDeprecated,
        "VERSION_DEPRECATED",
        26,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::DiffTooLarge,
        "DIFF_TOO_LARGE",
        27,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::ToolNotDeclared,
        "TOOL_NOT_DECLARED",
        28,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::PolicyDenied,
        "POLICY_DENIED",
        29,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::FuelExhausted,
        "FUEL_EXHAUSTED",
        30,
        ErrorCode::ResourceExhausted,
    ),
    (
        Reason::TokenRevoked,
        "TOKEN_REVOKED",
        31,
        ErrorCode::PermissionDenied,
    ),
    (
        Reason::TokenAlreadyUsed,
        "TOKEN_ALREADY_USED",
        32,
        ErrorCode::PermissionDenied,
    ),
    (
        Reason::TokenScopeMismatch,
        "TOKEN_SCOPE_MISMATCH",
        33,
        ErrorCode::PermissionDenied,
    ),
    (
        Reason::IdempotencyKeyReused,
        "IDEMPOTENCY_KEY_REUSED",
        34,
        ErrorCode::AlreadyExists,
    ),
    (
        Reason::PreflightRequired,
        "PREFLIGHT_REQUIRED",
        35,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::SelfApproval,
        "SELF_APPROVAL",
        36,
        ErrorCode::PermissionDenied,
    ),
    (
        Reason::NotAnApprover,
        "NOT_AN_APPROVER",
        37,
        ErrorCode::PermissionDenied,
    ),
    (
        Reason::ApprovalAlreadyDecided,
        "APPROVAL_ALREADY_DECIDED",
        38,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::ApprovalNotFound,
        "APPROVAL_NOT_FOUND",
        39,
        ErrorCode::NotFound,
    ),
    (
        Reason::RunNotFound,
        "RUN_NOT_FOUND",
        40,
        ErrorCode::NotFound,
    ),
    (
        Reason::RateLimited,
        "RATE_LIMITED",
        41,
        ErrorCode::ResourceExhausted,
    ),
    (
        Reason::StreamIdle,
        "STREAM_IDLE",
        42,
        ErrorCode::Unavailable,
    ),
    (
        Reason::PreflightNotFound,
        "PREFLIGHT_NOT_FOUND",
        43,
        ErrorCode::NotFound,
    ),
    (
        Reason::ApprovalArgsMismatch,
        "APPROVAL_ARGS_MISMATCH",
        44,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::ToolNotFound,
        "TOOL_NOT_FOUND",
        45,
        ErrorCode::NotFound,
    ),
    (
        Reason::ToolVersionNotFound,
        "TOOL_VERSION_NOT_FOUND",
        46,
        ErrorCode::NotFound,
    ),
    (
        Reason::PreflightInputsInvalid,
        "PREFLIGHT_INPUTS_INVALID",
        47,
        ErrorCode::InvalidArgument,
    ),
    (
        Reason::PreflightFixtureInvalid,
        "PREFLIGHT_FIXTURE_INVALID",
        48,
        ErrorCode::InvalidArgument,
    ),
    (
        Reason::ConnectorRetryable,
        "CONNECTOR_RETRYABLE",
        49,
        ErrorCode::Unavailable,
    ),
    (
        Reason::ConnectorFailed,
        "CONNECTOR_FAILED",
        50,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::McpServerNotFound,
        "MCP_SERVER_NOT_FOUND",
        55,
        ErrorCode::NotFound,
    ),
    (
        Reason::RunTerminal,
        "RUN_TERMINAL",
        63,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::StepNotFound,
        "STEP_NOT_FOUND",
        64,
        ErrorCode::NotFound,
    ),
    (
        Reason::StepNotResolvable,
        "STEP_NOT_RESOLVABLE",
        65,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::PreflightMismatch,
        "PREFLIGHT_MISMATCH",
        66,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::PreflightFailed,
        "PREFLIGHT_FAILED",
        67,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::PreflightExpired,
        "PREFLIGHT_EXPIRED",
        68,
        ErrorCode::FailedPrecondition,
    ),
    (
        Reason::CallInFlight,
        "CALL_IN_FLIGHT",
        69,
        ErrorCode::Unavailable,
    ),
    (
        Reason::RouteNotFound,
        "ROUTE_NOT_FOUND",
        77,
        ErrorCode::NotFound,
    ),
    (
        Reason::ServiceIdentityMismatch,
        "SERVICE_IDENTITY_MISMATCH",
        78,
        ErrorCode::PermissionDenied,
    ),
];

impl Reason {
    /// Every registered reason, in proto order.
    pub fn all() -> impl Iterator<Item = Reason> {
        REASONS.iter().map(|row| row.0)
    }

    fn row(self) -> &'static (Reason, &'static str, i32, ErrorCode) {
        // The table lists every variant; `every_reason_is_in_the_table_once` checks it.
        REASONS
            .iter()
            .find(|row| row.0 == self)
            .unwrap_or(&REASONS[ErrorCode::Internal as usize])
    }

    /// The wire name sent as `ErrorInfo.reason`, e.g. `CAPSULE_NOT_FOUND`.
    pub fn as_str(self) -> &'static str {
        self.row().1
    }

    /// The `ErrorReason` enum number in `common.proto`.
    pub fn number(self) -> i32 {
        self.row().2
    }

    /// The class it belongs to (its gRPC code and HTTP status).
    pub fn code(self) -> ErrorCode {
        self.row().3
    }

    /// Parses a wire name.
    pub fn from_name(name: &str) -> Option<Reason> {
        REASONS.iter().find(|row| row.1 == name).map(|row| row.0)
    }

    /// The class's own generic reason.
    pub fn generic(code: ErrorCode) -> Reason {
        REASONS
            .iter()
            .find(|row| row.1 == code.as_str())
            .map_or(Reason::Internal, |row| row.0)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_in_the_table_once() {
        let mut names: Vec<_> = REASONS.iter().map(|r| r.1).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REASONS.len());
        // Numbers increase in proto order; gaps are numbers assigned to
        // work not yet landed.
        for (i, row) in REASONS.iter().enumerate() {
            let before = if i == 0 { 0 } else { REASONS[i - 1].2 };
            assert!(row.2 > before, "{} is numbered in proto order", row.1);
            assert_eq!(Reason::from_name(row.1), Some(row.0));
            assert_eq!(row.0.as_str(), row.1);
        }
    }

    #[test]
    fn every_class_has_its_generic_reason() {
        for code in ErrorCode::all() {
            let generic = Reason::generic(code);
            assert_eq!(generic.code(), code);
            assert_eq!(generic.as_str(), code.as_str());
        }
    }
}
