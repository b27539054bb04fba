//! Bearer-token authentication for Anumate services.
//!
//! A caller presents `authorization: Bearer <jwt>`; the [`AuthLayer`] verifies it
//! with the [`Authenticator`] (JWKS per issuer, ES256 or RS256) and hands the
//! handler a [`Principal`] in the request extensions. The tenant and roles come
//! only from the verified token. [`DevIssuer`] mints tokens for `anumate dev`;
//! [`ServiceIssuer`] mints the platform's service identities, the only tokens
//! that make a [`Principal::service`].
#![forbid(unsafe_code)]

mod authenticator;
mod config;
mod dev;
mod layer;
mod principal;
mod service;

pub use authenticator::Authenticator;
pub use config::{AuthConfig, IssuerConfig};
pub use dev::{DEV_AUDIENCE, DEV_ISSUER, DevIssuer};
pub use layer::{
    AUTHZ_OPTION, AuthLayer, AuthService, AuthzRule, AuthzTable, BearerToken, PUBLIC_PATH_PREFIXES,
    principal,
};
pub use principal::{
    Claims, GROUP_PREFIX, MAX_GROUP_LEN, MAX_GROUPS, MAX_TENANT_LEN, OnBehalfOf, Principal, Role,
    SERVICE_SUBJECT_PREFIX, parse_groups_claim, service_subject, validate_group_name,
    validate_tenant_id,
};
pub use service::{MAX_SERVICE_TOKEN_TTL, SERVICE_AUDIENCE, SERVICE_ISSUER, ServiceIssuer};
