//! The redacting writer under a real `tracing` subscriber.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io;
use std::sync::{Arc, Mutex};

use anumate_redaction::{RedactingMakeWriter, Redactor};
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn emit() {
    let span = tracing::info_span!("checkout", customer = "jane@example.com");
    let _g = span.enter();
    tracing::info!(
        email = "jane@example.com",
        card = %"4111 1111 1111 1111",
        amount = 42,
        "charging card 4111-1111-1111-1111 for jane@example.com"
    );
    tracing::warn!(?span, "debug-formatted value mentions +1 415 555 0132");
}

fn assert_clean(out: &str) {
    assert!(!out.is_empty());
    for secret in ["jane@example.com", "4111", "555 0132"] {
        assert!(!out.contains(secret), "{secret} leaked into:\n{out}");
    }
    assert!(out.contains("[REDACTED:email]"), "{out}");
    assert!(out.contains("[REDACTED:card]"), "{out}");
    assert!(out.contains("amount"), "{out}");
}

#[test]
fn json_output_is_redacted() {
    let buf = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_writer(RedactingMakeWriter::new(buf.clone(), Redactor::default()))
        .finish();
    tracing::subscriber::with_default(subscriber, emit);
    let out = buf.text();
    assert_clean(&out);
    for line in out.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
}

#[test]
fn pretty_output_is_redacted() {
    let buf = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .pretty()
        .with_ansi(false)
        .with_writer(RedactingMakeWriter::new(buf.clone(), Redactor::default()))
        .finish();
    tracing::subscriber::with_default(subscriber, emit);
    assert_clean(&buf.text());
}

#[test]
fn compact_ansi_output_is_redacted() {
    let buf = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .compact()
        .with_ansi(true)
        .with_writer(RedactingMakeWriter::new(buf.clone(), Redactor::default()))
        .finish();
    tracing::subscriber::with_default(subscriber, emit);
    assert_clean(&buf.text());
}

#[test]
fn writes_split_mid_value_are_still_redacted() {
    use std::io::Write;
    let buf = Buffer::default();
    let r = Redactor::default();
    {
        let mut w = anumate_redaction::RedactingWriter::new(buf.clone(), &r);
        w.write_all(b"user jane@exa").unwrap();
        w.write_all(b"mple.com logged in\nnext 4111 1111 ").unwrap();
        w.write_all(b"1111 1111").unwrap();
    }
    assert_eq!(
        buf.text(),
        "user [REDACTED:email] logged in\nnext [REDACTED:card]"
    );
}
