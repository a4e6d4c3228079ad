//! A throwaway PostgreSQL for unit tests: one cluster per test binary (`initdb` into a
//! temporary directory, a free loopback port, run as the `postgres` user when the tests run
//! as root, since the server refuses root), and a fresh database per test.
//!
//! PostgreSQL missing is a test failure with a message, never a skip: CI installs it
//! (`.ci/deps test`). The cluster outlives nothing: a watcher process stops it and removes
//! its directory as soon as the test binary exits, however it exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Cluster {
    port: u16,
    bin: PathBuf,
    as_user: Option<&'static str>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static DATABASES: AtomicU64 = AtomicU64::new(0);

/// A database of its own in the binary's cluster; dropped (with its connections) with it.
pub struct TestDb {
    pub url: String,
    name: String,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(cluster) = CLUSTER.get() {
            let _ = cluster
                .command("psql")
                .args(["-X", "-q", "-d", "postgres", "-c"])
                .arg(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .output();
        }
    }
}

/// A fresh, empty database; the cluster starts on first use.
pub fn database() -> TestDb {
    let cluster = CLUSTER.get_or_init(start);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    );
    let out = cluster
        .command("createdb")
        .arg(&name)
        .output()
        .expect("run createdb");
    assert!(
        out.status.success(),
        "createdb {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    TestDb {
        url: format!("postgres://keybrake@127.0.0.1:{}/{name}", cluster.port),
        name,
    }
}

impl Cluster {
    fn command(&self, tool: &str) -> Command {
        let mut c = match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(self.bin.join(tool));
                c
            }
            None => Command::new(self.bin.join(tool)),
        };
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "keybrake",
        ]);
        c.env("PGCONNECT_TIMEOUT", "5");
        c
    }
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KEYBRAKE_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; set \
             KEYBRAKE_PG_BIN or run `.ci/deps test`): the PostgreSQL tests cannot run"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start() -> Cluster {
    let bin = bin_dir();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let as_user = root.then_some("postgres");
    let dir = std::env::temp_dir().join(format!("keybrake-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the cluster's directory");
    if root {
        run("chown", Command::new("chown").arg("postgres").arg(&dir));
    }
    let wrap = |tool: &str| match as_user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(bin.join(tool));
            c
        }
        None => Command::new(bin.join(tool)),
    };
    let data = dir.join("db");
    run(
        "initdb",
        wrap("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "keybrake", "--no-sync"]),
    );
    let mut last_err = String::new();
    for _ in 0..5 {
        let port = free_port();
        let out = wrap("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c max_connections=200 -c shared_buffers=32MB",
                dir.display()
            ))
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "30", "start"])
            .output()
            .expect("run pg_ctl");
        if out.status.success() {
            watch(&bin, &data, &dir, as_user);
            return Cluster { port, bin, as_user };
        }
        last_err = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    }
    panic!("cannot start a throwaway PostgreSQL: {last_err}");
}

/// Stops the cluster and removes its directory once this process is gone.
fn watch(bin: &Path, data: &Path, dir: &Path, as_user: Option<&str>) {
    let stop = format!(
        "{} {}/pg_ctl -D {} -m immediate stop",
        as_user
            .map(|u| format!("runuser -u {u} --"))
            .unwrap_or_default(),
        bin.display(),
        data.display()
    );
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}
