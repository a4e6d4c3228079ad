"""`keybrake migrate --from sqlite:DIR --to postgres://…` (SPEC §1): a team that outgrows
one host moves its data to PostgreSQL and keeps its tenants, API tokens, credentials,
keys, spend and audit trail.

A `keybrake serve` on SQLite takes tenants, keys, payments, a revocation and a refused
call; migrate is refused while it runs; once it is stopped the data dir is copied into a
fresh database of the suite's throwaway cluster (pg.py); then `keybrake control
--database-url` on that database, with the same master key, shows the same keys (status,
spend) and the same audit trail, and an edge proxy synced from it lets the old key pay
and refuses the revoked one. New keys and events sort after the copied ones (the
sequences continued), and a second migrate into the now non-empty database is refused.
"""

from __future__ import annotations

import secrets
import subprocess
from decimal import Decimal

from fleet import PgDeployment, accepted, pay
from harness import KEYBRAKE_BIN, Keybrake, free_port, Tenant, assert_denied, wait_until, write_config

# The serve's lease holder is taken for gone this long after it stops beating (migrate
# refuses a data dir whose holder is still alive).
LEASE_LIFETIME_S = 3


def migrate(data_dir, url) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "RUST_BACKTRACE": "1"}
    return subprocess.run(
        [str(KEYBRAKE_BIN), "migrate", "--from", f"sqlite:{data_dir}", "--to", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def counts(stdout: str) -> dict[str, int]:
    """The per-table counts migrate prints (`table  rows` lines)."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def keys_of(tenant: Tenant) -> list[dict]:
    r = tenant.call("GET", "/v1/keys", params={"limit": 100})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_a_serve_data_dir_moves_to_postgres_with_keys_spend_and_audit(tmp_path, fake_stripe, pg_cluster):
    config = write_config(tmp_path / "conf", leases={"lifetime_seconds": LEASE_LIFETIME_S})
    kb = Keybrake(tmp_path / "serve", {"stripe": fake_stripe.url}, config=config).start()
    pg = None
    try:
        acme = kb.create_tenant("acme")
        acme.put_credential("stripe", "sk_test_" + secrets.token_hex(20))
        globex = kb.create_tenant("globex")
        globex.put_credential("stripe", "sk_test_" + secrets.token_hex(20))
        spender = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100,
                                 expires_in="1h", label="spender")
        gone = acme.issue_key(allowed_endpoints=["POST /v1/payment_intents"], expires_in="1h", label="gone")
        globex_key = globex.issue_key(expires_in="1h", label="globex-key")
        for amount in (1500, 2500, 700):
            assert pay(kb, spender["token"], amount).status_code == 200
        assert acme.revoke(gone["id"]).status_code == 200
        assert_denied(pay(kb, gone["token"], 100), 401, "key_revoked")
        acme.wait_spent(spender["id"], Decimal(47))
        keys_before = {k["id"]: k for k in keys_of(acme)}
        audit_before = wait_until(lambda: (lambda a: a if len(a) == 4 else None)(acme.audit_all()),
                                  timeout=5) or acme.audit_all()
        globex_audit_before = globex.audit_all()
        assert len(audit_before) == 4, audit_before

        r = migrate(kb.data_dir, pg_cluster.create_database("migrate_busy"))
        assert r.returncode != 0, r.stdout
        assert "in use" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "panicked" not in r.stderr

        assert kb.stop() == 0
        url = pg_cluster.create_database("migrate_target")
        # At once: the stopped serve released the data dir's lock when it exited (its lease
        # holder, still dated alive, is copied and found dead later).
        result = migrate(kb.data_dir, url)
        assert result.returncode == 0, result.stderr
        copied = counts(result.stdout)
        assert copied["tenants"] == 2 and copied["api_tokens"] == 2, result.stdout
        assert copied["credentials"] == 2 and copied["keys"] == 3, result.stdout
        assert copied["signing_keys"] >= 1 and copied["ledger"] >= 1, result.stdout
        assert copied["audit"] == len(audit_before) + len(globex_audit_before), result.stdout

        again = migrate(kb.data_dir, url)
        assert again.returncode != 0 and "already holds 2 tenants" in again.stderr, again.stderr

        # The old data dir is the past: a start on it (a unit that lost its database URL)
        # is refused, saying so; `serve` and `control` alike.
        for role in ["serve", "control"]:
            cmd = [str(KEYBRAKE_BIN), role, "--data-dir", str(kb.data_dir),
                   "--control-listen", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{free_port()}"]
            if role == "serve":
                cmd += ["--proxy-listen", f"127.0.0.1:{free_port()}"]
            old = subprocess.run(cmd, env=kb.environment(), cwd=kb.workdir, capture_output=True, text=True,
                                 timeout=30)
            assert old.returncode == 1, (role, old.returncode, old.stderr[-2000:])
            assert "was copied to PostgreSQL by keybrake migrate" in old.stderr, old.stderr[-2000:]
            assert "--database-url" in old.stderr, old.stderr[-2000:]

        # The PostgreSQL control plane, same master key and admin token, and an edge proxy.
        pg = PgDeployment(tmp_path / "pg", {"stripe": fake_stripe.url}, url, pg_cluster, config=config,
                          admin_token=kb.admin_token, master_key=kb.master_key).start()
        acme_pg = Tenant(pg, acme.id, acme.token, acme.created)
        globex_pg = Tenant(pg, globex.id, globex.token, globex.created)

        keys_after = {k["id"]: k for k in keys_of(acme_pg)}
        assert keys_after.keys() == keys_before.keys()
        for key_id, before in keys_before.items():
            after = acme_pg.get_key(key_id)
            for field in ("label", "status", "spent_today_usd", "daily_usd_cap", "created_at", "expires_at",
                          "revoked_at", "allowed_endpoints"):
                assert after[field] == before[field], (key_id, field, before, after)
        assert acme_pg.get_key(gone["id"])["status"] == "revoked"
        assert acme_pg.audit_all() == audit_before
        assert globex_pg.audit_all() == globex_audit_before
        assert [k["id"] for k in keys_of(globex_pg)] == [globex_key["id"]]

        # The old key still pays through a proxy synced from the PostgreSQL control; the
        # revoked one stays refused; the vendor credential decrypts with the same key.
        before_paid = len(accepted(fake_stripe))
        assert pay(pg, spender["token"], 300).status_code == 200
        assert len(accepted(fake_stripe)) == before_paid + 1
        assert_denied(pay(pg, gone["token"], 100), 401, "key_revoked")
        acme_pg.wait_spent(spender["id"], Decimal(50))

        # New events and keys sort after the copied ones: the sequences continued.
        audit_now = wait_until(lambda: (lambda a: a if len(a) == len(audit_before) + 2 else None)(
            acme_pg.audit_all()), timeout=5) or acme_pg.audit_all()
        assert audit_now[2:] == audit_before, audit_now[:3]
        assert [(e["key_id"], e["decision"]) for e in audit_now[:2]] == [
            (gone["id"], "key_revoked"),
            (spender["id"], "allowed"),
        ]
        fresh = acme_pg.issue_key(label="after-migrate")
        assert keys_of(acme_pg)[0]["id"] == fresh["id"]
    finally:
        if pg is not None:
            pg.kill_all()
        if kb.proc and kb.proc.poll() is None:
            kb.proc.kill()
            kb.proc.wait(timeout=10)


def test_migrate_explains_a_wrong_source_or_target(tmp_path, pg_cluster):
    """A source that is not a data dir, and a target that is not PostgreSQL, are refused
    with one line each, before anything is written."""
    url = pg_cluster.create_database("migrate_wrong")
    r = migrate(tmp_path / "nothing-here", url)
    assert r.returncode != 0 and "no keybrake.db" in r.stderr, r.stderr
    r = subprocess.run([str(KEYBRAKE_BIN), "migrate", "--from", str(tmp_path), "--to", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "sqlite:DIR" in r.stderr, r.stderr
    r = subprocess.run([str(KEYBRAKE_BIN), "migrate", "--from", f"sqlite:{tmp_path}", "--to", "mysql://x@h/db"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "postgres" in r.stderr, r.stderr
