#!/usr/bin/env python3
"""Revocation propagation across an edge fleet: one `keybrake control`, three
`keybrake proxy` nodes and the fake Stripe of the acceptance suite, all on 127.0.0.1.

For each of N keys (default 100): issue the key, call through every node once (so each
node holds the verified token in its cache), `DELETE /v1/keys/{id}`, then from the
moment the DELETE is answered poll the three nodes in parallel (one keep-alive
connection each, back to back) until every one answers 401 `key_revoked`. Prints p50,
p90, p99 and max of that time over the N revocations. Target: p99 < 250 ms.

    cargo build --release --bin keybrake
    KEYBRAKE_BIN=target/release/keybrake .venv/bin/python load-tests/revocation_propagation.py

Env: N (100), KEYBRAKE_BIN (default target/debug/keybrake, as the acceptance suite).
Every wait is bounded (5 s per revocation); stops what it starts.
"""

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "acceptance"))

import requests  # noqa: E402

from fleet import ControlPlane, EdgeProxy  # noqa: E402
from harness import FakeStripe  # noqa: E402

N = int(os.environ.get("N", "100"))
PATH = "/stripe/v1/customers"


def refused_after(session: requests.Session, node: EdgeProxy, token: str, t0: float, out: list, i: int):
    deadline = t0 + 5.0
    while time.monotonic() < deadline:
        r = session.get(node.proxy_url + PATH, headers={"authorization": f"Bearer {token}"}, timeout=5)
        if r.status_code == 401 and r.json().get("code") == "key_revoked":
            out[i] = time.monotonic() - t0
            return
    out[i] = None


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="kb-revprop-"))
    fake = FakeStripe(tmp / "fake").start()
    control = ControlPlane(tmp / "control", {"stripe": fake.url})
    nodes = []
    try:
        control.start()
        tenant = control.create_tenant("revprop")
        tenant.put_credential("stripe", "sk_test_revocation_propagation")
        for i in range(3):
            token = control.create_node(f"edge{i}")["node_token"]
            nodes.append(EdgeProxy(tmp / f"edge{i}", control, token, {"stripe": fake.url}).start())
        sessions = [requests.Session() for _ in nodes]
        times = []
        for k in range(N):
            key = tenant.issue_key(allowed_endpoints=["GET /v1/customers"], daily_usd_cap=1)
            for s, node in zip(sessions, nodes):
                r = s.get(node.proxy_url + PATH, headers={"authorization": f"Bearer {key['token']}"}, timeout=5)
                assert r.status_code == 200, (r.status_code, r.text[:200])
            r = tenant.revoke(key["id"])
            t0 = time.monotonic()
            assert r.status_code == 200, r.text
            out = [None, None, None]
            threads = [threading.Thread(target=refused_after, args=(s, n, key["token"], t0, out, i))
                       for i, (s, n) in enumerate(zip(sessions, nodes))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=10)
            if any(v is None for v in out):
                print(f"revocation {k}: a node still accepted the key after 5 s: {out}")
                return 1
            times.append(max(out))
        times.sort()

        def pct(p):
            return times[min(len(times) - 1, int(round(p / 100 * (len(times) - 1))))] * 1000

        print(f"revocations: {N}, until all three nodes refuse the key (from the DELETE's answer):")
        print(f"  p50 {pct(50):.1f} ms  p90 {pct(90):.1f} ms  p99 {pct(99):.1f} ms  max {times[-1] * 1000:.1f} ms")
        print(f"  target p99 < 250 ms: {'met' if pct(99) < 250 else 'NOT met'}")
        return 0
    finally:
        for n in nodes:
            n.stop()
        control.stop()
        fake.stop()


if __name__ == "__main__":
    sys.exit(main())
