"""Edge fleet (SPEC §1, §5, §6): one `keybrake control` and edge nodes running
`keybrake proxy --control-url --node-token-file`, against the fake Stripe. One cap, one
revocation and one audit trail hold across every node."""

from __future__ import annotations

import http.server
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
import requests

from fleet import ConfirmChargesMore, ControlPlane, EdgeProxy, accepted, pay, start_vendor
from harness import (KEYBRAKE_BIN, answered_until, assert_denied, clock_at, error_code, free_port, parse_ts,
                     wait_until, write_config)


@pytest.fixture
def fleet(tmp_path, fake_stripe, stripe_secret):
    """A control plane with a tenant (Stripe credential set) and a factory of edge nodes."""
    started = []
    try:
        control = ControlPlane(tmp_path / "control", {"stripe": fake_stripe.url},
                               config=write_config(tmp_path / "conf", leases={"lifetime_seconds": 6}))
        started.append(control)
        control.start()
        tenant = control.create_tenant("acme")
        tenant.put_credential("stripe", stripe_secret)

        def node(name: str, start: bool = True, token: str | None = "", **kwargs) -> EdgeProxy:
            if token == "":
                token = control.create_node(name)["node_token"]
            e = EdgeProxy(tmp_path / name, control, token, {"stripe": fake_stripe.url}, **kwargs)
            started.append(e)
            if start:
                e.start()
            return e

        yield control, tenant, node
    finally:  # also when the setup failed half-way: nothing outlives the test
        for p in started:
            if p.proc and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)


def test_600_concurrent_charges_over_three_nodes_stop_at_the_cap(fleet, fake_stripe, stripe_secret):
    """600 concurrent $1 charges spread over three nodes against one $100 key: exactly
    100 succeed, Stripe received exactly $100, and settled spend = audit = Stripe. The
    nodes wrote nothing to disk and never logged the vendor secret."""
    control, tenant, node = fleet
    nodes = [node(f"edge{i}") for i in range(3)]
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    n = 600
    barrier = threading.Barrier(n, timeout=120)

    def fire(i):
        barrier.wait()
        try:
            r = pay(nodes[i % 3], key["token"])
            return r.status_code, error_code(r) if r.status_code != 200 else None
        except requests.RequestException as e:
            return "error", repr(e)

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(fire, range(n)))
    ok = [r for r in results if r[0] == 200]
    others = [r for r in results if r[0] != 200 and r != (429, "cap_exhausted")]
    assert not others, others[:5]
    assert len(ok) == 100, f"{len(ok)} succeeded"
    stripe_total = sum(int(dict(r.form)["amount"]) for r in accepted(fake_stripe))
    assert len(accepted(fake_stripe)) == 100 and stripe_total == 100 * 100
    tenant.wait_spent(key["id"], Decimal(100), timeout=20)

    def audited():
        events = tenant.audit_all(key_id=key["id"])
        return events if len(events) == n else None

    events = wait_until(audited, timeout=10) or tenant.audit_all(key_id=key["id"])
    assert len(events) == n, f"{len(events)} audit events for {n} requests"
    assert sum(Decimal(str(e["spend_usd"])) for e in events) == Decimal(100)
    assert sum(1 for e in events if e["decision"] == "allowed") == 100
    for e in nodes:
        assert not (e.workdir / "nothing-here").exists(), "an edge node created its data dir"
        assert stripe_secret not in e.logs() and e.node_token not in e.logs()
        assert e.metric("keybrake_lease_requests_total") >= 1
        assert e.metric("keybrake_sync_snapshot_version") >= 1
        assert e.metric("keybrake_sync_lag_seconds") is not None


def test_a_flood_on_a_key_with_its_cap_settled_costs_the_control_plane_nothing(fleet, fake_stripe):
    """A key whose day's cap is spent and settled, flooded through a node: every call is
    refused 429 cap_exhausted, and after the first refusal (whose answer carries the
    key's settled spend) none of them asks the control plane for a lease."""
    control, tenant, node = fleet
    e = node("edge0")
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=3)
    for _ in range(3):
        assert pay(e, key["token"]).status_code == 200
    tenant.wait_spent(key["id"], Decimal(3))
    assert_denied(pay(e, key["token"]), 429, "cap_exhausted")
    asked = e.metric("keybrake_lease_requests_total")
    for _ in range(50):
        assert_denied(pay(e, key["token"]), 429, "cap_exhausted")
    assert e.metric("keybrake_lease_requests_total") == asked
    assert len(accepted(fake_stripe)) == 3


def test_a_revoked_key_is_refused_by_every_node_within_one_second(fleet):
    control, tenant, node = fleet
    nodes = [node(f"edge{i}") for i in range(3)]
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    for e in nodes:
        assert pay(e, key["token"]).status_code == 200
    r = tenant.revoke(key["id"])
    assert r.status_code == 200, r.text
    revoked_at = time.monotonic()
    pending = set(range(3))
    while pending and time.monotonic() - revoked_at < 1.0:
        for i in list(pending):
            if error_code(pay(nodes[i], key["token"])) == "key_revoked":
                pending.discard(i)
    assert not pending, f"nodes {sorted(pending)} still accept the key 1 s after the revocation"
    for e in nodes:
        assert_denied(pay(e, key["token"]), 401, "key_revoked")
        # What the node holds (docs/operations.md, "Memory of a node"): the revoked id, and
        # the key's verified digest until it expires; the revoked key leaves the in-use tier
        # at the cache's next sweep (every second, which also sets the cache gauges).
        # The gauge follows the filter on the node's sync thread: a moment later at most.
        wait_until(lambda: e.metric("keybrake_revoked_keys") == 1, timeout=2)
        assert e.metric("keybrake_revoked_keys") == 1
        def held(e=e):
            return e.metric("keybrake_token_cache_entries"), e.metric("keybrake_token_cache_keys")

        wait_until(lambda: held() == (1, 0), timeout=3)
        assert held() == (1, 0), f"(digests, keys in use) held by {e.metrics_url}: {held()}"


def test_audit_from_a_node_shows_within_two_seconds(fleet):
    control, tenant, node = fleet
    e = node("edge0")
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=5)
    assert pay(e, key["token"]).status_code == 200
    t0 = time.monotonic()
    events = wait_until(lambda: tenant.audit(key_id=key["id"]), timeout=2.0, interval=0.05)
    assert events, "the node's audit event did not reach GET /v1/audit within 2 s"
    assert time.monotonic() - t0 <= 2.5
    assert events[0]["decision"] == "allowed" and Decimal(str(events[0]["spend_usd"])) == 1


def test_a_key_that_expired_before_a_node_saw_it_is_refused_in_its_audit_trail(fleet):
    """An agent calling with a key that has expired gets 401 key_expired, and the refusal
    is in that key's audit trail (the signature holds, so the key is known) even though
    the node never saw the key while it was valid."""
    control, tenant, node = fleet
    e = node("edge0")
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=5,
                           expires_in="1s")
    time.sleep(max(0.0, parse_ts(key["expires_at"]) - time.time()) + 1.5)
    assert_denied(pay(e, key["token"]), 401, "key_expired")
    events = wait_until(lambda: tenant.audit(key_id=key["id"]), timeout=5.0, interval=0.05)
    assert [(x["decision"], x["status"]) for x in events] == [("key_expired", 401)]


def test_a_strict_audit_node_keeps_every_answered_call_through_kill_9(fleet, tmp_path):
    """`audit.durability: strict` on a node: a response is released only once the control
    plane answered that its event is written. Payments and denials from 8 threads (a key
    each), the node SIGKILLed mid-load: every call a client was answered is in the
    control plane's trail, with nothing left on the node to send."""
    control, tenant, node = fleet
    e = node("edge0", config=write_config(tmp_path / "strict", audit={"durability": "strict"}))
    keys = [tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100000)
            for _ in range(8)]
    answered = answered_until(e.proxy_url, keys, 2.0, e.kill9)
    counts = {kid: (n, len(tenant.audit_all(key_id=kid))) for kid, n in answered.items()}
    assert sum(n for n, _ in counts.values()) > 40, f"too little load to judge: {counts}"
    missing = {k: (n, a) for k, (n, a) in counts.items() if a < n}
    assert not missing, f"answered calls missing from the trail (answered, audited): {missing}"


def raw_get(node, path: str, token: str | None = None) -> bytes:
    """A GET of `path` sent as is (requests would percent-encode it); the whole answer."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", node.proxy_port), timeout=10) as s:
        s.sendall(request.encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_an_oversized_audit_path_is_cut_and_never_stalls_a_nodes_audit(fleet):
    """One request with ~32 KiB of `"` in its path (JSON doubles each) made an audit event
    larger than the control plane takes in a node's batch: the node sent that batch again
    forever and audited nothing more. The path is now cut to 2,048 bytes ending in `…`,
    and later events still arrive."""
    control, tenant, node = fleet
    e = node("edge0")
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=5)
    long_path = "/stripe/" + '"' * 32_700
    answer = raw_get(e, long_path)
    assert answer.startswith(b"HTTP/1.1 401") and b"missing_key" in answer, answer[:300]
    # The same from a key holder (a shorter path: the head is at most 32 KiB, token
    # included): denied, and audited where its tenant can read it.
    answer = raw_get(e, long_path[:30_000], token=key["token"])
    assert answer.startswith(b"HTTP/1.1 4"), answer[:300]
    assert pay(e, key["token"]).status_code == 200

    def audited():
        events = tenant.audit(key_id=key["id"])
        return events if any(ev["decision"] == "allowed" for ev in events) else None

    events = wait_until(audited, timeout=5)
    assert events, ("the node's audit stalled",
                    [line for line in e.logs().splitlines() if "audit" in line and len(line) < 500][-3:])
    cut = [ev for ev in events if ev["path"].startswith('/stripe/"')]
    assert len(cut) == 1, (events, answer[:400])
    assert cut[0]["path"].endswith('"…') and len(cut[0]["path"].encode()) == 2048, cut[0]["path"][-20:]
    # The keyless event has no tenant, so no GET /v1/audit shows it: read from the trail.
    with sqlite3.connect(f"file:{control.data_dir / 'audit.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT path FROM audit WHERE decision = 'missing_key'").fetchall()
    assert [(len(p.encode()), p[:9], p[-2:]) for (p,) in rows] == [(2048, '/stripe/"', '"…')]
    assert e.metric("keybrake_audit_dropped_total") == 0
    assert wait_until(lambda: e.metric("keybrake_audit_queue_depth") == 0, timeout=5)


def test_wrong_missing_or_deleted_node_token_refuses_to_start(fleet, tmp_path):
    control, tenant, node = fleet
    wrong = node("wrong", start=False, token="kbn_" + "x" * 40)
    missing = node("missing", start=False, token=None)
    created = control.create_node("gone")
    r = control.admin("DELETE", f"/v1/nodes/{created['id']}")
    assert r.status_code == 200, r.text
    deleted = node("gone", start=False, token=created["node_token"])
    # The CLI's two-line summary written to the file as is: refused before any call, and
    # the token inside it is never printed.
    live = control.create_node("summary")["node_token"]
    summary = node("summary", start=False, token=f"node nd_x\nnode token (shown once): {live}")
    for e, words in ((wrong, "refused the node token"), (missing, "cannot read the node token file"),
                     (deleted, "refused the node token"), (summary, "does not hold one node token")):
        proc = e.launch()
        assert proc.wait(timeout=20) != 0
        err = e.logs()
        lines = [line for line in err.splitlines() if line.startswith("keybrake:")]
        assert lines and words in lines[-1], err[-2000:]
        if e.node_token:
            assert e.node_token not in err, "the node token appeared in the log"
        assert live not in err, "the node token appeared in the log"


def test_plain_http_to_another_host_is_refused_before_any_secret_is_sent(fleet, tmp_path):
    """A node (and the CLI) would send its token, and receive vendor credentials, in clear
    text over http:// to another host (however the URL disguises the host): refused at
    start with the fix named. `.invalid`
    never resolves, so nothing leaves this host on any build."""
    control, tenant, node = fleet
    token = control.create_node("plain")["node_token"]
    token_file = tmp_path / "plain.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    env = {"PATH": "/usr/bin:/bin"}
    # A backslash ends the authority for the HTTP client as `/` does: the host is the
    # part before it, whatever follows an `@`.
    for url in ("http://control.invalid:8081", "http://10.0.0.5.invalid/",
                "http://control.invalid:8081\\@127.0.0.1"):
        out = subprocess.run(
            [str(KEYBRAKE_BIN), "proxy", "--control-url", url, "--node-token-file", str(token_file),
             "--proxy-listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}"],
            env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        assert "plain HTTP to another host" in out.stderr and "https://" in out.stderr, out.stderr
        assert token not in out.stderr + out.stdout
        out = subprocess.run([str(KEYBRAKE_BIN), "node", "--control-url", url, "list"],
                             env=env | {"KEYBRAKE_ADMIN_TOKEN": control.admin_token},
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "plain HTTP to another host" in out.stderr, out.stderr
        assert control.admin_token not in out.stderr + out.stdout


def test_a_daemon_node_without_a_pid_file_directory_says_what_to_set(fleet, tmp_path):
    """An edge node creates nothing on disk: `--daemon` with the PID file defaulting into a
    data dir that does not exist is refused before it forks, naming the setting."""
    control, tenant, node = fleet
    e = node("daemon", start=False)
    e.workdir.mkdir(parents=True, exist_ok=True)
    e.token_file.write_text(e.node_token + "\n")
    e.token_file.chmod(0o600)
    out = subprocess.run(e.command() + ["--daemon"], cwd=e.workdir, capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "is not a directory" in out.stderr and "pingora.pid_file" in out.stderr, out.stderr
    assert e.node_token not in out.stderr + out.stdout


def test_a_node_deleted_while_running_is_cut_off_within_one_second(fleet):
    control, tenant, node = fleet
    created = control.create_node("doomed")
    e = node("doomed", token=created["node_token"])
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=5)
    assert pay(e, key["token"]).status_code == 200
    listed = control.admin("GET", "/v1/nodes").json()["data"]
    mine = [n for n in listed if n["id"] == created["id"]]
    assert mine and mine[0]["last_sync_at"], listed
    assert control.admin("DELETE", f"/v1/nodes/{created['id']}").status_code == 200
    t0 = time.monotonic()
    cut = wait_until(lambda: error_code(pay(e, key["token"])) == "control_unreachable", timeout=1.0, interval=0.02)
    assert cut, "the deleted node still serves 1 s later"
    assert time.monotonic() - t0 <= 1.2
    assert_denied(pay(e, key["token"]), 503, "control_unreachable")
    assert e.ready().status_code == 503
    assert all(n["id"] != created["id"] for n in control.admin("GET", "/v1/nodes").json()["data"])
    assert control.admin("DELETE", f"/v1/nodes/{created['id']}").status_code == 404


def test_control_plane_down_then_back(fleet, fake_stripe, tmp_path):
    """Control stopped: nodes serve within the budget they committed ahead (every
    metered call is committed on the control plane before it is forwarded; a key commits
    as much again as it needs), then 503 control_unreachable after max_staleness; control
    back: they serve again within 2 s; nothing counted twice or lost."""
    control, tenant, node = fleet
    # One node takes its staleness limit from the flag, the other from its config file.
    nodes = [node("edge0", extra_args=["--max-staleness", "2"]),
             node("edge1", config=write_config(tmp_path / "edge1-conf", edge={"max_staleness": "2s"}))]
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=32)
    for e in nodes:
        assert pay(e, key["token"]).status_code == 200  # each node now holds a lease
    # SIGQUIT (serve's graceful upgrade; a reload line copied from serve's unit) is
    # ignored by control: it has no sockets to hand over, and must not die on it.
    control.proc.send_signal(signal.SIGQUIT)
    assert wait_until(lambda: "SIGQUIT ignored" in control.logs(), timeout=5), control.logs()[-2000:]
    assert control.proc.poll() is None, "control died on SIGQUIT"
    t_stop = time.monotonic()
    control.stop()
    for e in nodes:
        assert pay(e, key["token"]).status_code == 200, "a node stopped serving within its lease"
    stale = wait_until(lambda: all(error_code(pay(e, key["token"])) == "control_unreachable" for e in nodes),
                       timeout=4.0, interval=0.1)
    assert stale, "nodes still serve after max_staleness without a control plane"
    # A node's last sync is the moment it sent its last successful poll, and a node polls
    # at least every max_staleness/3: it goes stale between 2/3 and all of max_staleness
    # after the control plane stopped answering, never sooner.
    assert time.monotonic() - t_stop >= 2.0 * 2 / 3 - 0.05
    for e in nodes:
        assert e.ready().status_code == 503
        # The operator sees when a node starts refusing, and when it serves again, and
        # what it refused (vendor and path are known without the control plane). Requests
        # are refused on the clock itself; the line comes from the sync watcher, which looks
        # every 50 ms, so it may follow the first refusal by that much.
        assert wait_until(lambda: "refusing every proxied request with 503 control_unreachable" in e.logs(),
                          timeout=2), "the node's refusing for staleness was not logged"
        assert wait_until(
            lambda: (e.metric('keybrake_requests_total{decision="control_unreachable",vendor="stripe"}') or 0) >= 1,
            timeout=2)
    control.start()
    t_back = time.monotonic()
    back = wait_until(lambda: all(pay(e, key["token"]).status_code == 200 for e in nodes), timeout=2.0,
                      interval=0.05)
    assert back, "nodes did not serve again within 2 s of the control plane's return"
    assert time.monotonic() - t_back <= 2.5
    assert all(wait_until(lambda: "in sync with the control plane again: serving" in e.logs(), timeout=2)
               for e in nodes)
    total = len(accepted(fake_stripe))
    tenant.wait_spent(key["id"], Decimal(total), timeout=20)

    def audited():
        events = [e for e in tenant.audit_all(key_id=key["id"]) if e["decision"] == "allowed"]
        return events if len(events) == total else None

    assert wait_until(audited, timeout=5), "audit events were lost or counted twice"


def test_a_strict_audit_node_still_answers_control_unreachable_and_serves_again(fleet, tmp_path):
    """`audit.durability: strict` on a node whose control plane stops: a response whose
    event cannot be written is withheld (never an unaudited answer), but past
    max_staleness the node still answers SPEC §6's 503 control_unreachable (no money
    moved, nothing reached a vendor), promptly; with the control plane back it serves
    again, each answer audited."""
    control, tenant, node = fleet
    e = node("edge-strict", config=write_config(tmp_path / "strict-conf", edge={"max_staleness": "2s"},
                                                 audit={"durability": "strict"}))
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=32)
    assert pay(e, key["token"]).status_code == 200

    def answer():
        try:
            r = pay(e, key["token"])
            return r.status_code, error_code(r)
        except requests.RequestException:
            return "withheld", None

    control.stop()
    assert wait_until(lambda: answer() == (503, "control_unreachable"), timeout=15, interval=0.2)
    t0 = time.monotonic()
    for _ in range(5):
        assert answer() == (503, "control_unreachable")
    assert time.monotonic() - t0 < 2.5, "each refusal waited for an audit write that cannot happen"
    control.start()
    assert wait_until(lambda: answer() == (200, None), timeout=10, interval=0.2)
    paid = [ev for ev in tenant.audit_all(key_id=key["id"]) if ev["decision"] == "allowed"]
    assert len(paid) >= 2


def test_a_strict_audit_node_whose_control_plane_stops_forwards_nothing_it_could_not_answer(
        fleet, fake_stripe, tmp_path):
    """`audit.durability: strict` on a node whose control plane stops, before
    max_staleness: a call forwarded now would pay at Stripe and have its answer withheld.
    Once its audit batches have failed for 1 s the node refuses before forwarding (503
    `audit_unavailable`, nothing sent): at most the first calls go unanswered. With the
    control plane back it serves again."""
    control, tenant, node = fleet
    e = node("edge-strict", config=write_config(tmp_path / "strict-conf", edge={"max_staleness": "20s"},
                                                 audit={"durability": "strict"}))
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=50)
    assert pay(e, key["token"]).status_code == 200
    before = len(accepted(fake_stripe))
    control.stop()
    seen = []
    deadline = time.monotonic() + 9   # the first call waits up to 5 s for its event
    while time.monotonic() < deadline and len(seen) < 40:
        try:
            r = pay(e, key["token"])
            seen.append((r.status_code, error_code(r)))
        except requests.RequestException:
            seen.append(("withheld", None))
        time.sleep(0.1)
    print(f"strict node, control plane stopped: {seen}")
    withheld = seen.count(("withheld", None))
    assert set(seen) <= {("withheld", None), (503, "audit_unavailable")}, seen
    assert withheld <= 2 and seen.count((503, "audit_unavailable")) >= 5, seen
    assert len(accepted(fake_stripe)) - before <= withheld
    control.start()
    assert wait_until(lambda: pay(e, key["token"]).status_code == 200, timeout=15, interval=0.25)


def test_a_strict_audit_node_whose_control_plane_freezes_refuses_within_seconds(
        fleet, fake_stripe, tmp_path):
    """The control plane frozen (SIGSTOP: connections taken, never answered) under a
    strict node: its audit batch waits, and a send fails only at its 5 s timeout. Once a
    batch has waited 2 s unanswered the node refuses before forwarding (503
    `audit_unavailable`, nothing sent to Stripe) instead of paying calls it cannot answer."""
    control, tenant, node = fleet
    e = node("edge-frozen", config=write_config(tmp_path / "frozen-conf", edge={"max_staleness": "30s"},
                                                audit={"durability": "strict"}))
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=50)
    assert pay(e, key["token"]).status_code == 200
    control.proc.send_signal(signal.SIGSTOP)
    try:
        # A first call after the freeze is forwarded (nothing is known yet); its event's
        # batch then waits unanswered.
        first = threading.Thread(target=lambda: _quietly(lambda: pay(e, key["token"])), daemon=True)
        first.start()
        time.sleep(3.2)
        before = len(accepted(fake_stripe))
        started = time.monotonic()
        r = pay(e, key["token"])
        took = time.monotonic() - started
        assert (r.status_code, error_code(r)) == (503, "audit_unavailable"), (r.status_code, r.text[:300])
        assert took < 1.5, took
        assert len(accepted(fake_stripe)) == before
    finally:
        control.proc.send_signal(signal.SIGCONT)
    first.join(timeout=15)
    assert wait_until(lambda: pay(e, key["token"]).status_code == 200, timeout=15, interval=0.25)


def _quietly(call):
    try:
        call()
    except requests.RequestException:
        pass


def test_a_node_whose_clock_is_past_midnight_gets_no_lease_on_the_next_days_cap(
        tmp_path, fake_stripe, stripe_secret):
    """The control plane at 23:55 UTC, one node in step with it, another 5 minutes fast
    (already 00:00:30 of the next day). The fast node must not be granted the next day's
    cap while the fleet still spends today's: two caps in one day. It is refused (503
    `ledger_unavailable`) until the control plane's day is its own; Stripe receives one
    cap's worth. The node says its clock is off (log, `keybrake_clock_offset_seconds`)."""
    started = []
    # Every clock set from one moment: the in-step node's is the control plane's.
    clocks = {"control": clock_at("2026-12-06 23:55:00")}
    clocks["in-step"] = dict(clocks["control"])
    clocks["fast"] = {**clocks["control"], "FAKETIME": f"{float(clocks['control']['FAKETIME']) + 330:+.3f}"}
    try:
        control = ControlPlane(tmp_path / "control", {"stripe": fake_stripe.url},
                               config=write_config(tmp_path / "conf", leases={"lifetime_seconds": 6}),
                               env_overrides=clocks["control"])
        started.append(control)
        control.start()
        tenant = control.create_tenant("acme")
        tenant.put_credential("stripe", stripe_secret)
        nodes = {}
        for name in ("in-step", "fast"):
            e = EdgeProxy(tmp_path / name, control, control.create_node(name)["node_token"],
                          {"stripe": fake_stripe.url}, env=clocks[name])
            started.append(e)
            nodes[name] = e.start()
        key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10,
                               expires_in="1h")
        assert pay(nodes["in-step"], key["token"], amount=1000).status_code == 200
        assert_denied(pay(nodes["in-step"], key["token"], amount=1000), 429, "cap_exhausted")
        assert_denied(pay(nodes["fast"], key["token"], amount=1000), 503, "ledger_unavailable")
        assert sum(int(r.response_json()["amount"]) for r in accepted(fake_stripe)) == 1000
        assert "leases are granted for its own day only" in nodes["fast"].logs()
        # Said before midnight comes: the node's clock against the control plane's.
        assert 327 <= nodes["fast"].metric("keybrake_clock_offset_seconds") <= 333
        assert abs(nodes["in-step"].metric("keybrake_clock_offset_seconds")) <= 1.5
        assert "this node's clock is 3" in nodes["fast"].logs()
        assert "this node's clock is" not in nodes["in-step"].logs()
    finally:
        for p in started:
            if p.proc and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)


def test_kill_9_of_a_node_mid_burst_never_passes_the_cap_and_its_lease_returns(fleet, fake_stripe):
    """A node SIGKILLed mid-burst: Stripe never accepts more than the cap. Every call a
    node forwards was committed in the ledger first (write-ahead), so the dead node's
    calls in flight stay counted; after the lease lifetime the rest of its lease returns
    and the live nodes spend up to the cap. What can be lost is at most what the dead
    node committed and never sent: its calls in flight (two workers here) and its
    headroom committed ahead (at most its lease)."""
    control, tenant, node = fleet
    nodes = [node(f"edge{i}") for i in range(3)]
    cap = 60
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=cap)
    stop = threading.Event()

    def worker(e):
        for _ in range(cap):
            if stop.is_set():
                return
            try:
                pay(e, key["token"])
            except requests.RequestException:
                return

    workers_on_killed = 2
    threads = [threading.Thread(target=worker, args=(nodes[i % 3],), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(accepted(fake_stripe)) >= cap // 3, timeout=60, interval=0.02)
    nodes[0].kill9()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    time.sleep(1.0)
    before = len(accepted(fake_stripe))
    assert before < cap, "the whole cap was spent before the kill; the test proves nothing"
    assert before <= tenant.get_key(key["id"])["spent_today_usd"] <= cap
    # After the lease lifetime (6 s here) plus the reclaim period, the dead node's
    # unused lease is back: the live nodes can spend up to the cap. Waited for (bounded),
    # not slept: on a loaded machine the reclaim may come a little later.
    killed_at = time.monotonic()
    assert wait_until(lambda: "a process that stopped" in control.logs(), timeout=30, interval=0.2), \
        control.logs()[-3000:]
    print(f"the dead node's leases came back {time.monotonic() - killed_at:.1f} s after the kill")
    for e in nodes[1:]:
        for _ in range(cap):
            if pay(e, key["token"]).status_code != 200:
                break
    total = len(accepted(fake_stripe))
    print(f"kill -9 after {before} accepted; total accepted {total} against a ${cap} cap")
    assert total <= cap, f"Stripe accepted ${total} against a ${cap} cap"
    # What the dead node had committed and never sent is counted as spent: its calls in
    # flight and its headroom, which its lease bounds (a slice: 1/16 of the cap, in $1s).
    slice_usd = -(-cap // 16)
    assert total >= cap - workers_on_killed - slice_usd, (
        f"only ${total} of ${cap} could be spent: more was lost than the dead node held")
    for e in nodes[1:]:
        assert_denied(pay(e, key["token"]), 429, "cap_exhausted")
    # All of the cap is settled, none of it still held (the dead node's lease was
    # reclaimed: committed part settled, the rest spent by the live nodes).
    settled = wait_until(lambda: (lambda k: k if k["held_usd"] == 0 else None)(tenant.get_key(key["id"])),
                         timeout=10)
    assert settled and settled["spent_today_usd"] == cap, settled


def test_a_charge_learned_from_the_answer_survives_a_node_killed_right_after_it(
        tmp_path, stripe_secret):
    """A confirm looked up at $10 whose answer says $500 was charged (the intent was raised
    meanwhile), on a $100 key: the node commits what its lease can take and reports the
    rest, beyond the cap, before the answer's end leaves. Killed -9 the moment its client
    has the answer (before its next report round or audit batch): the control plane still
    counts all $500, what the vendor charged, and the key stays stopped."""
    vendor = start_vendor(ConfirmChargesMore)
    url = f"http://127.0.0.1:{vendor.server_address[1]}"
    started = []
    try:
        control = ControlPlane(tmp_path / "control", {"stripe": url},
                               config=write_config(tmp_path / "conf", leases={"lifetime_seconds": 3}))
        started.append(control)
        control.start()
        tenant = control.create_tenant("acme")
        tenant.put_credential("stripe", stripe_secret)
        node = EdgeProxy(tmp_path / "edge", control, control.create_node("edge")["node_token"],
                         {"stripe": url})
        started.append(node)
        node.start()
        key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents/*/confirm"],
                               daily_usd_cap=100)
        r = node.proxy("POST", "/stripe/v1/payment_intents/pi_abc/confirm", key=key["token"])
        assert r.status_code == 200, r.text
        node.kill9()
        settled = wait_until(lambda: (lambda k: k if k["held_usd"] == 0 else None)(tenant.get_key(key["id"])),
                             timeout=20, interval=0.3)
        assert settled and settled["spent_today_usd"] == 500, settled
        other = EdgeProxy(tmp_path / "edge2", control, control.create_node("edge2")["node_token"],
                          {"stripe": url})
        started.append(other)
        other.start()
        assert_denied(other.proxy("POST", "/stripe/v1/payment_intents/pi_abc/confirm", key=key["token"]),
                      429, "cap_exhausted")
    finally:
        vendor.shutdown()
        for p in started:
            if p.proc and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)


def test_a_node_taken_for_dead_stops_and_serves_again_with_a_new_session(fleet):
    """A node silent for longer than the lease lifetime while the control plane ran (a
    partition, a stopped process) is taken for dead and its lease given back. Woken, it
    learns so from its next poll: it spends nothing more, fails /readyz, and stops with
    exit status 75 (systemd's `Restart=on-failure` starts it again), instead of polling
    in a loop with every metered call refused. Started again, it serves."""
    control, tenant, node = fleet
    e = node("sleepy")
    # A cap whose lease slice ($100 / 16) outlasts the first $1 call.
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    assert pay(e, key["token"]).status_code == 200
    e.proc.send_signal(signal.SIGSTOP)
    try:
        # The lease it held comes back once the lifetime (6 s) has passed.
        assert tenant.get_key(key["id"])["held_usd"] > 0
        assert wait_until(lambda: tenant.get_key(key["id"])["held_usd"] == 0, timeout=20, interval=0.2)
        # The reclaim settled what the node committed (its call, and budget committed ahead).
        spent = tenant.get_key(key["id"])["spent_today_usd"]
        assert spent >= 1, spent
    finally:
        e.proc.send_signal(signal.SIGCONT)
    assert e.proc.wait(timeout=30) == 75, e.logs()[-2000:]
    assert "took this node for dead" in e.logs()
    # What the node reports on waking was settled by the reclaim already: not counted twice.
    time.sleep(1)
    assert tenant.get_key(key["id"])["spent_today_usd"] == spent
    e.start()
    assert pay(e, key["token"]).status_code == 200
    assert tenant.get_key(key["id"])["spent_today_usd"] >= spent + 1


def test_a_control_plane_paused_past_the_lease_lifetime_takes_no_node_for_dead(fleet):
    """The control plane frozen (SIGSTOP: a paused VM, a suspended host) for longer than
    the lease lifetime: no node could beat to it meanwhile, so on waking it must not take
    them for dead (that would stop the whole fleet with exit status 75). It waits a
    lifetime first; the nodes serve on."""
    control, tenant, node = fleet
    e = node("patient")
    key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    assert pay(e, key["token"]).status_code == 200
    control.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(9)  # the lifetime is 6 s
    finally:
        control.proc.send_signal(signal.SIGCONT)
    last = {}

    def paid():
        r = pay(e, key["token"])
        last["answer"] = (r.status_code, r.text[:300])
        return r.status_code == 200

    served = wait_until(paid, timeout=10, interval=0.3)
    assert served, (last, e.logs()[-2000:], control.logs()[-2000:])
    time.sleep(8)  # past a lifetime after waking: a reclaim would have run by now
    assert e.proc.poll() is None, e.logs()[-2000:]
    assert paid(), (last, e.logs()[-2000:])
    assert "took this node for dead" not in e.logs()
    assert "a process that stopped" not in control.logs(), "the node's leases were reclaimed"
    assert "was paused" in control.logs()


def test_node_cli_creates_lists_and_deletes(fleet):
    control, tenant, node = fleet
    env = {"KEYBRAKE_ADMIN_TOKEN": control.admin_token, "PATH": "/usr/bin:/bin"}
    base = [str(KEYBRAKE_BIN), "node", "--control-url", control.control_url]
    out = subprocess.run(base + ["create", "cli-node"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    node_id = out.stdout.split()[1]
    token = out.stdout.rsplit(" ", 1)[1].strip()
    assert node_id.startswith("nd_") and token.startswith("kbn_")
    out = subprocess.run(base + ["list"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and node_id in out.stdout and "cli-node" in out.stdout \
        and "none seen by this control process" in out.stdout
    # A name names one live node: a provisioning script run twice gets no second token.
    out = subprocess.run(base + ["create", "cli-node"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "exists already" in out.stderr and "kbn_" not in out.stdout + out.stderr
    r = control.admin("POST", "/v1/nodes", json={"name": "cli-node"})
    assert r.status_code == 409 and error_code(r) == "name_taken", r.text
    out = subprocess.run(base + ["delete", node_id], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and f"{node_id} deleted" in out.stdout
    out = subprocess.run(base + ["list"], env=env, capture_output=True, text=True, timeout=30)
    assert node_id not in out.stdout
    # Deleting the node freed its name.
    again = control.create_node("cli-node")
    assert again["id"] != node_id and again["node_token"] != token


class _LosingRelay(http.server.BaseHTTPRequestHandler):
    """Between a node and its control plane: passes every call on, but the first lease
    call's answer never reaches the node (the control plane granted it; the connection
    closes before the answer is sent, as when a replica is killed after its commit)."""

    protocol_version = "HTTP/1.1"
    upstream = ""
    lost: list = []

    def _relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() in ("authorization", "content-type", "keybrake-node-session")}
        r = requests.request(self.command, self.upstream + self.path, data=body, headers=headers,
                             timeout=60)
        if self.path.startswith("/v1/sync/leases") and not self.lost:
            self.lost.append(r.status_code)
            self.close_connection = True
            return
        self.send_response(r.status_code)
        self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PUT = do_DELETE = _relay

    def log_message(self, *args):
        pass


def test_a_lease_answer_lost_on_the_way_to_the_node_gives_back_all_it_granted(fleet, fake_stripe):
    """The control plane grants a fresh key's first lease (the $7 of the call that asked
    committed), and the answer never reaches the node: the call is refused (503) and never
    reaches Stripe. The node names the lease batch lost in its next report, and the ledger
    gives back all it granted: nothing spent, nothing held, and the key's whole $10 cap can
    then be spent ($7 and $3), no further."""
    control, tenant, node = fleet
    handler = type("Relay", (_LosingRelay,), {"upstream": control.control_url, "lost": []})
    relay = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        e = node("edge-lossy", start=False)
        e.command = lambda: [("http://127.0.0.1:%d" % relay.server_address[1])
                             if arg == control.control_url else arg
                             for arg in EdgeProxy.command(e)]
        e.start()
        key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
        r = pay(e, key["token"], 700)
        assert r.status_code == 503, r.text
        assert handler.lost == [200], handler.lost
        tenant.wait_spent(key["id"], Decimal(0))
        assert e.metric("keybrake_lease_batches_lost_total") == 1
        assert pay(e, key["token"], 700).status_code == 200
        assert pay(e, key["token"], 300).status_code == 200
        assert_denied(pay(e, key["token"], 100), 429, "cap_exhausted")
        assert sorted(int(dict(x.form)["amount"]) for x in accepted(fake_stripe)) == [300, 700]
        tenant.wait_spent(key["id"], Decimal(10))
    finally:
        relay.shutdown()


class _FreezingRelay:
    """A TCP relay between a node and its control plane that can stop passing bytes, both
    ways, keeping every connection open (a partition), and pass what it held once healed."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.frozen = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the control plane stopped at the end of the test
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.005)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.server.close()


def test_a_poll_answer_delayed_by_a_partition_does_not_make_a_node_serve_a_key_revoked_meanwhile(
        fleet, fake_stripe):
    """The node's link to the control plane stops passing bytes (connections kept open);
    the key is revoked; the node goes stale; the link heals while clients keep calling,
    and the answer it held arrives, built before the revocation and by now older than
    max_staleness. The node counts its
    freshness from when that answer was built, not from its arrival: it goes on refusing
    (503) until a newer answer brings the revocation (401), and never forwards the revoked
    key to Stripe."""
    control, tenant, node = fleet
    relay = _FreezingRelay(control.control_port)
    try:
        e = node("edge-partitioned", start=False, extra_args=["--max-staleness", "2s"])
        e.command = lambda: [f"http://127.0.0.1:{relay.port}" if arg == control.control_url else arg
                             for arg in EdgeProxy.command(e)]
        e.start()
        # Unmetered lookups: answered without a write-ahead, so as fast as the node can.
        key = tenant.issue_key(allowed_endpoints=["GET /v1/customers/*"], daily_usd_cap=100)
        lookup = "/stripe/v1/customers/cus_partition"
        assert e.proxy("GET", lookup, key=key["token"]).status_code == 404  # forwarded: unknown there
        relay.frozen.set()
        frozen_at = time.monotonic()
        time.sleep(1.0)
        assert tenant.revoke(key["id"]).status_code == 200
        assert wait_until(lambda: e.ready().status_code == 503, timeout=4)
        # The answer the relay holds was built at most one poll wait (max_staleness / 3)
        # after the freeze: healed past that plus max_staleness, it is stale on arrival.
        time.sleep(max(0.0, frozen_at + 3.2 - time.monotonic()))
        forwarded = len([r for r in fake_stripe.received() if r.path.startswith("/v1/customers/")])
        deadline = time.monotonic() + 2.0

        def hammer(_):
            codes = []
            while time.monotonic() < deadline:
                codes.append(error_code(e.proxy("GET", lookup, key=key["token"])))
            return codes
        with ThreadPoolExecutor(16) as pool:
            calls = pool.map(hammer, range(16))
            time.sleep(0.3)
            relay.frozen.clear()
            codes = [c for batch in calls for c in batch]
        after = [r for r in fake_stripe.received() if r.path.startswith("/v1/customers/")]
        assert len(after) == forwarded, f"{len(after) - forwarded} lookups with the revoked key reached Stripe"
        assert set(codes) <= {"control_unreachable", "key_revoked"}, set(codes)
        assert "key_revoked" in codes, "the node never synced again after the heal"
    finally:
        relay.close()


def test_a_node_resumed_after_a_pause_refuses_what_queued_meanwhile(fleet, fake_stripe):
    """A node paused (SIGSTOP: a frozen VM) past max_staleness while its key is revoked and
    calls queue at its socket: resumed, it refuses them (503 stale, or 401 once synced), and
    forwards none to Stripe, even before anything else in it has run."""
    control, tenant, node = fleet
    e = node("edge-paused", extra_args=["--max-staleness", "2s"])
    # Unmetered lookups: answered without a write-ahead, so as fast as the node can.
    key = tenant.issue_key(allowed_endpoints=["GET /v1/customers/*"], daily_usd_cap=100)
    lookup = "/stripe/v1/customers/cus_paused"
    for _ in range(20):
        assert e.proxy("GET", lookup, key=key["token"]).status_code == 404  # forwarded: unknown there

    def lookups():
        return len([r for r in fake_stripe.received() if r.path == "/v1/customers/cus_paused"])
    # Kept-alive connections, open before the pause: what they carry meanwhile waits in
    # the node's sockets, ready for its worker threads the moment it resumes.
    sessions = [requests.Session() for _ in range(32)]
    headers = {"Authorization": f"Bearer {key['token']}"}
    for session in sessions:
        assert session.get(e.proxy_url + lookup, headers=headers, timeout=10).status_code == 404
    forwarded = lookups()
    e.proc.send_signal(signal.SIGSTOP)
    try:
        assert tenant.revoke(key["id"]).status_code == 200
        with ThreadPoolExecutor(32) as pool:
            queued = [pool.submit(s.get, e.proxy_url + lookup, headers=headers, timeout=30) for s in sessions]
            time.sleep(3.0)
            e.proc.send_signal(signal.SIGCONT)
            answers = [f.result() for f in queued]
    finally:
        e.proc.send_signal(signal.SIGCONT)
        for session in sessions:
            session.close()
    codes = [error_code(r) for r in answers]
    assert lookups() == forwarded, f"{lookups() - forwarded} queued lookups with the revoked key reached Stripe"
    assert set(codes) <= {"control_unreachable", "key_revoked"}, set(codes)
