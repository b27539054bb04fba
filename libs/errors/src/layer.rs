//! A tower layer that makes every gRPC error leave the server with `ErrorInfo`.
//!
//! Handlers return [`Error`](crate::Error)s, which carry details already. Errors
//! raised by the transport itself — a request over the decoding limit, an unknown
//! method, a malformed frame — come out of tonic as bare statuses; this layer
//! adds the `ErrorInfo` (with the product code implied by the gRPC code) so
//! clients can always branch on `reason`.

use crate::{Error, ErrorCode, code_for_grpc};
use http::{HeaderMap, Response};

const DETAILS: &str = "grpc-status-details-bin";

/// Adds `grpc-status-details-bin` with an `ErrorInfo` to trailers-only error
/// responses that lack it.
pub fn ensure_error_info<B>(mut resp: Response<B>) -> Response<B> {
    add_missing_details(resp.headers_mut());
    resp
}

fn add_missing_details(headers: &mut HeaderMap) {
    let failed = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s != "0");
    if !failed || headers.contains_key(DETAILS) {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    // tonic reports an oversized request as OUT_OF_RANGE; our table sends
    // PAYLOAD_TOO_LARGE as RESOURCE_EXHAUSTED, like the registry's own limit.
    let (code, message) = if status.message().contains("message length too large") {
        (ErrorCode::PayloadTooLarge, status.message().to_string())
    } else if status
        .message()
        .starts_with("failed to decode Protobuf message")
    {
        // tonic-prost answers a body that is not protobuf with a bare INTERNAL
        // before any handler runs; it is the caller's error (SPEC §12).
        (
            ErrorCode::InvalidArgument,
            format!(
                "request is not a valid protobuf message: {}",
                status.message()
            ),
        )
    } else {
        (code_for_grpc(status.code()), status.message().to_string())
    };
    let enriched = Error::new(code, message).to_status();
    // Replaces grpc-status/grpc-message with identical values and adds the details.
    let _ = enriched.add_header(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_statuses_get_error_info() {
        let bare = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 10485760 bytes, the limit is: 4194304 bytes",
        );
        let resp = ensure_error_info(bare.into_http::<()>());
        let status = tonic::Status::from_header_map(resp.headers()).expect("status");
        let err = Error::from_status(&status);
        assert_eq!(err.code, ErrorCode::PayloadTooLarge);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);

        let resp = ensure_error_info(tonic::Status::unimplemented("").into_http::<()>());
        let err =
            Error::from_status(&tonic::Status::from_header_map(resp.headers()).expect("status"));
        assert_eq!(err.code, ErrorCode::Unimplemented);
    }

    #[test]
    fn undecodable_requests_are_invalid_argument() {
        let bare = tonic::Status::internal("failed to decode Protobuf message: buffer underflow");
        let resp = ensure_error_info(bare.into_http::<()>());
        let status = tonic::Status::from_header_map(resp.headers()).expect("status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(Error::from_status(&status).code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn existing_details_and_successes_are_untouched() {
        let rich = Error::new(ErrorCode::EtagMismatch, "changed").to_status();
        let before = rich.clone().into_http::<()>();
        let after = ensure_error_info(rich.into_http::<()>());
        assert_eq!(before.headers().get(DETAILS), after.headers().get(DETAILS));
        let ok = ensure_error_info(Response::new(()));
        assert!(ok.headers().get(DETAILS).is_none());
    }
}
