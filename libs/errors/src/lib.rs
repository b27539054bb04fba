//! Stable product error codes and their one mapping to gRPC and HTTP.
//!
//! Every error that leaves an Anumate service is a `google.rpc.Status` whose
//! details carry `ErrorInfo { reason: CODE, domain: "anumate.dev" }` and, for
//! invalid documents or fields, a `BadRequest` with one violation per problem.
//! Clients branch on `reason`; the [`ErrorCode`] names equal the
//! `anumate.common.v1.ErrorCode` values without their prefix.
#![forbid(unsafe_code)]

pub mod layer;
mod names;
mod reason;

pub use names::{MAX_DNS_LABEL, check_dns_label, is_dns_label};
pub use reason::Reason;

use std::fmt;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every Anumate error.
pub const DOMAIN: &str = "anumate.dev";

/// A stable product error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    InvalidDocument,
    PayloadTooLarge,
    Unauthenticated,
    TokenExpired,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    ResourceExhausted,
    Unimplemented,
    Unavailable,
    DeadlineExceeded,
    Internal,
}

/// The single table: code, its name on the wire, gRPC code, HTTP status.
const TABLE: &[(ErrorCode, &str, Code, u16)] = &[
    (
        ErrorCode::InvalidArgument,
        "INVALID_ARGUMENT",
        Code::InvalidArgument,
        400,
    ),
    (
        ErrorCode::InvalidDocument,
        "INVALID_DOCUMENT",
        Code::InvalidArgument,
        400,
    ),
    (
        ErrorCode::PayloadTooLarge,
        "PAYLOAD_TOO_LARGE",
        Code::ResourceExhausted,
        413,
    ),
    (
        ErrorCode::Unauthenticated,
        "UNAUTHENTICATED",
        Code::Unauthenticated,
        401,
    ),
    (
        ErrorCode::TokenExpired,
        "TOKEN_EXPIRED",
        Code::Unauthenticated,
        401,
    ),
    (
        ErrorCode::PermissionDenied,
        "PERMISSION_DENIED",
        Code::PermissionDenied,
        403,
    ),
    (ErrorCode::NotFound, "NOT_FOUND", Code::NotFound, 404),
    (
        ErrorCode::AlreadyExists,
        "ALREADY_EXISTS",
        Code::AlreadyExists,
        409,
    ),
    (ErrorCode::EtagMismatch, "ETAG_MISMATCH", Code::Aborted, 409),
    (
        ErrorCode::FailedPrecondition,
        "FAILED_PRECONDITION",
        Code::FailedPrecondition,
        400,
    ),
    (
        ErrorCode::ResourceExhausted,
        "RESOURCE_EXHAUSTED",
        Code::ResourceExhausted,
        429,
    ),
    (
        ErrorCode::Unimplemented,
        "UNIMPLEMENTED",
        Code::Unimplemented,
        501,
    ),
    (
        ErrorCode::Unavailable,
        "UNAVAILABLE",
        Code::Unavailable,
        503,
    ),
    (
        ErrorCode::DeadlineExceeded,
        "DEADLINE_EXCEEDED",
        Code::DeadlineExceeded,
        504,
    ),
    (ErrorCode::Internal, "INTERNAL", Code::Internal, 500),
];

impl ErrorCode {
    /// Every code, in table order.
    pub fn all() -> impl Iterator<Item = ErrorCode> {
        TABLE.iter().map(|row| row.0)
    }

    fn row(self) -> &'static (ErrorCode, &'static str, Code, u16) {
        // The table lists every variant; `all_codes_are_in_the_table` checks it.
        TABLE
            .iter()
            .find(|row| row.0 == self)
            .unwrap_or(&TABLE[TABLE.len() - 1])
    }

    /// The class's stable name, e.g. `ETAG_MISMATCH` (also its generic reason's).
    pub fn as_str(self) -> &'static str {
        self.row().1
    }

    /// The gRPC status code this product code is sent with.
    pub fn grpc_code(self) -> Code {
        self.row().2
    }

    /// The HTTP status the REST gateway answers with.
    pub fn http_status(self) -> u16 {
        self.row().3
    }

    /// The class of a wire `reason` (any registered reason, generic or specific).
    pub fn from_reason(reason: &str) -> Option<ErrorCode> {
        Reason::from_name(reason).map(Reason::code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem with a field or a place in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field (`spec.steps[1].tool`) or the request field name.
    pub field: String,
    /// What is wrong, human readable.
    pub description: String,
    /// 1-based position in the parsed document, when there is one.
    pub position: Option<(u32, u32)>,
}

impl Violation {
    /// A violation without a document position.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Violation {
            field: field.into(),
            description: description.into(),
            position: None,
        }
    }

    /// A violation at `line:column` (1-based) of a document.
    pub fn at(
        field: impl Into<String>,
        line: u32,
        column: u32,
        description: impl Into<String>,
    ) -> Self {
        Violation {
            field: field.into(),
            description: description.into(),
            position: Some((line, column)),
        }
    }

    /// The `BadRequest.FieldViolation.description`: `line:col: text` when positioned.
    pub fn wire_description(&self) -> String {
        match self.position {
            Some((line, col)) => format!("{line}:{col}: {}", self.description),
            None => self.description.clone(),
        }
    }
}

/// An error with a stable code, a safe message and optional details.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    /// The class: gRPC code and HTTP status.
    pub code: ErrorCode,
    /// The specific cause, sent as `ErrorInfo.reason`; always of class `code`.
    pub reason: Reason,
    /// Message for the caller; never contains internals.
    pub message: String,
    /// Field or document violations (sent as `BadRequest`).
    pub violations: Vec<Violation>,
    /// Extra `ErrorInfo.metadata` entries.
    pub metadata: Vec<(String, String)>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error with `code` and `message`.
    /// Its reason is the class's generic one; see [`Error::because`].
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            reason: Reason::generic(code),
            message: message.into(),
            violations: Vec::new(),
            metadata: Vec::new(),
        }
    }

    /// A new error for a specific registered `reason` (its class follows).
    pub fn because(reason: Reason, message: impl Into<String>) -> Self {
        let mut err = Error::new(reason.code(), message);
        err.reason = reason;
        err
    }

    /// Replaces the reason, and the class with the reason's.
    pub fn with_reason(mut self, reason: Reason) -> Self {
        self.code = reason.code();
        self.reason = reason;
        self
    }

    /// Adds violations.
    pub fn with_violations(mut self, violations: Vec<Violation>) -> Self {
        self.violations = violations;
        self
    }

    /// Adds an `ErrorInfo.metadata` entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// `INVALID_ARGUMENT` naming one request field.
    pub fn invalid_argument(field: &str, description: impl Into<String>) -> Self {
        let description = description.into();
        Error::new(
            ErrorCode::InvalidArgument,
            format!("{field}: {description}"),
        )
        .with_violations(vec![Violation::new(field, description)])
    }

    /// `NOT_FOUND`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::NotFound, message)
    }

    /// `INTERNAL` with a generic message; logs the real cause.
    pub fn internal(cause: impl fmt::Display) -> Self {
        tracing::error!(cause = %cause, "internal error");
        Error::new(ErrorCode::Internal, "internal error")
    }

    /// Converts to a `tonic::Status` carrying `ErrorInfo` and `BadRequest`.
    pub fn to_status(&self) -> tonic::Status {
        let mut details = ErrorDetails::new();
        let metadata = self
            .metadata
            .iter()
            .cloned()
            .collect::<std::collections::HashMap<_, _>>();
        details.set_error_info(self.reason.as_str(), DOMAIN, metadata);
        for v in &self.violations {
            details.add_bad_request_violation(v.field.clone(), v.wire_description());
        }
        tonic::Status::with_error_details(self.code.grpc_code(), self.message.clone(), details)
    }

    /// Reads an error back from a status produced by [`Error::to_status`]. Statuses
    /// without `ErrorInfo` get the code implied by their gRPC code.
    pub fn from_status(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let reason = details
            .error_info()
            .and_then(|info| Reason::from_name(&info.reason))
            .unwrap_or_else(|| Reason::generic(code_for_grpc(status.code())));
        let mut metadata: Vec<(String, String)> = details
            .error_info()
            .map(|info| info.metadata.clone().into_iter().collect())
            .unwrap_or_default();
        metadata.sort();
        let violations = details
            .bad_request()
            .map(|br| {
                br.field_violations
                    .iter()
                    .map(|fv| parse_violation(&fv.field, &fv.description))
                    .collect()
            })
            .unwrap_or_default();
        Error {
            code: reason.code(),
            reason,
            message: status.message().to_string(),
            violations,
            metadata,
        }
    }
}

fn parse_violation(field: &str, description: &str) -> Violation {
    let mut parts = description.splitn(3, ':');
    if let (Some(l), Some(c), Some(rest)) = (parts.next(), parts.next(), parts.next())
        && let (Ok(line), Ok(col)) = (l.parse::<u32>(), c.parse::<u32>())
    {
        return Violation::at(field, line, col, rest.trim_start());
    }
    Violation::new(field, description)
}

/// The product code a bare gRPC status code implies.
pub fn code_for_grpc(code: Code) -> ErrorCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange => ErrorCode::InvalidArgument,
        Code::Unauthenticated => ErrorCode::Unauthenticated,
        Code::PermissionDenied => ErrorCode::PermissionDenied,
        Code::NotFound => ErrorCode::NotFound,
        Code::AlreadyExists => ErrorCode::AlreadyExists,
        Code::Aborted => ErrorCode::EtagMismatch,
        Code::FailedPrecondition => ErrorCode::FailedPrecondition,
        Code::ResourceExhausted => ErrorCode::ResourceExhausted,
        Code::Unimplemented => ErrorCode::Unimplemented,
        Code::Unavailable => ErrorCode::Unavailable,
        Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        _ => ErrorCode::Internal,
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_codes_are_in_the_table_once() {
        let mut names: Vec<_> = TABLE.iter().map(|r| r.1).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TABLE.len());
        for code in ErrorCode::all() {
            assert_eq!(ErrorCode::from_reason(code.as_str()), Some(code));
        }
    }

    #[test]
    fn status_round_trips_code_and_violations() {
        let err =
            Error::new(ErrorCode::InvalidDocument, "capsule has 2 problems").with_violations(vec![
                Violation::at(
                    "spec.steps[0].tool",
                    12,
                    7,
                    "tool \"x\" is not in spec.tools",
                ),
                Violation::new("metadata.name", "required"),
            ]);
        let status = err.to_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let back = Error::from_status(&status);
        assert_eq!(back.code, ErrorCode::InvalidDocument);
        assert_eq!(back.violations, err.violations);
    }

    #[test]
    fn a_specific_reason_goes_on_the_wire_and_comes_back() {
        let err = Error::because(Reason::CapsuleNotFound, "capsule refund not found");
        assert_eq!(err.code, ErrorCode::NotFound);
        let status = err.to_status();
        assert_eq!(status.code(), Code::NotFound);
        let info = status.get_error_details().error_info().cloned();
        assert_eq!(
            info.map(|i| i.reason),
            Some("CAPSULE_NOT_FOUND".to_string())
        );
        let back = Error::from_status(&status);
        assert_eq!(
            (back.code, back.reason),
            (ErrorCode::NotFound, Reason::CapsuleNotFound)
        );
        // A status from elsewhere, without ErrorInfo: the class's generic reason.
        let bare = Error::from_status(&tonic::Status::not_found("gone"));
        assert_eq!(bare.reason, Reason::NotFound);
    }

    #[test]
    fn etag_mismatch_is_aborted_and_409() {
        assert_eq!(ErrorCode::EtagMismatch.grpc_code(), Code::Aborted);
        assert_eq!(ErrorCode::EtagMismatch.http_status(), 409);
    }
}
