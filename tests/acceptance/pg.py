"""A throwaway PostgreSQL cluster for the acceptance suite, the Rust tests and the load
tests: `initdb` into a fresh temporary directory, a server on 127.0.0.1 at a free port
(plus a unix socket inside that directory), one fresh database per caller, and the whole
directory removed when it stops, even after a failure.

The server refuses to run as root, and CI runs as root: then every server binary runs
as the `postgres` user (created by the Debian package) through `runuser`; as any other
user the binaries run directly. No test is skipped when PostgreSQL is missing: `.ci/deps
test` installs the `postgresql` package, and `find_bindir` fails with what to do.

Durability settings stay at PostgreSQL's defaults (fsync, synchronous_commit,
full_page_writes on), because the suite kills processes and checks that nothing granted
or audited is lost. Only what costs time and proves nothing is turned off: `initdb
--no-sync` (a throwaway cluster's catalog need not survive a power cut). `max_connections` is raised so several replicas, each with
its connection pool, fit beside the suite's own databases.

As a command, it wraps another command with a cluster (load-tests/lib.sh uses this):
    python3 tests/acceptance/pg.py run -- load-tests/key_issuance.sh
starts a cluster, exports KEYBRAKE_TEST_DATABASE_URL (a fresh database; its user is the
cluster's superuser), runs the command and removes the cluster. (The Rust tests start
their own cluster: src/control/pg_test.rs.)
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

SUPERUSER = "keybrake"
START_TIMEOUT_S = 30
MAX_CONNECTIONS = 300


class PostgresMissing(RuntimeError):
    pass


def _has_initdb(bindir: str) -> bool:
    return os.access(os.path.join(bindir, "initdb"), os.X_OK) and os.access(
        os.path.join(bindir, "pg_ctl"), os.X_OK
    )


def _version_key(path: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def find_bindir() -> str:
    """Where initdb/pg_ctl/postgres/psql live: $KEYBRAKE_PG_BINDIR, `pg_config --bindir`,
    or the newest /usr/lib/postgresql/*/bin (Debian keeps them off PATH)."""
    candidates = []
    if os.environ.get("KEYBRAKE_PG_BINDIR"):
        candidates.append(os.environ["KEYBRAKE_PG_BINDIR"])
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                candidates.append(out.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for c in candidates:
        if c and _has_initdb(c):
            return c
    raise PostgresMissing(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in $KEYBRAKE_PG_BINDIR, "
        "`pg_config --bindir` or /usr/lib/postgresql/*/bin: run `.ci/deps test` (installs the "
        "Debian package `postgresql`) or set KEYBRAKE_PG_BINDIR"
    )


def _free_port() -> int:
    # Below the ephemeral range, where client connections take their source ports (as
    # harness.free_port; this file also runs alone, without the suite's packages).
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


class Cluster:
    """One PostgreSQL server in its own temporary directory. `start()`, then
    `create_database()` for each user of it; `stop()` / `start_again()` to simulate an
    outage; `destroy()` stops it and removes the directory."""

    def __init__(self, bindir: Optional[str] = None, port: Optional[int] = None):
        self.bindir = bindir or find_bindir()
        self.port = port or _free_port()
        self.as_root = os.geteuid() == 0
        self.owner: Optional[pwd.struct_passwd] = None
        if self.as_root:
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresMissing(
                    "running as root, and there is no `postgres` user to run the server as "
                    "(the Debian package `postgresql` creates it: run `.ci/deps test`)"
                )
            if not shutil.which("runuser"):
                raise PostgresMissing("running as root without `runuser` (util-linux) to drop to `postgres`")
        # Not under pytest's tmp dir: that is private to root (0700) and the server runs
        # as `postgres`. The socket path must stay under ~100 bytes, so keep it short.
        self.dir = Path(tempfile.mkdtemp(prefix="kb-pg-"))
        self.data = self.dir / "db"
        self.log = self.dir / "server.log"
        self.running = False
        if self.owner:
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)

    # ---- processes
    def _server_cmd(self, *argv: str) -> list[str]:
        cmd = [os.path.join(self.bindir, argv[0]), *argv[1:]]
        return ["runuser", "-u", "postgres", "--", *cmd] if self.owner else cmd

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        out = subprocess.run(self._server_cmd(*argv), capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({out.returncode}): {out.stderr[-2000:]}{self.tail()}")
        return out

    def tail(self) -> str:
        try:
            return "\n--- server log (tail)\n" + self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> "Cluster":
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")
        return self.start_again()

    def start_again(self) -> "Cluster":
        """Start the server on the existing data directory and the same port."""
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                f"-c max_connections={MAX_CONNECTIONS}")
        # Diagnostics only (a load test asking what a setting costs), never the suite.
        if os.environ.get("KEYBRAKE_PG_OPTS"):
            opts += " " + os.environ["KEYBRAKE_PG_OPTS"]
        argv = ["pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.log), "-w",
                "-t", str(START_TIMEOUT_S), "start"]
        # Load tests put the server on chosen CPUs (the postmaster's backends inherit them).
        cpus = os.environ.get("KEYBRAKE_PG_CPUS")
        if cpus and shutil.which("taskset"):
            cmd = ["taskset", "-c", cpus, *self._server_cmd(*argv)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S + 10,
                                 stdin=subprocess.DEVNULL)
            if out.returncode != 0:
                raise RuntimeError(f"pg_ctl start failed ({out.returncode}): {out.stderr[-2000:]}{self.tail()}")
        else:
            self._run(*argv, timeout=START_TIMEOUT_S + 10)
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast: disconnects every client at once, like an outage)."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop", timeout=40)
            self.running = False

    def destroy(self) -> None:
        try:
            if self.running:
                try:
                    self.stop("immediate")
                except Exception:
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        self.running = False

    # ---- SQL
    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; returns unaligned output."""
        out = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql {sql[:80]!r} failed: {out.stderr[-1000:]}")
        return out.stdout

    def dump(self, url: str) -> bytes:
        """pg_dump (plain SQL, data included) of the database behind `url`."""
        out = subprocess.run(
            [os.path.join(self.bindir, "pg_dump"), "-h", str(self.dir), "-p", str(self.port),
             "-U", SUPERUSER, "-d", database_name(url)],
            capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {out.stderr[-1000:]!r}")
        return out.stdout

    def url(self, database: str) -> str:
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "kb") -> str:
        """A fresh empty database (copied from template0: fast, nothing inherited);
        returns its postgres:// URL."""
        name = re.sub(r"[^a-z0-9_]", "_", prefix.lower())[:40] + "_" + secrets.token_hex(4)
        self.psql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


def _main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "run" or "--" not in argv:
        print("usage: pg.py run -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    try:
        cluster = Cluster()
    except PostgresMissing as e:
        print(f"pg.py: {e}", file=sys.stderr)
        return 1
    # The cluster goes away on Ctrl-C or a TERM from CI too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cluster.start()
        env = dict(os.environ)
        env["KEYBRAKE_TEST_DATABASE_URL"] = cluster.create_database("test")
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.destroy()


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
