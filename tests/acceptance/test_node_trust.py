"""A node's word on the sync channel is checked, not taken (SPEC §5: the control plane is
the ledger). Raw sync calls with a valid node token, as a compromised or buggy node would
send them: the cap comes from the key row, not the request; another tenant's, an unknown,
an expired or a revoked key, a far day, and a session that never said hello are granted
nothing; negative or huge amounts are refused (the call with 400, a lease request alone)
and never reach the ledger; a
numbered report batch sent again (its answer lost) is applied once; an audit event is
filed under its key's tenant, not the one the node names; a late copy of a reclaimed
session's hello does not bring it back."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime
from decimal import Decimal

import pytest

from fleet import ControlPlane
from harness import wait_until, write_config

MAX_USD_MICROS = 1_000_000_000 * 1_000_000


@pytest.fixture
def node_channel(tmp_path, fake_stripe, stripe_secret):
    """A control plane, two tenants with a Stripe credential, and a sync call helper for
    one node session that said hello."""
    control = ControlPlane(tmp_path / "control", {"stripe": fake_stripe.url},
                           config=write_config(tmp_path / "conf", leases={"lifetime_seconds": 30}))
    control.start()
    try:
        tenants = []
        for name in ("acme", "other"):
            t = control.create_tenant(name)
            t.put_credential("stripe", stripe_secret)
            tenants.append(t)
        token = control.create_node("suspect")["node_token"]

        def sync(path: str, body: dict | None = None, session: str = "s_suspect"):
            return control.control("POST", f"/v1/sync/{path}", token=token,
                                   headers={"keybrake-node-session": session}, json=body or {})

        assert sync("hello").status_code == 200
        yield control, tenants, sync
    finally:
        control.stop()


def today() -> int:
    return int(time.time()) // 86_400


def lease(key: dict, tenant_id: str, cap: int, want: int, day: int | None = None) -> dict:
    return {"key_id": key["id"], "tenant_id": tenant_id, "day": today() if day is None else day,
            "cap": cap, "min": 1, "want": want}


def granted(resp) -> list[int]:
    assert resp.status_code == 200, resp.text
    return [g.get("granted", 0) for g in resp.json()["grants"]]


def test_a_node_cannot_raise_a_keys_cap(node_channel):
    control, (acme, _), sync = node_channel
    key = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    # The node claims a $500 cap and wants $400: it gets at most the key's $10.
    assert granted(sync("leases", {"requests": [lease(key, acme.id, 500_000_000, 400_000_000)]})) == [10_000_000]
    assert granted(sync("leases", {"requests": [lease(key, acme.id, 500_000_000, 1)]})) == [0]
    assert Decimal(str(acme.get_key(key["id"])["spent_today_usd"])) <= 10


def test_keys_a_node_may_not_spend_are_granted_nothing(node_channel):
    control, (acme, other), sync = node_channel
    key = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    short = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10,
                           expires_in="1s")
    revoked = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    assert acme.revoke(revoked["id"]).status_code == 200
    time.sleep(2.1)  # `short` has expired
    asks = [
        lease(key, other.id, 10_000_000, 5_000_000),              # another tenant's key
        lease({"id": "key_doesnotexist"}, acme.id, 10_000_000, 5_000_000),
        lease(short, acme.id, 10_000_000, 5_000_000),              # expired
        lease(revoked, acme.id, 10_000_000, 5_000_000),            # revoked
        lease(key, acme.id, 10_000_000, 5_000_000, day=2**62),    # a far day
        lease(key, acme.id, 10_000_000, 5_000_000, day=today() + 5),
    ]
    assert granted(sync("leases", {"requests": asks})) == [0] * len(asks)
    # A session that never said hello holds nothing either: its lease could never be
    # given back.
    assert granted(sync("leases", {"requests": [lease(key, acme.id, 10_000_000, 5_000_000)]},
                        session="s_never_said_hello")) == [0]
    # The same request, honest, from the session that said hello: granted.
    assert granted(sync("leases", {"requests": [lease(key, acme.id, 10_000_000, 5_000_000)]})) == [5_000_000]
    assert acme.get_key(key["id"])["spent_today_usd"] == 5


@pytest.mark.parametrize("field,value", [
    ("spent", -7_000_000), ("overspent", -100_000_000), ("returned", -1), ("unreserved", -1),
    ("overspent", 2**63 - 1), ("spent", MAX_USD_MICROS + 1),
])
def test_reports_with_negative_or_huge_amounts_are_refused(node_channel, field, value):
    control, (acme, _), sync = node_channel
    key = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    assert granted(sync("leases", {"requests": [lease(key, acme.id, 10_000_000, 2_000_000)]})) == [2_000_000]
    report = {"key_id": key["id"], "day": today(), "spent": 0, "returned": 0, "overspent": 0,
              field: value}
    resp = sync("reports", {"reports": [report]})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_request"
    # Nothing reached the ledger: the key still shows the $2 lease, and its listing reads.
    assert acme.get_key(key["id"])["spent_today_usd"] == 2
    assert any(k["id"] == key["id"] for k in acme.call("GET", "/v1/keys").json()["data"])
    # Lease amounts are held to the same range, request by request: a lease batch carries
    # many tenants' keys, and one key's figure (a huge charge's commit) must not refuse
    # the others'.
    for bad in ({"want": -5}, {"commit": MAX_USD_MICROS + 1}, {"cap": -1}):
        resp = sync("leases", {"requests": [dict(lease(key, acme.id, 10_000_000, 1), **bad),
                                            lease(key, acme.id, 10_000_000, 1_000_000)]})
        assert resp.status_code == 200, resp.text
        bad_grant, good_grant = resp.json()["grants"]
        assert "micro-USD" in bad_grant["error"] and "granted" not in bad_grant
        assert good_grant["granted"] == 1_000_000
    assert acme.get_key(key["id"])["spent_today_usd"] == 5
    bad_commit = {"key_id": key["id"], "day": today(), "amount": -1}
    assert sync("commits", {"commits": [bad_commit]}).status_code == 400


def test_a_report_batch_sent_again_is_applied_once(node_channel):
    """A node that lost the answer to a spend report (the control plane committed it,
    then the connection dropped) sends the same batch again, same number: it is answered
    200 and settles nothing more. A lower number is ignored too, a higher one applies; an
    unnumbered report (a node older than the numbering) applies each time."""
    control, (acme, _), sync = node_channel
    key = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    assert granted(sync("leases", {"requests": [lease(key, acme.id, 10_000_000, 4_000_000)]})) == [4_000_000]

    def spend() -> tuple[Decimal, Decimal]:
        k = acme.get_key(key["id"])
        return Decimal(str(k["spent_today_usd"])), Decimal(str(k["held_usd"]))

    def report(spent: float, overspent: float, batch: int | None) -> None:
        row = {"key_id": key["id"], "day": today(), "spent": int(spent * 1e6), "returned": 0,
               "overspent": int(overspent * 1e6)}
        body = {"reports": [row]} if batch is None else {"batch": batch, "reports": [row]}
        resp = sync("reports", body)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"ok": True}

    assert spend() == (4, 4)
    # $1.50 spent of the $4 lease and $0.50 beyond it: settled $2, held $2.50.
    report(1.5, 0.5, batch=1)
    assert spend() == (Decimal("4.5"), Decimal("2.5"))
    # The same batch again, twice: answered as the first time, nothing settled again
    # (applied twice it would read $5 spent, $1 held).
    report(1.5, 0.5, batch=1)
    report(1.5, 0.5, batch=1)
    assert spend() == (Decimal("4.5"), Decimal("2.5"))
    # The next batch applies; an older number (whatever it carries) does not.
    report(1, 0, batch=2)
    report(2, 2, batch=1)
    assert spend() == (Decimal("4.5"), Decimal("1.5"))
    # Without a number, a report applies every time it arrives.
    report(0, 0.25, batch=None)
    report(0, 0.25, batch=None)
    assert spend() == (Decimal("5"), Decimal("1.5"))


def test_reports_about_unknown_keys_or_far_days_settle_nothing_and_add_no_rows(node_channel):
    """A node token could otherwise fill the ledger with rows about keys that do not exist
    (1000 a call), or settle spend on days no lease is granted for."""
    control, (acme, _), sync = node_channel
    key = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    assert granted(sync("leases", {"requests": [lease(key, acme.id, 10_000_000, 2_000_000)]})) == [2_000_000]

    def row(key_id: str, day: int, spent: int) -> dict:
        return {"key_id": key_id, "day": day, "spent": spent, "returned": 0, "overspent": 0}

    junk = [row(f"key_doesnotexist{i}", today(), 1_000_000) for i in range(50)]
    junk += [row(key["id"], today() + 5, 1_000_000), row(key["id"], today() - 30, 1_000_000),
             row(key["id"], -5, 1_000_000)]
    resp = sync("reports", {"batch": 1, "reports": junk + [row(key["id"], today(), 1_000_000)]})
    assert resp.status_code == 200, resp.text
    # Only the row about the key's lease today settled: $1 of the $2 lease spent.
    k = acme.get_key(key["id"])
    assert (k["spent_today_usd"], k["held_usd"]) == (2, 1)
    with sqlite3.connect(f"file:{control.data_dir / 'keybrake.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT key_id, day FROM ledger").fetchall()
    assert rows == [(key["id"], today())], rows


def test_a_nodes_audit_events_are_filed_under_the_keys_tenant(node_channel):
    """A node that names the wrong tenant for a key's audit event cannot put it into that
    tenant's trail: an event is filed under the tenant that owns the key, and an event
    for a key that does not exist under none."""
    control, (acme, other), sync = node_channel
    key = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)

    def event(key_id: str, tenant_id: str, path: str) -> dict:
        return {"ts_ms": int(time.time() * 1000), "tenant_id": tenant_id, "key_id": key_id,
                "label": "forged", "vendor": "stripe", "method": "POST", "path": path,
                "status": 200, "decision": "allowed", "spend": 1_000_000,
                "vendor_request_id": None, "duration_ms": 3, "llm": None}

    resp = sync("audit", {"batch": 1, "events": [
        event(key["id"], other.id, "/stripe/v1/named_other"),
        event("key_doesnotexist", other.id, "/stripe/v1/unknown_key"),
    ]})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"recorded": 2}
    # The event of acme's key is acme's, whatever the node said; `other` sees neither.
    assert [e["path"] for e in acme.audit(key_id=key["id"])] == ["/stripe/v1/named_other"]
    assert other.audit() == []
    assert other.audit(key_id=key["id"]) == []
    assert other.audit(key_id="key_doesnotexist") == []


def test_a_nodes_audit_event_is_bounded_and_cannot_forge_lines_or_dates(node_channel):
    """An event a node sends is held to what a proxy's own events are: the label is the
    key's, texts are cut to their bounds with control characters replaced (a trail read
    in a terminal shows no escape sequence and no made-up second line), a date in the
    future is now, a negative spend none."""
    control, (acme, _), sync = node_channel
    key = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10,
                         label="real-label")
    now_ms = int(time.time() * 1000)
    forged = {"ts_ms": 4_102_444_800_000, "tenant_id": acme.id, "key_id": key["id"],
              "label": "forged\u001b[2J", "vendor": "stripe", "method": "POST",
              "path": "/stripe/v1/charges\n2026-12-04 POST /v1/refunds 200 allowed $0",
              "status": 200, "decision": "allowed\u2028", "spend": -5_000_000,
              "vendor_request_id": "req_" + "\u001b" * 5000, "duration_ms": 3, "llm": None}
    resp = sync("audit", {"batch": 1, "events": [forged]})
    assert resp.status_code == 200, resp.text
    [event] = acme.audit(key_id=key["id"])
    assert event["label"] == "real-label"
    assert "\n" not in event["path"] and event["path"].startswith("/stripe/v1/charges")
    assert not any(ord(c) < 0x20 or c in "\u2028\u2029" for c in event["path"] + event["decision"])
    assert len(event["vendor_request_id"].encode()) <= 256
    assert "\u001b" not in event["vendor_request_id"]
    assert event["spend_usd"] == 0
    shown = int(datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp() * 1000)
    assert now_ms - 1000 <= shown <= now_ms + 61_000, event["ts"]


def test_hello_again_and_malformed_bodies_get_clear_answers(node_channel):
    """A hello sent again on a live session (its answer was lost) is answered 200, not a
    500; a malformed or misshapen sync body is 400 with the spec's codes and a message
    that says what is wrong."""
    control, (acme, _), sync = node_channel
    assert sync("hello").status_code == 200
    key = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
    assert granted(sync("leases", {"requests": [lease(key, acme.id, 10_000_000, 1_000_000)]})) == [1_000_000]
    resp = control.control("POST", "/v1/sync/reports", token=None, data=b"{")
    assert resp.status_code == 401
    token_headers = {"keybrake-node-session": "s_suspect"}
    node_token = control.create_node("second")["node_token"]
    for body, code in ((b"{\"reports\": [", "invalid_json"), (b"[]", "invalid_request"),
                       (b"{\"reports\": [], \"reports\": []}", "invalid_json"),
                       (b"{\"reports\": [{\"key_id\": 1}]}", "invalid_request")):
        resp = control.control("POST", "/v1/sync/reports", token=node_token, data=body,
                               headers=dict(token_headers, **{"content-type": "application/json"}))
        assert resp.status_code == 400, (body, resp.text)
        err = resp.json()["error"]
        assert err["code"] == code, (body, err)
        assert "path, query or headers" not in err["message"], err


def test_the_control_plane_serves_its_metrics(node_channel):
    """`keybrake control --metrics-listen` serves /metrics (it took the flag and bound
    nothing): the control plane's own counters, for the operator's Prometheus."""
    import requests

    control, (acme, _), sync = node_channel
    acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=1)
    text = requests.get(f"{control.metrics_url}/metrics", timeout=5).text
    issued = [line for line in text.splitlines() if line.startswith("keybrake_keys_issued_total")]
    assert issued and float(issued[0].split()[-1]) >= 1, text[:2000]
    # Proxy metrics belong to the nodes: a control plane does not list them, always empty.
    for proxy_only in ("keybrake_requests_total", "keybrake_overhead_seconds",
                       "keybrake_spend_usd_total", "keybrake_token_cache_hits_total"):
        assert proxy_only not in text, proxy_only


def test_a_late_copy_of_a_reclaimed_sessions_hello_does_not_bring_its_leases_back(
        tmp_path, fake_stripe, stripe_secret):
    """A node session leases $5 of a $10 key and goes silent; after the lease lifetime the
    control plane gives the $5 back. A copy of that session's hello arriving only now (a
    request held up on its way) registers nothing: the session's next poll is told its
    leases lapsed, and it is granted nothing more."""
    control = ControlPlane(tmp_path / "control", {"stripe": fake_stripe.url},
                           config=write_config(tmp_path / "conf", leases={"lifetime_seconds": 5}))
    control.start()
    try:
        tenant = control.create_tenant("acme")
        tenant.put_credential("stripe", stripe_secret)
        token = control.create_node("late")["node_token"]
        headers = {"keybrake-node-session": "s_late_copy"}

        def sync(path: str, body: dict | None = None):
            return control.control("POST", f"/v1/sync/{path}", token=token, headers=headers,
                                   json=body or {})

        def poll() -> dict:
            r = control.control("GET", "/v1/sync/snapshot", token=token, headers=headers,
                                params={"since": 0, "wait_ms": 0})
            assert r.status_code == 200, r.text
            return r.json()

        key = tenant.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=10)
        assert sync("hello").status_code == 200
        assert granted(sync("leases", {"requests": [lease(key, tenant.id, 10_000_000, 5_000_000)]})) \
            == [5_000_000]
        assert poll()["leases_lapsed"] is False
        assert Decimal(str(tenant.get_key(key["id"])["held_usd"])) == 5
        assert wait_until(lambda: "a process that stopped" in control.logs(), timeout=30, interval=0.2), \
            control.logs()[-3000:]
        assert Decimal(str(tenant.get_key(key["id"])["held_usd"])) == 0
        # The late hello, then the session carries on as if alive.
        assert sync("hello").status_code == 200
        assert poll()["leases_lapsed"] is True
        r = sync("leases", {"requests": [lease(key, tenant.id, 10_000_000, 5_000_000)]})
        assert granted(r) == [0], r.text
        assert Decimal(str(tenant.get_key(key["id"])["held_usd"])) == 0
        # A new session of the same node is a new holder, granted as usual.
        headers["keybrake-node-session"] = "s_after_copy"
        assert sync("hello").status_code == 200
        assert granted(sync("leases", {"requests": [lease(key, tenant.id, 10_000_000, 5_000_000)]})) \
            == [5_000_000]
    finally:
        control.stop()
