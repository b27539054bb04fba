//! Server streaming over HTTP: NDJSON (`{"result": …}` per line,
//! `{"error": Status}` last when the stream fails) or Server-Sent Events
//! (`id:` the message's `sequence`, heartbeat comments). The response
//! headers wait for the first message, so an error before it (`NOT_FOUND`,
//! `PERMISSION_DENIED`) is a real HTTP status; later errors go in-band.
//!
//! A stream of `google.api.HttpBody` (the receipts export) is the bodies'
//! bytes as they are, under the first body's content type: no wrapping, no
//! SSE; an error after the first body cuts the response short (the body
//! ends without its last chunk), which HTTP clients report as a broken
//! transfer, and the client resumes as the RPC says.

use std::time::Duration;

use axum::{body::Body, response::Response};
use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderValue, StatusCode, header};
use prost_reflect::{DynamicMessage, MessageDescriptor};
use serde_json::{Value as Json, json};
use tonic::Streaming;

use crate::routes::Route;
use crate::status::{status_json, status_response};
use crate::{Upstream, codec::BytesCodec, grpc_client, grpc_path, transcode};

/// The request field `Last-Event-ID` resumes from, if the RPC has one.
pub fn resume_field(input: &MessageDescriptor) -> Option<&'static str> {
    input
        .get_field_by_name("after_sequence")
        .map(|_| "after_sequence")
}

/// The `sequence` of a response message, for the SSE `id:`: its own, else
/// that of a message field carrying one (`TailEvents`' `event.sequence`).
fn sequence(msg: &DynamicMessage) -> Option<String> {
    own_sequence(msg).or_else(|| {
        msg.fields().find_map(|(_, v)| match v {
            prost_reflect::Value::Message(inner) => own_sequence(inner),
            _ => None,
        })
    })
}

fn own_sequence(msg: &DynamicMessage) -> Option<String> {
    let v = msg.get_field_by_name("sequence")?;
    match v.as_ref() {
        prost_reflect::Value::I64(n) => Some(n.to_string()),
        prost_reflect::Value::U64(n) => Some(n.to_string()),
        prost_reflect::Value::I32(n) => Some(n.to_string()),
        prost_reflect::Value::U32(n) => Some(n.to_string()),
        _ => None,
    }
}

struct State {
    stream: Streaming<Bytes>,
    first: Option<Bytes>,
    output: MessageDescriptor,
    response_body: String,
    sse: bool,
    /// The messages are `google.api.HttpBody`: their bytes go out raw.
    raw: bool,
    heartbeat: tokio::time::Interval,
    done: bool,
}

/// Why a raw stream was cut short (the client sees a broken transfer).
#[derive(Debug)]
struct Broken(String);

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Broken {}

/// The `content_type` and `data` of an encoded `google.api.HttpBody`.
fn http_body(output: &MessageDescriptor, bytes: &[u8]) -> Result<(String, Bytes), Broken> {
    let msg = DynamicMessage::decode(output.clone(), bytes)
        .map_err(|e| Broken(format!("response does not decode: {e}")))?;
    let content_type = msg
        .get_field_by_name("content_type")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let data = msg
        .get_field_by_name("data")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    Ok((content_type, data))
}

impl State {
    fn frame(&self, bytes: &[u8]) -> Result<Bytes, Broken> {
        if self.raw {
            return http_body(&self.output, bytes).map(|(_, data)| data);
        }
        Ok(
            match transcode::response_json(&self.output, bytes, &self.response_body) {
                Ok((json, msg)) => {
                    if self.sse {
                        let mut out = String::new();
                        if let Some(seq) = sequence(&msg) {
                            out.push_str("id: ");
                            out.push_str(&seq);
                            out.push('\n');
                        }
                        out.push_str("event: result\ndata: ");
                        out.push_str(&json.to_string());
                        out.push_str("\n\n");
                        Bytes::from(out)
                    } else {
                        line(&json!({ "result": json }))
                    }
                }
                Err(e) => self.error_frame(&e.to_status()),
            },
        )
    }

    fn error_frame(&self, status: &tonic::Status) -> Bytes {
        let body = status_json(status);
        if self.sse {
            Bytes::from(format!("event: error\ndata: {body}\n\n"))
        } else {
            line(&json!({ "error": body }))
        }
    }
}

fn line(json: &Json) -> Bytes {
    let mut v = serde_json::to_vec(json).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Calls a server-streaming RPC and streams its answers.
pub async fn call(
    channel: &Upstream,
    route: &Route,
    request: tonic::Request<Bytes>,
    sse: bool,
    heartbeat_secs: u64,
    first_wait: Duration,
) -> Response {
    let mut grpc = match grpc_client(channel).await {
        Ok(g) => g,
        Err(s) => return status_response(&s),
    };
    let mut stream = match grpc
        .server_streaming(request, grpc_path(route), BytesCodec)
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return status_response(&s),
    };
    let output = route.rpc.output();
    let raw = output.full_name() == "google.api.HttpBody";
    // Hold the headers until the first message or error, so an early
    // refusal is a real HTTP status; a watch with nothing to say yet gets
    // its headers after `first_wait` (before the gateway's timeout would
    // turn the quiet stream into a 504) and its messages as they come. A
    // raw stream (a download, not a watch) always waits for its first body,
    // which names the content type, bounded by the gateway's timeout: its
    // body then never starts with a failure, which could only cut the
    // connection before any response.
    let first = if raw {
        Ok(stream.message().await)
    } else {
        tokio::time::timeout(first_wait, stream.message()).await
    };
    let (first, done) = match first {
        Ok(Ok(Some(first))) => (Some(first), false),
        Ok(Ok(None)) => (None, true),
        Ok(Err(s)) => return status_response(&s),
        Err(_) => (None, false),
    };
    // Raw bodies are never SSE: the RPC chose their content type.
    let sse = sse && !raw;
    let raw_type = match (&first, raw) {
        (Some(first), true) => match http_body(&output, first) {
            Ok((content_type, _)) if !content_type.is_empty() => Some(content_type),
            Ok(_) => None,
            Err(e) => return status_response(&tonic::Status::internal(e.0)),
        },
        _ => None,
    };
    let mut heartbeat = tokio::time::interval(Duration::from_secs(heartbeat_secs.max(1)));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.reset();
    let state = State {
        stream,
        first,
        output,
        response_body: route.response_body.clone(),
        sse,
        raw,
        heartbeat,
        done,
    };
    let body = futures::stream::unfold(state, |mut st| async move {
        if let Some(first) = st.first.take() {
            let frame = st.frame(&first);
            st.done |= frame.is_err();
            return Some((frame, st));
        }
        if st.done {
            return None;
        }
        let sse = st.sse;
        let next = tokio::select! {
            r = st.stream.message() => Some(r),
            _ = st.heartbeat.tick(), if sse => None,
        };
        match next {
            Some(Ok(Some(bytes))) => {
                st.heartbeat.reset();
                let frame = st.frame(&bytes);
                st.done |= frame.is_err();
                Some((frame, st))
            }
            Some(Ok(None)) => None,
            Some(Err(status)) => {
                st.done = true;
                if st.raw {
                    // Raw lines have no room for an error: cut the body.
                    return Some((Err(Broken(status.message().to_owned())), st));
                }
                let frame = st.error_frame(&status);
                Some((Ok(frame), st))
            }
            None => Some((Ok(Bytes::from_static(b": heartbeat\n\n")), st)),
        }
    })
    // Fused: the compression layer (a raw text download is gzipped) polls
    // the body again after its end, which an unfold must never see.
    .fuse();
    let content_type = if let Some(t) = raw_type.and_then(|t| HeaderValue::from_str(&t).ok()) {
        t
    } else if raw {
        HeaderValue::from_static("application/octet-stream")
    } else if sse {
        HeaderValue::from_static("text/event-stream")
    } else {
        HeaderValue::from_static("application/x-ndjson")
    };
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell buffering proxies (nginx) to pass lines through as they come.
    resp.headers_mut().insert(
        http::HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    resp
}
