//! Layered configuration, one serde struct per subsystem.
//!
//! Layers, later ones winning: the struct's defaults → a TOML file → `ANUMATE_…`
//! environment variables (`__` separates nesting: `ANUMATE_STORE__URL`) → values
//! given as command-line flags.
#![forbid(unsafe_code)]

use std::path::Path;

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Serialize, de::DeserializeOwned};

/// Prefix of the environment variables read as configuration.
pub const ENV_PREFIX: &str = "ANUMATE_";

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The named file does not exist.
    #[error("config file {0} does not exist")]
    MissingFile(String),
    /// A layer holds a value of the wrong type or an unknown key.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads `T` from its defaults, an optional TOML file, the environment and
/// `overrides` (typically the flags given on the command line, serialized with
/// unset flags skipped).
pub fn load<T, O>(defaults: &T, file: Option<&Path>, overrides: &O) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned,
    O: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(file) = file {
        if !file.exists() {
            return Err(ConfigError::MissingFile(file.display().to_string()));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    // Only variables naming a known section are configuration: others share the
    // prefix for other purposes (`ANUMATE_SERVER` for the CLI,
    // `ANUMATE_TEST_POSTGRES_URL` for tests). Unknown keys *inside* a known
    // section are still errors.
    let sections = top_level_keys(defaults);
    figment = figment
        .merge(Env::prefixed(ENV_PREFIX).split("__").filter(move |key| {
            let first = key.as_str().split('.').next().unwrap_or_default();
            sections.iter().any(|s| s.eq_ignore_ascii_case(first))
        }))
        .merge(Serialized::defaults(overrides));
    figment
        .extract()
        .map_err(|e| ConfigError::Invalid(e.to_string()))
}

fn top_level_keys<T: Serialize>(value: &T) -> Vec<String> {
    match figment::value::Value::serialize(value) {
        Ok(figment::value::Value::Dict(_, dict)) => dict.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Store {
        url: String,
        max_connections: u32,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        listen: String,
        store: Store,
    }

    fn defaults() -> Cfg {
        Cfg {
            listen: "127.0.0.1:1".into(),
            store: Store {
                url: "sqlite://a".into(),
                max_connections: 4,
            },
        }
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
    }

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "a.toml",
                "listen = \"file\"\n[store]\nurl = \"postgres://file\"\nmax_connections = 9\n",
            )?;
            jail.set_env("ANUMATE_STORE__MAX_CONNECTIONS", "12");
            // Not a section: ignored, not an error.
            jail.set_env("ANUMATE_TEST_POSTGRES_URL", "postgres://elsewhere");
            let cfg: Cfg = load(&defaults(), Some(Path::new("a.toml")), &Flags::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(cfg.listen, "file");
            assert_eq!(cfg.store.url, "postgres://file");
            assert_eq!(cfg.store.max_connections, 12);
            let cfg: Cfg = load(
                &defaults(),
                Some(Path::new("a.toml")),
                &Flags {
                    listen: Some("flag".into()),
                },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(cfg.listen, "flag");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[store]\nurl = 3\n")?;
            let err = load::<Cfg, _>(&defaults(), Some(Path::new("bad.toml")), &Flags::default());
            assert!(matches!(err, Err(ConfigError::Invalid(_))));
            jail.create_file("unknown.toml", "lisen = \"x\"\n")?;
            let err = load::<Cfg, _>(
                &defaults(),
                Some(Path::new("unknown.toml")),
                &Flags::default(),
            );
            assert!(matches!(err, Err(ConfigError::Invalid(m)) if m.contains("lisen")));
            jail.set_env("ANUMATE_STORE__MAX_CONECTIONS", "3");
            let err = load::<Cfg, _>(&defaults(), None, &Flags::default());
            assert!(matches!(err, Err(ConfigError::Invalid(m)) if m.contains("max_conections")));
            assert!(matches!(
                load::<Cfg, _>(&defaults(), Some(Path::new("nope.toml")), &Flags::default()),
                Err(ConfigError::MissingFile(_))
            ));
            Ok(())
        });
    }
}
