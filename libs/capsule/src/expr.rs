//! Static reference check for `${{ … }}` expressions.
//!
//! This module finds every `${{ … }}` in a string (an unterminated one is an
//! error) and pulls out the references it makes — `inputs.<name>` and
//! `steps.<id>.…` (ids may contain hyphens: `steps.fetch-order.output.status`;
//! `inputs['name']` also works) — so the validator can say which input is
//! unknown (with a "did you mean") or which step is not upstream. Text inside
//! single- or double-quoted string literals is skipped. Once the references
//! are sound, the validator hands each expression to the expression language
//! itself (`anumate_policy::check_template_expr`, SPEC §3) for syntax,
//! functions and types.

/// A reference found inside an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `inputs.<name>`.
    Input(String),
    /// `steps.<id>` followed by the rest of the path (`["output", "status"]`).
    Step {
        /// The referenced step id.
        id: String,
        /// Path segments after the id.
        path: Vec<String>,
    },
}

/// One `${{ … }}` occurrence: byte offsets in the string and the inner text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expression<'a> {
    /// Byte offset of `${{`.
    pub start: usize,
    /// Byte offset just past `}}`.
    pub end: usize,
    /// The text between the braces, trimmed.
    pub body: &'a str,
}

/// Why a string's expressions could not be extracted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    /// `${{` without a closing `}}`.
    #[error("unterminated `${{{{` (no closing `}}}}`)")]
    Unterminated {
        /// Byte offset of the opening `${{`.
        start: usize,
    },
    /// `${{ }}` with nothing inside.
    #[error("empty expression `${{{{ }}}}`")]
    Empty {
        /// Byte offset of the opening `${{`.
        start: usize,
    },
}

/// Finds every `${{ … }}` in `s`, skipping quoted literals inside them.
pub fn find_expressions(s: &str) -> Result<Vec<Expression<'_>>, ExprError> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(rel) = s.get(from..).and_then(|rest| rest.find("${{")) {
        let start = from + rel;
        let body_start = start + 3;
        let mut i = body_start;
        let mut close = None;
        while i < bytes.len() {
            match bytes[i] {
                q @ (b'\'' | b'"') => i = skip_string(bytes, i, q),
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    close = Some(i);
                    break;
                }
                _ => i += 1,
            }
        }
        let Some(close) = close else {
            return Err(ExprError::Unterminated { start });
        };
        let body = s.get(body_start..close).unwrap_or_default().trim();
        if body.is_empty() {
            return Err(ExprError::Empty { start });
        }
        out.push(Expression {
            start,
            end: close + 2,
            body,
        });
        from = close + 2;
    }
    Ok(out)
}

/// Returns the index just past the literal opened by the quote at `i`.
fn skip_string(b: &[u8], mut i: usize, quote: u8) -> usize {
    i += 1;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
        } else if b[i] == quote {
            return i + 1;
        } else {
            i += 1;
        }
    }
    b.len()
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_segment(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Extracts the `inputs.*` and `steps.*` references of an expression body.
pub fn references(body: &str) -> Vec<Reference> {
    let b = body.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' || c == b'"' {
            i = skip_string(b, i, c);
        } else if c == b'.' || c.is_ascii_digit() {
            // A member of something we do not track, or a number: skip it whole.
            i += 1;
            while i < b.len() && (is_segment(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            let root = &body[s..i];
            if root != "inputs" && root != "steps" {
                continue;
            }
            let (segments, next) = accessors(body, i);
            i = next;
            let mut segments = segments.into_iter();
            match (root, segments.next()) {
                ("inputs", Some(name)) => out.push(Reference::Input(name)),
                ("steps", Some(id)) => out.push(Reference::Step {
                    id,
                    path: segments.collect(),
                }),
                _ => {}
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Reads `.segment` and `['key']` accessors starting at `i`.
fn accessors(body: &str, mut i: usize) -> (Vec<String>, usize) {
    let b = body.as_bytes();
    let mut segments = Vec::new();
    loop {
        match b.get(i) {
            Some(b'.') if b.get(i + 1).is_some_and(|c| is_segment(*c)) => {
                let s = i + 1;
                i = s;
                while i < b.len() && is_segment(b[i]) {
                    i += 1;
                }
                segments.push(body[s..i].to_string());
            }
            Some(b'[') if matches!(b.get(i + 1), Some(b'\'' | b'"')) => {
                let quote = b[i + 1];
                let end = skip_string(b, i + 1, quote);
                if b.get(end) != Some(&b']') || end < i + 3 {
                    return (segments, end);
                }
                segments.push(body[i + 2..end - 1].to_string());
                i = end + 1;
            }
            _ => return (segments, i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_expressions_and_skips_quoted_braces() {
        let s = "a ${{ inputs.x }} b ${{ 'x}}y' == steps.s.output }}";
        let found = find_expressions(s).unwrap_or_default();
        let bodies: Vec<_> = found.iter().map(|e| e.body).collect();
        assert_eq!(bodies, ["inputs.x", "'x}}y' == steps.s.output"]);
        assert_eq!(found[0].start, 2);
        assert_eq!(
            find_expressions("x ${{ inputs.a"),
            Err(ExprError::Unterminated { start: 2 })
        );
        assert_eq!(
            find_expressions("${{  }}"),
            Err(ExprError::Empty { start: 0 })
        );
        assert_eq!(find_expressions("plain"), Ok(vec![]));
    }

    #[test]
    fn extracts_references() {
        let refs = references(
            "steps.fetch-order.output.status == 'paid' && inputs.amount > 3 \
             && \"inputs.ignored\" != x.inputs.not_root && inputs['b'] && contains(steps.a.output, 'x')",
        );
        assert_eq!(
            refs,
            vec![
                Reference::Step {
                    id: "fetch-order".into(),
                    path: vec!["output".into(), "status".into()]
                },
                Reference::Input("amount".into()),
                Reference::Input("b".into()),
                Reference::Step {
                    id: "a".into(),
                    path: vec!["output".into()]
                },
            ]
        );
        assert_eq!(references("1.5 + inputsx + steps"), vec![]);
    }
}
