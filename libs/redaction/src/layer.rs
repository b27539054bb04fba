//! Redaction for `tracing` output.
//!
//! `tracing_subscriber::fmt` formats each event (fields and message, in JSON,
//! compact or pretty form) into a buffer and writes it with one `write_all`.
//! Wrapping the writer therefore sees every byte that would reach the sink,
//! whatever the format, and redacts it there. Writes are buffered up to the
//! last newline so a value split across `write` calls is still caught; the
//! remainder is redacted on `flush` or drop.

use std::io::{self, Write};
use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;

use crate::Redactor;

/// A [`MakeWriter`] whose writers redact everything before passing it on.
///
/// ```no_run
/// use anumate_redaction::{RedactingMakeWriter, Redactor};
/// let subscriber = tracing_subscriber::fmt()
///     .json()
///     .with_writer(RedactingMakeWriter::new(std::io::stdout, Redactor::default()))
///     .finish();
/// # drop(subscriber);
/// ```
#[derive(Debug, Clone)]
pub struct RedactingMakeWriter<M> {
    inner: M,
    redactor: Arc<Redactor>,
}

impl<M> RedactingMakeWriter<M> {
    /// Wraps `inner`; every write goes through `redactor`.
    pub fn new(inner: M, redactor: impl Into<Arc<Redactor>>) -> Self {
        RedactingMakeWriter {
            inner,
            redactor: redactor.into(),
        }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RedactingMakeWriter<M> {
    type Writer = RedactingWriter<'a, M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter::new(self.inner.make_writer(), &self.redactor)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        RedactingWriter::new(self.inner.make_writer_for(meta), &self.redactor)
    }
}

/// An [`io::Write`] that redacts line-buffered output before writing it to
/// the inner writer.
#[derive(Debug)]
pub struct RedactingWriter<'a, W: Write> {
    inner: W,
    redactor: &'a Redactor,
    pending: Vec<u8>,
}

impl<'a, W: Write> RedactingWriter<'a, W> {
    /// Wraps `inner`.
    pub fn new(inner: W, redactor: &'a Redactor) -> Self {
        RedactingWriter {
            inner,
            redactor,
            pending: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        let text = String::from_utf8_lossy(bytes);
        if !text.contains('\x1b') {
            return self
                .inner
                .write_all(self.redactor.redact_str(&text).as_bytes());
        }
        // Colour codes (`ESC[3m`) end in a letter and would glue to the value
        // that follows; redact the text between them piece by piece.
        let mut out = String::with_capacity(text.len());
        let mut rest: &str = &text;
        while let Some(esc) = rest.find('\x1b') {
            out.push_str(&self.redactor.redact_str(&rest[..esc]));
            let seq_len = ansi_len(&rest[esc..]);
            out.push_str(&rest[esc..esc + seq_len]);
            rest = &rest[esc + seq_len..];
        }
        out.push_str(&self.redactor.redact_str(rest));
        self.inner.write_all(out.as_bytes())
    }
}

/// Length of the ANSI CSI sequence at the start of `s` (`ESC [ params final`),
/// or 1 for a lone ESC.
fn ansi_len(s: &str) -> usize {
    let b = s.as_bytes();
    if b.get(1) != Some(&b'[') {
        return 1;
    }
    b[2..]
        .iter()
        .position(|c| (0x40..=0x7e).contains(c))
        .map_or(b.len(), |p| p + 3)
}

impl<W: Write> Write for RedactingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(nl) = memchr::memrchr(b'\n', buf) else {
            self.pending.extend_from_slice(buf);
            return Ok(buf.len());
        };
        if self.pending.is_empty() {
            self.emit(&buf[..=nl])?;
        } else {
            let mut line = std::mem::take(&mut self.pending);
            line.extend_from_slice(&buf[..=nl]);
            self.emit(&line)?;
        }
        self.pending.extend_from_slice(&buf[nl + 1..]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest)?;
        }
        self.inner.flush()
    }
}

impl<W: Write> Drop for RedactingWriter<'_, W> {
    fn drop(&mut self) {
        // Nowhere to report an error from drop; the event is lost either way.
        let _ = self.flush();
    }
}
