//! Errors as JSON `google.rpc.Status`, with the HTTP status the one error
//! table (`anumate_errors`) gives the reason.

use anumate_errors::{Error, ErrorCode, Reason, code_for_grpc};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value as Json, json};
use tonic_types::StatusExt as _;

/// The `google.rpc.Status` JSON of a gRPC status, with its `ErrorInfo`,
/// `BadRequest` and other details.
pub fn status_json(status: &tonic::Status) -> Json {
    let details = status.get_error_details();
    let mut out = Vec::new();
    if let Some(info) = details.error_info() {
        out.push(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": info.reason,
            "domain": info.domain,
            "metadata": info.metadata,
        }));
    }
    if let Some(br) = details.bad_request() {
        let violations: Vec<Json> = br
            .field_violations
            .iter()
            .map(|v| json!({"field": v.field, "description": v.description}))
            .collect();
        out.push(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": violations,
        }));
    }
    if let Some(retry) = details.retry_info()
        && let Some(delay) = retry.retry_delay
    {
        out.push(json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{}.{:09}s", delay.as_secs(), delay.subsec_nanos()),
        }));
    }
    if let Some(pf) = details.precondition_failure() {
        let violations: Vec<Json> = pf
            .violations
            .iter()
            .map(|v| json!({"type": v.r#type, "subject": v.subject, "description": v.description}))
            .collect();
        out.push(json!({
            "@type": "type.googleapis.com/google.rpc.PreconditionFailure",
            "violations": violations,
        }));
    }
    if let Some(qf) = details.quota_failure() {
        let violations: Vec<Json> = qf
            .violations
            .iter()
            .map(|v| json!({"subject": v.subject, "description": v.description}))
            .collect();
        out.push(json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": violations,
        }));
    }
    json!({
        "code": status.code() as i32,
        "message": status.message(),
        "details": out,
    })
}

/// The HTTP status of a gRPC status: its reason's class when it carries a
/// registered `ErrorInfo`, else its gRPC code's class.
pub fn http_status(status: &tonic::Status) -> StatusCode {
    let code = status
        .get_details_error_info()
        .and_then(|info| Reason::from_name(&info.reason))
        .map(Reason::code)
        .unwrap_or_else(|| code_for_grpc(status.code()));
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A gRPC status as an HTTP response; a `RetryInfo` also becomes a
/// `Retry-After` header (whole seconds, rounded up).
pub fn status_response(status: &tonic::Status) -> Response {
    let mut resp = json_response(http_status(status), &status_json(status));
    if let Some(delay) = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
    {
        let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// One of the gateway's own errors as an HTTP response.
pub fn error_response(error: &Error) -> Response {
    status_response(&error.to_status())
}

/// A JSON response.
pub fn json_response(code: StatusCode, body: &Json) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = (code, bytes).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A gateway error of `reason` with `message`.
pub fn reason_response(reason: Reason, message: impl Into<String>) -> Response {
    error_response(&Error::because(reason, message))
}

/// The HTTP status of an error class.
pub fn http_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn retry_info_becomes_retry_after() {
        let limited = tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(1_200))),
        );
        let resp = status_response(&limited);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let plain = status_response(&tonic::Status::not_found("gone"));
        assert!(plain.headers().get(header::RETRY_AFTER).is_none());
    }
}
