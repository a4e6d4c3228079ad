//! The `keybrake` binary: `serve`, `control`, `check`.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use keybrake::config::{Config, Overrides};
use keybrake::serve::{run_control, run_serve, SecretSources};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "keybrake",
    version,
    about = "Short-lived, scoped, spend-capped vault keys for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Control API + proxy + metrics in one process (embedded SQLite in --data-dir).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Take over the listening sockets of a running instance (Pingora graceful upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// The control API alone.
    Control {
        #[command(flatten)]
        common: Common,
    },
    /// Validate the configuration and exit.
    Check {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// Config file (default: conf/keybrake.yaml if present, else embedded defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_name = "ADDR")]
    proxy_listen: Option<String>,
    #[arg(long, value_name = "ADDR")]
    control_listen: Option<String>,
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Override a vendor's upstream, e.g. stripe=http://127.0.0.1:8420 (repeatable).
    #[arg(long, value_name = "VENDOR=URL")]
    vendor_upstream: Vec<String>,
    /// File holding the base64 master key (instead of KEYBRAKE_MASTER_KEY).
    #[arg(long, value_name = "FILE")]
    master_key_file: Option<PathBuf>,
    /// File holding the admin token (instead of KEYBRAKE_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
}

impl Common {
    fn load(&self) -> Result<Config> {
        let overrides = Overrides {
            proxy_listen: self.proxy_listen.clone(),
            control_listen: self.control_listen.clone(),
            metrics_listen: self.metrics_listen.clone(),
            data_dir: self.data_dir.clone(),
            vendor_upstreams: self.vendor_upstream.clone(),
        };
        Config::load(self.config.as_deref(), &overrides)
    }

    fn secrets(&self, generate_missing: bool) -> SecretSources {
        SecretSources {
            master_key_file: self.master_key_file.clone(),
            admin_token_file: self.admin_token_file.clone(),
            generate_missing,
        }
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("keybrake: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { common, upgrade } => {
            let config = common.load()?;
            run_serve(config, common.secrets(true), upgrade)
        }
        Command::Control { common } => {
            let config = common.load()?;
            run_control(config, common.secrets(false))
        }
        Command::Check { common } => {
            let config = common.load()?;
            println!(
                "configuration OK: proxy {}, control {}, metrics {}, {} vendors, {} currencies",
                config.proxy_listen,
                config.control_listen,
                config.metrics_listen,
                config.vendors.len(),
                config.currencies.len()
            );
            Ok(())
        }
    }
}
