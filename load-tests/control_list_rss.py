#!/usr/bin/env python3
"""RSS of `keybrake serve` while many slow clients read the largest page of GET /v1/keys.

One tenant issues KEYS keys (default 1,000), each as large as the limits allow: 100
endpoint patterns of ~80 bytes (8 KiB in all) and ~8 KiB of metadata. Then READERS connections
(default 100) each send `GET /v1/keys?limit=1000` and read the answer SLOW_BYTES bytes per
second, for DURATION seconds. The script samples the process's VmRSS every 0.25 s and
prints the largest value, before and during the readers. Target: < 256 MiB. (Since the
twenty-fifth session a tenant gets two listings built at once and a third is answered 429
`rate_limited`: most of these readers now get that answer, and the peak is lower than the
figures in RESULTS.md, measured before, when all of them held a page.)

    cargo build --release --bin keybrake
    load-tests/control_list_rss.py

Env knobs: KB_BIN (target/release/keybrake)  KEYS (1000)  READERS (100)  DURATION (s, 20)
SLOW_BYTES (4096 per second per reader)  KEEP_TMP (1: keep the data dir).
Standard library only; binds 127.0.0.1; stops what it starts, in count and time.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from kbload import call, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KB_BIN = os.path.abspath(os.environ.get("KB_BIN", os.path.join(ROOT, "target", "release", "keybrake")))
KEYS = int(os.environ.get("KEYS", 1000))
READERS = int(os.environ.get("READERS", 100))
DURATION = float(os.environ.get("DURATION", 20))
SLOW_BYTES = int(os.environ.get("SLOW_BYTES", 4096))



def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0



def main():
    if not os.access(KB_BIN, os.X_OK):
        sys.exit(f"missing {KB_BIN}: cargo build --release --bin keybrake")
    tmp = tempfile.mkdtemp(prefix="keybrake-rss.")
    admin = "adm_" + os.urandom(16).hex()
    ports = [free_port() for _ in range(3)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
    env["KEYBRAKE_ADMIN_TOKEN"] = admin
    proc = subprocess.Popen(
        [KB_BIN, "serve", "--data-dir", f"{tmp}/data",
         "--proxy-listen", f"127.0.0.1:{ports[0]}", "--control-listen", f"127.0.0.1:{ports[1]}",
         "--metrics-listen", f"127.0.0.1:{ports[2]}", "--vendor-upstream", "stripe=http://127.0.0.1:9"],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/keybrake.err", "w"),
    )
    base = f"http://127.0.0.1:{ports[1]}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        tenant = call(base, "POST", "/v1/tenants", admin, {"name": "rss"})
        token = tenant["api_token"]
        call(base, "PUT", "/v1/vendors/stripe/credential", token, {"secret": "sk_test_" + "r" * 24})
        patterns = [f"GET /v1/{'a' * 70}/{i}" for i in range(100)]  # the 8 KiB allowed in all
        for i in range(KEYS):
            call(base, "POST", "/v1/keys", token, {
                "label": f"big-{i}", "vendor": "stripe", "allowed_endpoints": patterns,
                "daily_usd_cap": 5, "expires_in": "1h", "metadata": {"pad": "x" * 8000},
            })
        first = urllib.request.Request(base + "/v1/keys?limit=1000")
        first.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(first, timeout=60) as r:
            page = r.read()
        listed = len(json.loads(page)["data"])
        time.sleep(1)
        baseline = rss_kib(proc.pid)

        stop = threading.Event()
        received = [0] * READERS

        def reader(n):
            try:
                with socket.create_connection(("127.0.0.1", ports[1]), timeout=DURATION + 10) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    s.sendall(
                        f"GET /v1/keys?limit=1000 HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Bearer {token}\r\n\r\n".encode()
                    )
                    while not stop.is_set():
                        chunk = s.recv(SLOW_BYTES)
                        if not chunk:
                            return
                        received[n] += len(chunk)
                        stop.wait(1)
            except OSError:
                return

        threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(READERS)]
        for t in threads:
            t.start()
        peak, end = baseline, time.monotonic() + DURATION
        while time.monotonic() < end:
            peak = max(peak, rss_kib(proc.pid))
            time.sleep(0.25)
        stop.set()
        for t in threads:
            t.join(timeout=5)
        print(f"keys {KEYS}, first page: {listed} keys, {len(page) / 1024:.0f} KiB of JSON")
        print(f"RSS before the readers: {baseline / 1024:.1f} MiB")
        print(f"RSS peak with {READERS} slow readers over {DURATION:.0f} s: {peak / 1024:.1f} MiB "
              f"(target < 256 MiB)")
        print(f"bytes read by the readers: {sum(received) / 1024:.0f} KiB in total")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if os.environ.get("KEEP_TMP") == "1":
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
