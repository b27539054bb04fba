//! [`ServiceModule`]: a service as the binary sees it, and the [`Context`] it
//! is built from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anumate_auth::ServiceIssuer;
use anumate_crypto::KeyRing;
use anumate_store::{Migration, Store};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::service::RoutesBuilder;
use tonic::transport::Channel;

use crate::clients;
use crate::tasks::Tasks;

/// One service of the platform, as the binary composes it. Each service
/// crate exposes one (`module()`); `anumate dev`, `serve`, `migrate` and the
/// tests iterate the same list.
pub trait ServiceModule: Send + Sync {
    /// Full gRPC service name (`anumate.registry.v1.RegistryService`).
    fn name(&self) -> &'static str;
    /// Its name on the command line (`anumate serve registry`) and its
    /// configuration section (`[registry]`).
    fn section(&self) -> &'static str;
    /// One line for `--help`: what the service is.
    fn about(&self) -> &'static str;
    /// Its configuration section with every default (`None`: it has none).
    /// The binary's defaults hold it, so the TOML file and `ANUMATE_<SECTION>__…`
    /// variables layer over it.
    fn default_config(&self) -> Option<serde_json::Value> {
        None
    }
    /// Checks its section as loaded (unknown keys, wrong types) before
    /// anything is served or migrated.
    fn check_config(&self, _section: &serde_json::Value) -> Result<(), BuildError> {
        Ok(())
    }
    /// Whether it needs the database (placeholders do not).
    fn needs_store(&self) -> bool {
        true
    }
    /// Its own migrations (the outbox's are applied once for all).
    fn migrations(&self) -> Vec<Migration>;
    /// The configuration keys of signing keys it needs and that are not set
    /// (`serve` refuses to start without them; `dev` generates them).
    fn missing_keys(&self, _config: &serde_json::Value, _keys: &KeysConfig) -> Vec<&'static str> {
        Vec::new()
    }
    /// Adds its routes to `ctx.routes`, spawns its background tasks on
    /// `ctx.tasks` and provides what later modules may use in-process
    /// ([`Context::provide`]).
    fn build(&self, ctx: &mut Context) -> Result<(), BuildError>;
}

/// A service module from its parts: what a service with a typed
/// configuration section `C` declares instead of implementing
/// [`ServiceModule`] by hand.
pub struct Module<C> {
    /// Full gRPC service name.
    pub name: &'static str,
    /// `anumate serve` name and configuration section.
    pub section: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// Its own migrations.
    pub migrations: &'static [Migration],
    /// The signing-key settings it needs and lacks, given its section and `[keys]`.
    pub missing_keys: fn(&C, &KeysConfig) -> Vec<&'static str>,
    /// Builds it from its parsed section (see [`ServiceModule::build`]).
    pub build: fn(&mut Context, C) -> Result<(), BuildError>,
}

/// For [`Module::missing_keys`]: a service that signs nothing.
pub fn no_keys<C>(_: &C, _: &KeysConfig) -> Vec<&'static str> {
    Vec::new()
}

impl<C: Serialize + DeserializeOwned + Default> ServiceModule for Module<C> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn section(&self) -> &'static str {
        self.section
    }

    fn about(&self) -> &'static str {
        self.about
    }

    fn default_config(&self) -> Option<serde_json::Value> {
        default_section::<C>()
    }

    fn check_config(&self, value: &serde_json::Value) -> Result<(), BuildError> {
        check_section::<C>(self.section, value)
    }

    fn migrations(&self) -> Vec<Migration> {
        self.migrations.to_vec()
    }

    fn missing_keys(&self, config: &serde_json::Value, keys: &KeysConfig) -> Vec<&'static str> {
        // A section that does not parse is reported when the service is built.
        match section::<C>(config, self.section) {
            Ok(cfg) => (self.missing_keys)(&cfg, keys),
            Err(_) => Vec::new(),
        }
    }

    fn build(&self, ctx: &mut Context) -> Result<(), BuildError> {
        let cfg = ctx.section::<C>(self.section)?;
        (self.build)(ctx, cfg)
    }
}

/// Why a service could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Its configuration section does not parse.
    #[error("[{section}]: {message}")]
    Config {
        /// The section.
        section: String,
        /// What is wrong.
        message: String,
    },
    /// It needs the database and none is configured.
    #[error("the {0} service needs a store")]
    NoStore(&'static str),
    /// Signing keys are required and not configured.
    #[error(
        "no signing keys configured: set {0} (PKCS#8 PEM files, active key first, the same files on every replica; see deploy/README.md). Only `anumate dev` generates keys, under its data directory"
    )]
    NoKeys(String),
    /// A service refused its configuration or could not load something.
    #[error("{what}: {source}")]
    Service {
        /// Which service or setting.
        what: String,
        /// The product error.
        source: anumate_errors::Error,
    },
    /// Something a service needs could not be started.
    #[error("{what}: {message}")]
    Failed {
        /// What could not be started.
        what: String,
        /// Why.
        message: String,
    },
}

impl BuildError {
    /// `what` could not be started, because of `cause`.
    pub fn failed(what: impl Into<String>, cause: impl std::fmt::Display) -> BuildError {
        BuildError::Failed {
            what: what.into(),
            message: cause.to_string(),
        }
    }

    /// `source`, attributed to `what` (a service or a configuration key).
    pub fn service(what: impl Into<String>, source: anumate_errors::Error) -> BuildError {
        BuildError::Service {
            what: what.into(),
            source,
        }
    }
}

/// `[keys]`: the signing keys of the platform and of its signing services.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Generate missing keys under `<data_dir>/keys/`: set by `anumate dev`
    /// only, never from configuration (replicas would each sign with their own).
    #[serde(skip)]
    pub generate_missing: bool,
    /// PKCS#8 PEM files of the registry's signing keys, active first (the
    /// others still verify: rotation with overlap), the same files on every
    /// replica. Required by `serve` for the registry; empty in `anumate dev`: a
    /// key generated and kept under `<data_dir>/keys/`.
    pub registry_key_files: Vec<PathBuf>,
    /// PKCS#8 PEM files of the receipt log's signing keys (receipts and
    /// checkpoints), active first, the same files on every replica. Required
    /// by `serve` for receipts; empty in `anumate dev`: a key kept under
    /// `<data_dir>/keys/`.
    pub receipts_key_files: Vec<PathBuf>,
    /// PKCS#8 PEM files of the platform's service issuer, active first: the
    /// same files on every replica of every service. A service calling
    /// another presents a short-lived `svc:<name>` token signed with it, and
    /// only tokens signed with these keys are service identities. Empty in
    /// `anumate dev`: a key kept under `<data_dir>/keys/`.
    pub service_key_files: Vec<PathBuf>,
}

/// The defaults of a section typed `T`, for [`ServiceModule::default_config`].
pub fn default_section<T: Serialize + Default>() -> Option<serde_json::Value> {
    serde_json::to_value(T::default()).ok()
}

/// Checks `value` as section `name` typed `T`, for [`ServiceModule::check_config`].
pub fn check_section<T: DeserializeOwned>(
    name: &str,
    value: &serde_json::Value,
) -> Result<(), BuildError> {
    parse_section::<T>(name, value).map(|_| ())
}

/// Parses section `name` of the whole configuration `config` (absent: `T`'s
/// defaults).
pub fn section<T: DeserializeOwned + Default>(
    config: &serde_json::Value,
    name: &str,
) -> Result<T, BuildError> {
    match config.get(name) {
        None => Ok(T::default()),
        Some(value) => parse_section(name, value),
    }
}

fn parse_section<T: DeserializeOwned>(
    name: &str,
    value: &serde_json::Value,
) -> Result<T, BuildError> {
    T::deserialize(value).map_err(|e| BuildError::Config {
        section: name.to_owned(),
        message: e.to_string(),
    })
}

/// What a service is built from, and what it adds to the server.
pub struct Context {
    config: serde_json::Value,
    store: Option<Store>,
    keys: KeysConfig,
    keys_dir: PathBuf,
    service_issuer: Option<ServiceIssuer>,
    own_url: String,
    /// The routes of the server; each module adds its tonic service.
    pub routes: RoutesBuilder,
    /// The server's supervised background tasks.
    pub tasks: Tasks,
    provided: http::Extensions,
}

impl Context {
    /// A context over the whole configuration (as JSON, one key per section),
    /// the store (if any), the `[keys]` section and the directory of generated
    /// keys, the platform's service issuer (if any) and the `http://` address of
    /// this server's own listener (where unset upstream addresses point).
    pub fn new(
        config: serde_json::Value,
        store: Option<Store>,
        keys: KeysConfig,
        keys_dir: PathBuf,
        service_issuer: Option<ServiceIssuer>,
        own_url: String,
    ) -> Context {
        Context {
            config,
            store,
            keys,
            keys_dir,
            service_issuer,
            own_url,
            routes: RoutesBuilder::default(),
            tasks: Tasks::new(),
            provided: http::Extensions::new(),
        }
    }

    /// Section `name` of the configuration.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, BuildError> {
        section(&self.config, name)
    }

    /// The store, for `service`.
    pub fn store(&self, service: &'static str) -> Result<Store, BuildError> {
        self.store.clone().ok_or(BuildError::NoStore(service))
    }

    /// `[keys]`.
    pub fn keys(&self) -> &KeysConfig {
        &self.keys
    }

    /// The platform's service issuer, when its keys are configured.
    pub fn service_issuer(&self) -> Option<&ServiceIssuer> {
        self.service_issuer.as_ref()
    }

    /// Signing keys from `files` (named by `config_key` in errors), else (in
    /// `anumate dev` only) the key `<keys dir>/<name>.key.pem`, created if missing.
    pub fn key_ring(
        &self,
        files: &[PathBuf],
        config_key: &str,
        name: &str,
    ) -> Result<KeyRing, BuildError> {
        if !files.is_empty() {
            return KeyRing::from_pem_files(files).map_err(|e| BuildError::service(config_key, e));
        }
        if !self.keys.generate_missing {
            return Err(BuildError::NoKeys(config_key.to_owned()));
        }
        KeyRing::load_or_create(&self.keys_dir, name).map_err(|e| {
            BuildError::service(format!("{name} key under {}", display(&self.keys_dir)), e)
        })
    }

    /// Makes `value` available to the modules built after this one (an
    /// in-process client, say) and to the binary.
    pub fn provide<T: Clone + Send + Sync + 'static>(&mut self, value: T) {
        self.provided.insert(value);
    }

    /// What an earlier module provided.
    pub fn get<T: Clone + Send + Sync + 'static>(&self) -> Option<&T> {
        self.provided.get::<T>()
    }

    /// The client of an upstream service: the in-process one when that
    /// service was built in this process, else a gRPC client of `url`
    /// (configuration key `config_key`), or of this server's own listener
    /// when `url` is empty.
    pub fn upstream<C>(
        &self,
        config_key: &str,
        url: &str,
        grpc: impl FnOnce(Channel) -> Arc<C>,
    ) -> Result<Arc<C>, BuildError>
    where
        C: ?Sized + Send + Sync + 'static,
    {
        if let Some(local) = self.get::<Arc<C>>() {
            return Ok(local.clone());
        }
        let url = if url.is_empty() { &self.own_url } else { url };
        let channel =
            clients::channel(config_key, url).map_err(|e| BuildError::service(config_key, e))?;
        Ok(grpc(channel))
    }

    /// What the modules provided, the routes and the tasks.
    pub fn into_parts(self) -> (RoutesBuilder, Tasks, http::Extensions) {
        (self.routes, self.tasks, self.provided)
    }
}

fn display(path: &Path) -> std::path::Display<'_> {
    path.display()
}
