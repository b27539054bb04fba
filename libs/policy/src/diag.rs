//! Source positions, diagnostics and their caret rendering.

use std::fmt;

use anumate_errors::{Error, ErrorCode, Violation};
use serde::Serialize;

/// A byte range in a source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Span {
    /// Byte offset of the first character.
    pub start: usize,
    /// Byte offset just past the last character.
    pub end: usize,
}

impl Span {
    /// A span from `start` to `end`.
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }
}

/// A 1-based line and column (columns count characters, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct LineCol {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub col: u32,
}

impl fmt::Display for LineCol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// The 1-based line and column of byte `offset` in `src` (clamped to its end).
pub fn line_col(src: &str, offset: usize) -> LineCol {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    LineCol {
        line: u32::try_from(line).unwrap_or(u32::MAX),
        col: u32::try_from(col).unwrap_or(u32::MAX),
    }
}

/// Renders `file:line:col: message` followed by the source line and a caret
/// under the column.
pub fn render_diagnostic(file: &str, src: &str, at: LineCol, message: &str) -> String {
    let text = src
        .lines()
        .nth(at.line.saturating_sub(1) as usize)
        .unwrap_or("");
    // Tabs are kept so the caret lines up whatever the tab width.
    let pad: String = text
        .chars()
        .take(at.col.saturating_sub(1) as usize)
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    format!(
        "{file}:{}:{}: {message}\n  {text}\n  {pad}^",
        at.line, at.col
    )
}

/// One problem found in a source, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where the problem is.
    pub at: LineCol,
    /// Byte range of the offending text.
    pub span: Span,
    /// What is wrong.
    pub message: String,
    /// `file:line:col: message` with the source line and a caret.
    pub rendered: String,
}

impl Diagnostic {
    /// A diagnostic for `span` of `src`, rendered with `file` as its name.
    pub fn new(file: &str, src: &str, span: Span, message: impl Into<String>) -> Self {
        let message = message.into();
        let at = line_col(src, span.start);
        let rendered = render_diagnostic(file, src, at, &message);
        Diagnostic {
            at,
            span,
            message,
            rendered,
        }
    }

    /// This diagnostic as an `anumate_errors` violation.
    pub fn violation(&self, field: &str) -> Violation {
        Violation::at(field, self.at.line, self.at.col, self.message.clone())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rendered)
    }
}

/// Why a policy source could not be compiled: one parse error, or every
/// problem the checker found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CompileError {
    /// The name the source was given (a file name).
    pub file: String,
    /// The problems, in source order.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&d.rendered)?;
        }
        Ok(())
    }
}

impl From<CompileError> for Error {
    fn from(e: CompileError) -> Self {
        let n = e.diagnostics.len();
        Error::new(
            ErrorCode::InvalidDocument,
            format!(
                "policy source has {n} problem{}",
                if n == 1 { "" } else { "s" }
            ),
        )
        .with_violations(e.diagnostics.iter().map(|d| d.violation(&e.file)).collect())
    }
}
