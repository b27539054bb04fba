//! The `anumate` configuration: one section per subsystem, layered by
//! `anumate_config::load` (defaults → `--config` TOML → `ANUMATE_…` env → flags).
//! The platform's sections are typed here; each service's section
//! (`[registry]`, `[compiler]`, …) belongs to its module, which gives its
//! defaults and checks it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anumate_auth::AuthConfig;
use anumate_events::relay::KafkaConfig;
use anumate_store::StoreConfig;
use anumate_telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

/// Everything `anumate dev|serve|migrate` reads. Unknown keys are refused:
/// by serde in the typed sections, by [`load`] at the top level.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AppConfig {
    /// Where dev state lives: SQLite file, keys, `dev.json`.
    pub data_dir: PathBuf,
    /// The gRPC listener.
    pub grpc: GrpcConfig,
    /// The admin HTTP listener: health, readiness, metrics, JWKS.
    pub admin: crate::admin::AdminConfig,
    /// Database.
    pub store: StoreConfig,
    /// Trusted token issuers.
    pub auth: AuthConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
    /// Signing keys.
    pub keys: KeysConfig,
    /// `anumate dev` only.
    pub dev: DevConfig,
    /// Kafka: the outbox relay's brokers, topics and archive retention.
    pub kafka: KafkaConfig,
    /// The REST gateway (`anumate dev`, `anumate serve gateway`).
    pub gateway: anumate_gateway::GatewayConfig,
    /// mTLS between services: every gRPC listener and client (off while
    /// `cert` is empty).
    pub tls: anumate_service::TlsConfig,
    /// The services' sections by name, each owned and checked by its module
    /// (see `server::modules`).
    #[serde(flatten)]
    pub services: BTreeMap<String, serde_json::Value>,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            data_dir: PathBuf::from(".anumate"),
            grpc: GrpcConfig::default(),
            admin: crate::admin::AdminConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            telemetry: TelemetryConfig::default(),
            keys: KeysConfig::default(),
            dev: DevConfig::default(),
            kafka: KafkaConfig::default(),
            gateway: anumate_gateway::GatewayConfig::default(),
            tls: anumate_service::TlsConfig::default(),
            services: crate::server::modules()
                .iter()
                .filter_map(|m| Some((m.section().to_owned(), m.default_config()?)))
                .collect(),
        }
    }
}

/// `[grpc]`: shared with the server every entry point runs, whose layers read it.
pub use anumate_service::GrpcConfig;

/// `[keys]`: shared with the service modules, which read their key files from it.
pub use anumate_service::KeysConfig;

/// `[dev]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevConfig {
    /// Tenant of the printed admin token.
    pub tenant: String,
    /// Lifetime of the printed admin token, in hours.
    pub token_ttl_hours: u64,
}

impl Default for DevConfig {
    fn default() -> Self {
        DevConfig {
            tenant: "dev".into(),
            token_ttl_hours: 24 * 30,
        }
    }
}

impl AppConfig {
    /// The store URL, defaulting to the SQLite file under the data directory.
    pub fn store_config(&self) -> StoreConfig {
        let mut store = self.store.clone();
        if store.url.is_empty() {
            store.url = format!("sqlite://{}", self.default_sqlite_path().display());
        }
        store
    }

    /// The embedded SQLite file used when `[store] url` is empty.
    pub fn default_sqlite_path(&self) -> PathBuf {
        self.data_dir.join("anumate.db")
    }

    /// Directory of generated keys.
    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }
}

/// Flags that override configuration (only the ones given).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub store_url: Option<String>,
    pub log_format: Option<String>,
    pub kafka: Option<String>,
}

impl Overrides {
    fn to_value(&self) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        if let Some(d) = &self.data_dir {
            root.insert("data_dir".into(), d.display().to_string().into());
        }
        if let Some(l) = &self.listen {
            root.insert("grpc".into(), serde_json::json!({ "listen": l }));
        }
        if let Some(u) = &self.store_url {
            root.insert("store".into(), serde_json::json!({ "url": u }));
        }
        if let Some(f) = &self.log_format {
            root.insert("telemetry".into(), serde_json::json!({ "log_format": f }));
        }
        if let Some(k) = &self.kafka {
            root.insert("kafka".into(), serde_json::json!({ "brokers": k }));
        }
        serde_json::Value::Object(root)
    }
}

/// Loads the layered configuration.
pub fn load(
    file: Option<&Path>,
    defaults: AppConfig,
    overrides: &Overrides,
) -> anyhow::Result<AppConfig> {
    let config: AppConfig = anumate_config::load(&defaults, file, &overrides.to_value())?;
    check_services(&config)?;
    Ok(config)
}

/// Every key left at the top level is a section of one of the service
/// modules, and checks as one.
fn check_services(config: &AppConfig) -> anyhow::Result<()> {
    let modules = crate::server::modules();
    for (name, value) in &config.services {
        let owner = modules
            .iter()
            .find(|m| m.section() == name && m.default_config().is_some());
        match owner {
            Some(module) => module
                .check_config(value)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?,
            None => anyhow::bail!("invalid configuration: unknown section or key `{name}`"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The example operators copy from stays loadable: every key in it is one
    /// the configuration knows (unknown keys are errors).
    #[test]
    fn the_deploy_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/anumate.example.toml");
        let config = load(Some(&path), AppConfig::default(), &Overrides::default())
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(config.kafka.partitions, 6);
        assert_eq!(config.services["events"]["history_retention_hours"], 168);
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("anumate.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A service's section layers over its module's defaults, and is
    /// checked by its module: unknown keys and wrong types name the section.
    #[test]
    fn service_sections_belong_to_their_modules() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[compiler]\nmemo_entries = 7\n");
        let config = load(Some(&path), AppConfig::default(), &Overrides::default()).unwrap();
        assert_eq!(config.services["compiler"]["memo_entries"], 7);
        // The rest of the section keeps its defaults.
        assert_eq!(config.services["compiler"]["default_step_timeout_secs"], 30);

        let path = write(dir.path(), "[compiler]\nmemo_entrys = 7\n");
        let e = load(Some(&path), AppConfig::default(), &Overrides::default()).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("[compiler]") && e.contains("memo_entrys"), "{e}");

        let path = write(dir.path(), "[registry]\nmax_steps = \"many\"\n");
        let e = load(Some(&path), AppConfig::default(), &Overrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("[registry]"), "{e:#}");

        // A placeholder service has no section.
        let path = write(dir.path(), "[ghostrun]\nx = 1\n");
        let e = load(Some(&path), AppConfig::default(), &Overrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("ghostrun"), "{e:#}");
    }
}
