//! Export record formats: NDJSON, ArcSight CEF and RFC 5424 syslog, with the
//! escaping each format requires.

use anumate_errors::{Error, Result};
use anumate_proto::receipts::v1 as pb;

use crate::{Actor, Filter, Receipts, receipt_proto, repo};

/// The private enterprise number in the syslog SD-ID `anumate@32473`
/// (32473 is the documentation PEN of RFC 5612 until one is assigned).
pub const SYSLOG_SD_ID: &str = "anumate@32473";

/// Escapes a CEF header field: `\` and `|`; newlines become spaces (headers
/// cannot carry them).
pub fn cef_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a CEF extension value: `\`, `=`, and newlines as `\n` / `\r`.
pub fn cef_ext_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes an RFC 5424 SD-PARAM value: `"`, `\` and `]`.
pub fn sd_param_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn kind_name(kind: i32) -> &'static str {
    match pb::ReceiptKind::try_from(kind) {
        Ok(pb::ReceiptKind::StepExecution) => "STEP_EXECUTION",
        Ok(pb::ReceiptKind::ApprovalDecision) => "APPROVAL_DECISION",
        Ok(pb::ReceiptKind::TokenRevocation) => "TOKEN_REVOCATION",
        Ok(pb::ReceiptKind::RunOutcome) => "RUN_OUTCOME",
        _ => "UNSPECIFIED",
    }
}

fn issue_time(r: &pb::Receipt) -> String {
    r.issue_time
        .as_ref()
        .and_then(anumate_proto::rfc3339_from_timestamp)
        .unwrap_or_else(|| "-".into())
}

/// The fields every line-oriented format carries, in order.
fn fields(r: &pb::Receipt, include_content: bool) -> Result<Vec<(&'static str, String)>> {
    let subject = r.subject.clone().unwrap_or_default();
    let mut out = vec![
        ("receipt_id", r.receipt_id.clone()),
        ("tenant_id", r.tenant_id.clone()),
        ("kind", kind_name(r.kind).to_string()),
        ("run_id", subject.run_id),
        ("step_id", subject.step_id),
        ("attempt", subject.attempt.to_string()),
        ("plan_hash", subject.plan_hash),
        ("approval_id", subject.approval_id),
        ("jtis", subject.jtis.join(",")),
        ("content_digest", r.content_digest.clone()),
        ("kid", r.kid.clone()),
        ("leaf_index", r.leaf_index.to_string()),
        ("signature", r.signature.clone()),
    ];
    if include_content && let Some(content) = &r.content {
        out.push((
            "content",
            serde_json::to_string(content).map_err(Error::internal)?,
        ));
    }
    Ok(out)
}

/// The receipt in proto3 JSON, with `issueTime` written exactly as signed in
/// the statement (RFC 3339 UTC with `Z`; the generic timestamp serializer
/// writes `+00:00`). This is the form `anumate receipt verify` reads.
pub fn receipt_json(r: &pb::Receipt) -> Result<serde_json::Value> {
    let mut value = serde_json::to_value(r).map_err(Error::internal)?;
    let signed_time = serde_json::from_str::<serde_json::Value>(&r.statement_json)
        .ok()
        .and_then(|s| s.get("issue_time").cloned());
    if let (Some(time), Some(obj)) = (signed_time, value.as_object_mut()) {
        obj.insert("issueTime".into(), time);
    }
    Ok(value)
}

/// One NDJSON line: the receipt in proto3 JSON.
pub fn ndjson(r: &pb::Receipt) -> Result<String> {
    let mut line = serde_json::to_string(&receipt_json(r)?).map_err(Error::internal)?;
    line.push('\n');
    Ok(line)
}

/// One CEF line.
pub fn cef(r: &pb::Receipt, include_content: bool) -> Result<String> {
    let kind = kind_name(r.kind);
    let summary = format!("Receipt {kind}");
    let millis = r
        .issue_time
        .as_ref()
        .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    let mut ext = format!("rt={millis}");
    for (key, value) in fields(r, include_content)? {
        if value.is_empty() {
            continue;
        }
        ext.push(' ');
        ext.push_str(key);
        ext.push('=');
        ext.push_str(&cef_ext_value(&value));
    }
    Ok(format!(
        "CEF:0|Anumate|Anumate|{}|{}|{}|3|{ext}\n",
        cef_header(env!("CARGO_PKG_VERSION")),
        cef_header(kind),
        cef_header(&summary),
    ))
}

/// One RFC 5424 syslog line (facility local0, severity informational).
pub fn syslog(r: &pb::Receipt, include_content: bool) -> Result<String> {
    let mut sd = format!("[{SYSLOG_SD_ID}");
    for (key, value) in fields(r, include_content)? {
        if value.is_empty() {
            continue;
        }
        sd.push_str(&format!(" {key}=\"{}\"", sd_param_value(&value)));
    }
    sd.push(']');
    Ok(format!(
        "<134>1 {} - anumate - receipt {sd} receipt {} {}\n",
        issue_time(r),
        kind_name(r.kind),
        r.receipt_id.replace(['\r', '\n'], " "),
    ))
}

/// One record in `format`.
pub fn record(format: pb::ExportFormat, r: &pb::Receipt, include_content: bool) -> Result<String> {
    match format {
        pb::ExportFormat::Ndjson => {
            let mut r = r.clone();
            if !include_content {
                r.content = None;
            }
            ndjson(&r)
        }
        pb::ExportFormat::Cef => cef(r, include_content),
        pb::ExportFormat::Syslog => syslog(r, include_content),
        pb::ExportFormat::Unspecified => Err(Error::invalid_argument(
            "format",
            "choose EXPORT_FORMAT_NDJSON, EXPORT_FORMAT_CEF or EXPORT_FORMAT_SYSLOG",
        )),
    }
}

impl Receipts {
    /// Up to `limit` receipts after leaf `after` (exclusive; `None` = from the
    /// start), oldest first, for exports.
    pub async fn export_page(
        &self,
        actor: &Actor,
        filter: &Filter,
        after: Option<u64>,
        limit: i64,
        with_content: bool,
    ) -> Result<Vec<pb::Receipt>> {
        let tx = self.store.read(&actor.tenant).await?;
        repo::list(&tx, filter, after, false, limit)
            .await?
            .iter()
            .map(|r| receipt_proto(r, with_content))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cef_header_escapes_backslash_and_pipe() {
        assert_eq!(cef_header(r"a|b\c"), r"a\|b\\c");
        assert_eq!(cef_header("a\nb"), "a b");
        assert_eq!(cef_header("x=y"), "x=y");
    }

    #[test]
    fn cef_extension_escapes_backslash_equals_and_newlines() {
        assert_eq!(cef_ext_value(r"a=b\c"), r"a\=b\\c");
        assert_eq!(cef_ext_value("l1\nl2\r"), r"l1\nl2\r");
        assert_eq!(cef_ext_value("a|b"), "a|b");
    }

    #[test]
    fn sd_param_escapes_quote_backslash_bracket() {
        assert_eq!(sd_param_value(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
        assert_eq!(sd_param_value("[x=y]"), r"[x=y\]");
    }

    fn receipt() -> pb::Receipt {
        pb::Receipt {
            receipt_id: "r-1".into(),
            tenant_id: "acme".into(),
            kind: pb::ReceiptKind::StepExecution as i32,
            subject: Some(pb::ReceiptSubject {
                run_id: "run|1=x\\y".into(),
                step_id: "s\"]".into(),
                attempt: 1,
                ..Default::default()
            }),
            content_digest: "sha256:00".into(),
            issue_time: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 1000,
            }),
            kid: "k1".into(),
            leaf_index: 7,
            ..Default::default()
        }
    }

    #[test]
    fn cef_line_is_escaped_and_single_line() {
        let line = cef(&receipt(), false).unwrap();
        assert!(line.starts_with("CEF:0|Anumate|Anumate|"), "{line}");
        assert!(line.contains(r"run_id=run|1\=x\\y"), "{line}");
        assert!(line.contains("|STEP_EXECUTION|Receipt STEP_EXECUTION|3|rt=1700000000000 "));
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn syslog_line_is_escaped() {
        let line = syslog(&receipt(), false).unwrap();
        assert!(
            line.starts_with("<134>1 2023-11-14T22:13:20.000001Z - anumate - receipt [anumate@32473 receipt_id=\"r-1\""),
            "{line}"
        );
        assert!(line.contains(r#"step_id="s\"\]""#), "{line}");
        assert!(line.contains(r#"run_id="run|1=x\\y""#), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn ndjson_is_one_json_line() {
        let line = ndjson(&receipt()).unwrap();
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["receiptId"], "r-1");
        assert_eq!(line.matches('\n').count(), 1);
    }
}
