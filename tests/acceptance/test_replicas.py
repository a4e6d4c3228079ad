"""Control replicas on one PostgreSQL (SPEC §1, issue 17): two `keybrake control
--database-url` on one database, each with an edge proxy synced from it, against the fake
Stripe. What one replica is told, the other and every proxy honour within 1 s; one
ledger caps spend across both; a replica killed with -9 takes nothing granted with it;
PostgreSQL lost and back, unreachable or from a newer binary, is handled as SPEC says."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
import requests

from fleet import EdgeProxy, PgControlPlane, accepted, pay
from harness import Tenant, assert_control_error, assert_denied, error_code, wait_until, write_config
from pg import Cluster

CUSTOMERS = "/stripe/v1/customers"


class Replicas:
    """Replicas `a` and `b` on one database, edge proxies `ea` (synced from a) and `eb`
    (from b), and one tenant seen through either replica (`ta`, `tb`)."""

    def __init__(self, tmp_path, fake_stripe, stripe_secret, cluster: Cluster, database_url: str):
        self.tmp_path = tmp_path
        self.fake = fake_stripe
        self.cluster = cluster
        self.database_url = database_url
        self.config = write_config(tmp_path / "conf", leases={"lifetime_seconds": 6})
        self.started: list = []
        try:
            self._start(stripe_secret)
        except BaseException:
            self.kill_all()  # the fixture never sees a half-built fleet: stop what started
            raise

    def _start(self, stripe_secret: str) -> None:
        first = self.replica("a")
        self.a = first.start()
        # Same admin token and master key: replicas of one control plane share both.
        self.b = self.replica("b", admin_token=first.admin_token, master_key=first.master_key).start()
        self.ta = self.a.create_tenant("acme")
        self.ta.put_credential("stripe", stripe_secret)
        self.tb = Tenant(self.b, self.ta.id, self.ta.token, self.ta.created)
        self.ea = self.edge("ea", self.a)
        self.eb = self.edge("eb", self.b)

    def replica(self, name: str, **kwargs) -> PgControlPlane:
        r = PgControlPlane(self.tmp_path / name, {"stripe": self.fake.url}, self.database_url, self.cluster,
                           config=self.config, **kwargs)
        self.started.append(r)
        return r

    def edge(self, name: str, control: PgControlPlane, **kwargs) -> EdgeProxy:
        # The node is registered on replica a; b must know it from the shared database,
        # within the promised 1 s (b authenticates from memory, kept by LISTEN/NOTIFY).
        token = self.a.create_node(name)["node_token"]
        if control is not self.a:
            time.sleep(1.0)
        e = EdgeProxy(self.tmp_path / name, control, token, {"stripe": self.fake.url}, config=self.config,
                      **kwargs)
        self.started.append(e)
        return e.start()

    def kill_all(self) -> None:
        for p in self.started:
            if p.proc and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)


@pytest.fixture
def replicas(tmp_path, fake_stripe, stripe_secret, pg_cluster, pg_database):
    r = None
    try:
        r = Replicas(tmp_path, fake_stripe, stripe_secret, pg_cluster, pg_database)
        yield r
    finally:
        if r is not None:
            r.kill_all()


def within_one_second(check, what: str) -> float:
    """Polls `check` for 1 s; returns how long it took, fails saying `what` if it never held."""
    t0 = time.monotonic()
    ok = wait_until(check, timeout=1.0, interval=0.02)
    took = time.monotonic() - t0
    assert ok, f"{what} not within 1 s"
    return took


# --------------------------------------------------------------------------- agreement


def test_a_postgresql_replica_lists_its_store_metrics_but_no_sqlite_wal(replicas):
    """A replica on PostgreSQL shows the keys it issued but no
    keybrake_store_wal_backlog_frames: it has no SQLite WAL, and a gauge reading 0 for
    ever would tell an operator's alert that checkpoints keep up."""
    replicas.ta.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=1)
    text = requests.get(f"{replicas.a.metrics_url}/metrics", timeout=5).text
    assert "keybrake_keys_issued_total" in text, text
    assert "keybrake_store_wal_backlog_frames" not in text, text


def test_a_key_issued_on_one_replica_is_revoked_on_the_other_and_refused_everywhere(replicas):
    """Issued through a: shown by b and usable through both proxies; revoked through b:
    a shows it revoked, and both proxies refuse it within 1 s; the audit of calls that
    went through a's proxy is read through b."""
    r = replicas
    key = r.ta.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    shown = r.tb.get_key(key["id"])
    assert shown["status"] == "active" and shown["label"] == key["label"], shown
    for e in (r.ea, r.eb):
        assert pay(e, key["token"]).status_code == 200
    assert wait_until(lambda: len(r.tb.audit(key_id=key["id"])) == 2, timeout=5), r.tb.audit(key_id=key["id"])

    assert r.tb.revoke(key["id"]).status_code == 200
    pending = {"ea": r.ea, "eb": r.eb}

    def refused_everywhere():
        for name, e in list(pending.items()):
            if error_code(pay(e, key["token"])) == "key_revoked":
                del pending[name]
        return not pending

    took = within_one_second(refused_everywhere, f"revocation through b reaching {sorted(pending)}")
    print(f"revocation through b refused by both proxies after {took * 1000:.0f} ms")
    for e in (r.ea, r.eb):
        assert_denied(pay(e, key["token"]), 401, "key_revoked")
    assert r.ta.get_key(key["id"])["status"] == "revoked"
    decisions = sorted(ev["decision"] for ev in r.ta.audit_all(key_id=key["id"]))
    assert decisions.count("allowed") == 2, decisions


def test_an_api_token_deleted_on_one_replica_is_refused_by_the_other_within_one_second(replicas):
    r = replicas
    created = r.a.admin("POST", f"/v1/tenants/{r.ta.id}/api_tokens")
    assert created.status_code == 201, created.text
    second = created.json()
    # Created through a: b honours it within 1 s too (its cache follows a's NOTIFY).
    within_one_second(
        lambda: r.b.control("GET", "/v1/keys", token=second["api_token"]).status_code == 200,
        "the API token created through a accepted by b",
    )
    gone = r.a.admin("DELETE", f"/v1/tenants/{r.ta.id}/api_tokens/{second['id']}")
    assert gone.status_code == 200, gone.text
    took = within_one_second(
        lambda: r.b.control("GET", "/v1/keys", token=second["api_token"]).status_code == 401,
        "the API token deleted through a refused by b",
    )
    print(f"deleted API token refused by b after {took * 1000:.0f} ms")
    assert_control_error(r.b.control("GET", "/v1/keys", token=second["api_token"]), 401, "invalid_token")
    # The tenant's other token is untouched on both.
    for kb in (r.a, r.b):
        assert kb.control("GET", "/v1/keys", token=r.ta.token).status_code == 200


def test_a_credential_rotated_on_one_replica_is_used_by_the_others_proxy_within_one_second(replicas, fake_stripe):
    r = replicas
    key = r.ta.issue_key(allowed_endpoints=["GET /v1/customers"], daily_usd_cap=5)
    assert r.ea.proxy("GET", CUSTOMERS, key=key["token"]).status_code == 200
    rotated = "sk_test_" + "r0tated" * 5
    r.tb.put_credential("stripe", rotated)

    def uses_new_secret():
        resp = r.ea.proxy("GET", CUSTOMERS, key=key["token"])
        return resp.status_code == 200 and fake_stripe.received()[-1].authorization == f"Bearer {rotated}"

    took = within_one_second(uses_new_secret, "a's proxy using the credential rotated through b")
    print(f"credential rotated through b used by a's proxy after {took * 1000:.0f} ms")
    assert r.ta.call("GET", "/v1/vendors/stripe/credential").json()["last4"] == rotated[-4:]


# --------------------------------------------------------------------------- one ledger


def test_400_concurrent_charges_through_both_replicas_stop_at_the_cap(replicas, fake_stripe):
    """400 concurrent $1 charges on one $100 key, half through each replica's proxy:
    exactly 100 succeed, the fake Stripe got exactly $100, and both replicas show $100
    spent and 400 audit events adding up to $100."""
    r = replicas
    key = r.ta.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
    n = 400
    barrier = threading.Barrier(n, timeout=120)
    nodes = (r.ea, r.eb)

    def fire(i):
        barrier.wait()
        try:
            resp = pay(nodes[i % 2], key["token"])
            return resp.status_code, error_code(resp) if resp.status_code != 200 else None
        except requests.RequestException as e:
            return "error", repr(e)

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(fire, range(n)))
    ok = [x for x in results if x[0] == 200]
    others = [x for x in results if x[0] != 200 and x != (429, "cap_exhausted")]
    assert not others, others[:5]
    assert len(ok) == 100, f"{len(ok)} succeeded"
    got = accepted(fake_stripe)
    assert len(got) == 100 and sum(int(dict(x.form)["amount"]) for x in got) == 100 * 100
    for t in (r.ta, r.tb):
        t.wait_spent(key["id"], Decimal(100), timeout=20)

    def audited():
        events = r.tb.audit_all(key_id=key["id"])
        return events if len(events) == n else None

    events = wait_until(audited, timeout=10) or r.tb.audit_all(key_id=key["id"])
    assert len(events) == n, f"{len(events)} audit events for {n} requests"
    assert sum(Decimal(str(e["spend_usd"])) for e in events) == Decimal(100)


TIGHT_CAP = 150


def test_kill_9_of_one_replica_mid_burst_grants_nothing_twice(replicas, fake_stripe):
    """Payments through both proxies on a tight key ($150 cap, $1 each) and a roomy one
    ($2 each); replica a is killed with -9 a second in. b and its proxy keep serving; the
    tight key is never charged past its cap; once a is back and the dead leases' lifetime
    has passed, each key's settled spend = its audit trail = what Stripe accepted = the
    200s answered, and the tight key's rest can be spent to exactly its cap, no further."""
    r = replicas
    tight = r.ta.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=TIGHT_CAP)
    roomy = r.ta.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10_000)
    stop = threading.Event()
    killed_at = [None]
    lock = threading.Lock()
    ok = {tight["id"]: 0, roomy["id"]: 0}
    ok_on_b_after_kill = [0]
    cents = {tight["id"]: 100, roomy["id"]: 200}

    def worker(e, key):
        for _ in range(400):
            if stop.is_set():
                return
            try:
                resp = pay(e, key["token"], amount=cents[key["id"]])
            except requests.RequestException:
                continue
            if resp.status_code == 200:
                with lock:
                    ok[key["id"]] += 1
                    if e is r.eb and killed_at[0] is not None:
                        ok_on_b_after_kill[0] += 1

    threads = [threading.Thread(target=worker, args=(e, k), daemon=True)
               for e in (r.ea, r.eb) for k in (tight, roomy, roomy)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    r.a.kill9()
    killed_at[0] = time.monotonic()
    # b answers its control API and its proxy keeps taking payments.
    assert r.tb.get_key(roomy["id"])["status"] == "active"
    ready = r.b.control("GET", "/readyz")
    assert ready.status_code == 200
    # `control` runs no proxy: its readiness names no proxy listener.
    assert ready.json() == {"status": "ready", "storage": True, "audit": True, "signing_keys": True}
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert ok_on_b_after_kill[0] > 0, "b's proxy took no payment after a was killed"

    # The two keys pay different amounts, so Stripe's record tells them apart.
    stripe = [int(dict(x.form)["amount"]) for x in accepted(fake_stripe)]
    assert stripe.count(100) == ok[tight["id"]] and stripe.count(200) == ok[roomy["id"]], (stripe, ok)
    assert len(stripe) == ok[tight["id"]] + ok[roomy["id"]], "Stripe charged calls that were not answered 200"
    assert ok[tight["id"]] <= TIGHT_CAP, f"the ${TIGHT_CAP} key was charged ${ok[tight['id']]}"
    print(f"before and during the kill: {ok[tight['id']]} x $1 on the tight key, "
          f"{ok[roomy['id']]} x $2 on the roomy one, {ok_on_b_after_kill[0]} through b after the kill")

    # a comes back (its proxy flushes audit events and reports to it); the dead process's
    # leases expire after their lifetime (6 s) and are settled from the audit trail.
    r.a.start()
    for key in (tight, roomy):
        spent = Decimal(ok[key["id"]] * cents[key["id"]]) / 100
        r.tb.wait_spent(key["id"], spent, timeout=30)
        r.ta.wait_spent(key["id"], spent, timeout=10)

        def audited(key=key, spent=spent):
            events = [e for e in r.tb.audit_all(key_id=key["id"]) if e["decision"] == "allowed"]
            return events if sum(Decimal(str(e["spend_usd"])) for e in events) == spent else None

        assert wait_until(audited, timeout=10), f"audit of {key['id']} does not add up to ${spent}"
    # What the dead replica had granted came back: the tight key spends up to its cap.
    for e in (r.ea, r.eb):
        for _ in range(TIGHT_CAP):
            if pay(e, tight["token"]).status_code != 200:
                break
    assert_denied(pay(r.eb, tight["token"]), 429, "cap_exhausted")
    r.tb.wait_spent(tight["id"], Decimal(TIGHT_CAP), timeout=30)
    assert [int(dict(x.form)["amount"]) for x in accepted(fake_stripe)].count(100) == TIGHT_CAP


# --------------------------------------------------------------------------- PostgreSQL trouble


@pytest.fixture
def own_cluster():
    """A cluster of the test's own, for tests that stop PostgreSQL (the session's cluster
    must stay up for the others)."""
    cluster = Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.destroy()


def test_a_node_audit_batch_sent_again_to_either_replica_is_recorded_once(replicas):
    """A node whose answer was lost sends the same numbered batch again, maybe to the
    other replica: GET /v1/audit shows its events once. The session's next batch is
    recorded; an older number arriving late is not."""
    r = replicas
    token = r.a.create_node("auditor")["node_token"]
    time.sleep(1.0)  # b knows the node from the shared database within 1 s
    key = r.ta.issue_key(allowed_endpoints=["POST /v1/customers"], daily_usd_cap=5)

    def event(n: int) -> dict:
        return {"ts_ms": int(time.time() * 1000), "tenant_id": r.ta.id, "key_id": key["id"],
                "label": None, "vendor": "stripe", "method": "POST", "path": CUSTOMERS,
                "status": 200, "decision": "allowed", "spend": 0,
                "vendor_request_id": f"req_batch_{n}", "duration_ms": 1, "llm": None}

    def send(replica, batch: int, ns: range) -> None:
        resp = replica.control("POST", "/v1/sync/audit", token=token,
                               headers={"keybrake-node-session": "s_resend"},
                               json={"batch": batch, "events": [event(n) for n in ns]})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"recorded": len(ns)}

    send(r.a, 1, range(0, 3))
    send(r.b, 1, range(0, 3))   # the answer was lost: sent again, to the other replica
    send(r.a, 1, range(0, 3))
    send(r.b, 2, range(3, 5))
    send(r.a, 1, range(0, 3))   # late, after batch 2

    def ids():
        return sorted(e["vendor_request_id"] for e in r.tb.audit_all(key_id=key["id"]))

    want = [f"req_batch_{n}" for n in range(5)]
    assert wait_until(lambda: ids() == want, timeout=2.0), ids()
    assert sorted(e["vendor_request_id"] for e in r.ta.audit_all(key_id=key["id"])) == want


def one_replica_and_node(tmp_path, fake_stripe, own_cluster, database: str, lifetime: int):
    """A control replica on a new database of `own_cluster` and one edge node (staleness
    60 s), both started; `lifetime`: the lease lifetime in seconds."""
    url = own_cluster.create_database(database)
    config = write_config(tmp_path / "conf", leases={"lifetime_seconds": lifetime})
    a = PgControlPlane(tmp_path / "a", {"stripe": fake_stripe.url}, url, own_cluster, config=config)
    a.start()
    try:
        e = EdgeProxy(tmp_path / "ea", a, a.create_node("ea")["node_token"], {"stripe": fake_stripe.url},
                      config=config, extra_args=["--max-staleness", "60"]).start()
    except BaseException:
        a.proc.kill()
        raise
    return a, e


def tenant_paying(a: PgControlPlane, e: EdgeProxy, stripe_secret: str):
    """A tenant with a $50 key that has paid once through `e` (so the node holds a lease)."""
    t = a.create_tenant("acme")
    t.put_credential("stripe", stripe_secret)
    key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=50)
    assert pay(e, key["token"]).status_code == 200
    return t, key


def test_postgres_lost_while_running_then_back(tmp_path, fake_stripe, stripe_secret, own_cluster):
    """PostgreSQL stopped: the control API answers 503 storage_unavailable, /readyz 503,
    the proxy keeps serving on its lease; PostgreSQL back: the replica recovers by
    itself, and spend = audit = Stripe."""
    a, e = one_replica_and_node(tmp_path, fake_stripe, own_cluster, "outage", lifetime=30)
    try:
        t, key = tenant_paying(a, e, stripe_secret)

        own_cluster.stop()
        served = pay(e, key["token"])
        assert served.status_code == 200, f"the proxy stopped serving on its lease: {served.text[:300]}"
        unavailable = wait_until(lambda: t.call("GET", "/v1/keys").status_code == 503, timeout=10)
        assert unavailable, "the control API still answers without its database"
        assert_control_error(t.call("GET", "/v1/keys"), 503, "storage_unavailable")
        assert_control_error(t.call("POST", "/v1/keys", json={"label": "x", "vendor": "stripe",
                             "allowed_endpoints": ["/v1/**"], "daily_usd_cap": 1}), 503, "storage_unavailable")
        assert a.control("GET", "/readyz").status_code == 503
        assert a.control("GET", "/healthz").status_code == 200, "the process itself is alive"

        own_cluster.start_again()
        back = wait_until(lambda: a.control("GET", "/readyz").status_code == 200, timeout=15, interval=0.2)
        assert back, f"the replica did not recover by itself:\n{a.logs()[-3000:]}"
        assert t.call("GET", "/v1/keys").status_code == 200
        assert t.issue_key(daily_usd_cap=1)["id"]
        total = len(accepted(fake_stripe))
        assert total == 2
        t.wait_spent(key["id"], Decimal(total), timeout=30)
        def allowed():
            return [x for x in t.audit_all(key_id=key["id"]) if x["decision"] == "allowed"]

        # The node sends the outage's events again until the control plane takes them.
        assert wait_until(lambda: len(allowed()) == total, timeout=15), allowed()
        assert a.proc.poll() is None
    finally:
        for p in (e, a):
            if p is not None and p.proc and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)


def test_a_database_outage_longer_than_the_lease_lifetime_does_not_restart_the_fleet(
        tmp_path, fake_stripe, stripe_secret, own_cluster):
    """No node can poll while PostgreSQL is down, so each one's life runs out. When it is
    back, the control plane gives the nodes a lease lifetime to poll again before it takes
    any for dead: the node keeps running (no exit 75, no restart of the whole fleet at
    once) and pays again with the same session."""
    a, e = one_replica_and_node(tmp_path, fake_stripe, own_cluster, "long_outage", lifetime=3)
    try:
        t, key = tenant_paying(a, e, stripe_secret)

        own_cluster.stop()
        started = time.monotonic()
        ready = a.control("GET", "/readyz")
        assert ready.status_code == 503 and time.monotonic() - started < 2.5, ready.text
        time.sleep(7)  # beyond the lifetime (3 s) and its reclaim margin
        own_cluster.start_again()
        assert wait_until(lambda: pay(e, key["token"]).status_code == 200, timeout=15, interval=0.3), \
            e.logs()[-2000:]
        time.sleep(6)  # two lifetimes: a reclaim would have happened by now
        assert e.proc.poll() is None, f"the node stopped:\n{e.logs()[-2000:]}"
        # A control plane on PostgreSQL keeps nothing on disk: no data dir is made.
        assert not any(p.name == "data" for p in (tmp_path / "a").rglob("data")), list((tmp_path / "a").iterdir())
        assert "took this node for dead" not in e.logs()
        assert pay(e, key["token"]).status_code == 200
    finally:
        for p in (e, a):
            if p is not None and p.proc and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)


def keybrake_error_lines(kb) -> list[str]:
    return [line for line in kb.logs().splitlines() if line.startswith("keybrake:")]


def test_an_unreachable_database_at_start_is_one_line_and_a_non_zero_exit(tmp_path, fake_stripe):
    from harness import free_port

    password = "pw_" + "s3cret" * 4
    url = f"postgres://keybrake:{password}@127.0.0.1:{free_port()}/nowhere"
    a = PgControlPlane(tmp_path / "a", {"stripe": fake_stripe.url}, url)
    with pytest.raises(AssertionError):
        a.start()
    try:
        assert a.proc.wait(timeout=60) != 0
        lines = keybrake_error_lines(a)
        assert len(lines) == 1, a.logs()[-3000:]
        assert "database" in lines[0].lower() or "postgres" in lines[0].lower(), lines[0]
        assert password not in a.logs(), "the database password appeared in the log"
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait(timeout=10)


def test_a_database_from_a_newer_binary_is_refused_at_start(tmp_path, fake_stripe, pg_cluster, pg_database):
    a = PgControlPlane(tmp_path / "a", {"stripe": fake_stripe.url}, pg_database, pg_cluster)
    try:
        a.start()
        a.create_tenant("kept")
        assert a.stop() == 0
        mark_schema_newer(pg_cluster, pg_database)
        with pytest.raises(AssertionError):
            a.start()
        assert a.proc.wait(timeout=30) != 0
        lines = keybrake_error_lines(a)
        assert lines and "newer" in lines[-1], a.logs()[-3000:]
        # Refused untouched: the version a newer binary wrote is still there.
        from pg import database_name

        assert int(pg_cluster.psql("SELECT max(version) FROM keybrake_schema", database_name(pg_database))) > 1000
    finally:
        if a.proc and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait(timeout=10)


def mark_schema_newer(cluster: Cluster, url: str) -> None:
    """Records a schema version past this binary's, as a newer keybrake would."""
    from pg import database_name

    cluster.psql("UPDATE keybrake_schema SET version = version + 1000", database_name(url))
