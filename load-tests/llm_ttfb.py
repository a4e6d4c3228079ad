#!/usr/bin/env python3
"""Time to first byte of an LLM stream: through Keybrake vs straight to the vendor.

Starts the fake OpenAI of the acceptance suite (tests/acceptance/fakes/llm_server.py) and
`keybrake serve` in front of it, issues a vault key, then at ONE connection (keep-alive)
sends the same streaming chat completion (`"stream": true`, no `stream_options`, so
Keybrake injects `include_usage` and removes the usage chunk) directly to the fake and through Keybrake. TTFB is measured from sending the request to
the first byte of the answer's body (the first SSE event); the rest of the stream is read
before the next request; the two sides alternate request by request. Prints p50/p90/p99
of each and the added p50 and p99.

    cargo build --release --bin keybrake
    .venv/bin/python load-tests/llm_ttfb.py          # N=5000 requests per side

Env: N (requests per side, 5000), KEYBRAKE_BIN (default
target/release/keybrake), PIN (1: keybrake on CPU 0, the fake and this client on CPU 1).
Only 127.0.0.1; every wait is bounded.
"""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "acceptance" / "fakes" / "llm_server.py"
KB = Path(os.environ.get("KEYBRAKE_BIN", ROOT / "target" / "release" / "keybrake"))
N = int(os.environ.get("N", "5000"))
PIN = os.environ.get("PIN", "1") == "1"
BODY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 64, "stream": True,
                   "messages": [{"role": "user", "content": "Say hello"}]}).encode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=20):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listening on {port} after {deadline}s")


def pinned(cmd, cpu):
    return (["taskset", "-c", str(cpu)] + cmd) if PIN and shutil.which("taskset") else cmd


def control(port, method, path, token, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    assert r.status < 300, (method, path, r.status, data)
    return json.loads(data)


def ttfb(conn, path, headers):
    t0 = time.perf_counter()
    conn.request("POST", path, body=BODY, headers={"Content-Type": "application/json",
                                                   "x-fake-delay-ms": "0", **headers})
    r = conn.getresponse()
    assert r.status == 200, (r.status, r.read()[:300])
    first = r.read(1)
    took = time.perf_counter() - t0
    rest = first + r.read()
    assert rest.endswith(b"data: [DONE]\n\n"), rest[-200:]
    return took


def measure(fake_port, proxy_port, direct, via, n):
    """`n` requests each way on one keep-alive connection per side, alternating one by
    one, so both sides see the same machine noise."""
    a = http.client.HTTPConnection("127.0.0.1", fake_port, timeout=30)
    b = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
    d, k = [], []
    for i in range(n):
        if i % 2:
            d.append(ttfb(a, *direct))
            k.append(ttfb(b, *via))
        else:
            k.append(ttfb(b, *via))
            d.append(ttfb(a, *direct))
    a.close()
    b.close()
    return d, k


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000


def main():
    if not KB.exists():
        sys.exit(f"{KB} missing: cargo build --release --bin keybrake")
    tmp = Path(tempfile.mkdtemp(prefix="kb-llm-ttfb-"))
    procs = []
    try:
        fake_port, proxy, ctl, met = free_port(), free_port(), free_port(), free_port()
        procs.append(subprocess.Popen(pinned([sys.executable, str(FAKE), "--port", str(fake_port), "--state-dir",
                                              str(tmp / "fake")], 1), stdout=subprocess.DEVNULL,
                                      stderr=open(tmp / "fake.err", "w")))
        admin = "adm_" + os.urandom(16).hex()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")},
               "KEYBRAKE_ADMIN_TOKEN": admin,
               "KEYBRAKE_MASTER_KEY": __import__("base64").b64encode(os.urandom(32)).decode()}
        cfg = tmp / "kb.yaml"
        cfg.write_text(f"vendors_file: {ROOT / 'conf' / 'vendors.yaml'}\n"
                       f"currencies_file: {ROOT / 'conf' / 'currencies.yaml'}\n"
                       f"prices_file: {ROOT / 'conf' / 'prices.yaml'}\naccess_log: {tmp / 'access.log'}\n")
        procs.append(subprocess.Popen(pinned([str(KB), "serve", "--config", str(cfg), "--data-dir", str(tmp / "data"),
                                              "--proxy-listen", f"127.0.0.1:{proxy}", "--control-listen",
                                              f"127.0.0.1:{ctl}", "--metrics-listen", f"127.0.0.1:{met}",
                                              "--vendor-upstream", f"openai=http://127.0.0.1:{fake_port}"], 0),
                                      env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "kb.err", "w")))
        wait_port(fake_port)
        wait_port(ctl)
        wait_port(proxy)
        tenant = control(ctl, "POST", "/v1/tenants", admin, {"name": "ttfb"})
        control(ctl, "PUT", "/v1/vendors/openai/credential", tenant["api_token"], {"secret": "sk-ttfb-0123456789"})
        key = control(ctl, "POST", "/v1/keys", tenant["api_token"],
                      {"label": "ttfb", "vendor": "openai", "allowed_endpoints": ["POST /v1/chat/completions"],
                       "daily_usd_cap": 100000, "expires_in": "1h"})
        via = ("/openai/v1/chat/completions", {"Authorization": f"Bearer {key['token']}"})
        direct = ("/v1/chat/completions", {"Authorization": "Bearer sk-ttfb-0123456789"})
        measure(fake_port, proxy, direct, via, 200)  # warm-up
        d, k = measure(fake_port, proxy, direct, via, N)
        print(f"requests per side: {len(d)}, one connection each, alternating request by request")
        for name, xs in (("direct  ", d), ("keybrake", k)):
            print(f"{name} TTFB p50 {pct(xs, 50):.3f} ms  p90 {pct(xs, 90):.3f} ms  p99 {pct(xs, 99):.3f} ms")
        print(f"added TTFB: p50 {pct(k, 50) - pct(d, 50):+.3f} ms  p99 {pct(k, 99) - pct(d, 99):+.3f} ms")
        # Keybrake's own time per request (total minus upstream: the body read, plan,
        # reservation before forwarding, and the settlement after), from its histogram.
        c = http.client.HTTPConnection("127.0.0.1", met, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        buckets = [(float(le), float(n)) for le, n in
                   __import__("re").findall(r'keybrake_overhead_seconds_bucket\{le="([^"+]+)"\} (\S+)', text)]
        total = max(n for _, n in buckets)
        for q in (0.5, 0.99):
            le = next(le for le, n in buckets if n >= q * total)
            print(f"keybrake_overhead_seconds p{int(q * 100)} <= {le * 1000:g} ms ({int(total)} requests)")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
