//! The tower layer that authenticates and authorizes every gRPC request, the
//! per-RPC authorization table it enforces, and client helpers.
//!
//! Who may call each RPC is declared once, as the `(anumate.common.v1.authz)`
//! option on the RPC in `proto/` (see `proto/anumate/common/v1/authz.proto`).
//! [`AuthzTable`] reads those options from the encoded descriptor set;
//! [`AuthLayer`] authenticates the caller, then refuses with
//! `PERMISSION_DENIED` anyone the method's rule does not admit — before the
//! handler runs. A method without a rule is refused (fail closed).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use anumate_errors::{Error, ErrorCode};
use prost_reflect::{DescriptorPool, Value as ReflectValue};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;

use crate::authenticator::Authenticator;
use crate::principal::{Principal, Role};

/// Paths served without a token: health checks and reflection.
pub const PUBLIC_PATH_PREFIXES: &[&str] = &["/grpc.health.v1.", "/grpc.reflection."];

/// The full name of the method option holding an RPC's [`AuthzRule`].
pub const AUTHZ_OPTION: &str = "anumate.common.v1.authz";

/// Who may call one RPC (the `anumate.common.v1.AuthzRule` of its option).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthzRule {
    /// Served without a credential; nothing else is checked.
    pub public: bool,
    /// User roles admitted (only these: `admin` is not implied).
    pub roles: Vec<Role>,
    /// Platform service identities admitted, by name.
    pub services: Vec<String>,
    /// Any platform service identity is admitted.
    pub any_service: bool,
}

impl AuthzRule {
    /// A rule admitting callers holding one of `roles`.
    pub fn roles(roles: &[Role]) -> AuthzRule {
        AuthzRule {
            roles: roles.to_vec(),
            ..AuthzRule::default()
        }
    }

    /// A rule for a method served without a credential.
    pub fn public() -> AuthzRule {
        AuthzRule {
            public: true,
            ..AuthzRule::default()
        }
    }

    /// `Ok` if the rule admits `principal`; else `PERMISSION_DENIED` naming
    /// the roles (`required_roles`) or services (`required_services`) needed.
    ///
    /// A service identity is admitted by name (or `any_service`); one the rule
    /// does not name is refused as a service when the rule names services and
    /// it acts in its own name; otherwise it is judged by its roles like any
    /// caller (a delegated service token carries the roles of whom it acts for).
    pub fn check(&self, principal: &Principal) -> Result<(), Error> {
        if self.public {
            return Ok(());
        }
        if let Some(service) = principal.service_name() {
            if self.any_service || self.services.iter().any(|s| s == service) {
                return Ok(());
            }
            // In its own name it is refused as a service; acting for a
            // user, it is judged by that user's roles below.
            if !self.services.is_empty() && principal.on_behalf_of().is_none() {
                return Err(self.services_denied());
            }
        }
        if self.roles.iter().any(|r| principal.has_role(*r)) {
            return Ok(());
        }
        if self.roles.is_empty() {
            return Err(self.services_denied());
        }
        let needed = self
            .roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Err(Error::new(
            ErrorCode::PermissionDenied,
            format!("this call needs one of the roles: {needed}"),
        )
        .with_metadata("required_roles", needed))
    }

    fn services_denied(&self) -> Error {
        if self.any_service || self.services.is_empty() {
            return Error::new(
                ErrorCode::PermissionDenied,
                "this call is for the platform services only",
            )
            .with_metadata("required_services", "*");
        }
        Error::new(
            ErrorCode::PermissionDenied,
            format!(
                "this call is for the platform service(s): {}",
                self.services.join(", ")
            ),
        )
        .with_metadata("required_services", self.services.join(","))
    }

    /// Checks the rule is coherent: a public rule names nobody, any other
    /// admits someone, service names are well-formed.
    fn validate(&self) -> Result<(), String> {
        if self.public {
            if self.any_service || !self.roles.is_empty() || !self.services.is_empty() {
                return Err("a public rule must not name roles or services".into());
            }
            return Ok(());
        }
        if !self.any_service && self.roles.is_empty() && self.services.is_empty() {
            return Err(
                "the rule admits nobody (set roles, services, any_service or public)".into(),
            );
        }
        for s in &self.services {
            let valid = !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(format!(
                    "service name {s:?} must be 1-63 characters of a-z, 0-9 and '-'"
                ));
            }
        }
        Ok(())
    }
}

/// The rule of every RPC, by gRPC path (`/package.Service/Method`).
#[derive(Debug, Clone, Default)]
pub struct AuthzTable {
    rules: Arc<HashMap<String, Arc<AuthzRule>>>,
}

/// The platform's table, read once from `anumate_proto::FILE_DESCRIPTOR_SET`.
static PLATFORM: LazyLock<Result<AuthzTable, Error>> =
    LazyLock::new(|| AuthzTable::from_descriptor_set(anumate_proto::FILE_DESCRIPTOR_SET));

impl AuthzTable {
    /// The rules declared on every Anumate RPC in `proto/`.
    pub fn platform() -> Result<AuthzTable, Error> {
        PLATFORM.clone()
    }

    /// The rules declared by `(anumate.common.v1.authz)` options in an encoded
    /// `FileDescriptorSet` (the bytes of `encode_file_descriptor_set`, which
    /// keep extension options). Methods without the option get no rule (and
    /// are refused); a malformed rule is an `INTERNAL` error naming the method.
    pub fn from_descriptor_set(bytes: &[u8]) -> Result<AuthzTable, Error> {
        let bad = |why: String| Error::new(ErrorCode::Internal, why);
        let pool = DescriptorPool::decode(bytes)
            .map_err(|e| bad(format!("descriptor set does not decode: {e}")))?;
        let Some(ext) = pool.get_extension_by_name(AUTHZ_OPTION) else {
            return Err(bad(format!(
                "descriptor set lacks the {AUTHZ_OPTION} option"
            )));
        };
        let mut rules = HashMap::new();
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                let options = method.options();
                if !options.has_extension(&ext) {
                    continue;
                }
                let value = options.get_extension(&ext);
                let ReflectValue::Message(msg) = value.as_ref() else {
                    return Err(bad(format!("{path}: {AUTHZ_OPTION} is not a message")));
                };
                let flag = |name: &str| {
                    msg.get_field_by_name(name)
                        .is_some_and(|v| v.as_bool() == Some(true))
                };
                let strings = |name: &str| -> Vec<String> {
                    match msg.get_field_by_name(name).as_deref() {
                        Some(ReflectValue::List(items)) => items
                            .iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect(),
                        _ => Vec::new(),
                    }
                };
                let roles = strings("roles")
                    .iter()
                    .map(|name| {
                        Role::parse(name)
                            .ok_or_else(|| bad(format!("{path}: unknown role {name:?}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let rule = AuthzRule {
                    public: flag("public"),
                    roles,
                    services: strings("services"),
                    any_service: flag("any_service"),
                };
                rule.validate()
                    .map_err(|why| bad(format!("{path}: {why}")))?;
                rules.insert(path, Arc::new(rule));
            }
        }
        Ok(AuthzTable {
            rules: Arc::new(rules),
        })
    }

    /// A table of the given `(path, rule)` pairs, for services outside
    /// `proto/` (tests); fails like [`AuthzTable::from_descriptor_set`] on an
    /// incoherent rule.
    pub fn from_rules(
        rules: impl IntoIterator<Item = (String, AuthzRule)>,
    ) -> Result<AuthzTable, Error> {
        let mut map = HashMap::new();
        for (path, rule) in rules {
            rule.validate()
                .map_err(|why| Error::new(ErrorCode::Internal, format!("{path}: {why}")))?;
            map.insert(path, Arc::new(rule));
        }
        Ok(AuthzTable {
            rules: Arc::new(map),
        })
    }

    /// The rule of the method at gRPC `path`, if it has one.
    pub fn get(&self, path: &str) -> Option<&AuthzRule> {
        self.rules.get(path).map(Arc::as_ref)
    }

    /// Every method path with a rule.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    /// Whether the table has no rule at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn rule(&self, path: &str) -> Option<Arc<AuthzRule>> {
        self.rules.get(path).cloned()
    }
}

/// Authenticates each request's bearer token, enforces the method's
/// [`AuthzRule`], and puts the [`Principal`] in the request's extensions.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Authenticator,
    rules: AuthzTable,
    public_prefixes: Arc<Vec<String>>,
}

impl AuthLayer {
    /// A layer enforcing `rules`; besides the methods they declare public,
    /// only health and reflection are served without a token.
    pub fn new(auth: Authenticator, rules: AuthzTable) -> AuthLayer {
        AuthLayer {
            auth,
            rules,
            public_prefixes: Arc::new(PUBLIC_PATH_PREFIXES.iter().map(|p| p.to_string()).collect()),
        }
    }

    /// Also serves paths starting with `prefix` without a token or a rule.
    pub fn allow_unauthenticated(mut self, prefix: impl Into<String>) -> AuthLayer {
        Arc::make_mut(&mut self.public_prefixes).push(prefix.into());
        self
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
            rules: self.rules.clone(),
            public_prefixes: self.public_prefixes.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a tonic server.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
    rules: AuthzTable,
    public_prefixes: Arc<Vec<String>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, ResBody> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let rule = self.rules.rule(path);
        if rule.as_ref().is_some_and(|r| r.public)
            || self
                .public_prefixes
                .iter()
                .any(|p| path.starts_with(p.as_str()))
        {
            return Box::pin(self.inner.call(req));
        }
        // The ready inner service is the one that must be called; keep a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let result = match bearer_token(req.headers()) {
                Ok(token) => auth.authenticate(token).await,
                Err(e) => Err(e),
            };
            let principal = match result {
                Ok(principal) => principal,
                Err(e) => {
                    tracing::debug!(path = %req.uri().path(), reason = %e, "request not authenticated");
                    return Ok(e.to_status().into_http());
                }
            };
            let allowed = match &rule {
                Some(rule) => rule.check(&principal),
                None => Err(Error::new(
                    ErrorCode::PermissionDenied,
                    format!("{} has no authorization rule", req.uri().path()),
                )),
            };
            if let Err(e) = allowed {
                tracing::warn!(
                    tenant = %principal.tenant_id,
                    subject = %principal.subject,
                    service = principal.service_name().unwrap_or(""),
                    method = %req.uri().path(),
                    reason = %e.message,
                    "permission denied"
                );
                return Ok(e.to_status().into_http());
            }
            req.extensions_mut().insert(principal);
            inner.call(req).await
        })
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Error> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Error::new(ErrorCode::Unauthenticated, "missing authorization metadata"))?;
    let value = value.to_str().map_err(|_| {
        Error::new(
            ErrorCode::Unauthenticated,
            "authorization metadata is not ASCII",
        )
    })?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(Error::new(
            ErrorCode::Unauthenticated,
            "authorization metadata is not \"Bearer <token>\"",
        )),
    }
}

/// The authenticated caller of `req`; `UNAUTHENTICATED` if no [`AuthLayer`] ran.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    req.extensions().get::<Principal>().cloned().ok_or_else(|| {
        Error::new(ErrorCode::Unauthenticated, "request is not authenticated").to_status()
    })
}

/// A client interceptor that sends `authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerToken(pub String);

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value: MetadataValue<_> = format!("Bearer {}", self.0).parse().map_err(|_| {
            Error::new(
                ErrorCode::InvalidArgument,
                "bearer token is not valid ASCII",
            )
            .to_status()
        })?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::Claims;

    fn principal(roles: &[&str], service: Option<&str>) -> Principal {
        let claims: Claims = serde_json::from_value(serde_json::json!({
            "iss": "test", "sub": "user:alice", "exp": 1, "tenant": "acme", "roles": roles,
        }))
        .unwrap();
        let mut p = claims.into_principal().unwrap();
        p.service = service.map(str::to_owned);
        p
    }

    fn meta<'a>(e: &'a Error, key: &str) -> &'a str {
        e.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap()
    }

    fn platform() -> AuthzTable {
        AuthzTable::platform().unwrap()
    }

    fn rule(path: &str) -> AuthzRule {
        platform().get(path).cloned().unwrap()
    }

    #[test]
    fn every_rpc_in_the_descriptor_set_has_a_rule() {
        let pool = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).unwrap();
        let table = platform();
        let mut methods = 0;
        for service in pool.services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                assert!(table.get(&path).is_some(), "{path} has no authz option");
                methods += 1;
            }
        }
        // The nine services of proto/ (59 RPCs when this was written).
        assert!(
            pool.services().count() >= 9 && methods >= 59,
            "{methods} methods"
        );
        assert_eq!(table.paths().count(), methods);
    }

    #[test]
    fn rules_match_the_documented_roles() {
        use Role::*;
        let registry_push = rule("/anumate.registry.v1.RegistryService/PushCapsule");
        assert_eq!(registry_push, AuthzRule::roles(&[Admin, Author]));
        let compile = rule("/anumate.compiler.v1.CompilerService/Compile");
        assert_eq!(compile, AuthzRule::roles(&[Admin, Operator]));
        let replay = rule("/anumate.events.v1.EventsService/ReplayEvents");
        assert_eq!(replay, AuthzRule::roles(&[Admin]));
        assert!(rule("/anumate.captokens.v1.CapTokensService/GetJwks").public);
        let append = rule("/anumate.receipts.v1.ReceiptsInternal/AppendReceipt");
        assert!(append.any_service && append.roles.is_empty());
        let issue = rule("/anumate.captokens.v1.CapabilityTokensInternal/IssueToken");
        assert_eq!(issue.services, ["orchestrator"]);
        assert_eq!(issue.roles, [Admin]);
        let audit = rule("/anumate.captokens.v1.CapTokensService/ListTokenAudit");
        assert!(audit.services.is_empty() && !audit.any_service);
    }

    #[test]
    fn roles_are_checked_and_admin_only_when_listed() {
        let push = rule("/anumate.registry.v1.RegistryService/PushCapsule");
        assert!(push.check(&principal(&["author"], None)).is_ok());
        assert!(push.check(&principal(&["admin"], None)).is_ok());
        let e = push.check(&principal(&["auditor"], None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert_eq!(e.message, "this call needs one of the roles: admin, author");
        assert_eq!(meta(&e, "required_roles"), "admin, author");
        // A service identity without roles is judged by roles here.
        assert!(push.check(&principal(&[], Some("orchestrator"))).is_err());

        // Appending is for services only: even an admin is refused.
        let append = rule("/anumate.receipts.v1.ReceiptsInternal/AppendReceipt");
        let e = append.check(&principal(&["admin"], None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert_eq!(meta(&e, "required_services"), "*");
        assert!(append.check(&principal(&[], Some("captokens"))).is_ok());
    }

    #[test]
    fn a_service_acting_for_a_user_is_judged_by_the_users_roles() {
        // GetTool names the hub as a service and lists roles: the compiler
        // acting for an operator passes on the operator's roles, the compiler
        // in its own name is refused as a service.
        let get_tool = rule("/anumate.registry.v1.ToolsService/GetTool");
        let mut delegated = principal(&["operator"], Some("compiler"));
        delegated.on_behalf_of = Some("user:alice".into());
        assert!(get_tool.check(&delegated).is_ok());
        let e = get_tool
            .check(&principal(&[], Some("compiler")))
            .unwrap_err();
        assert_eq!(meta(&e, "required_services"), "connectors");
        assert!(get_tool.check(&principal(&[], Some("connectors"))).is_ok());
        let mut no_roles = principal(&[], Some("compiler"));
        no_roles.on_behalf_of = Some("user:mallory".into());
        assert!(get_tool.check(&no_roles).is_err());
    }

    #[test]
    fn named_services_pass_and_other_services_are_refused_as_services() {
        let issue = rule("/anumate.captokens.v1.CapabilityTokensInternal/IssueToken");
        assert!(issue.check(&principal(&[], Some("orchestrator"))).is_ok());
        assert!(issue.check(&principal(&["admin"], None)).is_ok());
        let e = issue.check(&principal(&[], Some("ghostrun"))).unwrap_err();
        assert_eq!(
            e.message,
            "this call is for the platform service(s): orchestrator"
        );
        assert_eq!(meta(&e, "required_services"), "orchestrator");
        let e = issue.check(&principal(&["operator"], None)).unwrap_err();
        assert_eq!(e.message, "this call needs one of the roles: admin");

        let verify = rule("/anumate.captokens.v1.CapabilityTokensInternal/VerifyToken");
        assert!(verify.check(&principal(&[], Some("anything"))).is_ok());
        assert!(verify.check(&principal(&["operator"], None)).is_err());
        let audit = rule("/anumate.captokens.v1.CapTokensService/ListTokenAudit");
        let e = audit
            .check(&principal(&[], Some("orchestrator")))
            .unwrap_err();
        assert!(e.message.starts_with("this call needs one of the roles"));
    }

    #[test]
    fn incoherent_rules_are_refused() {
        let nobody = AuthzTable::from_rules([("/x.S/M".to_string(), AuthzRule::default())]);
        assert_eq!(nobody.unwrap_err().code, ErrorCode::Internal);
        let public_with_roles = AuthzRule {
            public: true,
            ..AuthzRule::roles(&[Role::Admin])
        };
        assert!(AuthzTable::from_rules([("/x.S/M".to_string(), public_with_roles)]).is_err());
        let bad_service = AuthzRule {
            services: vec!["Not A Name".into()],
            ..AuthzRule::default()
        };
        assert!(AuthzTable::from_rules([("/x.S/M".to_string(), bad_service)]).is_err());
    }

    #[test]
    fn a_descriptor_set_without_the_option_is_refused() {
        let e = AuthzTable::from_descriptor_set(b"\x0a\x00").unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.message.contains(AUTHZ_OPTION), "{}", e.message);
    }
}
