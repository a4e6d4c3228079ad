//! A throwaway PostgreSQL for unit tests: one cluster per test binary, started on first
//! use (`initdb` into a temporary directory, on a free loopback port, as the `postgres`
//! user when the tests run as root, since the server refuses root), and a fresh database
//! per test. The cluster is stopped and its directory deleted when the test binary exits.
//! A test that stops the server takes an `OwnCluster`, stopped and deleted on drop.
//!
//! PostgreSQL missing is a failure, never a skip: `.ci/deps test` installs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A running cluster: its directory (data, socket, log) and port.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty database on this test binary's cluster: its URL (user `keybrake`,
/// trust authentication, loopback only).
pub async fn database() -> String {
    cluster().create_database().await
}

/// This test binary's cluster, started on first use and stopped at exit.
fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let cluster = Cluster::start().unwrap_or_else(|e| panic!("{e}"));
        extern "C" fn stop_at_exit() {
            if let Some(c) = CLUSTER.get() {
                c.stop();
            }
        }
        // SAFETY: registers a plain function to run at process exit.
        unsafe { libc::atexit(stop_at_exit) };
        cluster
    })
}

/// A cluster of the caller's own, for a test that stops and restarts its server (the
/// shared one serves other tests meanwhile). Stopped and deleted when dropped.
pub struct OwnCluster(Cluster);

impl OwnCluster {
    pub fn start() -> OwnCluster {
        OwnCluster(Cluster::start().unwrap_or_else(|e| panic!("{e}")))
    }
}

impl std::ops::Deref for OwnCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Cluster {
    /// A fresh, empty database on this cluster: its URL.
    pub async fn create_database(&self) -> String {
        let cluster = self;
        let name = format!("t{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let admin = cluster.url("postgres");
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test cluster at {admin}: {e}"));
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        cluster.url(&name)
    }
}

impl Cluster {
    pub fn url(&self, database: &str) -> String {
        format!("postgres://keybrake@127.0.0.1:{}/{database}", self.port)
    }

    fn start() -> Result<Cluster, String> {
        let bin = find_bin()?;
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let dir = std::env::temp_dir().join(format!(
            "keybrake-pg-{}-{}",
            std::process::id(),
            crate::ids::new_id("")
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cluster = |port| Cluster {
            dir: dir.clone(),
            bin: bin.clone(),
            port,
            as_postgres,
        };
        if as_postgres {
            run(Command::new("chown").arg("postgres").arg(&dir))?;
        }
        let c = cluster(0);
        run(c.command("initdb").arg("-D").arg(dir.join("db")).args([
            "-A",
            "trust",
            "-U",
            "keybrake",
            "-E",
            "UTF8",
            "--no-sync",
        ]))
        .map_err(|e| format!("initdb failed: {e}"))?;
        // A free port can be taken by someone else before the server binds it: retry.
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let c = cluster(port);
            let started = run(c.command("pg_ctl").arg("-D").arg(dir.join("db")).args([
                "-w",
                "-l",
                &dir.join("log").to_string_lossy(),
                "-o",
                &format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                     -c max_connections=400",
                    dir.display()
                ),
                "start",
            ]));
            match started {
                Ok(()) => return Ok(c),
                Err(e) => last = e,
            }
        }
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!("cannot start the test PostgreSQL: {last}\n{log}"))
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Stops the server (`immediate`: a crash, as a lost database looks to clients).
    pub fn stop_server(&self) {
        let _ = run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("db"))
            .args(["-m", "immediate", "-w", "stop"]));
    }

    /// Starts the stopped server again on the same port.
    pub fn start_server(&self) {
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("db"))
            .args([
                "-w",
                "-l",
                &self.dir.join("log").to_string_lossy(),
                "-o",
                &format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                     -c max_connections=400",
                    self.port,
                    self.dir.display()
                ),
                "start",
            ]))
        .unwrap_or_else(|e| panic!("cannot restart the test PostgreSQL: {e}"));
    }

    fn stop(&self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PostgreSQL server binaries: Debian's `/usr/lib/postgresql/<major>/bin` (newest
/// major), else `initdb` on the PATH.
fn find_bin() -> Result<PathBuf, String> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    if let Some((_, bin)) = majors.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths).find(|p: &PathBuf| Path::new(p).join("initdb").exists())
        })
        .ok_or_else(|| {
            "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on the \
             PATH): the PostgreSQL unit tests need it; `.ci/deps test` installs it"
                .to_string()
        })
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
