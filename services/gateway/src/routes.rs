//! The routing table, read from the `google.api.http` annotation of every
//! method in the descriptor set: one route per binding (the rule and its
//! `additional_bindings`). Methods without the annotation (internal RPCs)
//! get no route.

use anumate_proto::google::api::{HttpRule, http_rule::Pattern};
use http::Method;
use prost_reflect::{DescriptorPool, MethodDescriptor, Value};

use std::collections::HashMap;

use crate::template::{Segment, Template, TemplateError};

/// Where the HTTP body goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyBinding {
    /// No body: the fields not bound by the path come from the query string.
    None,
    /// `body: "*"`: the whole request message (minus path variables).
    Whole,
    /// `body: "field"`: that field; the others come from the path and query.
    Field(String),
}

/// One HTTP binding of an RPC.
#[derive(Debug, Clone)]
pub struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The path template.
    pub template: Template,
    /// Where the body goes.
    pub body: BodyBinding,
    /// `response_body`: the response field sent as the body (empty: the whole response).
    pub response_body: String,
    /// The RPC.
    pub rpc: MethodDescriptor,
    /// `/package.Service/Method`.
    pub grpc_path: String,
}

impl Route {
    /// Whether the RPC streams its responses.
    pub fn server_streaming(&self) -> bool {
        self.rpc.is_server_streaming()
    }
}

/// A route that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The descriptor set does not decode.
    #[error("descriptor set: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    /// The descriptor set lacks the `google.api.http` extension.
    #[error("the descriptor set has no google.api.http extension")]
    NoHttpExtension,
    /// An annotation does not decode.
    #[error("{method}: google.api.http: {message}")]
    Rule {
        /// The RPC.
        method: String,
        /// What is wrong.
        message: String,
    },
    /// A bad path template.
    #[error("{method}: {source}")]
    Template {
        /// The RPC.
        method: String,
        /// The error.
        source: TemplateError,
    },
}

/// Every route, most specific first within a method, indexed by the first
/// two path segments (`/v1/capsules…`) so a lookup tries only the few routes
/// that can match.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// First segment → second segment (up to a `:`) → routes, in order.
    index: HashMap<String, HashMap<String, Vec<usize>>>,
    /// Routes whose first two segments are not both literal: always tried.
    generic: Vec<usize>,
}

fn decode_segment(p: &str) -> std::borrow::Cow<'_, str> {
    if p.contains('%') {
        std::borrow::Cow::Owned(crate::template::decode(p))
    } else {
        std::borrow::Cow::Borrowed(p)
    }
}

/// The text of a segment up to its first `:` (a custom verb or a literal's own colon).
fn head(segment: &str) -> &str {
    segment.split(':').next().unwrap_or(segment)
}

/// A template's index key: its first two segments when both are literal.
fn template_key(t: &Template) -> Option<(&str, &str)> {
    match (t.segments.first(), t.segments.get(1)) {
        (Some(Segment::Literal(a)), Some(Segment::Literal(b))) => Some((a.as_str(), head(b))),
        _ => None,
    }
}

/// A request path's first two segments, percent-decoded, the second up to a `:`.
fn path_key(path: &str) -> Option<(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
    let rest = path.strip_prefix('/')?;
    let mut parts = rest.splitn(3, '/');
    let a = parts.next()?;
    let b = parts.next()?;
    let a = decode_segment(a);
    let b = match decode_segment(b) {
        std::borrow::Cow::Borrowed(b) => std::borrow::Cow::Borrowed(head(b)),
        std::borrow::Cow::Owned(b) => std::borrow::Cow::Owned(head(&b).to_owned()),
    };
    Some((a, b))
}

/// The outcome of a lookup.
pub enum Lookup<'a> {
    /// A route and its path variables.
    Found(&'a Route, Vec<(String, String)>),
    /// The path matches routes of other methods only.
    MethodNotAllowed(Vec<Method>),
    /// Nothing matches.
    NotFound,
}

impl RouteTable {
    /// Builds the table from every service in `pool`.
    pub fn from_pool(pool: &DescriptorPool) -> Result<RouteTable, RouteError> {
        let ext = pool
            .get_extension_by_name("google.api.http")
            .ok_or(RouteError::NoHttpExtension)?;
        let mut routes = Vec::new();
        for service in pool.services() {
            for rpc in service.methods() {
                let options = rpc.options();
                if !options.has_extension(&ext) {
                    continue;
                }
                let Value::Message(rule) = options.get_extension(&ext).into_owned() else {
                    continue;
                };
                let rule: HttpRule = rule.transcode_to().map_err(|e| RouteError::Rule {
                    method: rpc.full_name().to_owned(),
                    message: e.to_string(),
                })?;
                let grpc_path = format!("/{}/{}", service.full_name(), rpc.name());
                let mut bindings = vec![rule.clone()];
                bindings.extend(rule.additional_bindings.iter().cloned());
                for binding in bindings {
                    routes.push(route(&rpc, &grpc_path, &binding)?);
                }
            }
        }
        // Most specific first, so the first match wins.
        routes.sort_by_key(|r| std::cmp::Reverse(r.template.specificity()));
        let mut index: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        let mut generic = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match template_key(&r.template) {
                Some((a, b)) => index
                    .entry(a.to_owned())
                    .or_default()
                    .entry(b.to_owned())
                    .or_default()
                    .push(i),
                None => generic.push(i),
            }
        }
        Ok(RouteTable {
            routes,
            index,
            generic,
        })
    }

    /// The routes that may match `path`, most specific first.
    fn candidates(&self, path: &str) -> impl Iterator<Item = &Route> {
        let bucket: &[usize] = path_key(path)
            .and_then(|(a, b)| self.index.get(a.as_ref())?.get(b.as_ref()))
            .map_or(&[], Vec::as_slice);
        // Merge the bucket and the generic routes, keeping the table's order.
        let (mut i, mut j) = (0, 0);
        std::iter::from_fn(move || {
            let next = match (bucket.get(i), self.generic.get(j)) {
                (Some(&x), Some(&y)) if x < y => {
                    i += 1;
                    x
                }
                (Some(&x), None) => {
                    i += 1;
                    x
                }
                (_, Some(&y)) => {
                    j += 1;
                    y
                }
                (None, None) => return None,
            };
            Some(&self.routes[next])
        })
    }

    /// Every route.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for `method` and `path` (undecoded).
    pub fn lookup(&self, method: &Method, path: &str) -> Lookup<'_> {
        let mut allowed = Vec::new();
        for route in self.candidates(path) {
            if route.method != *method && !(*method == Method::HEAD && route.method == Method::GET)
            {
                if !allowed.contains(&route.method) && route.template.matches(path).is_some() {
                    allowed.push(route.method.clone());
                }
                continue;
            }
            if let Some(vars) = route.template.matches(path) {
                return Lookup::Found(route, vars);
            }
        }
        if allowed.is_empty() {
            Lookup::NotFound
        } else {
            Lookup::MethodNotAllowed(allowed)
        }
    }
}

fn route(rpc: &MethodDescriptor, grpc_path: &str, rule: &HttpRule) -> Result<Route, RouteError> {
    let bad = |message: String| RouteError::Rule {
        method: rpc.full_name().to_owned(),
        message,
    };
    let (method, template) = match &rule.pattern {
        Some(Pattern::Get(t)) => (Method::GET, t.as_str()),
        Some(Pattern::Put(t)) => (Method::PUT, t.as_str()),
        Some(Pattern::Post(t)) => (Method::POST, t.as_str()),
        Some(Pattern::Delete(t)) => (Method::DELETE, t.as_str()),
        Some(Pattern::Patch(t)) => (Method::PATCH, t.as_str()),
        Some(Pattern::Custom(c)) => (
            Method::from_bytes(c.kind.as_bytes()).map_err(|e| bad(e.to_string()))?,
            c.path.as_str(),
        ),
        None => return Err(bad("no pattern".into())),
    };
    let template = Template::parse(template).map_err(|source| RouteError::Template {
        method: rpc.full_name().to_owned(),
        source,
    })?;
    let input = rpc.input();
    for v in &template.variables {
        if crate::transcode::field_path(&input, &v.field_path).is_none() {
            return Err(bad(format!(
                "path variable `{}` is not a field of {}",
                v.field_path,
                input.full_name()
            )));
        }
    }
    let body = match rule.body.as_str() {
        "" => BodyBinding::None,
        "*" => BodyBinding::Whole,
        field => {
            if input.get_field_by_name(field).is_none() {
                return Err(bad(format!("body `{field}` is not a field")));
            }
            BodyBinding::Field(field.to_owned())
        }
    };
    if !rule.response_body.is_empty()
        && rpc
            .output()
            .get_field_by_name(&rule.response_body)
            .is_none()
    {
        return Err(bad(format!(
            "response_body `{}` is not a field",
            rule.response_body
        )));
    }
    Ok(Route {
        method,
        template,
        body,
        response_body: rule.response_body.clone(),
        rpc: rpc.clone(),
        grpc_path: grpc_path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn table() -> RouteTable {
        let pool = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).unwrap();
        RouteTable::from_pool(&pool).unwrap()
    }

    fn found(t: &RouteTable, m: Method, path: &str) -> (String, Vec<(String, String)>) {
        match t.lookup(&m, path) {
            Lookup::Found(r, v) => (r.grpc_path.clone(), v),
            _ => panic!("no route for {m} {path}"),
        }
    }

    #[test]
    fn every_annotated_rpc_is_routed_and_no_other() {
        let pool = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).unwrap();
        let t = table();
        let ext = pool.get_extension_by_name("google.api.http").unwrap();
        for service in pool.services() {
            for rpc in service.methods() {
                let path = format!("/{}/{}", service.full_name(), rpc.name());
                let routed = t.routes().iter().any(|r| r.grpc_path == path);
                assert_eq!(routed, rpc.options().has_extension(&ext), "{path}");
            }
        }
    }

    /// The index finds what a scan of every route in order finds, for a
    /// path made from each route's own template.
    #[test]
    fn the_index_finds_what_a_full_scan_finds() {
        let t = table();
        let mut tried = 0;
        for route in t.routes() {
            let mut path = String::new();
            for seg in &route.template.segments {
                path.push('/');
                path.push_str(match seg {
                    Segment::Literal(l) => l,
                    Segment::Star => "x",
                    Segment::DoubleStar => "y/z",
                });
            }
            if let Some(verb) = &route.template.verb {
                path.push(':');
                path.push_str(verb);
            }
            for method in [Method::GET, Method::POST, Method::PATCH, Method::DELETE] {
                let scan = t
                    .routes()
                    .iter()
                    .filter(|r| r.method == method)
                    .find_map(|r| r.template.matches(&path).map(|v| (r.grpc_path.clone(), v)));
                let indexed = match t.lookup(&method, &path) {
                    Lookup::Found(r, v) => Some((r.grpc_path.clone(), v)),
                    _ => None,
                };
                assert_eq!(indexed, scan, "{method} {path}");
                tried += 1;
            }
        }
        assert!(tried > 200, "{tried}");
        // Percent-encoded first segments reach the same bucket.
        let (rpc, _) = found(&t, Method::GET, "/%761/capsules/refund");
        assert!(rpc.ends_with("/GetCapsule"), "{rpc}");
    }

    #[test]
    fn verbs_variables_and_additional_bindings() {
        let t = table();
        let (rpc, vars) = found(&t, Method::GET, "/v1/capsules/refund");
        assert!(rpc.ends_with("RegistryService/GetCapsule"), "{rpc}");
        assert_eq!(vars, vec![("name".to_owned(), "refund".to_owned())]);
        let (rpc, _) = found(&t, Method::GET, "/v1/capsules/refund:diff");
        assert!(
            rpc.ends_with("/DiffCapsule") || rpc.contains("Diff"),
            "{rpc}"
        );
        let (rpc, _) = found(&t, Method::POST, "/v1/capsules:push");
        assert!(rpc.ends_with("/PushCapsule"), "{rpc}");
        assert!(matches!(
            t.lookup(&Method::PUT, "/v1/capsules:push"),
            Lookup::MethodNotAllowed(m) if m == vec![Method::POST]
        ));
        assert!(matches!(
            t.lookup(&Method::GET, "/v2/nothing"),
            Lookup::NotFound
        ));
    }
}
