//! The `keybrake` binary: the servers (`serve`, `control`, `proxy` for an edge node),
//! `check`, and the client commands for the control API (`tenant`, `node`, `vendor`,
//! `key`, `audit`).

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use keybrake::cli::{self, Client};
use keybrake::config::{Config, Overrides};
use keybrake::serve::{run_control, run_serve, SecretSources};
use std::path::PathBuf;

/// mimalloc instead of glibc malloc: a proxy allocates and frees small objects on one
/// thread and frees some on another (audit events); glibc's arenas pay for that in locks
/// and consolidation (measured: ~15 µs per proxied request on the dev machine).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "keybrake",
    version,
    about = "Short-lived, scoped, spend-capped vault keys for AI agents",
    after_help = "Secrets come from the environment or from files, never from the command \
                  line: KEYBRAKE_ADMIN_TOKEN (servers, admin commands; or --admin-token-file), \
                  KEYBRAKE_MASTER_KEY (base64, servers; or --master-key-file), KEYBRAKE_TOKEN \
                  (tenant API token, client commands). Every flag can also \
                  be set by the variable shown beside it; a flag given wins."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which of keybrake's commands a configuration is checked for.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    Serve,
    Control,
    Proxy,
}

#[derive(Subcommand)]
enum Command {
    /// Control API + proxy + metrics in one process (embedded SQLite in --data-dir).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Take over the listening sockets of a running instance (Pingora graceful upgrade).
        #[arg(long, env = "KEYBRAKE_UPGRADE", value_parser = clap::builder::BoolishValueParser::new())]
        upgrade: bool,
        /// Fork into the background; the parent writes the child's PID to
        /// `pingora.pid_file` and exits (systemd `Type=forking`).
        #[arg(long, env = "KEYBRAKE_DAEMON", value_parser = clap::builder::BoolishValueParser::new())]
        daemon: bool,
    },
    /// The control API alone (SQLite in --data-dir, or PostgreSQL with --database-url).
    Control {
        #[command(flatten)]
        common: Common,
        /// Keep the control plane in PostgreSQL (postgres://user:password@host:port/db),
        /// shared by any number of `control` replicas; wins over the config's
        /// database_url. Without it: SQLite in --data-dir.
        #[arg(
            long,
            env = "KEYBRAKE_DATABASE_URL",
            value_name = "URL",
            hide_env_values = true
        )]
        database_url: Option<String>,
    },
    /// An edge proxy (proxy + metrics), synced from a control plane; nothing on disk.
    Proxy {
        #[command(flatten)]
        common: Common,
        /// The control plane's base URL.
        #[arg(
            long,
            env = "KEYBRAKE_CONTROL_URL",
            value_name = "URL",
            hide_env_values = true
        )]
        control_url: String,
        /// File holding this node's token (from `keybrake node create`).
        #[arg(long, env = "KEYBRAKE_NODE_TOKEN_FILE", value_name = "FILE")]
        node_token_file: PathBuf,
        /// A private CA (PEM) to trust for an https:// control URL, besides the system's.
        #[arg(long, env = "KEYBRAKE_CA_FILE", value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Refuse every request (503 control_unreachable) once the last sync is older
        /// than this: 30s, 2m or seconds [default: `edge.max_staleness` of the config
        /// file, 30s].
        #[arg(long, env = "KEYBRAKE_MAX_STALENESS", value_name = "DURATION")]
        max_staleness: Option<String>,
        /// Take over the listening sockets of a running instance (Pingora graceful upgrade).
        #[arg(long, env = "KEYBRAKE_UPGRADE", value_parser = clap::builder::BoolishValueParser::new())]
        upgrade: bool,
        /// Fork into the background; the parent writes the child's PID to
        /// `pingora.pid_file` and exits (systemd `Type=forking`).
        #[arg(long, env = "KEYBRAKE_DAEMON", value_parser = clap::builder::BoolishValueParser::new())]
        daemon: bool,
    },
    /// Copy a SQLite data dir (tenants, API tokens, nodes, credentials, signing keys, keys,
    /// ledger, leases, audit trail) into an empty PostgreSQL database for `control
    /// --database-url`. The data dir must not be in use: stop its serve/control first
    /// (refused while a process holds its lock or its PID file names a live one).
    Migrate {
        /// The source: `sqlite:DIR`, a data dir holding keybrake.db (and audit.db).
        #[arg(long, env = "KEYBRAKE_MIGRATE_FROM", value_name = "sqlite:DIR")]
        from: String,
        /// The target: `postgres://user:password@host:port/db`, an empty database (the
        /// schema is applied if missing). Start the PostgreSQL control plane with the same
        /// master key: credentials and signing keys are copied sealed.
        #[arg(
            long,
            env = "KEYBRAKE_MIGRATE_TO",
            value_name = "URL",
            hide_env_values = true
        )]
        to: String,
    },
    /// Validate the configuration and exit.
    Check {
        #[command(flatten)]
        common: Common,
        /// The command the configuration is for: its TLS and access-log files are the
        /// ones checked (`control` needs no proxy files, `proxy` no control files).
        #[arg(long, value_enum, default_value = "serve", env = "KEYBRAKE_CHECK_ROLE")]
        role: Role,
    },
    /// Tenants (admin token).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Edge nodes (admin token).
    Node {
        #[command(subcommand)]
        command: NodeCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Vendor credentials of your tenant.
    Vendor {
        #[command(subcommand)]
        command: VendorCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Vault keys of your tenant.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Your tenant's audit trail, newest first.
    Audit {
        /// Only this key's events.
        #[arg(long, env = "KEYBRAKE_AUDIT_KEY", value_name = "KEY_ID")]
        key: Option<String>,
        /// Only events at or after this time (RFC 3339 or Unix seconds).
        #[arg(long, env = "KEYBRAKE_AUDIT_SINCE", value_name = "TIME")]
        since: Option<String>,
        /// Most events to show (1 to 1000).
        #[arg(long, env = "KEYBRAKE_AUDIT_LIMIT", default_value_t = 50)]
        limit: u32,
        /// The next page: the cursor the previous page ended with ("more: --cursor …").
        #[arg(long, env = "KEYBRAKE_AUDIT_CURSOR")]
        cursor: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
struct ClientArgs {
    /// Control API base URL.
    #[arg(
        long,
        env = "KEYBRAKE_CONTROL_URL",
        default_value_t = keybrake::config::defaults::control_url(),
        global = true
    )]
    control_url: String,
    /// A private CA (PEM) to trust for an https:// control URL, besides the system's.
    #[arg(long, env = "KEYBRAKE_CA_FILE", value_name = "FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, env = "KEYBRAKE_JSON", value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    json: bool,
    /// Admin commands (tenant, node): the file holding the admin token, instead of
    /// KEYBRAKE_ADMIN_TOKEN (`serve` writes it to DATA_DIR/admin.token on first start).
    #[arg(
        long,
        env = "KEYBRAKE_ADMIN_TOKEN_FILE",
        value_name = "FILE",
        global = true
    )]
    admin_token_file: Option<PathBuf>,
    /// Tenant commands (vendor, key, audit): the file holding the tenant's API token,
    /// instead of KEYBRAKE_TOKEN.
    #[arg(long, env = "KEYBRAKE_TOKEN_FILE", value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
}

impl ClientArgs {
    /// A client of the control API; `admin` commands send the admin token.
    fn client(&self, admin: bool) -> Result<Client> {
        let token_file = if admin {
            self.admin_token_file.as_deref()
        } else {
            self.token_file.as_deref()
        };
        Client::new(
            &self.control_url,
            admin,
            token_file,
            self.ca_file.as_deref(),
        )
    }
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints its first API token (shown once).
    Create {
        /// The tenant's name.
        name: String,
    },
    /// List tenants by creation time (to the second).
    List {
        /// Most tenants to show (1 to 1000).
        #[arg(long, env = "KEYBRAKE_TENANT_LIMIT", default_value_t = 100)]
        limit: u32,
        /// The next page: the cursor the previous page ended with ("more: --cursor …").
        #[arg(long, env = "KEYBRAKE_TENANT_CURSOR")]
        cursor: Option<String>,
    },
    /// Add an API token to a tenant (for rotation); prints it (shown once) and its id.
    AddToken {
        /// The tenant (tn_…).
        tenant_id: String,
    },
    /// Delete one of a tenant's API tokens (the end of a rotation): it stops working at
    /// once.
    DeleteToken {
        /// The tenant (tn_…).
        tenant_id: String,
        /// The token's id (`tenant create` and `tenant add-token` print it).
        token_id: String,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Register an edge node; prints its node token (shown once).
    Create {
        /// A name for the node (e.g. its host name).
        name: String,
    },
    /// List nodes with their last sync.
    List,
    /// Delete a node: its token stops working and it is cut off within a second.
    Delete {
        /// The node's id (`nd_…`).
        id: String,
    },
}

#[derive(Subcommand)]
enum VendorCommand {
    /// Register the vendor secret, read from a file ("-" for stdin), never from argv.
    Set {
        /// The vendor, as named in the catalog (e.g. stripe).
        vendor: String,
        /// File holding the vendor secret ("-": standard input).
        #[arg(long, env = "KEYBRAKE_VENDOR_SECRET_FILE", value_name = "FILE")]
        secret_file: PathBuf,
    },
    /// Show the registered credential's metadata (last 4 characters only).
    Show {
        /// The vendor, as named in the catalog.
        vendor: String,
    },
    /// Remove the vendor credential.
    Delete {
        /// The vendor, as named in the catalog.
        vendor: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Issue a vault key; prints the token (or the whole answer with --json).
    Issue {
        /// The vendor the key is for (e.g. stripe).
        #[arg(long, env = "KEYBRAKE_KEY_VENDOR")]
        vendor: String,
        /// Allowed endpoint, e.g. "POST /v1/payment_intents" (repeatable; the variable
        /// holds one).
        #[arg(long = "endpoint", env = "KEYBRAKE_KEY_ENDPOINT", required = true)]
        endpoints: Vec<String>,
        /// Daily cap in US dollars.
        #[arg(
            long,
            env = "KEYBRAKE_KEY_CAP",
            value_name = "USD",
            allow_hyphen_values = true
        )]
        cap: String,
        /// Lifetime: 30s, 5m, 2h, 1d or seconds (default: the server's default_key_ttl).
        #[arg(long, env = "KEYBRAKE_KEY_TTL", value_name = "DURATION")]
        ttl: Option<String>,
        /// A label shown in listings and the audit trail.
        #[arg(long, env = "KEYBRAKE_KEY_LABEL")]
        label: Option<String>,
        /// Allowed Stripe Connect account (repeatable; in the variable, comma-separated).
        #[arg(
            long = "stripe-account",
            env = "KEYBRAKE_KEY_STRIPE_ACCOUNTS",
            value_delimiter = ','
        )]
        stripe_accounts: Vec<String>,
    },
    /// Show one key with its status and today's spend.
    Show {
        /// The key (key_…).
        id: String,
    },
    /// List keys, newest first.
    List {
        /// Only keys in this state: active, revoked or expired.
        #[arg(long, env = "KEYBRAKE_KEY_STATUS")]
        status: Option<String>,
        /// Most keys to show (1 to 1000).
        #[arg(long, env = "KEYBRAKE_KEY_LIMIT", default_value_t = 100)]
        limit: u32,
        /// The next page: the cursor the previous page ended with ("more: --cursor …").
        #[arg(long, env = "KEYBRAKE_KEY_CURSOR")]
        cursor: Option<String>,
    },
    /// Revoke a key (idempotent).
    Revoke {
        /// The key (key_…).
        id: String,
    },
}

#[derive(Args)]
struct Common {
    /// Config file (default: conf/keybrake.yaml if present, else embedded defaults).
    #[arg(long, env = "KEYBRAKE_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Where the proxy listens (wins over the config's proxy_listen).
    #[arg(long, env = "KEYBRAKE_PROXY_LISTEN", value_name = "ADDR")]
    proxy_listen: Option<String>,
    /// Where the control API listens (wins over the config's control_listen).
    #[arg(long, env = "KEYBRAKE_CONTROL_LISTEN", value_name = "ADDR")]
    control_listen: Option<String>,
    /// Where Prometheus metrics are served (wins over the config's metrics_listen).
    #[arg(long, env = "KEYBRAKE_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Database, generated secrets and PID file (wins over the config's data_dir).
    #[arg(long, env = "KEYBRAKE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Override a vendor's upstream, e.g. stripe=http://127.0.0.1:8420 (repeatable; in
    /// the variable, comma-separated).
    #[arg(
        long,
        env = "KEYBRAKE_VENDOR_UPSTREAM",
        value_name = "VENDOR=URL",
        value_delimiter = ','
    )]
    vendor_upstream: Vec<String>,
    /// File holding the base64 master key (instead of KEYBRAKE_MASTER_KEY).
    #[arg(long, env = "KEYBRAKE_MASTER_KEY_FILE", value_name = "FILE")]
    master_key_file: Option<PathBuf>,
    /// File holding the admin token (instead of KEYBRAKE_ADMIN_TOKEN).
    #[arg(long, env = "KEYBRAKE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
}

impl Common {
    fn load(&self) -> Result<Config> {
        self.load_with(None)
    }

    /// The config, with `control`'s --database-url.
    fn load_with(&self, database_url: Option<keybrake::database::DatabaseUrl>) -> Result<Config> {
        let overrides = Overrides {
            proxy_listen: self.proxy_listen.clone(),
            control_listen: self.control_listen.clone(),
            metrics_listen: self.metrics_listen.clone(),
            data_dir: self.data_dir.clone(),
            database_url,
            vendor_upstreams: self.vendor_upstream.clone(),
        };
        Config::load(self.config.as_deref(), &overrides)
    }

    /// Drops the flags (or their variables) `command` does not use, with a warning for each
    /// one given: a setting silently ignored would look like it took effect, and one it
    /// would refuse must not stop it.
    fn drop_unused(&mut self, command: &str) {
        let mut unused = Vec::new();
        match command {
            "control" => {
                if self.proxy_listen.take().is_some() {
                    unused.push("--proxy-listen (KEYBRAKE_PROXY_LISTEN)");
                }
                if !std::mem::take(&mut self.vendor_upstream).is_empty() {
                    unused.push("--vendor-upstream (KEYBRAKE_VENDOR_UPSTREAM)");
                }
            }
            "proxy" => {
                if self.control_listen.take().is_some() {
                    unused.push("--control-listen (KEYBRAKE_CONTROL_LISTEN)");
                }
                if self.master_key_file.take().is_some() {
                    unused.push("--master-key-file (KEYBRAKE_MASTER_KEY_FILE)");
                }
                if self.admin_token_file.take().is_some() {
                    unused.push("--admin-token-file (KEYBRAKE_ADMIN_TOKEN_FILE)");
                }
            }
            _ => {}
        }
        for flag in unused {
            log::warn!("keybrake {command} does not use {flag}: ignored");
        }
    }

    fn secrets(&self, generate_missing: bool) -> SecretSources {
        SecretSources {
            master_key_file: self.master_key_file.clone(),
            admin_token_file: self.admin_token_file.clone(),
            generate_missing,
        }
    }
}

/// Flags shared by `serve`, `control` and `proxy` that a command does not use: hidden
/// from its `--help` (still accepted, and warned about: `Common::drop_unused`).
const NOT_USED_BY: &[(&str, &[&str])] = &[
    ("control", &["proxy_listen", "vendor_upstream"]),
    (
        "proxy",
        &["control_listen", "master_key_file", "admin_token_file"],
    ),
];

fn command() -> clap::Command {
    let mut cmd = Cli::command();
    for (name, flags) in NOT_USED_BY {
        cmd = cmd.mut_subcommand(*name, |mut sub| {
            for flag in *flags {
                sub = sub.mut_arg(*flag, |a| a.hide(true));
            }
            sub
        });
    }
    // An edge node keeps nothing on disk but its PID file and upgrade socket.
    cmd.mut_subcommand("proxy", |sub| {
        sub.mut_arg("data_dir", |a| {
            a.help("Where the PID file and upgrade socket go unless pingora.pid_file / upgrade_sock say otherwise (nothing else is written)")
        })
    })
}

/// The logger `RUST_LOG` configures, without the libraries' `trace` lines: Pingora's
/// print whole request headers (a vault key, the vendor secret injected), and the HTTP
/// and TLS libraries' print what they send. Keybrake's own lines at every level stay.
struct NoLibraryTraces(env_logger::Logger);

impl NoLibraryTraces {
    fn allows(&self, metadata: &log::Metadata) -> bool {
        (metadata.level() < log::Level::Trace || metadata.target().starts_with("keybrake"))
            && log::Log::enabled(&self.0, metadata)
    }
}

impl log::Log for NoLibraryTraces {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.allows(metadata)
    }

    /// A library's line is shown with any token or secret in it redacted (Pingora's
    /// debug lines print request URIs, where a client may have put its key).
    fn log(&self, record: &log::Record) {
        if !self.allows(record.metadata()) {
            return;
        }
        if record.target().starts_with("keybrake") {
            return log::Log::log(&self.0, record);
        }
        let text = record.args().to_string();
        match keybrake::proxy::path::without_tokens(&text) {
            std::borrow::Cow::Borrowed(_) => log::Log::log(&self.0, record),
            std::borrow::Cow::Owned(clean) => log::Log::log(
                &self.0,
                &log::Record::builder()
                    .args(format_args!("{clean}"))
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        log::Log::flush(&self.0);
    }
}

fn parse_cli() -> Cli {
    Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
}

fn main() {
    // Every file the process creates (databases and their WAL, secrets, the access log,
    // the PID file, the upgrade socket) is for this user alone, whatever the directory's
    // mode: nothing of it is meant for other local users.
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    // Pingora logs an idle vendor connection lost to a race with its idle check as an
    // error ("failed to acquire reusable stream") and simply opens another: noise at
    // every busy moment, off unless RUST_LOG asks for it.
    const DEFAULT_FILTER: &str = "info,pingora_core::connectors=off";
    let build = |filter: &str| {
        env_logger::Builder::new()
            .parse_filters(filter)
            .target(env_logger::Target::Stderr)
            .build()
    };
    // An empty RUST_LOG (`Environment=RUST_LOG=`) means the default, as an unset one.
    let asked = std::env::var("RUST_LOG").unwrap_or_default();
    let mut logger = build(match asked.trim() {
        "" => DEFAULT_FILTER,
        asked => asked,
    });
    // A misspelled level (`RUST_LOG=inof`) reads as a module's name and silences every
    // other line, errors included: taken for a mistake unless it says `off`.
    let own_errors = log::MetadataBuilder::new()
        .level(log::Level::Error)
        .target("keybrake")
        .build();
    // A filter that names Keybrake's modules itself (`off,keybrake::proxy=trace`) means it.
    let names_keybrake = asked.split(',').any(|d| d.trim().starts_with("keybrake"));
    if !log::Log::enabled(&logger, &own_errors)
        && !names_keybrake
        && !asked.trim().eq_ignore_ascii_case("off")
    {
        eprintln!(
            "keybrake: RUST_LOG={asked:?} would hide Keybrake's own errors (a misspelled \
             level? levels: error, warn, info, debug, trace; `off` for none): logging at \
             the default level, info"
        );
        logger = build(DEFAULT_FILTER);
    }
    let max_level = logger.filter();
    if log::set_boxed_logger(Box::new(NoLibraryTraces(logger))).is_ok() {
        log::set_max_level(max_level);
    }
    if let Err(e) = run(parse_cli()) {
        eprintln!("keybrake: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if matches!(
        cli.command,
        Command::Serve { .. } | Command::Control { .. } | Command::Proxy { .. }
    ) {
        keybrake::proxy::record::reopen_access_log_on_hangup();
    }
    match cli.command {
        Command::Serve {
            common,
            upgrade,
            daemon,
        } => {
            let config = common.load()?;
            log::info!(
                "configuration: {}",
                Config::source(common.config.as_deref())
            );
            let ready = if daemon {
                let pid_file = std::path::Path::new(&config.pingora.pid_file);
                if upgrade {
                    keybrake::serve::upgrade_source_runs(pid_file)?;
                }
                Some(keybrake::serve::daemonize(pid_file)?)
            } else {
                None
            };
            run_serve(config, common.secrets(true), upgrade, ready)
        }
        Command::Control {
            mut common,
            database_url,
        } => {
            let database_url = database_url
                .map(|u| keybrake::database::DatabaseUrl::parse(&u))
                .transpose()
                .map_err(|e| e.context("--database-url"))?;
            common.drop_unused("control");
            let config = common.load_with(database_url)?;
            log::info!(
                "configuration: {}",
                Config::source(common.config.as_deref())
            );
            run_control(config, common.secrets(false))
        }
        Command::Proxy {
            mut common,
            control_url,
            node_token_file,
            ca_file,
            max_staleness,
            upgrade,
            daemon,
        } => {
            common.drop_unused("proxy");
            let config = common.load()?;
            log::info!(
                "configuration: {}",
                Config::source(common.config.as_deref())
            );
            let ready = if daemon {
                let pid_file = std::path::Path::new(&config.pingora.pid_file);
                keybrake::serve::pid_file_dir_exists(pid_file)?;
                if upgrade {
                    keybrake::serve::upgrade_source_runs(pid_file)?;
                }
                Some(keybrake::serve::daemonize(pid_file)?)
            } else {
                None
            };
            let max_staleness = match max_staleness {
                Some(flag) => keybrake::config::parse_duration(&flag)
                    .map_err(|e| anyhow::anyhow!("--max-staleness: {e}"))?,
                None => config.max_staleness,
            };
            if max_staleness < std::time::Duration::from_secs(1) {
                anyhow::bail!("--max-staleness must be at least 1s");
            }
            keybrake::edge::run_edge(
                config,
                keybrake::edge::EdgeOptions {
                    control_url,
                    node_token_file,
                    ca_file,
                    max_staleness,
                },
                upgrade,
                ready,
            )
        }
        Command::Migrate { from, to } => keybrake::migrate::run(&from, &to),
        Command::Check { common, role } => {
            let config = common.load()?;
            config.check_files(role != Role::Control, role != Role::Proxy)?;
            // What a start would refuse: the secrets given (not those serve generates) and
            // control's database URL.
            if role != Role::Proxy {
                keybrake::serve::given_secrets(&common.secrets(false))?;
            }
            if let (Role::Control, Ok(url)) = (role, std::env::var("KEYBRAKE_DATABASE_URL")) {
                keybrake::database::DatabaseUrl::parse(&url)
                    .map_err(|e| e.context("KEYBRAKE_DATABASE_URL"))?;
            }
            let database_url_in_env = std::env::var_os("KEYBRAKE_DATABASE_URL").is_some();
            if let (true, keybrake::database::Database::Sqlite { data_dir }) = (
                role == Role::Serve || (role == Role::Control && !database_url_in_env),
                config.database(),
            ) {
                keybrake::secret::check_private_dir(&data_dir)
                    .with_context(|| format!("cannot use data dir {}", data_dir.display()))?;
            }
            if role == Role::Serve
                && (config.database_url.is_some()
                    || std::env::var_os("KEYBRAKE_DATABASE_URL").is_some())
            {
                anyhow::bail!(
                    "database_url is for `keybrake control` (check --role=control): serve \
                     keeps its data in SQLite (--data-dir)"
                );
            }
            let pid_dir = std::path::Path::new(&config.pingora.pid_file).parent();
            // serve creates its data dir at start (the default place of the PID file).
            let created_at_start = |d: &std::path::Path| {
                role == Role::Serve
                    && d.components()
                        .eq(std::path::Path::new(&config.data_dir).components())
            };
            if role != Role::Control
                && pid_dir.is_some_and(|d| {
                    !d.as_os_str().is_empty() && !d.exists() && !created_at_start(d)
                })
            {
                eprintln!(
                    "warning: the directory of pingora.pid_file ({}) does not exist: `--daemon` \
                     fails to write the PID file until it does",
                    config.pingora.pid_file
                );
            }
            if role != Role::Control && config.pingora.upgrade_sock.len() > 107 {
                eprintln!(
                    "warning: pingora.upgrade_sock is longer than a Unix socket path may be \
                     (107 bytes): a graceful upgrade will fail"
                );
            }
            let scheme = |tls: bool| if tls { "https" } else { "http" };
            let checked = Config::source(common.config.as_deref());
            // The listeners the role runs, each once.
            let mut listeners = Vec::new();
            if role != Role::Control {
                let proxy = (scheme(config.proxy.tls.is_some()), config.proxy_listen);
                listeners.push(format!("proxy {}://{}", proxy.0, proxy.1));
            }
            if role != Role::Proxy {
                let control = (scheme(config.control.tls.is_some()), config.control_listen);
                listeners.push(format!("control {}://{}", control.0, control.1));
            }
            listeners.push(format!("metrics http://{}", config.metrics_listen));
            println!(
                "configuration OK ({checked}): {}, {} vendors, {} currencies, {} priced models",
                listeners.join(", "),
                config.vendors.len(),
                config.currencies.len(),
                config.prices.models()
            );
            Ok(())
        }
        Command::Tenant { command, client } => {
            let api = client.client(true)?;
            match command {
                TenantCommand::Create { name } => {
                    let t = api.call(
                        "POST",
                        "/v1/tenants",
                        Some(serde_json::json!({ "name": name })),
                    )?;
                    cli::print(&t, client.json, |t| {
                        format!(
                            "tenant {}\napi token id: {}\napi token (shown once): {}",
                            t["id"].as_str().unwrap_or("?"),
                            t["api_token_id"].as_str().unwrap_or("?"),
                            t["api_token"].as_str().unwrap_or("?")
                        )
                    });
                }
                TenantCommand::List { limit, cursor } => {
                    let path = cli::with_query(
                        "/v1/tenants",
                        &[("limit", Some(limit.to_string())), ("cursor", cursor)],
                    );
                    let list = api.call("GET", &path, None)?;
                    cli::print_page(&list, client.json, |t| {
                        format!(
                            "{}  {}  {}",
                            t["id"].as_str().unwrap_or("?"),
                            t["created_at"].as_str().unwrap_or("?"),
                            t["name"].as_str().unwrap_or("")
                        )
                    });
                }
                TenantCommand::AddToken { tenant_id } => {
                    let t = api.call(
                        "POST",
                        &format!("/v1/tenants/{}/api_tokens", cli::segment(&tenant_id)?),
                        None,
                    )?;
                    cli::print_created(&t, client.json, "api token id:", "api_token", "api token");
                }
                TenantCommand::DeleteToken {
                    tenant_id,
                    token_id,
                } => {
                    let path = format!(
                        "/v1/tenants/{}/api_tokens/{}",
                        cli::segment(&tenant_id)?,
                        cli::segment(&token_id)?
                    );
                    let t = api.call("DELETE", &path, None)?;
                    cli::print(&t, client.json, |_| format!("api token {token_id} deleted"));
                }
            }
            Ok(())
        }
        Command::Node { command, client } => {
            let api = client.client(true)?;
            match command {
                NodeCommand::Create { name } => {
                    let n = api.call(
                        "POST",
                        "/v1/nodes",
                        Some(serde_json::json!({ "name": name })),
                    )?;
                    cli::print_created(&n, client.json, "node", "node_token", "node token");
                }
                NodeCommand::List => {
                    let list = api.call("GET", "/v1/nodes", None)?;
                    cli::print(&list, client.json, |l| {
                        cli::data_lines(l, |n| {
                            format!(
                                "{}  {}  last sync {}",
                                n["id"].as_str().unwrap_or("?"),
                                n["name"].as_str().unwrap_or(""),
                                n["last_sync_at"]
                                    .as_str()
                                    .unwrap_or("none seen by this control process")
                            )
                        })
                    });
                }
                NodeCommand::Delete { id } => {
                    let n =
                        api.call("DELETE", &format!("/v1/nodes/{}", cli::segment(&id)?), None)?;
                    cli::print(&n, client.json, |n| {
                        format!("{} deleted", n["id"].as_str().unwrap_or("?"))
                    });
                }
            }
            Ok(())
        }
        Command::Vendor { command, client } => {
            let api = client.client(false)?;
            let (v, verb) = match command {
                VendorCommand::Set {
                    vendor,
                    secret_file,
                } => {
                    let secret = cli::read_secret_file(&secret_file)?;
                    (
                        api.call(
                            "PUT",
                            &format!("/v1/vendors/{}/credential", cli::segment(&vendor)?),
                            Some(serde_json::json!({ "secret": secret })),
                        )?,
                        "stored",
                    )
                }
                VendorCommand::Show { vendor } => (
                    api.call(
                        "GET",
                        &format!("/v1/vendors/{}/credential", cli::segment(&vendor)?),
                        None,
                    )?,
                    "registered",
                ),
                VendorCommand::Delete { vendor } => (
                    api.call(
                        "DELETE",
                        &format!("/v1/vendors/{}/credential", cli::segment(&vendor)?),
                        None,
                    )?,
                    "deleted",
                ),
            };
            cli::print(&v, client.json, |v| match verb {
                "deleted" => format!("{} credential deleted", v["vendor"].as_str().unwrap_or("?")),
                _ => format!(
                    "{} credential {verb}: …{} (updated {})",
                    v["vendor"].as_str().unwrap_or("?"),
                    v["last4"].as_str().unwrap_or("?"),
                    v["updated_at"].as_str().unwrap_or("?")
                ),
            });
            Ok(())
        }
        Command::Key { command, client } => {
            let api = client.client(false)?;
            match command {
                KeyCommand::Issue {
                    vendor,
                    endpoints,
                    cap,
                    ttl,
                    label,
                    stripe_accounts,
                } => {
                    let body = cli::issue_body(
                        &vendor,
                        &endpoints,
                        &cap,
                        ttl.as_deref(),
                        label.as_deref(),
                        &stripe_accounts,
                    )?;
                    let k = api.call("POST", "/v1/keys", Some(body))?;
                    // Warnings on stderr: stdout stays the token alone, for `VK=$(…)`.
                    for w in k["warnings"].as_array().into_iter().flatten() {
                        eprintln!("warning: {}", w.as_str().unwrap_or_default());
                    }
                    if !client.json {
                        // The id (for `key show`, `key revoke`, `audit --key`), on stderr.
                        eprintln!(
                            "issued {} (expires {})",
                            k["id"].as_str().unwrap_or("?"),
                            k["expires_at"].as_str().unwrap_or("?")
                        );
                    }
                    cli::print(&k, client.json, |k| {
                        k["token"].as_str().unwrap_or("?").to_string()
                    });
                }
                KeyCommand::Show { id } => {
                    let k = api.call("GET", &format!("/v1/keys/{}", cli::segment(&id)?), None)?;
                    cli::print(&k, client.json, cli::key_details);
                }
                KeyCommand::List {
                    status,
                    limit,
                    cursor,
                } => {
                    let path = cli::with_query(
                        "/v1/keys",
                        &[
                            ("limit", Some(limit.to_string())),
                            ("status", status),
                            ("cursor", cursor),
                        ],
                    );
                    let list = api.call("GET", &path, None)?;
                    cli::print_page(&list, client.json, cli::key_line);
                }
                KeyCommand::Revoke { id } => {
                    let k =
                        api.call("DELETE", &format!("/v1/keys/{}", cli::segment(&id)?), None)?;
                    cli::print(&k, client.json, |k| {
                        format!("{} revoked", k["id"].as_str().unwrap_or("?"))
                    });
                }
            }
            Ok(())
        }
        Command::Audit {
            key,
            since,
            limit,
            cursor,
            client,
        } => {
            let api = client.client(false)?;
            let path = cli::with_query(
                "/v1/audit",
                &[
                    ("limit", Some(limit.to_string())),
                    ("key_id", key),
                    ("since", since),
                    ("cursor", cursor),
                ],
            );
            let list = api.call("GET", &path, None)?;
            cli::print_page(&list, client.json, cli::audit_line);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// A command's `--help` hides the shared flags it does not use, and only those.
    #[test]
    fn flags_a_command_does_not_use_are_hidden_from_its_help() {
        let cmd = super::command();
        cmd.clone().debug_assert();
        for (name, flags) in super::NOT_USED_BY {
            let sub = cmd.find_subcommand(name).unwrap();
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                assert_eq!(arg.is_hide_set(), flags.contains(&id), "{name} {id}");
            }
        }
        let serve = cmd.find_subcommand("serve").unwrap();
        assert!(serve.get_arguments().all(|a| !a.is_hide_set()));
    }

    /// Every argument of every command is explained in `--help`, and every flag can also
    /// be set from a `KEYBRAKE_…` variable (shown in `--help` too).
    #[test]
    fn every_flag_has_help_and_an_environment_variable() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let name = format!("{path} {id}");
                if arg
                    .get_help()
                    .is_none_or(|h| h.to_string().trim().is_empty())
                {
                    missing.push(format!("{name}: no help"));
                }
                if arg.is_positional() {
                    continue;
                }
                match arg.get_env().and_then(|e| e.to_str()) {
                    Some(env) if env.starts_with("KEYBRAKE_") => {}
                    _ => missing.push(format!("{name}: no KEYBRAKE_ variable")),
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "keybrake", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
        let help = cmd
            .find_subcommand("serve")
            .unwrap()
            .clone()
            .render_long_help()
            .to_string();
        assert!(help.contains("[env: KEYBRAKE_DATA_DIR="), "{help}");
    }
}
