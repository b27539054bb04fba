//! `anumate tenant settings [set KEY=VALUE…]`: read and (admins) change the
//! tenant's settings (`anumate.registry.v1.TenantSettingsService`).

use std::process::ExitCode;

use anumate_proto::registry::v1 as pb;
use clap::{Args, Subcommand};
use pb::tenant_settings_service_client::TenantSettingsServiceClient;

use crate::cli::{Connection, Failure, finish, show, time};

/// `anumate tenant …`
#[derive(Args, Debug)]
pub struct TenantCommand {
    #[command(subcommand)]
    pub command: TenantSub,
    #[command(flatten)]
    pub conn: Connection,
}

/// Tenant subcommands.
#[derive(Subcommand, Debug)]
pub enum TenantSub {
    /// Show the tenant's settings (defaults for what was never set); `set`
    /// changes some (admins only).
    Settings {
        #[command(subcommand)]
        command: Option<SettingsSub>,
    },
}

/// `anumate tenant settings …`
#[derive(Subcommand, Debug)]
pub enum SettingsSub {
    /// Change the named settings, and only those (admins only), e.g.
    /// `set require_preflight=false preflight_citation_ttl=30m`.
    ///
    /// Keys: require_preflight (true|false|default), preflight_citation_ttl (1m–7d),
    /// approval_default_expiry (1m–30d), idempotency_retention (1h–400d),
    /// run_retention (1h–400d). Durations are like 90s, 30m, 4h, 7d or 1h30m;
    /// `default` puts a duration back to its default.
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        assignments: Vec<String>,
        /// Refuse the change if the settings changed since this etag was read.
        #[arg(long, default_value = "")]
        etag: String,
    },
}

/// Runs a tenant command and returns the process exit code.
pub async fn run(cmd: TenantCommand) -> ExitCode {
    finish(tenant(cmd).await.map(|()| ExitCode::SUCCESS), None)
}

async fn tenant(cmd: TenantCommand) -> Result<(), Failure> {
    let conn = &cmd.conn;
    let TenantSub::Settings { command } = cmd.command;
    // Assignments are checked before connecting: a typo costs no round trip.
    let update = match command {
        Some(SettingsSub::Set { assignments, etag }) => Some(update_request(&assignments, etag)?),
        None => None,
    };
    let mut client = conn
        .client(TenantSettingsServiceClient::with_interceptor)
        .await?;
    let settings = match update {
        None => {
            client
                .get_tenant_settings(pb::GetTenantSettingsRequest {})
                .await?
                .into_inner()
                .settings
        }
        Some(request) => {
            client
                .update_tenant_settings(request)
                .await?
                .into_inner()
                .settings
        }
    }
    .ok_or_else(|| Failure::Local("the server sent no settings".into()))?;
    show(conn.output, &settings, print_settings);
    Ok(())
}

/// The update of `KEY=VALUE` pairs: the mask names each key once, in the
/// order given. Keys this CLI does not know go to the server as they are
/// (it names every unknown field); values of known keys are parsed here.
fn update_request(
    assignments: &[String],
    etag: String,
) -> Result<pb::UpdateTenantSettingsRequest, Failure> {
    let mut settings = pb::TenantSettings::default();
    let mut paths: Vec<String> = Vec::new();
    for a in assignments {
        let (key, value) = a
            .split_once('=')
            .ok_or_else(|| Failure::Local(format!("{a:?} is not KEY=VALUE")))?;
        let (key, value) = (key.trim(), value.trim());
        let bad = |e: String| Failure::Local(format!("{key}: {e}"));
        match key {
            "require_preflight" => {
                settings.require_preflight = match value {
                    "true" => Some(true),
                    "false" => Some(false),
                    "default" => None,
                    other => return Err(bad(format!("{other:?} is not true or false"))),
                }
            }
            "preflight_citation_ttl" => {
                settings.preflight_citation_ttl = duration_value(value).map_err(bad)?
            }
            "approval_default_expiry" => {
                settings.approval_default_expiry = duration_value(value).map_err(bad)?
            }
            "idempotency_retention" => {
                settings.idempotency_retention = duration_value(value).map_err(bad)?
            }
            "run_retention" => settings.run_retention = duration_value(value).map_err(bad)?,
            _ => {}
        }
        if paths.iter().any(|p| p == key) {
            return Err(Failure::Local(format!("{key} is set twice")));
        }
        paths.push(key.to_owned());
    }
    Ok(pb::UpdateTenantSettingsRequest {
        settings: Some(settings),
        update_mask: Some(pbjson_types::FieldMask { paths }),
        etag,
    })
}

/// A duration setting's value: `default` (none), or a duration.
fn duration_value(s: &str) -> Result<Option<pbjson_types::Duration>, String> {
    if s == "default" {
        return Ok(None);
    }
    let seconds = parse_duration(s)?;
    Ok(Some(pbjson_types::Duration {
        seconds: i64::try_from(seconds).map_err(|_| format!("{s:?} is too long"))?,
        nanos: 0,
    }))
}

/// Seconds of `90s`, `30m`, `4h`, `7d`, `1h30m`.
fn parse_duration(s: &str) -> Result<u64, String> {
    let shape = || format!("{s:?} is not a duration like 90s, 30m, 4h, 7d or 1h30m");
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(shape()),
        };
        let n: u64 = number.parse().map_err(|_| shape())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long"))?;
        number.clear();
    }
    if !number.is_empty() || s.is_empty() {
        return Err(shape());
    }
    Ok(total)
}

/// `1h`, `30d`, `1h30m`, `90s`: days, hours, minutes, seconds that are not 0.
fn format_duration(d: Option<&pbjson_types::Duration>) -> String {
    let Some(d) = d else {
        return "-".into();
    };
    let mut secs = d.seconds;
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, name) in [(86_400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        if secs >= unit {
            out.push_str(&format!("{}{name}", secs / unit));
            secs %= unit;
        }
    }
    out
}

fn print_settings(s: &pb::TenantSettings) {
    match s.require_preflight {
        Some(v) => println!("require_preflight        {v}"),
        None => println!("require_preflight        -"),
    }
    for (name, d) in [
        ("preflight_citation_ttl", &s.preflight_citation_ttl),
        ("approval_default_expiry", &s.approval_default_expiry),
        ("idempotency_retention", &s.idempotency_retention),
        ("run_retention", &s.run_retention),
    ] {
        println!("{name:<24} {}", format_duration(d.as_ref()));
    }
    println!("etag                     {}", s.etag);
    println!("updated                  {}", time(s.update_time.as_ref()));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations_parse_and_print_back() {
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        for bad in ["", "30", "1w", "h", "1.5h", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        let d = |seconds| pbjson_types::Duration { seconds, nanos: 0 };
        assert_eq!(format_duration(Some(&d(5400))), "1h30m");
        assert_eq!(format_duration(Some(&d(30 * 86_400))), "30d");
        assert_eq!(format_duration(Some(&d(90))), "1m30s");
    }

    #[test]
    fn assignments_build_the_mask_from_the_keys() {
        let r = update_request(
            &[
                "require_preflight=false".into(),
                "preflight_citation_ttl=30m".into(),
                "run_retention=default".into(),
                "colour=blue".into(),
            ],
            "r3".into(),
        )
        .unwrap();
        assert_eq!(
            r.update_mask.unwrap().paths,
            vec![
                "require_preflight",
                "preflight_citation_ttl",
                "run_retention",
                "colour"
            ]
        );
        let s = r.settings.unwrap();
        assert_eq!(s.require_preflight, Some(false));
        assert_eq!(s.preflight_citation_ttl.unwrap().seconds, 1800);
        assert!(s.run_retention.is_none());
        assert_eq!(r.etag, "r3");
        assert!(update_request(&["require_preflight=maybe".into()], String::new()).is_err());
        assert!(update_request(&["run_retention".into()], String::new()).is_err());
        assert!(
            update_request(
                &["run_retention=1d".into(), "run_retention=2d".into()],
                String::new()
            )
            .is_err()
        );
    }
}
