//! `anumate auth dev-token`: tokens from the dev issuer for any user, role
//! and group, so one person can play every part locally (the requester, two
//! approvers of a group, an auditor).

use std::path::PathBuf;
use std::time::Duration;

use anumate_auth::{DevIssuer, Role};
use anyhow::Context as _;
use clap::Args;

/// Flags of `anumate auth dev-token`.
#[derive(Args, Debug)]
pub struct DevTokenArgs {
    /// Tenant the token is for.
    #[arg(long, default_value = "dev")]
    tenant: String,
    /// Subject (principal id), e.g. `user:alice`; what approvers lists name.
    #[arg(long, default_value = "user:dev")]
    subject: String,
    /// Roles, repeatable or comma-separated: admin, author, operator,
    /// approver, auditor.
    #[arg(long, default_value = "admin", value_delimiter = ',')]
    roles: Vec<String>,
    /// Groups for the token's `groups` claim, repeatable or comma-separated
    /// (`controllers`, or `group:controllers`): approvers listed as
    /// `group:<name>` match them.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_secs: u64,
    /// Data directory holding the dev issuer key.
    #[arg(long, default_value = ".anumate")]
    data_dir: PathBuf,
}

/// Mints the token and prints it alone on stdout (so `$(…)` captures it);
/// whom it names goes to stderr.
pub fn dev_token(args: DevTokenArgs) -> anyhow::Result<()> {
    let roles = parse_roles(&args.roles)?;
    let groups: Vec<String> = args
        .groups
        .iter()
        .map(|g| g.trim().to_owned())
        .filter(|g| !g.is_empty())
        .collect();
    let issuer = DevIssuer::load_or_create(&args.data_dir.join("keys"))?;
    let token = issuer
        .mint_with_groups(
            &args.tenant,
            &args.subject,
            &roles,
            &groups,
            Duration::from_secs(args.ttl_secs),
        )
        .map_err(|e| anyhow::anyhow!("{}", e.message))
        .context("--groups")?;
    println!("{token}");
    eprintln!("{}", summary(&args.subject, &args.tenant, &roles, &groups));
    Ok(())
}

/// `token for user:alice in tenant dev: roles approver; groups controllers`.
fn summary(subject: &str, tenant: &str, roles: &[Role], groups: &[String]) -> String {
    let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    let groups: Vec<&str> = groups
        .iter()
        .map(|g| g.strip_prefix(anumate_auth::GROUP_PREFIX).unwrap_or(g))
        .collect();
    let list = |items: &[&str]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    format!(
        "token for {subject} in tenant {tenant}: roles {}; groups {}",
        list(&roles),
        list(&groups)
    )
}

/// Role names to roles; an unknown name is an error naming the known ones.
pub fn parse_roles(names: &[String]) -> anyhow::Result<Vec<Role>> {
    names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .map(|n| {
            Role::parse(n).with_context(|| {
                format!("unknown role {n:?} (admin, author, operator, approver, auditor)")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_from_lists_and_unknown_names_are_refused() {
        let names = ["approver".to_owned(), " auditor".to_owned(), String::new()];
        assert_eq!(
            parse_roles(&names).unwrap(),
            vec![Role::Approver, Role::Auditor]
        );
        let err = parse_roles(&["boss".to_owned()]).unwrap_err().to_string();
        assert!(err.contains("unknown role \"boss\""), "{err}");
    }

    #[test]
    fn summary_names_subject_roles_and_groups() {
        assert_eq!(
            summary(
                "user:alice",
                "dev",
                &[Role::Approver],
                &["group:controllers".into(), "finance".into()]
            ),
            "token for user:alice in tenant dev: roles approver; groups controllers, finance"
        );
        assert_eq!(
            summary("user:x", "t", &[], &[]),
            "token for user:x in tenant t: roles none; groups none"
        );
    }
}
