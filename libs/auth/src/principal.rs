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
    format!("svc:{name}")
}

/// Who is calling, as proven by a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant the token was issued for.
    pub tenant_id: String,
    /// The token's `sub`; `svc:<name>` for services.
    pub subject: String,
    /// The token's `iss`.
    pub issuer: String,
    /// Known roles from the token (unknown names are dropped).
    pub roles: Vec<Role>,
    /// The token's `jti`, when it has one.
    pub token_id: Option<String>,
}

impl Principal {
    /// Whether the principal holds `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether the subject is a service identity (`svc:<name>`).
    pub fn is_service(&self) -> bool {
        self.subject.starts_with("svc:")
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
}

impl Claims {
    /// The principal these verified claims describe; `UNAUTHENTICATED` without a tenant.
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
        if self.sub.is_empty() {
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                "token has an empty sub claim",
            ));
        }
        let mut roles: Vec<Role> = self.roles.iter().filter_map(|r| Role::parse(r)).collect();
        roles.sort();
        roles.dedup();
        Ok(Principal {
            tenant_id,
            subject: self.sub,
            issuer: self.iss,
            roles,
            token_id: self.jti,
        })
    }
}
