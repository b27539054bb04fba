//! Roles, the verified principal and the token claims it comes from.

use std::fmt;
use std::str::FromStr;

use anumate_errors::{Error, ErrorCode};
use serde::{Deserialize, Serialize};

/// A role within a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Everything within the tenant.
    Admin,
    /// Writes capsules and policies.
    Author,
    /// Compiles, preflights and executes.
    Operator,
    /// Decides approvals.
    Approver,
    /// Reads receipts and events.
    Auditor,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Author,
        Role::Operator,
        Role::Approver,
        Role::Auditor,
    ];

    /// The lowercase name used in tokens, e.g. `operator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Author => "author",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
        }
    }

    /// Parses a lowercase role name; `None` for anything else.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::parse(s).ok_or_else(|| Error::invalid_argument("role", format!("unknown role {s:?}")))
    }
}

/// The subject of a service identity: `svc:<name>`.
pub fn service_subject(name: &str) -> String {
    format!("{SERVICE_SUBJECT_PREFIX}{name}")
}

/// Subjects starting with this are reserved for the platform's service issuer.
pub const SERVICE_SUBJECT_PREFIX: &str = "svc:";

/// Longest tenant id accepted, in bytes.
pub const MAX_TENANT_LEN: usize = 63;

/// Checks a tenant id: 1–63 characters of `a-z`, `0-9`, `-`, `_` and `.`,
/// starting with a letter or digit. Ids are path segments, log fields, Kafka
/// keys and checkpoint origins; a leading `-` or `.` is never a tenant.
pub fn validate_tenant_id(tenant: &str) -> Result<(), String> {
    let first_ok = tenant
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if tenant.is_empty() || tenant.len() > MAX_TENANT_LEN || !first_ok {
        return Err(format!(
            "tenant id {tenant:?} must be 1-{MAX_TENANT_LEN} characters starting with a lowercase letter or digit"
        ));
    }
    if let Some(c) = tenant
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "tenant id {tenant:?} contains {c:?}: only a-z, 0-9, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

/// The prefix naming a group where principals and groups share a list (`group:controllers`).
pub const GROUP_PREFIX: &str = "group:";

/// Most groups one token may name.
pub const MAX_GROUPS: usize = 64;

/// Longest group name accepted, in bytes.
pub const MAX_GROUP_LEN: usize = 63;

/// Checks a group name: 1–63 characters of `a-z`, `0-9`, `-`, `_` and `.`,
/// starting with a letter or digit (the charset of role and tenant names, so
/// a group is safe in `group:<name>` entries, logs and filters).
pub fn validate_group_name(group: &str) -> Result<(), String> {
    let first_ok = group
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if group.is_empty() || group.len() > MAX_GROUP_LEN || !first_ok {
        return Err(format!(
            "group {group:?} must be 1-{MAX_GROUP_LEN} characters starting with a lowercase letter or digit"
        ));
    }
    if let Some(c) = group
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "group {group:?} contains {c:?}: only a-z, 0-9, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

/// The groups of a `groups` claim: absent → none; else an array of at most
/// [`MAX_GROUPS`] valid names, sorted and deduplicated. A malformed claim is
/// refused rather than read as "no groups": a principal silently losing its
/// groups would be refused as an approver for no visible reason.
pub fn parse_groups_claim(claim: Option<&serde_json::Value>) -> Result<Vec<String>, String> {
    let items = match claim {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items,
        Some(other) => {
            return Err(format!(
                "groups claim must be an array of group names, not {}",
                json_kind(other)
            ));
        }
    };
    if items.len() > MAX_GROUPS {
        return Err(format!(
            "groups claim names {} groups; at most {MAX_GROUPS} are accepted",
            items.len()
        ));
    }
    let mut groups = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let serde_json::Value::String(name) = item else {
            return Err(format!(
                "groups[{i}] must be a string, not {}",
                json_kind(item)
            ));
        };
        // `group:x` in a claim is a confusion of the entry form with the name.
        let name = name.strip_prefix(GROUP_PREFIX).unwrap_or(name);
        validate_group_name(name).map_err(|why| format!("groups[{i}]: {why}"))?;
        groups.push(name.to_owned());
    }
    groups.sort();
    groups.dedup();
    Ok(groups)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Who is calling, as proven by a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant the token was issued for.
    pub tenant_id: String,
    /// The token's `sub`; `svc:<name>` for services.
    pub subject: String,
    /// The service name (`orchestrator`, …) when, and only when, the token
    /// was minted by the platform's service issuer. A subject prefix from any
    /// other issuer never makes a service.
    pub service: Option<String>,
    /// For a service acting for someone (a delegated service token): whom it
    /// acts for. The principal's `roles` are then that principal's roles, so
    /// a service can never do more for a caller than the caller could.
    pub on_behalf_of: Option<String>,
    /// The token's `iss`.
    pub issuer: String,
    /// Known roles from the token (unknown names are dropped).
    pub roles: Vec<Role>,
    /// The token's `jti`, when it has one.
    pub token_id: Option<String>,
    /// Groups from the token's `groups` claim (sorted, without duplicates;
    /// bare names such as `controllers`); empty when the token has none.
    pub groups: Vec<String>,
}

impl Principal {
    /// Whether the principal holds `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether the principal's token names `group` (a bare name, `controllers`).
    pub fn in_group(&self, group: &str) -> bool {
        self.groups
            .binary_search_by(|g| g.as_str().cmp(group))
            .is_ok()
    }

    /// Whether an approver entry names this principal: `group:<name>` by
    /// membership, anything else (`user:alice`) by the person behind the call.
    pub fn matches(&self, entry: &str) -> bool {
        match entry.strip_prefix(GROUP_PREFIX) {
            Some(group) => self.in_group(group),
            None => entry == self.originator(),
        }
    }

    /// Whether the token came from the platform's service issuer.
    pub fn is_service(&self) -> bool {
        self.service.is_some()
    }

    /// The service name, for a token from the platform's service issuer.
    pub fn service_name(&self) -> Option<&str> {
        self.service.as_deref()
    }

    /// Whom a delegated service token acts for (`user:alice`), if anyone.
    pub fn on_behalf_of(&self) -> Option<&str> {
        self.on_behalf_of.as_deref()
    }

    /// The person (or outside client) ultimately behind this call: the
    /// principal a service acts for, else the caller itself.
    pub fn originator(&self) -> &str {
        self.on_behalf_of.as_deref().unwrap_or(&self.subject)
    }

    /// `Ok` if the caller is one of the platform services `names` (by its
    /// service-issuer identity); else `PERMISSION_DENIED`.
    pub fn require_service(&self, names: &[&str]) -> Result<(), Error> {
        if self.service_name().is_some_and(|s| names.contains(&s)) {
            return Ok(());
        }
        tracing::warn!(
            tenant = %self.tenant_id,
            subject = %self.subject,
            needed = %names.join(", "),
            "permission denied: not a permitted service identity"
        );
        Err(Error::new(
            ErrorCode::PermissionDenied,
            format!(
                "this call is for the platform service(s): {}",
                names.join(", ")
            ),
        )
        .with_metadata("required_services", names.join(",")))
    }

    /// `Ok` if the principal holds one of `roles` or is admin; else `PERMISSION_DENIED`.
    pub fn require_any(&self, roles: &[Role]) -> Result<(), Error> {
        if self.has_role(Role::Admin) || roles.iter().any(|r| self.has_role(*r)) {
            return Ok(());
        }
        let needed = roles
            .iter()
            .chain(std::iter::once(&Role::Admin))
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            tenant = %self.tenant_id,
            subject = %self.subject,
            needed = %needed,
            "permission denied"
        );
        Err(Error::new(
            ErrorCode::PermissionDenied,
            format!("this call needs one of the roles: {needed}"),
        )
        .with_metadata("required_roles", needed))
    }
}

/// The claims Anumate reads from a bearer token.
///
/// `iss`, `sub` and `exp` default when absent so that the validator, which runs
/// after deserialization, reports the missing claim by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    #[serde(default)]
    pub iss: String,
    /// Subject.
    #[serde(default)]
    pub sub: String,
    /// Audience (a string or a list of strings on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    /// Expiry, seconds since the epoch.
    #[serde(default)]
    pub exp: i64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The tenant; required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Role names.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Group names (an array of strings; checked by [`Claims::into_principal`]
    /// so a malformed claim is reported by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<serde_json::Value>,
    /// On a delegated service token only: the principal the service acts for
    /// (its subject, roles and groups, as verified when the work began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obo: Option<OnBehalfOf>,
}

/// The `obo` claim of a delegated service token: whom the service acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnBehalfOf {
    /// The subject acted for, e.g. `user:alice`.
    pub sub: String,
    /// That principal's role names.
    #[serde(default)]
    pub roles: Vec<String>,
    /// That principal's group names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<serde_json::Value>,
}

impl Claims {
    /// The principal these verified claims describe; `UNAUTHENTICATED` without
    /// a valid tenant. `service` is set by the authenticator for tokens of the
    /// platform's service issuer only.
    pub fn into_principal(self) -> Result<Principal, Error> {
        let tenant_id = match self.tenant {
            Some(t) if !t.trim().is_empty() => t,
            _ => {
                return Err(Error::new(
                    ErrorCode::Unauthenticated,
                    "token has no tenant claim",
                ));
            }
        };
        if let Err(why) = validate_tenant_id(&tenant_id) {
            return Err(Error::new(ErrorCode::Unauthenticated, why));
        }
        if self.sub.is_empty() {
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                "token has an empty sub claim",
            ));
        }
        // A delegated token's roles and groups are those of whom it acts for.
        let (on_behalf_of, role_names, groups) = match self.obo {
            Some(obo) => {
                if obo.sub.is_empty() || obo.sub.starts_with(SERVICE_SUBJECT_PREFIX) {
                    return Err(Error::new(
                        ErrorCode::Unauthenticated,
                        "token's obo claim must name the principal acted for (not a service)",
                    ));
                }
                (Some(obo.sub), obo.roles, obo.groups)
            }
            None => (None, self.roles, self.groups),
        };
        let groups = parse_groups_claim(groups.as_ref()).map_err(|why| {
            Error::new(ErrorCode::Unauthenticated, format!("token's {why}"))
                .with_metadata("claim", "groups")
        })?;
        let mut roles: Vec<Role> = role_names.iter().filter_map(|r| Role::parse(r)).collect();
        roles.sort();
        roles.dedup();
        Ok(Principal {
            tenant_id,
            subject: self.sub,
            issuer: self.iss,
            service: None,
            on_behalf_of,
            roles,
            token_id: self.jti,
            groups,
        })
    }
}
