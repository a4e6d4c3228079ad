#!/usr/bin/env python3
"""What expired keys cost the store, and what deleting them costs the control API.

A fleet issues one key per agent invocation; each key is a `keys` row and, once it has
spent, a `ledger` row per day. This script issues KEYS keys (default 100,000) that expire
in 30 s, gives each the ledger row its first call would write (inserted straight into the
stopped `keybrake.db`: a call per key would measure the proxy instead), and prints the
store's size per key. It then starts `keybrake serve` again with its clock 31 days ahead
(libfaketime), issues a key on that clock (deletion never runs past the newest key's
issue time) and starts it once more, so the keys are past `expired_key_retention` (30
days) and the hourly deletion runs at start, while CLIENTS threads issue keys: it prints how long the deletion
took, the issuance latency while it ran and after it, and the file's free pages (SQLite
reuses them; the file does not shrink).

    cargo build --release --bin keybrake
    load-tests/expired_keys.py

Env knobs: KB_BIN (target/release/keybrake)  KEYS (100000)  CLIENTS (8)
FAKETIME_LIB (found under /usr/lib)  KEEP_TMP (1: keep the data dir).
Standard library only (and libfaketime: `.ci/deps test` installs it); binds 127.0.0.1;
stops what it starts, in count and time.
"""

import base64
import glob
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from kbload import call, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KB_BIN = os.path.abspath(os.environ.get("KB_BIN", os.path.join(ROOT, "target", "release", "keybrake")))
KEYS = int(os.environ.get("KEYS", 100_000))
CLIENTS = int(os.environ.get("CLIENTS", 8))
DONE_LINE = "expired keys deleted with their ledger rows: "


def faketime_lib():
    lib = os.environ.get("FAKETIME_LIB")
    if lib:
        return lib
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not found:
        sys.exit("libfaketime not found: .ci/deps test (or apt-get install -y libfaketime), or set FAKETIME_LIB")
    return found[0]




def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


class Serve:
    def __init__(self, tmp, env):
        self.tmp, self.env = tmp, env
        self.control = f"http://127.0.0.1:{free_port()}"
        self.ports = [free_port(), free_port()]
        self.log = os.path.join(tmp, "serve.log")
        self.proc = None

    def start(self, clock=None):
        env = dict(self.env)
        if clock:
            env.update(LD_PRELOAD=faketime_lib(), FAKETIME=clock, FAKETIME_DONT_FAKE_MONOTONIC="1")
        cmd = [KB_BIN, "serve", "--data-dir", os.path.join(self.tmp, "data"),
               "--control-listen", self.control.removeprefix("http://"),
               "--proxy-listen", f"127.0.0.1:{self.ports[0]}", "--metrics-listen", f"127.0.0.1:{self.ports[1]}",
               "--vendor-upstream", "stripe=http://127.0.0.1:9"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=self.tmp)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"serve exited {self.proc.returncode}:\n{self.logs()[-3000:]}")
            try:
                urllib.request.urlopen(self.control + "/readyz", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        sys.exit("serve not ready in 60 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self):
        with open(self.log, errors="replace") as f:
            return f.read()


def issue(base, token, n, expires_in, latencies, stop=None):
    body = {"label": "run", "vendor": "stripe", "allowed_endpoints": ["POST /v1/payment_intents"],
            "daily_usd_cap": 5, "expires_in": expires_in}
    for _ in range(n):
        if stop is not None and stop.is_set():
            return
        t = time.perf_counter()
        call(base, "POST", "/v1/keys", token, body)
        latencies.append(time.perf_counter() - t)


def main():
    if not os.path.exists(KB_BIN):
        sys.exit(f"no {KB_BIN}: cargo build --release --bin keybrake")
    faketime_lib()
    tmp = tempfile.mkdtemp(prefix="kb-expired-")
    admin = "adm_" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    env.update(KEYBRAKE_ADMIN_TOKEN=admin, KEYBRAKE_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
               RUST_LOG="info")
    kb = Serve(tmp, env)
    try:
        kb.start()
        tenants = []
        for name in ("fleet", "other"):
            t = call(kb.control, "POST", "/v1/tenants", admin, {"name": name})
            call(kb.control, "PUT", "/v1/vendors/stripe/credential", t["api_token"], {"secret": "sk_test_x"})
            tenants.append(t["api_token"])
        start = time.monotonic()
        per = KEYS // CLIENTS
        threads = [threading.Thread(target=issue, args=(kb.control, tenants[0], per, "30s", []))
                   for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        issued = per * CLIENTS
        print(f"issued {issued} keys in {time.monotonic() - start:.1f} s")
        kb.stop()
        db_path = os.path.join(tmp, "data", "keybrake.db")
        with sqlite3.connect(db_path) as db:
            day = int(time.time()) // 86_400
            db.execute("INSERT INTO ledger (key_id, day, settled) SELECT id, ?, 1000000 FROM keys", (day,))
            db.commit()
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = os.path.getsize(db_path)
        print(f"keybrake.db: {size / 2**20:.1f} MiB for {issued} keys with a ledger row each: "
              f"{size / issued:.0f} bytes per key")

        # Keys are deleted only up to the newest key's issue time: one issued on the new
        # clock first, then the start whose first round deletes.
        kb.start(clock="+31d")
        issue(kb.control, tenants[1], 1, "15m", [])
        kb.stop()
        kb.start(clock="+31d")
        during, stop = [], threading.Event()
        clients = [threading.Thread(target=issue, args=(kb.control, tenants[1], 1_000_000, "15m", during, stop))
                   for _ in range(CLIENTS)]
        started = time.monotonic()
        for t in clients:
            t.start()
        deadline = started + 600
        line = None
        while time.monotonic() < deadline and line is None:
            line = next((x for x in kb.logs().splitlines() if DONE_LINE in x), None)
            time.sleep(0.05)
        took = time.monotonic() - started
        in_prune = len(during)
        time.sleep(max(3.0, min(took, 10.0)))
        stop.set()
        for t in clients:
            t.join()
        after = during[in_prune:]
        during = during[:in_prune]
        if line is None:
            sys.exit(f"no deletion logged in 600 s:\n{kb.logs()[-3000:]}")
        print(f"deleted within {took:.1f} s of the start: {line.split(DONE_LINE)[1].split(' ')[0]} keys")
        ms = lambda xs, p: percentile(xs, p) * 1000  # noqa: E731
        print(f"issuance while deleting: {len(during)} keys, p50 {ms(during, 0.5):.1f} ms, "
              f"p99 {ms(during, 0.99):.1f} ms, max {ms(during, 1.0):.1f} ms")
        print(f"issuance after:          {len(after)} keys, p50 {ms(after, 0.5):.1f} ms, "
              f"p99 {ms(after, 0.99):.1f} ms, max {ms(after, 1.0):.1f} ms")
        kb.stop()
        with sqlite3.connect(db_path) as db:
            left = db.execute("SELECT count(*) FROM keys WHERE expires_at < strftime('%s','now')").fetchone()[0]
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            page = db.execute("PRAGMA page_size").fetchone()[0]
        print(f"expired keys left: {left}; free pages after: {free} ({free * page / 2**20:.1f} MiB, reused by "
              f"later writes; file {os.path.getsize(db_path) / 2**20:.1f} MiB)")
    finally:
        kb.stop()
        if os.environ.get("KEEP_TMP") != "1":
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    main()
