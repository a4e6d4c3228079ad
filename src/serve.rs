//! Process wiring for `keybrake serve` and `keybrake control`: start-up secrets, the
//! control plane on its own runtime thread, the metrics listener on another, and the
//! Pingora server (proxy, background upkeep) on the main thread.

use crate::config::Config;
use crate::conns::ConnTable;
use crate::control::api::{router, ApiState};
use crate::control::crypto::MasterKey;
use crate::control::{Control, ControlSettings};
use crate::metrics::{Metrics, MetricsOf, RequestCounters};
use crate::proxy::record::AccessLogWriter;
use crate::proxy::service::KeybrakeProxy;
use crate::proxy::spend::SpendBook;
use crate::proxy::upstream::Upstreams;
use crate::proxy::verify::KeyVerifier;
use crate::proxy_listener::{HeaderLimits, ProxyApp};
use crate::secret::Secret;
use crate::sync::{AuditSink, Ledger, Published};
use crate::token::now_secs;
use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where secrets come from (SPEC §1).
pub struct SecretSources {
    pub master_key_file: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    /// `serve` generates missing secrets into the data dir; `control` refuses to start.
    pub generate_missing: bool,
}

/// Reads a secret file, or creates it with mode 0600 holding `generate()`: written to a
/// temporary file and renamed, so a crash never leaves an empty or partial secret.
/// Only a new data dir gets a generated secret (`data_dir_is_new`): beside an existing
/// store, a fresh master key could not open it, and the file would be left for the
/// next start or a backup to pick up.
fn secret_file(
    path: &Path,
    generate: impl FnOnce() -> String,
    what: &str,
    data_dir_is_new: bool,
) -> Result<String> {
    let read = || {
        crate::secret::warn_if_shared(path, what);
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .with_context(|| format!("cannot read {what} file {}", path.display()))
    };
    let exists = path
        .try_exists()
        .with_context(|| format!("cannot access {what} file {}", path.display()))?;
    if exists {
        return read();
    }
    if !data_dir_is_new {
        return Err(anyhow!(
            "no {what}: {} is missing but the data dir already holds a store, which was \
             created with another one; provide it (see --help: KEYBRAKE_MASTER_KEY / \
             --master-key-file, KEYBRAKE_ADMIN_TOKEN / --admin-token-file) instead of \
             letting a new one be generated",
            path.display()
        ));
    }
    let value = generate();
    // Written whole to a temporary file of our own (a random name: two first starts on
    // one data dir, even with equal PIDs in two containers, never share it), then linked
    // into place. A link, unlike a rename, never replaces a file another process created
    // meanwhile: that secret wins and is read back.
    let nonce: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32);
    let tmp = path.with_extension(format!("tmp.{nonce:016x}"));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(value.as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read(),
        Err(_) => {
            // A file system without hard links (or no room for a temporary file):
            // written in place, still never over an existing file.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            match &mut f {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read(),
                _ => {}
            }
            let mut f =
                f.with_context(|| format!("cannot create {what} file {}", path.display()))?;
            f.write_all(value.as_bytes())?;
            f.sync_all()?;
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    log::info!("generated a new {what} in {} (mode 0600)", path.display());
    Ok(value)
}

/// The lock file a process holds on its SQLite data dir for its whole life.
const LOCK_FILE: &str = "keybrake.lock";

/// One process per SQLite data dir: a second one on other ports would serve from its own
/// caches (API tokens, credentials, tenants) what the first one changed. Refused at
/// start, except for the new process of a graceful upgrade (`--upgrade`), which follows
/// the store while the old one drains and takes the lock once the old one has exited.
/// The lock is an `flock` on `keybrake.lock`: the kernel drops it when the process ends,
/// however it ends.
fn lock_data_dir(data_dir: &Path, upgrade: bool, serve: bool) -> Result<()> {
    let (file, path) = open_lock_file(data_dir)?;
    match flock(&file, false) {
        Ok(true) => {}
        Ok(false) if upgrade => {
            std::thread::Builder::new()
                .name("data-dir-lock".into())
                .spawn(move || match flock(&file, true) {
                    Ok(_) => {
                        log::info!("the previous process has exited: data dir lock taken");
                        std::mem::forget(file);
                    }
                    Err(e) => log::error!("cannot lock the data dir: {e}"),
                })?;
            return Ok(());
        }
        Ok(false) => anyhow::bail!(
            "data dir {} is in use by another keybrake process: stop it first{}",
            data_dir.display(),
            if serve {
                " (a graceful upgrade starts the new process with --upgrade)"
            } else {
                " (several control processes share a PostgreSQL database, not a data dir)"
            }
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
    // Held (open) until the process exits.
    std::mem::forget(file);
    Ok(())
}

/// Fails when a running `serve` or `control` holds the data dir's lock: checked before
/// anything else at start (the ports, the secrets), so a second process started on the
/// same data dir names that as the problem, not the first port it finds taken. Creates
/// nothing; `lock_data_dir` takes the lock itself later.
fn refuse_a_data_dir_in_use(config: &Config, serve: bool) -> Result<()> {
    let crate::database::Database::Sqlite { data_dir } = config.database() else {
        return Ok(());
    };
    refuse_a_migrated_data_dir(&data_dir)?;
    let Ok(file) = std::fs::File::open(data_dir.join(LOCK_FILE)) else {
        return Ok(());
    };
    let lock = data_dir.join(LOCK_FILE);
    if flock(&file, false).with_context(|| format!("cannot lock {}", lock.display()))? {
        return Ok(());
    }
    let shown = std::path::absolute(&data_dir).unwrap_or(data_dir);
    anyhow::bail!(
        "data dir {} is in use by another keybrake process: stop it first{}",
        shown.display(),
        if serve {
            " (a graceful upgrade starts the new process with --upgrade)"
        } else {
            " (several control processes share a PostgreSQL database, not a data dir)"
        }
    )
}

/// Written into a data dir by `keybrake migrate` once it was copied to PostgreSQL.
pub const MIGRATED_FILE: &str = "MIGRATED";

/// A data dir `keybrake migrate` copied to PostgreSQL is the past: a process started on
/// it (a unit that lost its `--database-url`) would serve keys revoked and spend settled
/// since, to every node. Refused, saying how to use it on purpose.
fn refuse_a_migrated_data_dir(data_dir: &Path) -> Result<()> {
    let marker = data_dir.join(MIGRATED_FILE);
    // A data dir this user cannot search is named as such by the checks that follow.
    if std::fs::symlink_metadata(&marker).is_err() {
        return Ok(());
    }
    let note = std::fs::read_to_string(&marker)
        // There, but unreadable: as good as there.
        .unwrap_or_else(|e| format!("{} is there but unreadable: {e}", marker.display()));
    let shown = std::path::absolute(data_dir).unwrap_or(data_dir.to_path_buf());
    bail!(
        "data dir {} was copied to PostgreSQL by keybrake migrate ({}): start with \
         --database-url (or KEYBRAKE_DATABASE_URL, or database_url in the config file) to \
         use that database; to serve from this old copy anyway, delete {} first",
        shown.display(),
        note.trim(),
        marker.display()
    )
}

/// `serve --upgrade` takes over from the `serve` running on the same data dir, which
/// holds its lock: when nothing does, there is nothing to take over from, and the new
/// process would only wait for listeners that never come.
fn refuse_an_upgrade_of_nothing(config: &Config) -> Result<()> {
    let data_dir = &config.data_dir;
    let lock = data_dir.join(LOCK_FILE);
    let held = match std::fs::File::open(&lock) {
        Ok(file) => {
            !flock(&file, false).with_context(|| format!("cannot lock {}", lock.display()))?
        }
        Err(_) => false,
    };
    if !held {
        let shown = std::path::absolute(data_dir).unwrap_or(data_dir.clone());
        bail!(
            "--upgrade: no running keybrake to take over from (none holds data dir {}); \
             start it without --upgrade",
            shown.display()
        );
    }
    Ok(())
}

/// The data dir's lock, held while the returned file is open; `None` when a running
/// `serve` or `control` holds it.
pub fn hold_data_dir(data_dir: &Path) -> Result<Option<std::fs::File>> {
    let (file, path) = open_lock_file(data_dir)?;
    let held = flock(&file, false).with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(held.then_some(file))
}

/// The data dir's lock file, created (0600) if missing. An existing one is opened for
/// reading: a data dir copied read-only can still be migrated (flock needs no write
/// access).
fn open_lock_file(data_dir: &Path) -> Result<(std::fs::File, std::path::PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(LOCK_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?,
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    Ok((file, path))
}

/// An exclusive `flock` on `file`: `Ok(false)` when another open file holds it and `wait`
/// is false; with `wait`, blocks until it is free.
fn flock(file: &std::fs::File, wait: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: a valid open descriptor; flock only changes the lock on it.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// A data dir is new when it holds neither database yet.
fn data_dir_is_new(data_dir: &Path) -> bool {
    [crate::control::store::FILE, crate::control::audit::FILE]
        .iter()
        .all(|f| !data_dir.join(f).exists())
}

fn load_secrets(config: &Config, sources: &SecretSources) -> Result<(MasterKey, Secret)> {
    if !sources.generate_missing {
        // Everything missing said at once, before anything is created.
        let missing: Vec<&str> = [
            (
                sources.master_key_file.is_none()
                    && std::env::var_os("KEYBRAKE_MASTER_KEY").is_none(),
                "master key (KEYBRAKE_MASTER_KEY, base64 of 32 bytes, or --master-key-file)",
            ),
            (
                sources.admin_token_file.is_none()
                    && std::env::var_os("KEYBRAKE_ADMIN_TOKEN").is_none(),
                "admin token (KEYBRAKE_ADMIN_TOKEN or --admin-token-file)",
            ),
        ]
        .into_iter()
        .filter_map(|(missing, what)| missing.then_some(what))
        .collect();
        if !missing.is_empty() {
            return Err(anyhow!(
                "no {}: this command generates no secrets (`serve` does on a first start; \
                 docs/operations.md shows how to make them)",
                missing.join(" and no ")
            ));
        }
    }
    // A control plane on PostgreSQL keeps nothing on disk: no data dir is made for it.
    let on_disk = sources.generate_missing
        || matches!(config.database(), crate::database::Database::Sqlite { .. });
    let sqlite = matches!(config.database(), crate::database::Database::Sqlite { .. });
    if sqlite && !config.data_dir.exists() {
        // A mistyped --data-dir would otherwise look like every tenant vanished.
        log::warn!(
            "data dir {} does not exist: creating it, empty (if you meant an existing one, \
             check --data-dir)",
            std::path::absolute(&config.data_dir)
                .unwrap_or(config.data_dir.clone())
                .display()
        );
    }
    if on_disk {
        crate::secret::private_dir(&config.data_dir)
            .with_context(|| format!("cannot use data dir {}", config.data_dir.display()))?;
    }
    let is_new = data_dir_is_new(&config.data_dir);
    let (given_master, given_admin) = given_secrets(sources)?;
    let master = if let Some(master) = given_master {
        master
    } else if sources.generate_missing {
        let path = config.data_dir.join("master.key");
        let master = MasterKey::from_base64(&secret_file(
            &path,
            MasterKey::generate_base64,
            "master key",
            is_new,
        )?)
        .with_context(|| format!("master key file {}", path.display()))?;
        log::info!("master key: in {}", path.display());
        master
    } else {
        return Err(anyhow!(
            "no master key: set KEYBRAKE_MASTER_KEY (base64 of 32 bytes) or --master-key-file"
        ));
    };
    let admin = if let Some(admin) = given_admin {
        let generated = config.data_dir.join("admin.token");
        let same = |f: &Path| f.canonicalize().ok() == generated.canonicalize().ok();
        if sources.generate_missing
            && generated.exists()
            && !sources.admin_token_file.as_deref().is_some_and(same)
        {
            log::warn!(
                "{} is not used: the admin token is the one given ({}), and the file's is \
                 refused",
                generated.display(),
                if sources.admin_token_file.is_some() {
                    "--admin-token-file"
                } else {
                    "KEYBRAKE_ADMIN_TOKEN"
                }
            );
        }
        admin
    } else if sources.generate_missing {
        let path = config.data_dir.join("admin.token");
        let token = secret_file(
            &path,
            || crate::ids::new_token("kba_"),
            "admin token",
            is_new,
        )?;
        log::info!(
            "admin token: in {} (export KEYBRAKE_ADMIN_TOKEN=$(cat {}))",
            path.display(),
            path.display()
        );
        token
    } else {
        return Err(anyhow!(
            "no admin token: set KEYBRAKE_ADMIN_TOKEN or --admin-token-file"
        ));
    };
    if admin.len() < 16 {
        return Err(anyhow!("the admin token must be at least 16 characters"));
    }
    Ok((master, Secret::new(admin)))
}

/// The master key and admin token given by file or variable (`None` where neither is),
/// read and checked: what `keybrake check` validates and a start would refuse.
pub fn given_secrets(sources: &SecretSources) -> Result<(Option<MasterKey>, Option<String>)> {
    let master = if let Some(file) = &sources.master_key_file {
        crate::secret::warn_if_shared(file, "the master key file");
        if std::env::var_os("KEYBRAKE_MASTER_KEY").is_some() {
            log::warn!("KEYBRAKE_MASTER_KEY is not used: the master key file is given");
        }
        log::info!("master key: from {}", file.display());
        Some(MasterKey::from_file(file)?)
    } else if let Ok(text) = std::env::var("KEYBRAKE_MASTER_KEY") {
        log::info!("master key: from KEYBRAKE_MASTER_KEY");
        Some(MasterKey::from_base64(&text).context("KEYBRAKE_MASTER_KEY")?)
    } else {
        None
    };
    let admin = if let Some(file) = &sources.admin_token_file {
        crate::secret::warn_if_shared(file, "the admin token file");
        if std::env::var_os("KEYBRAKE_ADMIN_TOKEN").is_some() {
            log::warn!("KEYBRAKE_ADMIN_TOKEN is not used: the admin token file is given");
        }
        Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read admin token file {}", file.display()))?
                .trim()
                .to_string(),
        )
    } else if let Ok(text) = std::env::var("KEYBRAKE_ADMIN_TOKEN") {
        log::info!("admin token: from KEYBRAKE_ADMIN_TOKEN");
        Some(text.trim().to_string())
    } else {
        None
    };
    if admin.as_ref().is_some_and(|a| a.len() < 16) {
        return Err(anyhow!("the admin token must be at least 16 characters"));
    }
    Ok((master, admin))
}

/// Fails, naming the first, when another process already listens on one of `listeners`
/// (address, what it is for). The listeners bind with SO_REUSEPORT (so that the next
/// process of a graceful upgrade can bind while this one drains), which would otherwise
/// let a second keybrake share a port with the first, and Pingora retries a busy port
/// forever: a process started by mistake beside another, or on a port someone else took,
/// says so and exits. Not for `--upgrade`, whose ports the old process still holds.
pub(crate) fn check_free(listeners: &[(SocketAddr, &str)]) -> Result<()> {
    for (addr, what) in listeners {
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} ({what})"))?;
    }
    Ok(())
}

/// A router answering `GET /metrics` with the Prometheus text of every metric that
/// describes this process.
pub(crate) fn metrics_routes(of: MetricsOf) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move { of.render() }),
    )
}

/// The metrics listener of a process that runs the proxy (`serve`, edge nodes):
/// `GET /metrics`; `GET /healthz`, 200 while the process answers; `GET /readyz`, 200 while
/// `ready` says its proxy can serve requests, else 503, with `ready`'s JSON either way.
/// Any other path is 404, so a probe aimed at the wrong path fails rather than passes.
pub(crate) fn health_routes<F, Fut>(of: MetricsOf, ready: F) -> axum::Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (bool, serde_json::Value)> + Send + 'static,
{
    use axum::routing::get;
    metrics_routes(of)
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/readyz",
            get(move || async move {
                let (ok, body) = ready().await;
                let status = if ok {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                };
                (status, axum::Json(body))
            }),
        )
}

/// Serves `app` on `addr` (bound with SO_REUSEPORT, like the control API: the next process
/// of a graceful upgrade binds while this one drains) from a thread named `thread` with a
/// runtime of its own. Returns once the address is bound.
pub(crate) fn metrics_listener(addr: SocketAddr, thread: &str, app: axum::Router) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = runtime.block_on(async { reuseport_listener(addr, "metrics") })?;
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    log::error!("metrics listener failed: {e}");
                }
            })
        })?;
    Ok(())
}

/// `keybrake control`'s `GET /metrics` on `metrics_listen`: the control plane's counters
/// (keys issued and revoked, audit queue, …). `serve` and edge nodes add `/healthz` and
/// `/readyz` (`health_routes`).
fn metrics_server(addr: SocketAddr) -> Result<()> {
    metrics_listener(addr, "control-metrics", metrics_routes(MetricsOf::Control))?;
    log::info!("metrics on http://{addr}/metrics");
    Ok(())
}

/// Binds a listener with SO_REUSEPORT, so the next process of a graceful upgrade can bind
/// the same port while this one drains.
pub(crate) fn reuseport_listener(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr} ({what})"))?;
    // Connections not yet accepted: room for a burst of reconnections (a flood's) without
    // dropping a newcomer's SYN, which would cost it a retransmission (1 s, then 3 s). The
    // kernel caps it at net.core.somaxconn (4096 since Linux 5.4).
    Ok(socket.listen(4096)?)
}

/// Starts the control plane on its own runtime thread and returns once it is serving.
fn start_control(
    config: &Config,
    sources: &SecretSources,
    published: Arc<Published>,
    proxy_addr: Option<SocketAddr>,
    upgrade: bool,
) -> Result<Arc<Control>> {
    // Certificates, keys and CA files are loaded before anything starts.
    config.check_files(proxy_addr.is_some(), true)?;
    let (master, admin) = load_secrets(config, sources)?;
    if let crate::database::Database::Sqlite { data_dir } = config.database() {
        lock_data_dir(&data_dir, upgrade, proxy_addr.is_some())?;
    }
    let settings = ControlSettings {
        default_ttl: config.default_key_ttl,
        max_ttl: config.max_key_ttl,
        vendors: config.vendors.keys().cloned().collect(),
        lease_lifetime: config.leases.lifetime,
        audit_durability: config.audit_durability,
        expired_key_retention: config.expired_key_retention,
    };
    let database = config.database();
    let listen = config.control_listen;
    let catalog = Arc::new(config.vendors.clone());
    let listener_settings = config.control.clone();
    let tls = match &config.control.tls {
        Some(files) => {
            let cert = crate::tls::ReloadingCert::load("control", files).context("control.tls")?;
            crate::tls::watch(vec![cert.clone()]);
            Some(crate::tls::server_config(cert, &[b"http/1.1"])?)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let (tx, rx) = std::sync::mpsc::channel::<Result<Arc<Control>>>();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("control-rt")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let started = async {
                    let control = Control::open(
                        settings,
                        &database,
                        master,
                        admin,
                        published,
                        Metrics::global(),
                    )
                    .await?;
                    let listener = reuseport_listener(listen, "control API")?;
                    Ok::<_, anyhow::Error>((control, listener))
                }
                .await;
                let (control, listener) = match started {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                tokio::spawn(control.clone().housekeeping());
                tokio::spawn(
                    control
                        .store()
                        .clone()
                        .checkpoints(Metrics::global().store_wal_backlog.clone()),
                );
                tokio::spawn(control.clone().follow_revocations());
                tokio::spawn(control.clone().follow_changes());
                tokio::spawn(control.clone().lease_upkeep());
                let app = router(ApiState {
                    control: control.clone(),
                    catalog,
                    proxy_addr,
                });
                let _ = tx.send(Ok(control));
                log::info!("control API listening on {scheme}://{listen}");
                crate::control::listener::serve(
                    listener,
                    app,
                    tls,
                    &listener_settings,
                    crate::control::api::MAX_BODY_BYTES,
                )
                .await;
            });
        })?;
    rx.recv()
        .map_err(|_| anyhow!("the control plane thread died during start-up"))?
}

/// For a process that creates no data dir (an edge node): the PID file's directory must
/// exist before it forks, since the file is written only once the daemon runs.
pub fn pid_file_dir_exists(pid_file: &Path) -> Result<()> {
    let dir = match pid_file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot write PID file {}: {} is not a directory (set pingora.pid_file, and \
             pingora.upgrade_sock, to a path in an existing directory, e.g. /run/keybrake)",
            pid_file.display(),
            dir.display()
        );
    }
    Ok(())
}

/// `--daemon --upgrade` takes over from the process in `pid_file`: without one running,
/// nothing would hand the sockets over and the new process would give up after Pingora's
/// wait, its parent having reported success. Refused at once instead.
pub fn upgrade_source_runs(pid_file: &Path) -> Result<()> {
    let pid = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|&p| p > 0);
    // SAFETY: signal 0 only checks that the process exists (EPERM: it does, not ours).
    let alive = pid.is_some_and(|p| {
        let sent = unsafe { libc::kill(p, 0) };
        sent == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    });
    if !alive {
        bail!(
            "--upgrade: no running keybrake to take over from (PID file {} {}); start it \
             without --upgrade",
            pid_file.display(),
            match pid {
                Some(p) => format!("names {p}, which is not running"),
                None => "is missing or empty".into(),
            }
        );
    }
    Ok(())
}

/// Forks once. The child starts a new session and carries on; the parent waits until the
/// child reports that Pingora is running (listeners bound or received), then records the
/// child's PID in `pid_file` and exits 0 (or 1 if the child died first), so systemd's
/// `Type=forking` sees the service ready only when it is. Must run before any thread exists.
pub fn daemonize(pid_file: &Path) -> Result<std::fs::File> {
    // Where the PID file goes is tried before anything starts: a daemon that could not
    // be named there would have to be stopped again, half started.
    let tmp = pid_file.with_extension("pid.tmp");
    std::fs::write(&tmp, "")
        .with_context(|| format!("cannot write PID file {}", pid_file.display()))?;
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two descriptors we then own.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow!("pipe failed: {e}"));
    }
    // SAFETY: the descriptors were just created and are owned by nobody else.
    let (read_end, write_end) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: called from main before any thread is spawned, so the child inherits a
    // consistent single-threaded process.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(&tmp);
            Err(anyhow!("fork failed: {e}"))
        }
        0 => {
            drop(read_end);
            // SAFETY: plain system calls in the freshly forked child.
            unsafe { libc::setsid() };
            let devnull = std::fs::File::open("/dev/null")?;
            // SAFETY: dup2 onto stdin of our own process.
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&devnull), 0) };
            Ok(write_end)
        }
        child => {
            drop(write_end);
            let mut byte = [0u8; 1];
            let ready = std::io::Read::read(&mut &read_end, &mut byte).unwrap_or(0) == 1;
            if !ready {
                let _ = std::fs::remove_file(&tmp);
                eprintln!("keybrake: the daemon exited before it was ready; see its log");
                std::process::exit(1);
            }
            let written = std::fs::write(&tmp, format!("{child}\n"))
                .and_then(|_| std::fs::rename(&tmp, pid_file));
            if let Err(e) = written {
                // Nobody could find (or stop) a daemon without its PID file: it goes.
                // SAFETY: a signal to the child this process just forked.
                unsafe { libc::kill(child, libc::SIGTERM) };
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot write PID file {}", pid_file.display())));
            }
            std::process::exit(0)
        }
    }
}

/// `keybrake control`: the control API alone, until SIGTERM or SIGINT; then the audit
/// events nodes sent are written before the process exits (nodes send again what it
/// refuses from then on).
pub fn run_control(config: Config, sources: SecretSources) -> Result<()> {
    refuse_a_data_dir_in_use(&config, false)?;
    check_free(&[
        (config.control_listen, "control API"),
        (config.metrics_listen, "metrics"),
    ])?;
    let control = start_control(&config, &sources, Arc::new(Published::empty()), None, false)?;
    metrics_server(config.metrics_listen)?;
    log::info!(
        "keybrake control running; data in {}",
        config.database().describe()
    );
    // SIGTERM (systemd, an orchestrator) or SIGINT: write the audit events nodes sent that
    // are still buffered, then exit 0, as `serve` does; the default action would drop them.
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    signals.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // SIGQUIT (serve's graceful upgrade) has no sockets to hand over here: ignored,
        // so a unit reloading with it never kills the control plane (its default action).
        let mut quit = signal(SignalKind::quit())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = quit.recv() => log::info!("SIGQUIT ignored: `keybrake control` has no sockets to hand over"),
            }
        }
        anyhow::Ok(())
    })?;
    log::info!("keybrake control stopping: writing the audit events nodes sent");
    // Refuses node audit batches from now on (nodes send them again to the next process),
    // so every batch accepted is written.
    if !control.close_node_audit(Duration::from_secs(5)) {
        log::error!("audit events still buffered at exit could not be written in 5 s");
    }
    log::info!("keybrake control stopped");
    Ok(())
}

/// Background upkeep of the proxy: spend reports, DNS, the token-cache sweep; on
/// shutdown, a last report that returns every unused lease.
struct Upkeep {
    spend: Arc<SpendBook>,
    verifier: Arc<KeyVerifier>,
    upstreams: Arc<Upstreams>,
    vendors: crate::Map<String, crate::config::Vendor>,
    report_interval: Duration,
    dns_refresh: Duration,
}

#[async_trait]
impl BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut report = tokio::time::interval(self.report_interval);
        let mut dns = tokio::time::interval(self.dns_refresh);
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = report.tick() => self.spend.report(now_secs(), false).await,
                _ = dns.tick() => self.upstreams.refresh(&self.vendors).await,
                _ = sweep.tick() => self.verifier.sweep(now_secs()),
                _ = shutdown.changed() => break,
            }
        }
        // Pingora is draining and will exit the process without running destructors.
        // Until then, report every round and return all unused budget: requests still
        // in flight lease again if they need to.
        loop {
            self.spend.report(now_secs(), true).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Added to the old process's drain time: how much longer a process started with
/// `--upgrade` follows the store for changes the old one makes (API tokens, credentials).
const UPGRADE_MARGIN_SECS: i64 = 60;

/// `keybrake serve`: control API + proxy + metrics in one process.
pub fn run_serve(
    config: Config,
    sources: SecretSources,
    upgrade: bool,
    ready: Option<std::fs::File>,
) -> Result<()> {
    // SPEC §1: `serve` is the one-process form on embedded SQLite; PostgreSQL replicas
    // are `keybrake control`, with proxies synced from them.
    if config.database_url.is_some() || std::env::var_os("KEYBRAKE_DATABASE_URL").is_some() {
        anyhow::bail!(
            "serve keeps its data in SQLite (--data-dir); a PostgreSQL database \
             (database_url, KEYBRAKE_DATABASE_URL) is for `keybrake control`"
        );
    }
    if upgrade {
        refuse_an_upgrade_of_nothing(&config)?;
    } else {
        refuse_a_data_dir_in_use(&config, true)?;
        check_free(&[
            (config.control_listen, "control API"),
            (config.proxy_listen, "proxy"),
            (config.metrics_listen, "metrics"),
        ])?;
    }
    let published = Arc::new(Published::empty());
    let control = start_control(
        &config,
        &sources,
        published.clone(),
        Some(config.proxy_listen),
        upgrade,
    )?;
    log::info!("keybrake serve: data in {}", config.database().describe());
    if upgrade {
        // The old process serves the control API too until it has drained: Pingora's
        // fixed 5 s, then both configured periods, counted from its SIGQUIT (which the
        // reload sequence sends once this process is up), with a margin.
        let overlap = (5 + UPGRADE_MARGIN_SECS as u64)
            .saturating_add(config.pingora.grace_period_seconds)
            .saturating_add(config.pingora.graceful_shutdown_timeout_seconds);
        let overlap = i64::try_from(overlap).unwrap_or(i64::MAX);
        control.share_store_until(crate::token::now_secs().saturating_add(overlap));
    }

    let ready_control = control.clone();
    let proxy_addr = config.proxy_listen;
    let app = health_routes(MetricsOf::Serve, move || {
        let control = ready_control.clone();
        async move { crate::control::api::readiness(&control, Some(proxy_addr)).await }
    });
    metrics_listener(config.metrics_listen, "serve-metrics", app)?;
    log::info!(
        "metrics, /healthz and /readyz on http://{}",
        config.metrics_listen
    );

    let drain_control = control.clone();
    let exit_control = control.clone();
    let store_file = config.data_dir.join(crate::control::store::FILE);
    let parts = ProxyParts {
        ledger: control.clone(),
        audit: Arc::new(AuditForwarder(control)),
        published,
        staleness: crate::proxy::fresh::Staleness::never(),
        // The next process may already serve the control API on the same store.
        on_drain: Box::new(move || drain_control.share_store_until(i64::MAX)),
        // Pingora has stopped every service: no request records anything any more.
        // Write the audit events still buffered.
        on_exit: Box::new(move || {
            if !exit_control.audit.flush(Duration::from_secs(5)) {
                log::error!("audit events still buffered at exit could not be written in 5 s");
            }
            // The last settlements into keybrake.db itself, not only its WAL: a copy of a
            // stopped process's database files is complete (docs/storage.md, Backups).
            let checkpoint = rusqlite::Connection::open(&store_file)
                .and_then(|c| c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())));
            if let Err(e) = checkpoint {
                log::warn!("cannot checkpoint {} at exit: {e}", store_file.display());
            }
        }),
    };
    run_proxy(config, parts, upgrade, ready)
}

/// What differs between `serve` and an edge node around the one proxy they share.
pub(crate) struct ProxyParts {
    pub ledger: Arc<dyn Ledger>,
    pub audit: Arc<dyn AuditSink>,
    pub published: Arc<Published>,
    pub staleness: crate::proxy::fresh::Staleness,
    /// Run once a graceful upgrade or shutdown begins.
    pub on_drain: Box<dyn Fn() + Send + Sync>,
    /// Run once Pingora stopped every service, before the process exits.
    pub on_exit: Box<dyn FnOnce()>,
}

/// The Pingora server (proxy, background upkeep) on the calling thread, until it stops;
/// then exits the process.
pub(crate) fn run_proxy(
    config: Config,
    parts: ProxyParts,
    upgrade: bool,
    ready: Option<std::fs::File>,
) -> Result<()> {
    let metrics = Metrics::global();
    let ProxyParts {
        ledger,
        audit,
        published,
        staleness,
        on_drain,
        on_exit,
    } = parts;
    let spend = Arc::new(SpendBook::new(
        ledger,
        published.clone(),
        config.leases.slices_per_cap,
        config.leases.return_idle_after.as_secs() as i64,
        metrics.clone(),
    ));
    let verifier = Arc::new(KeyVerifier::new(
        published.clone(),
        config.token_cache_entries,
        metrics.clone(),
    ));
    let upstreams = Arc::new(Upstreams::new(&config.vendors, config.upstream.clone())?);

    if config.pingora.upgrade_sock.len() > 107 {
        log::warn!(
            "pingora.upgrade_sock {} is longer than a Unix socket path may be (107 bytes): \
             a graceful upgrade will fail; set a shorter path",
            config.pingora.upgrade_sock
        );
    }
    let conf = ServerConf {
        threads: config.pingora.threads,
        grace_period_seconds: Some(config.pingora.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(config.pingora.graceful_shutdown_timeout_seconds),
        upgrade_sock: config.pingora.upgrade_sock.clone(),
        pid_file: config.pingora.pid_file.clone(),
        ..Default::default()
    };
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h2_conns = Arc::new(crate::conns::H2Conns::default());
    let proxy = KeybrakeProxy {
        draining: draining.clone(),
        h2_conns: h2_conns.clone(),
        vendors: config
            .vendors
            .iter()
            .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
            .collect(),
        currencies: config.currencies.clone(),
        body_limit: config.body_limit_bytes,
        body_timeout: config.body_read_timeout,
        client_write_timeout: config.proxy.write_timeout,
        verifier: verifier.clone(),
        spend: spend.clone(),
        upstreams: upstreams.clone(),
        published,
        audit,
        access_log: AccessLogWriter::start(&config.access_log).with_context(|| {
            match &config.access_log {
                crate::config::AccessLog::File(path) => {
                    format!("cannot open the access log {}", path.display())
                }
                _ => "cannot open the access log".to_string(),
            }
        })?,
        request_counters: {
            metrics.start_vendor_series(
                (config.vendors.iter()).map(|(name, v)| (name.as_str(), !v.llm_metered.is_empty())),
            );
            RequestCounters::new(metrics.requests.clone(), config.vendors.keys().cloned())
        },
        metrics: metrics.clone(),
        charges: Default::default(),
        prices: config.prices.clone(),
        multi_pass_tools: config.llm_multi_pass_tools,
        connector: pingora::connectors::http::Connector::new(Some(
            pingora::connectors::ConnectorOptions::from_server_conf(&conf),
        )),
        idempotency: Default::default(),
        idempotent_wait: config.upstream.read + std::time::Duration::from_secs(5),
        staleness,
    };

    let opt = Opt {
        upgrade,
        daemon: false,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // Subscribe before bootstrap: with --upgrade, bootstrap blocks until the sockets arrive.
    watch_phases(&server, draining, on_drain, ready, upgrade);
    server.bootstrap();

    let proxy_tls = match &config.proxy.tls {
        Some(files) => {
            let cert = crate::tls::ReloadingCert::load("proxy", files).context("proxy.tls")?;
            crate::tls::watch(vec![cert.clone()]);
            Some(crate::tls::server_config(cert, &[b"h2", b"http/1.1"])?)
        }
        None => None,
    };
    let proxy_scheme = if proxy_tls.is_some() { "https" } else { "http" };
    let mut proxy_service = pingora::services::listening::Service::new(
        "keybrake proxy".to_string(),
        ProxyApp::new(
            pingora::proxy::http_proxy(&server.configuration, proxy),
            proxy_tls,
            ConnTable::new("proxy", config.proxy.limits),
            h2_conns,
            HeaderLimits {
                header_timeout: config.proxy.header_timeout,
                keepalive_timeout: config.proxy.keepalive_timeout,
                max_header_bytes: config.proxy.max_header_bytes,
                write_timeout: config.proxy.write_timeout,
            },
        ),
    );
    // TLS, when configured, is the listener's own (inside its header deadline and
    // connection bound), so Pingora accepts plain TCP.
    proxy_service.add_tcp(&config.proxy_listen.to_string());
    let upkeep = Upkeep {
        spend,
        verifier,
        upstreams,
        vendors: config.vendors.clone(),
        report_interval: config.leases.report_interval,
        dns_refresh: config.upstream.dns_refresh,
    };
    server.add_service(proxy_service);
    server.add_service(background_service("upkeep", upkeep));

    log::info!(
        "proxy listening on {proxy_scheme}://{} (access log: {})",
        config.proxy_listen,
        config.access_log
    );
    server.run(pingora::server::RunArgs::default());
    log::info!("keybrake stopping: the proxy has stopped; writing what is left of the audit");
    on_exit();
    log::info!("keybrake stopped");
    std::process::exit(0)
}

/// Follows Pingora's execution phases: tells the daemon's parent once the server runs,
/// and flags draining as soon as a graceful upgrade or shutdown begins, so every response
/// from then on closes its connection and keep-alive clients move to the new process
/// before Pingora drops idle connections.
///
/// For `--upgrade`, "ready" is reached earlier, when the process starts waiting for the old
/// one's sockets: the reload sequence only sends the old process SIGQUIT after this.
fn watch_phases(
    server: &Server,
    draining: Arc<std::sync::atomic::AtomicBool>,
    on_drain: Box<dyn Fn() + Send + Sync>,
    mut ready: Option<std::fs::File>,
    upgrade: bool,
) {
    use pingora::server::ExecutionPhase::*;
    let mut phases = server.watch_execution_phase();
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(phase @ (Bootstrap | Running)) if matches!(phase, Running) || upgrade => {
                if let Some(mut pipe) = ready.take() {
                    let _ = pipe.write_all(b"1");
                }
            }
            Ok(
                GracefulUpgradeTransferringFds
                | GracefulUpgradeCloseTimeout
                | GracefulTerminate
                | ShutdownStarted,
            ) => {
                draining.store(true, std::sync::atomic::Ordering::Release);
                on_drain();
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    });
}

/// The in-process audit sink: straight into the control plane's batched writer.
struct AuditForwarder(Arc<Control>);

impl AuditSink for AuditForwarder {
    fn record(&self, event: crate::sync::AuditEvent) {
        self.0.audit.record(event);
    }

    fn is_strict(&self) -> bool {
        self.0.audit.is_strict()
    }

    fn is_failing(&self) -> bool {
        self.0.audit.is_failing()
    }

    fn record_durably(&self, event: crate::sync::AuditEvent, timeout: Duration) -> bool {
        self.0.audit.record_durably(event, timeout)
    }
}
