//! `anumate`: run the platform (`dev`, `serve`, `migrate`) and talk to it
//! (`capsule …`, `auth …`).
#![forbid(unsafe_code)]

mod admin;
mod approval_cli;
mod auth_cli;
mod cli;
mod client;
mod config;
mod connector_cli;
mod dev_state;
mod events_cli;
mod plan_cli;
mod policy_cli;
mod preflight_cli;
mod receipts_cli;
mod run_cli;
mod server;
mod tenant_cli;
mod token_cli;
mod tool_cli;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anumate_auth::{Authenticator, DevIssuer, Role};
use anumate_store::Store;
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config::{AppConfig, Overrides};

/// Anumate: governed automation. Capsules in, signed receipts out.
#[derive(Parser, Debug)]
#[command(name = "anumate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every service in one process on SQLite under ./.anumate/ (no other server needed).
    Dev(ServerArgs),
    /// Run the named services (mesh mode: one or more services per process).
    Serve {
        /// Services to run (`all` for every one and the REST gateway; `gateway` for the gateway).
        #[arg(required = true, value_parser = server::service_names())]
        services: Vec<String>,
        #[command(flatten)]
        args: ServerArgs,
        /// Apply pending database migrations before serving.
        #[arg(long)]
        migrate: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate(ServerArgs),
    /// Manage capsules in the registry.
    Capsule(client::CapsuleCommand),
    /// Test (offline), push, evaluate and read policies.
    Policy(policy_cli::PolicyCommand),
    /// Push, list, read and deprecate the tenant's tools (SPEC §13).
    Tool(tool_cli::ToolCommand),
    /// Compile capsules into plans; show and list stored plans.
    Plan(plan_cli::PlanCommand),
    /// Append, list (a run's: --run), fetch and verify (offline) receipts; checkpoints and keys.
    Receipt(receipts_cli::ReceiptCommand),
    /// Mint, verify (online or offline) and revoke capability tokens; the JWKS.
    Token(token_cli::TokenCommand),
    /// Follow the event stream (tail) and replay archived events to Kafka.
    Events(events_cli::EventsCommand),
    /// List, read, approve, reject, delegate and follow approvals.
    Approval(approval_cli::ApprovalCommand),
    /// The connector hub: the mock connector's calls.
    Connector(connector_cli::ConnectorCommand),
    /// Simulate a run (GhostRun): steps, decisions, approvals, risk; exits 0/2/1 for PASS/WARN/FAIL.
    Preflight(preflight_cli::PreflightCommand),
    /// Start runs, follow them live, pause/resume/cancel/kill them, retry a step, read their journal.
    Run(run_cli::RunCommand),
    /// The tenant's settings: show them; admins change them (`settings set KEY=VALUE…`).
    Tenant(tenant_cli::TenantCommand),
    /// Tokens for development.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
}

#[derive(Args, Debug, Clone)]
struct ServerArgs {
    /// TOML configuration file (env: ANUMATE_CONFIG).
    #[arg(long, env = "ANUMATE_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for dev state: SQLite database, keys, dev.json.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address (port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// Database URL: postgres://… or sqlite://…
    #[arg(long)]
    store_url: Option<String>,
    /// Log format: json or pretty.
    #[arg(long)]
    log_format: Option<String>,
    /// Kafka bootstrap servers (host:port,…): relay outbox events there as
    /// CloudEvents (`[kafka] brokers`).
    #[arg(long)]
    kafka: Option<String>,
}

impl ServerArgs {
    fn load(&self, defaults: AppConfig) -> anyhow::Result<AppConfig> {
        let overrides = Overrides {
            data_dir: self.data_dir.clone(),
            listen: self.listen.clone(),
            store_url: self.store_url.clone(),
            log_format: self.log_format.clone(),
            kafka: self.kafka.clone(),
        };
        config::load(self.config.as_deref(), defaults, &overrides)
    }
}

#[derive(Subcommand, Debug)]
enum AuthCommand {
    /// Mint a token from the dev issuer kept under the data directory (as
    /// `anumate dev` does), for any subject, roles and groups.
    DevToken(auth_cli::DevTokenArgs),
    /// Mint a service identity token (`svc:<service>`) with the platform's
    /// service key kept under the data directory (as `anumate dev` does): what
    /// a platform service presents when it calls another. A `svc:` subject in a
    /// dev token is refused; only this key makes a service.
    ServiceToken {
        /// The service: orchestrator, approvals, captokens, …
        #[arg(long)]
        service: String,
        /// Tenant the service acts in.
        #[arg(long, default_value = "dev")]
        tenant: String,
        /// Lifetime in seconds (at most 300).
        #[arg(long, default_value_t = 300)]
        ttl_secs: u64,
        /// Data directory holding the service key.
        #[arg(long, default_value = ".anumate")]
        data_dir: PathBuf,
    },
}

/// `anumate … | head` closes stdout early; `println!` then panics with
/// "failed printing to stdout: Broken pipe". Exit quietly instead, with the
/// status a shell gives a process killed by SIGPIPE (128 + 13).
fn quiet_broken_pipe() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
}

fn main() -> ExitCode {
    quiet_broken_pipe();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dev(args) => {
            let mut defaults = AppConfig::default();
            defaults.telemetry.log_format = anumate_telemetry::LogFormat::Pretty;
            let mut config = args.load(defaults)?;
            config.keys.generate_missing = true;
            run_dev(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            services,
            args,
            migrate,
        } => {
            let config = args.load(AppConfig::default())?;
            run_serve(config, &services, migrate).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate(args) => {
            let config = args.load(AppConfig::default())?;
            let store = connect_store(&config).await?;
            let report = migrate_all(&store).await?;
            println!(
                "applied {} migration(s){}; {} already applied",
                report.applied.len(),
                if report.applied.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", report.applied.join(", "))
                },
                report.already_applied
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Capsule(cmd) => Ok(client::run_capsule(cmd).await),
        Command::Policy(cmd) => Ok(policy_cli::run(cmd).await),
        Command::Tool(cmd) => Ok(tool_cli::run(cmd).await),
        Command::Plan(cmd) => Ok(plan_cli::run(cmd).await),
        Command::Receipt(cmd) => Ok(receipts_cli::run(cmd).await),
        Command::Token(cmd) => Ok(token_cli::run(cmd).await),
        Command::Events(cmd) => Ok(events_cli::run(cmd).await),
        Command::Approval(cmd) => Ok(approval_cli::run(cmd).await),
        Command::Preflight(cmd) => Ok(preflight_cli::run(cmd).await),
        Command::Run(cmd) => Ok(run_cli::run(cmd).await),
        Command::Connector(cmd) => Ok(connector_cli::run(cmd).await),
        Command::Tenant(cmd) => Ok(tenant_cli::run(cmd).await),
        Command::Auth {
            command: AuthCommand::DevToken(args),
        } => {
            auth_cli::dev_token(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Auth {
            command:
                AuthCommand::ServiceToken {
                    service,
                    tenant,
                    ttl_secs,
                    data_dir,
                },
        } => {
            let issuer =
                anumate_auth::ServiceIssuer::load_or_create(&data_dir.join("keys"), &service)?;
            println!("{}", issuer.mint(&tenant, Duration::from_secs(ttl_secs))?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Applies every migration as the owner (`[store] owner_url`) and makes the
/// serving login a member of the roles it switches to.
async fn migrate_all(store: &Store) -> anyhow::Result<anumate_store::MigrationReport> {
    let report = store
        .migrate(&server::migrations(&server::modules()))
        .await?;
    store
        .grant_to_serving_login(anumate_events::relay::RELAY_ROLE)
        .await
        .context("granting the outbox relay role to the serving login")?;
    Ok(report)
}

async fn connect_store(config: &AppConfig) -> anyhow::Result<Store> {
    let store_cfg = config.store_config();
    if store_cfg.url.starts_with("sqlite:") {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    }
    Store::connect(&store_cfg)
        .await
        .with_context(|| format!("cannot open the store at {}", redact_url(&store_cfg.url)))
}

/// Hides a password in a database URL.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn run_dev(config: AppConfig) -> anyhow::Result<()> {
    // Private to the user: the database, the keys and the admin token live here.
    for dir in [&config.data_dir, &config.keys_dir()] {
        dev_state::create_private_dir(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if config.store.url.is_empty() {
        let db = config.default_sqlite_path();
        dev_state::create_private_file(&db)
            .with_context(|| format!("cannot create {}", db.display()))?;
    }
    let _telemetry = anumate_telemetry::init("anumate", &config.telemetry)?;
    let store = connect_store(&config).await?;
    let report = migrate_all(&store).await?;
    if !report.applied.is_empty() {
        tracing::info!(applied = ?report.applied, "migrations applied");
    }
    store.check_serving_role().await?;
    let issuer = DevIssuer::load_or_create(&config.keys_dir())?;
    let services = server::dev_service_issuer(&config)?;
    let authenticator = Authenticator::new(config.auth.clone())?
        .with_static_issuer(issuer.issuer(), issuer.jwks())
        .with_static_service_issuer(services.jwks());
    let token = issuer.mint(
        &config.dev.tenant,
        "user:dev",
        &[Role::Admin],
        Duration::from_secs(config.dev.token_ttl_hours * 3600),
    )?;
    // `[tls]` is checked before anything is printed or written to dev.json
    // (the server then uses what this loaded).
    anumate_service::clients::process_tls(&config.tls)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {}", e.message))?;
    let listener = server::bind(&config).await?;
    let addr = listener.local_addr()?;
    // With `[tls]` the gRPC listener speaks TLS: say so in the address the
    // CLI and `.anumate/dev.json` use.
    let scheme = if config.tls.enabled() {
        "https"
    } else {
        "http"
    };
    let server_url = format!("{scheme}://{addr}");
    let admin = admin::bind(&config.admin, &config.grpc.listen).await?;
    let admin_url = match &admin {
        Some(l) => format!("http://{}", l.local_addr()?),
        None => String::new(),
    };
    let gateway = server::bind_gateway(&config).await?;
    let gateway_url = match &gateway {
        Some(l) => format!("http://{}", l.local_addr()?),
        None => String::new(),
    };
    dev_state::write(
        &config.data_dir,
        &dev_state::DevState {
            server: server_url.clone(),
            token: token.clone(),
            tenant: config.dev.tenant.clone(),
            pid: std::process::id(),
            admin: admin_url.clone(),
            gateway: gateway_url.clone(),
        },
    )?;
    println!("anumate dev: serving gRPC on {server_url}");
    if !admin_url.is_empty() {
        println!("  admin:  {admin_url} (/healthz /readyz /metrics /.well-known/jwks.json)");
    }
    if !gateway_url.is_empty() {
        println!("  rest:   {gateway_url} (REST gateway; /openapi.json)");
    }
    println!("  store:  {}", redact_url(&config.store_config().url));
    println!("  tenant: {}", config.dev.tenant);
    println!(
        "  admin token (also in {}):",
        dev_state::path(&config.data_dir).display()
    );
    println!("{token}");
    println!("  try: anumate capsule push examples/refund.capsule.yaml");
    let data_dir = config.data_dir.clone();
    // In dev the gateway calls this process's services in process (see
    // server::serve), unless `[gateway] upstream` names other ones.
    let mut in_process_gateway = None;
    if let Some(gw) = gateway {
        if config.gateway.upstream.is_empty() {
            in_process_gateway = Some(gw);
        } else {
            let upstream = config.gateway.upstream.clone();
            let cfg = config.clone();
            tokio::spawn(async move {
                if let Err(e) = server::serve_gateway(&cfg, gw, &upstream).await {
                    tracing::error!(error = %format!("{e:#}"), "REST gateway stopped");
                }
            });
        }
    }
    let rt = server::Runtime {
        modules: server::selected(&[]),
        config,
        store: Some(store),
        authenticator,
        service_issuer: Some(services),
        admin,
        gateway: in_process_gateway,
    };
    let served = server::serve(rt, listener).await;
    // A stopped server's address would only send CLI commands to a dead port.
    dev_state::remove_if_owned(&data_dir, std::process::id());
    served
}

/// The `service.name` of a serving process's spans: `anumate-<service>` for
/// one service (`anumate-compiler`), several joined with `+`, `anumate` for
/// them all.
fn telemetry_service_name(services: &[String]) -> String {
    if services.is_empty() || services.iter().any(|s| s == "all") {
        return "anumate".to_owned();
    }
    format!("anumate-{}", services.join("+"))
}

async fn run_serve(config: AppConfig, services: &[String], migrate: bool) -> anyhow::Result<()> {
    let _telemetry = anumate_telemetry::init(&telemetry_service_name(services), &config.telemetry)?;
    let modules = server::selected(services);
    let with_gateway = server::with_gateway(services);
    if with_gateway && modules.is_empty() {
        // The gateway alone (mesh): it reaches the services at `[gateway] upstream`.
        anyhow::ensure!(
            !config.gateway.upstream.is_empty(),
            "`anumate serve gateway` alone needs [gateway] upstream (the services' gRPC address)"
        );
        let gw = server::bind_gateway(&config)
            .await?
            .context("[gateway] listen is off")?;
        println!(
            "anumate serve: REST gateway on http://{} -> {}",
            gw.local_addr()?,
            config.gateway.upstream
        );
        let upstream = config.gateway.upstream.clone();
        return server::serve_gateway(&config, gw, &upstream).await;
    }
    server::require_keys(&config, &modules)?;
    let needs_store = modules.iter().any(|m| m.needs_store());
    let store = if needs_store {
        let store = connect_store(&config).await?;
        if migrate {
            let report = migrate_all(&store).await?;
            tracing::info!(applied = ?report.applied, "migrations applied");
        }
        store.check_serving_role().await?;
        Some(store)
    } else {
        None
    };
    if config.auth.issuers.is_empty() {
        tracing::warn!(
            "no token issuers configured ([auth] issuers): every authenticated request will be refused"
        );
    }
    let services = server::service_issuer(&config)?;
    let authenticator = match &services {
        Some(services) => {
            Authenticator::new(config.auth.clone())?.with_static_service_issuer(services.jwks())
        }
        None => {
            tracing::warn!(
                "no [keys] service_key_files: calls between services (service identities) are refused"
            );
            Authenticator::new(config.auth.clone())?
        }
    };
    let listener = server::bind(&config).await?;
    let admin = admin::bind(&config.admin, &config.grpc.listen).await?;
    println!(
        "anumate serve: serving {} on http://{}",
        modules
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", "),
        listener.local_addr()?
    );
    if let Some(admin) = &admin {
        println!(
            "  admin: http://{} (/healthz /readyz /metrics /.well-known/jwks.json)",
            admin.local_addr()?
        );
    }
    let mut in_process_gateway = None;
    if with_gateway && let Some(gw) = server::bind_gateway(&config).await? {
        println!(
            "  rest:  http://{} (REST gateway; /openapi.json)",
            gw.local_addr()?
        );
        // Next to services: the gateway calls them in process (see
        // server::serve) unless told otherwise.
        if config.gateway.upstream.is_empty() {
            in_process_gateway = Some(gw);
        } else {
            let upstream = config.gateway.upstream.clone();
            let cfg = config.clone();
            tokio::spawn(async move {
                if let Err(e) = server::serve_gateway(&cfg, gw, &upstream).await {
                    tracing::error!(error = %format!("{e:#}"), "REST gateway stopped");
                }
            });
        }
    }
    let rt = server::Runtime {
        modules,
        config,
        store,
        authenticator,
        service_issuer: services,
        admin,
        gateway: in_process_gateway,
    };
    server::serve(rt, listener).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            super::redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact_url("sqlite://./x.db"), "sqlite://./x.db");
    }
}
