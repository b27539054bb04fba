//! `google.api.http` path templates: parsing and matching.
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! Verb     = ":" LITERAL ;
//! ```

use percent_encoding::percent_decode_str;

/// One segment of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Matches exactly this text.
    Literal(String),
    /// `*`: one segment.
    Star,
    /// `**`: the rest of the path (zero or more segments); last only.
    DoubleStar,
}

/// A variable: the request field it binds and the segments it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Dotted field path (`name`, `parent.id`).
    pub field_path: String,
    /// First segment index.
    pub start: usize,
    /// One past the last segment index.
    pub end: usize,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The segments, variables' included.
    pub segments: Vec<Segment>,
    /// The variables in order.
    pub variables: Vec<Variable>,
    /// The custom verb (`push` in `/v1/capsules:push`).
    pub verb: Option<String>,
    /// The template as written.
    pub source: String,
}

/// A template that does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path template `{template}`: {message}")]
pub struct TemplateError {
    /// The template.
    pub template: String,
    /// What is wrong.
    pub message: String,
}

impl Template {
    /// Parses `source`.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let err = |message: &str| TemplateError {
            template: source.to_owned(),
            message: message.to_owned(),
        };
        let rest = source
            .strip_prefix('/')
            .ok_or_else(|| err("must start with `/`"))?;
        // The verb is the text after the last `:` that is outside braces.
        let mut depth = 0usize;
        let mut verb_at = None;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.checked_sub(1).ok_or_else(|| err("unbalanced `}`"))?,
                ':' if depth == 0 => verb_at = Some(i),
                _ => {}
            }
        }
        if depth != 0 {
            return Err(err("unbalanced `{`"));
        }
        let (path, verb) = match verb_at {
            Some(i) => (&rest[..i], Some(rest[i + 1..].to_owned())),
            None => (rest, None),
        };
        if verb
            .as_deref()
            .is_some_and(|v| v.is_empty() || v.contains('/'))
        {
            return Err(err("empty or malformed verb"));
        }
        let mut segments = Vec::new();
        let mut variables = Vec::new();
        let mut chars = path;
        while !chars.is_empty() {
            if let Some(inner) = chars.strip_prefix('{') {
                let close = inner.find('}').ok_or_else(|| err("unclosed variable"))?;
                let body = &inner[..close];
                let (field_path, pattern) = match body.split_once('=') {
                    Some((f, p)) => (f, p),
                    None => (body, "*"),
                };
                if field_path.is_empty()
                    || !field_path.split('.').all(|p| {
                        !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
                {
                    return Err(err("bad variable field path"));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments
                        .push(parse_segment(part).ok_or_else(|| err("bad segment in variable"))?);
                }
                variables.push(Variable {
                    field_path: field_path.to_owned(),
                    start,
                    end: segments.len(),
                });
                chars = &inner[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let part = &chars[..end];
                segments.push(parse_segment(part).ok_or_else(|| err("bad segment"))?);
                chars = &chars[end..];
            }
            if let Some(next) = chars.strip_prefix('/') {
                if next.is_empty() {
                    return Err(err("trailing `/`"));
                }
                chars = next;
            } else if !chars.is_empty() {
                return Err(err("expected `/` between segments"));
            }
        }
        if let Some(pos) = segments.iter().position(|s| *s == Segment::DoubleStar)
            && pos + 1 != segments.len()
        {
            return Err(err("`**` must be the last segment"));
        }
        Ok(Template {
            segments,
            variables,
            verb,
            source: source.to_owned(),
        })
    }

    /// Matches a request path (not yet percent-decoded): the variables'
    /// values (decoded) in order, or `None`.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(verb) => rest.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => rest,
        };
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        // Without a verb, a last segment carrying `:verb` belongs to another route.
        if self.verb.is_none() && parts.last().is_some_and(|p| p.contains(':')) {
            let last = self.segments.last();
            if !matches!(last, Some(Segment::Literal(l)) if l.contains(':')) {
                return None;
            }
        }
        // Where each template segment starts in `parts` (the `**` takes the rest).
        let mut spans = Vec::with_capacity(self.segments.len());
        let mut i = 0usize;
        for seg in &self.segments {
            match seg {
                Segment::Literal(l) => {
                    if parts.get(i).is_none_or(|p| decode(p) != *l) {
                        return None;
                    }
                    spans.push((i, i + 1));
                    i += 1;
                }
                Segment::Star => {
                    if parts.get(i).is_none_or(|p| p.is_empty()) {
                        return None;
                    }
                    spans.push((i, i + 1));
                    i += 1;
                }
                Segment::DoubleStar => {
                    spans.push((i, parts.len()));
                    i = parts.len();
                }
            }
        }
        if i != parts.len() {
            return None;
        }
        let mut values = Vec::with_capacity(self.variables.len());
        for v in &self.variables {
            let from = spans.get(v.start).map_or(i, |s| s.0);
            let to = if v.end == 0 { from } else { spans[v.end - 1].1 };
            let value: Vec<String> = parts[from..to].iter().map(|p| decode(p)).collect();
            values.push((v.field_path.clone(), value.join("/")));
        }
        Some(values)
    }

    /// How specific the template is: routes with a verb, then more literal
    /// segments, then fewer wildcards win.
    pub fn specificity(&self) -> (bool, usize, std::cmp::Reverse<usize>) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        let double = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::DoubleStar))
            .count();
        (self.verb.is_some(), literals, std::cmp::Reverse(double))
    }

    /// The OpenAPI path: `{name=capsules/*}` becomes `{name}`.
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.segments.len() {
            out.push('/');
            if let Some(v) = self.variables.iter().find(|v| v.start == i) {
                out.push('{');
                out.push_str(&v.field_path);
                out.push('}');
                i = v.end.max(i + 1);
                continue;
            }
            match &self.segments[i] {
                Segment::Literal(l) => out.push_str(l),
                Segment::Star => out.push('*'),
                Segment::DoubleStar => out.push_str("**"),
            }
            i += 1;
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }
}

fn parse_segment(part: &str) -> Option<Segment> {
    match part {
        "" => None,
        "*" => Some(Segment::Star),
        "**" => Some(Segment::DoubleStar),
        _ if part.contains(['{', '}', '=', '*']) => None,
        _ => Some(Segment::Literal(part.to_owned())),
    }
}

/// A path segment, percent-decoded.
pub(crate) fn decode(part: &str) -> String {
    percent_decode_str(part).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vars(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        Template::parse(t).unwrap().matches(path)
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn literals_and_verbs() {
        assert_eq!(vars("/v1/capsules:push", "/v1/capsules:push"), Some(vec![]));
        assert_eq!(vars("/v1/capsules:push", "/v1/capsules"), None);
        assert_eq!(vars("/v1/capsules:push", "/v1/capsules:pull"), None);
        assert_eq!(vars("/v1/capsules", "/v1/capsules"), Some(vec![]));
        assert_eq!(vars("/v1/capsules", "/v1/capsules/x"), None);
        assert_eq!(vars("/v1/capsules", "/v1"), None);
    }

    #[test]
    fn simple_variables() {
        assert_eq!(
            vars("/v1/capsules/{name}", "/v1/capsules/refund"),
            Some(pairs(&[("name", "refund")]))
        );
        assert_eq!(
            vars(
                "/v1/capsules/{name}/versions/{version}",
                "/v1/capsules/a/versions/3"
            ),
            Some(pairs(&[("name", "a"), ("version", "3")]))
        );
        // A single-segment variable does not span slashes, nor match empty.
        assert_eq!(vars("/v1/capsules/{name}", "/v1/capsules/a/b"), None);
        assert_eq!(vars("/v1/capsules/{name}", "/v1/capsules/"), None);
        // Percent-decoding of the value.
        assert_eq!(
            vars("/v1/capsules/{name}", "/v1/capsules/a%20b"),
            Some(pairs(&[("name", "a b")]))
        );
    }

    #[test]
    fn a_variable_before_a_verb() {
        assert_eq!(
            vars("/v1/capsules/{name}:diff", "/v1/capsules/refund:diff"),
            Some(pairs(&[("name", "refund")]))
        );
        assert_eq!(
            vars(
                "/v1/runs/{run_id}/steps/{step_id}:resolve",
                "/v1/runs/r1/steps/s2:resolve"
            ),
            Some(pairs(&[("run_id", "r1"), ("step_id", "s2")]))
        );
        // The verb-less route does not take a `:verb` path as its variable.
        assert_eq!(
            vars("/v1/capsules/{name}", "/v1/capsules/refund:diff"),
            None
        );
    }

    #[test]
    fn variables_with_patterns_and_wildcards() {
        assert_eq!(
            vars("/v1/{name=capsules/*}", "/v1/capsules/refund"),
            Some(pairs(&[("name", "capsules/refund")]))
        );
        assert_eq!(vars("/v1/{name=capsules/*}", "/v1/policies/refund"), None);
        assert_eq!(
            vars("/v1/{name=files/**}", "/v1/files/a/b/c"),
            Some(pairs(&[("name", "files/a/b/c")]))
        );
        assert_eq!(
            vars("/v1/{parent.id}/things/*", "/v1/p/things/x"),
            Some(pairs(&[("parent.id", "p")]))
        );
        assert_eq!(
            vars(
                "/v1/{name=tenants/*/runs/*}:cancel",
                "/v1/tenants/t/runs/r:cancel"
            ),
            Some(pairs(&[("name", "tenants/t/runs/r")]))
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "v1/x",
            "/v1/{name",
            "/v1/name}",
            "/v1//x",
            "/v1/x/",
            "/v1/**/x",
            "/v1/{}",
            "/v1/{a-b}",
            "/v1/x:",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn specificity_prefers_verbs_and_literals() {
        let plain = Template::parse("/v1/capsules/{name}").unwrap();
        let verb = Template::parse("/v1/capsules/{name}:diff").unwrap();
        let lit = Template::parse("/v1/capsules/x").unwrap();
        assert!(verb.specificity() > plain.specificity());
        assert!(lit.specificity() > plain.specificity());
    }

    #[test]
    fn openapi_paths() {
        assert_eq!(
            Template::parse("/v1/{name=capsules/*}:diff")
                .unwrap()
                .openapi_path(),
            "/v1/{name}:diff"
        );
        assert_eq!(
            Template::parse("/v1/runs/{run_id}").unwrap().openapi_path(),
            "/v1/runs/{run_id}"
        );
    }
}
