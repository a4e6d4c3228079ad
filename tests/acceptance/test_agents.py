"""Agents (the seed's flow, end to end): a new user runs the shipped examples in minutes.

Each example runs as a user would run it, as its own process, against a real
`keybrake serve` and localstripe:

- `examples/deno/charge.ts` — the seed's Deno Deploy handler, under `deno serve`
  (the npm `deno` package's binary, node_modules/.bin/deno, with DENO_DIR=.deno);
- `examples/deno/multi_tenant.ts` — the seed's multi-tenant variant;
- `examples/python/agent.py` — the Python `stripe` SDK through the proxy;
- `examples/node/stripe_fetch.mjs` — the `stripe` npm SDK through the proxy via a
  custom fetch HTTP client.

Nothing is skipped: a missing deno/node/npm package fails with the command to run.
Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Optional

import pytest
import requests
import stripe

from harness import (
    HTTP_TIMEOUT_S,
    REPO,
    FakeStripe,
    Keybrake,
    Tenant,
    as_json,
    assert_denied,
    free_port,
    parse_ts,
    stripe_client,
)

EXAMPLES = REPO / "examples"
CHARGE_TS = EXAMPLES / "deno" / "charge.ts"
MULTI_TENANT_TS = EXAMPLES / "deno" / "multi_tenant.ts"
PY_AGENT = EXAMPLES / "python" / "agent.py"
NODE_AGENT = EXAMPLES / "node" / "stripe_fetch.mjs"
DENO = REPO / "node_modules" / ".bin" / "deno"
DENO_DIR = REPO / ".deno"
NODE_STRIPE = REPO / "node_modules" / "stripe" / "package.json"

SEED_ENDPOINTS = ["/v1/payment_intents", "/v1/payment_intents/*"]
CARD = {"card[number]": "4242424242424242", "card[exp_month]": "12", "card[exp_year]": "2034", "card[cvc]": "123"}
PI_PATH = "/v1/payment_intents"
EXAMPLE_TIMEOUT_S = 60
DENO_START_TIMEOUT_S = 30


# --------------------------------------------------------------------------- helpers


def require_deno() -> Path:
    if not DENO.exists():
        pytest.fail(f"{DENO} is missing: run `npm install` (or `.ci/deps test`) at the repo root")
    return DENO


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run `.ci/deps test` (installs nodejs and npm)")
    if not NODE_STRIPE.exists():
        pytest.fail("the stripe npm package is missing: run `npm install` (or `.ci/deps test`) at the repo root")
    return node


def base_env(**extra: str) -> dict[str, str]:
    """A small, explicit environment for example processes: no KEYBRAKE_* leaks in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "NO_COLOR": "1",
        "DENO_DIR": str(DENO_DIR),
        "DENO_NO_UPDATE_CHECK": "1",
    }
    env.update(extra)
    return env


def keybrake_env(kb: Keybrake, tenant_token: Optional[str] = None, **extra: str) -> dict[str, str]:
    env = base_env(KEYBRAKE_API_URL=kb.control_url, KEYBRAKE_PROXY_URL=kb.proxy_url, **extra)
    if tenant_token is not None:
        env["KEYBRAKE_TOKEN"] = tenant_token
    return env


def customer_with_card(fake: FakeStripe, secret: str) -> tuple[str, str]:
    """A Stripe customer with an attached card (set-up straight on the fake, not through
    Keybrake): the seed's `confirm: true` + automatic payment methods charges it."""
    direct = fake.direct(secret)
    pm = direct.post(f"{fake.url}/v1/payment_methods", data={"type": "card", **CARD}, timeout=10)
    assert pm.status_code == 200, pm.text
    cus = direct.post(f"{fake.url}/v1/customers", data={"payment_method": pm.json()["id"]}, timeout=10)
    assert cus.status_code == 200, cus.text
    return cus.json()["id"], pm.json()["id"]


def vendor_payment_posts(fake: FakeStripe) -> list:
    return fake.received_matching("POST", PI_PATH)


def assert_vendor_saw_only(fake: FakeStripe, secret: str, since: int = 0) -> None:
    received = fake.received()[since:]
    assert received, "the fake Stripe received nothing"
    for r in received:
        assert r.authorization == f"Bearer {secret}", (r.method, r.path, r.authorization)
        blob = json.dumps(r.headers) + r.body.decode("latin-1")
        assert "vk_" not in blob and "kb_" not in blob, f"an agent credential reached Stripe: {r.method} {r.path}"


def key_of(tenant: Tenant, key_id: Optional[str]) -> dict:
    assert key_id and key_id.startswith("key_"), f"no key id returned: {key_id!r}"
    return tenant.get_key(key_id)


def assert_revoked(tenant: Tenant, key_id: Optional[str]) -> dict:
    key = key_of(tenant, key_id)
    assert key["status"] == "revoked", f"the example did not revoke its key: {key}"
    assert key["revoked_at"], key
    return key


def last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "the example printed nothing on stdout"
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise AssertionError(f"last stdout line is not JSON: {lines[-1]!r}")


def run_example(cmd: list[str], env: dict[str, str]) -> tuple[int, dict, str]:
    p = subprocess.run(
        cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S
    )
    out = last_json_line(p.stdout) if p.stdout.strip() else {}
    assert out, f"{cmd[1:]} exited {p.returncode} with no JSON on stdout; stderr:\n{p.stderr[-3000:]}"
    return p.returncode, out, p.stderr


class DenoServe:
    """`deno serve` of one example file, with the minimal permissions it needs."""

    def __init__(self, workdir: Path, entry: Path, env: dict[str, str], env_names: list[str],
                 extra_flags: Optional[list[str]] = None):
        self.workdir = workdir
        self.entry = entry
        self.env = env
        self.env_names = env_names
        self.extra_flags = list(extra_flags or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log = workdir / f"deno-{entry.stem}-{self.port}.log"

    def command(self) -> list[str]:
        return [
            str(require_deno()),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--allow-net=127.0.0.1",
            "--allow-env=" + ",".join(self.env_names),
            *self.extra_flags,
            str(self.entry.relative_to(REPO)),
        ]

    def start(self) -> "DenoServe":
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.command(), env=self.env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + DENO_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"deno serve exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"deno serve not listening within {DENO_START_TIMEOUT_S}s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def post(self, body: dict, headers: Optional[dict] = None) -> requests.Response:
        return requests.post(self.url, json=body, headers=headers or {}, timeout=HTTP_TIMEOUT_S)


CHARGE_ENV_NAMES = ["KEYBRAKE_API_URL", "KEYBRAKE_PROXY_URL", "KEYBRAKE_TOKEN", "DAILY_USD_CAP"]
MULTI_ENV_NAMES = ["KEYBRAKE_API_URL", "KEYBRAKE_PROXY_URL", "KEYBRAKE_TENANTS", "DAILY_USD_CAP"]


@pytest.fixture
def deno_factory(tmp_path):
    started: list[DenoServe] = []

    def make(entry: Path, env: dict[str, str], env_names: list[str], extra_flags=None) -> DenoServe:
        server = DenoServe(tmp_path / "deno", entry, env, env_names, extra_flags)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def customer(fake_stripe, stripe_secret, tenant) -> tuple[str, str]:
    return customer_with_card(fake_stripe, stripe_secret)


@pytest.fixture
def charge_ts(deno_factory, keybrake, tenant):
    """The seed's handler under `deno serve`, with the tenant's token in its env."""
    return deno_factory(CHARGE_TS, keybrake_env(keybrake, tenant.token), CHARGE_ENV_NAMES)


# --------------------------------------------------------------------------- Deno: the seed's handler


def test_deno_examples_type_check_without_downloading_anything(tmp_path):
    """`deno check` passes on both Deno examples, from an empty DENO_DIR, and leaves no
    downloaded remote module or npm package behind (they import nothing remote)."""
    deno_dir = tmp_path / "deno_dir"
    p = subprocess.run(
        [str(require_deno()), "check", str(CHARGE_TS), str(MULTI_TENANT_TS)],
        env=base_env(DENO_DIR=str(deno_dir)), cwd=REPO, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (deno_dir / "remote").exists(), list((deno_dir / "remote").rglob("*"))[:10]
    assert not any((deno_dir / "npm").rglob("*.tgz")) and not any((deno_dir / "npm").rglob("package.json"))
    for path in (CHARGE_TS, MULTI_TENANT_TS):
        imports = [l for l in path.read_text().splitlines() if l.lstrip().startswith(("import ", "export * from"))]
        assert imports == [], f"{path.name} imports {imports}"


def test_deno_handler_charges_the_customer_and_revokes_its_vault_key(
        charge_ts, keybrake, tenant, fake_stripe, stripe_secret, customer):
    """POST {customerId, amountCents} to the seed's handler: it issues a $500, 5-minute
    vault key scoped to PaymentIntents, charges the customer through the proxy (Stripe
    answers succeeded; it saw only the real secret), answers Stripe's JSON and status,
    and has revoked the key by the time it answers; $42 is on the key."""
    customer_id, _ = customer
    before = len(fake_stripe.received())
    r = charge_ts.post({"customerId": customer_id, "amountCents": 4200}, headers={"x-request-id": "req-42"})
    assert r.status_code == 200, f"{r.status_code} {r.text[:1000]}\n{charge_ts.logs()}"
    payment = as_json(r)
    assert payment["object"] == "payment_intent", payment
    assert payment["status"] == "succeeded" and payment["amount"] == 4200, payment
    assert payment["customer"] == customer_id and payment["currency"] == "usd"

    posts = vendor_payment_posts(fake_stripe)
    assert len(posts) == 1 and posts[0].status == 200
    form = posts[0].form
    assert ("automatic_payment_methods[enabled]", "true") in form and ("confirm", "true") in form, form
    assert payment == posts[0].response_json()
    assert_vendor_saw_only(fake_stripe, stripe_secret, since=before)

    key = assert_revoked(tenant, r.headers.get("x-keybrake-key-id"))
    assert key["label"] == "deno-charge-req-42"
    assert key["vendor"] == "stripe" and key["allowed_endpoints"] == SEED_ENDPOINTS
    assert key["daily_usd_cap"] == 500
    ttl = parse_ts(key["expires_at"]) - parse_ts(key["created_at"])
    assert 295 <= ttl <= 305, key
    tenant.wait_spent(key["id"], Decimal(42))


def test_deno_handler_answers_402_when_the_charge_exceeds_the_invocations_cap(
        deno_factory, keybrake, tenant, fake_stripe, customer):
    """With DAILY_USD_CAP=50, a $60 charge answers 402 {"error":"spend_cap_exceeded"}
    (Keybrake's 429 cap_exhausted, mapped by the handler) and never reaches Stripe; the
    key is revoked with nothing spent. Each invocation has its own key and cap: two $40
    charges in a row both succeed."""
    customer_id, _ = customer
    server = deno_factory(CHARGE_TS, keybrake_env(keybrake, tenant.token, DAILY_USD_CAP="50"), CHARGE_ENV_NAMES)

    r = server.post({"customerId": customer_id, "amountCents": 6000})
    assert r.status_code == 402, f"{r.status_code} {r.text[:1000]}\n{server.logs()}"
    assert r.json() == {"error": "spend_cap_exceeded"}
    assert vendor_payment_posts(fake_stripe) == [], "a capped payment reached Stripe"
    key = assert_revoked(tenant, r.headers.get("x-keybrake-key-id"))
    assert key["daily_usd_cap"] == 50
    tenant.wait_spent(key["id"], Decimal(0))

    ids = set()
    for _ in range(2):
        ok = server.post({"customerId": customer_id, "amountCents": 4000})
        assert ok.status_code == 200, ok.text[:1000]
        assert ok.json()["status"] == "succeeded"
        key = assert_revoked(tenant, ok.headers.get("x-keybrake-key-id"))
        tenant.wait_spent(key["id"], Decimal(40))
        ids.add(key["id"])
    assert len(ids) == 2 and len(vendor_payment_posts(fake_stripe)) == 2


def test_deno_handler_passes_stripe_errors_through_and_still_revokes(charge_ts, tenant, fake_stripe):
    """A customer Stripe does not know: the handler answers Stripe's own status and JSON
    error (as the seed does), the reservation is released and the key revoked."""
    r = charge_ts.post({"customerId": "cus_doesnotexist", "amountCents": 1500})
    posts = vendor_payment_posts(fake_stripe)
    assert len(posts) == 1 and posts[0].status == 404, [(p.status, p.response[:200]) for p in posts]
    assert r.status_code == 404, r.text[:1000]
    assert as_json(r) == posts[0].response_json()
    key = assert_revoked(tenant, r.headers.get("x-keybrake-key-id"))
    tenant.wait_spent(key["id"], Decimal(0))


def test_deno_handler_with_a_bad_keybrake_token_answers_500_key_issuance_failed(deno_factory, keybrake, fake_stripe):
    """A wrong KEYBRAKE_TOKEN: no key is issued, nothing reaches Stripe, the handler
    answers the seed's 500 {"error":"key_issuance_failed"}."""
    server = deno_factory(CHARGE_TS, keybrake_env(keybrake, "kb_" + "0" * 40), CHARGE_ENV_NAMES)
    r = server.post({"customerId": "cus_x", "amountCents": 100})
    assert r.status_code == 500 and r.json() == {"error": "key_issuance_failed"}, r.text
    assert fake_stripe.received() == []


# --------------------------------------------------------------------------- Deno: multi-tenant


def test_deno_multi_tenant_handler_uses_each_tenants_own_token_secret_and_cap(
        deno_factory, keybrake, fake_stripe, stripe_secret):
    """Two tenants with their own Stripe secrets and caps, their Keybrake tokens in the
    handler's tenant map: each charge runs under the right tenant (Stripe sees that
    tenant's secret), each tenant's cap applies to its own keys, every key is revoked
    and belongs to its tenant only; an unknown tenant is 404 and costs nothing."""
    acme = keybrake.create_tenant("acme")
    acme.put_credential("stripe", stripe_secret)
    globex_secret = "sk_test_globex_" + os.urandom(8).hex()
    globex = keybrake.create_tenant("globex")
    globex.put_credential("stripe", globex_secret)
    acme_customer, _ = customer_with_card(fake_stripe, stripe_secret)
    globex_customer, _ = customer_with_card(fake_stripe, globex_secret)
    tenants = {"acme": {"token": acme.token}, "globex": {"token": globex.token, "daily_usd_cap": 10}}
    server = deno_factory(
        MULTI_TENANT_TS, keybrake_env(keybrake, KEYBRAKE_TENANTS=json.dumps(tenants)), MULTI_ENV_NAMES
    )

    before = len(fake_stripe.received())
    r = server.post({"tenantId": "acme", "customerId": acme_customer, "amountCents": 2500})
    assert r.status_code == 200, f"{r.text[:1000]}\n{server.logs()}"
    assert r.json()["status"] == "succeeded"
    assert_vendor_saw_only(fake_stripe, stripe_secret, since=before)
    acme_key = assert_revoked(acme, r.headers.get("x-keybrake-key-id"))
    assert acme_key["label"].startswith("tenant-acme-run-") and acme_key["daily_usd_cap"] == 500
    acme.wait_spent(acme_key["id"], Decimal(25))
    assert globex.call("GET", f"/v1/keys/{acme_key['id']}").status_code == 404

    r = server.post({"tenantId": "globex", "customerId": globex_customer, "amountCents": 2000})
    assert r.status_code == 402 and r.json() == {"error": "spend_cap_exceeded"}, r.text[:1000]
    key = assert_revoked(globex, r.headers.get("x-keybrake-key-id"))
    assert key["daily_usd_cap"] == 10
    globex.wait_spent(key["id"], Decimal(0))

    before = len(fake_stripe.received())
    r = server.post({"tenantId": "globex", "customerId": globex_customer, "amountCents": 500})
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text[:1000]
    assert_vendor_saw_only(fake_stripe, globex_secret, since=before)
    globex.wait_spent(assert_revoked(globex, r.headers.get("x-keybrake-key-id"))["id"], Decimal(5))

    before = len(fake_stripe.received())
    r = server.post({"tenantId": "initech", "customerId": acme_customer, "amountCents": 100})
    assert r.status_code == 404 and r.json() == {"error": "unknown_tenant"}, r.text
    assert len(fake_stripe.received()) == before


def test_deno_multi_tenant_handler_reads_tenant_tokens_from_deno_kv(deno_factory, keybrake, fake_stripe, tmp_path):
    """With Deno KV (`--unstable-kv`, as on Deno Deploy), the handler finds the tenant's
    Keybrake token and cap under ["tenants", id, "keybrake_token" | "daily_usd_cap"], as
    the seed's snippet stores them, with nothing in KEYBRAKE_TENANTS."""
    secret = "sk_test_kv_" + os.urandom(8).hex()
    acme = keybrake.create_tenant("acme-kv")
    acme.put_credential("stripe", secret)
    customer_id, _ = customer_with_card(fake_stripe, secret)
    deno_dir = tmp_path / "deno_dir_kv"
    env = keybrake_env(keybrake, DENO_DIR=str(deno_dir))
    flags = ["--unstable-kv"]

    # First start: the KV database of this entry point is created on first use.
    server = deno_factory(MULTI_TENANT_TS, env, MULTI_ENV_NAMES, flags)
    r = server.post({"tenantId": "acme", "customerId": customer_id, "amountCents": 100})
    assert r.status_code == 404 and r.json() == {"error": "unknown_tenant"}, f"{r.text}\n{server.logs()}"
    server.stop()
    dbs = list((deno_dir / "location_data").glob("*/kv.sqlite3"))
    assert len(dbs) == 1, f"expected one KV database under {deno_dir}, got {dbs}\n{server.logs()}"

    seed = (
        "const kv = await Deno.openKv(Deno.args[0]);"
        "await kv.set(['tenants', 'acme', 'keybrake_token'], Deno.args[1]);"
        "await kv.set(['tenants', 'acme', 'daily_usd_cap'], 10);"
        "kv.close();"
    )
    p = subprocess.run(
        [str(require_deno()), "eval", "--unstable-kv", seed, str(dbs[0]), acme.token],
        env=base_env(DENO_DIR=str(deno_dir)), cwd=REPO, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr

    server = deno_factory(MULTI_TENANT_TS, env, MULTI_ENV_NAMES, flags)
    r = server.post({"tenantId": "acme", "customerId": customer_id, "amountCents": 2000})
    assert r.status_code == 402 and r.json() == {"error": "spend_cap_exceeded"}, f"{r.text}\n{server.logs()}"
    key = assert_revoked(acme, r.headers.get("x-keybrake-key-id"))
    assert key["daily_usd_cap"] == 10 and key["label"].startswith("tenant-acme-run-")
    before = len(fake_stripe.received())
    r = server.post({"tenantId": "acme", "customerId": customer_id, "amountCents": 700})
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text[:1000]
    assert_vendor_saw_only(fake_stripe, secret, since=before)
    acme.wait_spent(assert_revoked(acme, r.headers.get("x-keybrake-key-id"))["id"], Decimal(7))


# --------------------------------------------------------------------------- Python stripe SDK


def test_python_agent_pays_through_the_proxy_and_revokes_its_key(keybrake, tenant, fake_stripe, stripe_secret, customer):
    """`python examples/python/agent.py`: the stock stripe SDK with a vault key and the
    proxy as base address creates and confirms a PaymentIntent; Stripe saw only the
    real secret; the key is revoked with $42 spent."""
    customer_id, _ = customer
    before = len(fake_stripe.received())
    code, out, err = run_example(
        [sys.executable, str(PY_AGENT), "--customer", customer_id, "--amount-cents", "4200"],
        keybrake_env(keybrake, tenant.token),
    )
    assert code == 0, (out, err)
    assert out["payment_intent"]["status"] == "succeeded" and out["payment_intent"]["amount"] == 4200, out
    assert [p.status for p in vendor_payment_posts(fake_stripe)] == [200]
    assert_vendor_saw_only(fake_stripe, stripe_secret, since=before)
    key = assert_revoked(tenant, out["key_id"])
    assert key["allowed_endpoints"] == SEED_ENDPOINTS
    tenant.wait_spent(key["id"], Decimal(42))


def test_python_agent_reports_cap_exhaustion_cleanly_and_revokes_its_key(keybrake, tenant, fake_stripe, customer):
    """A $20 payment on a $10 key: the agent exits 2 with spend_cap_exceeded; the SDK
    raised a RateLimitError (429) with code cap_exhausted and Keybrake's message;
    nothing reached Stripe; the key is revoked."""
    customer_id, _ = customer
    code, out, err = run_example(
        [sys.executable, str(PY_AGENT), "--customer", customer_id, "--amount-cents", "2000", "--cap-usd", "10"],
        keybrake_env(keybrake, tenant.token),
    )
    assert code == 2, (out, err)
    assert out["error"] == "spend_cap_exceeded", out
    assert out["stripe_error"] == {"class": "RateLimitError", "http_status": 429, "code": "cap_exhausted"}, out
    assert isinstance(out["message"], str) and out["message"].strip(), out
    assert "spend cap exceeded" in err
    assert vendor_payment_posts(fake_stripe) == []
    assert_revoked(tenant, out["key_id"])
    tenant.wait_spent(out["key_id"], Decimal(0))


def test_python_sdk_error_on_cap_exhaustion_carries_keybrakes_message(keybrake, tenant, fake_stripe, customer):
    """In process: the agent's `charge` raises SpendCapExceeded wrapping the SDK's
    StripeError, whose body is Keybrake's denial and whose message is Keybrake's."""
    spec = importlib.util.spec_from_file_location("keybrake_example_agent", PY_AGENT)
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)

    customer_id, _ = customer
    key = tenant.issue_key(allowed_endpoints=SEED_ENDPOINTS, daily_usd_cap=10)
    with pytest.raises(agent.SpendCapExceeded) as info:
        agent.charge(stripe_client(keybrake, key["token"]), customer_id, 2000)
    sdk_error = info.value.stripe_error
    assert isinstance(sdk_error, stripe.RateLimitError)
    assert sdk_error.http_status == 429 and sdk_error.error.code == "cap_exhausted"
    body = sdk_error.json_body
    assert body["code"] == "cap_exhausted" and body["error"]["type"] == "keybrake_error", body
    assert str(info.value) == sdk_error.user_message == body["error"]["message"] == body["message"]
    assert sdk_error.headers.get("x-keybrake-key-id") == key["id"]
    assert vendor_payment_posts(fake_stripe) == []


# --------------------------------------------------------------------------- Node stripe SDK


def test_node_stripe_sdk_creates_and_confirms_a_payment_intent_through_the_proxy(
        keybrake, tenant, fake_stripe, stripe_secret, customer):
    """`node examples/node/stripe_fetch.mjs`: the stripe npm SDK, its fetch client
    prefixing /stripe, creates a PaymentIntent (requires_confirmation) then confirms it
    (succeeded); Stripe saw both calls with only the real secret; confirming its own
    intent costs nothing more; the key is revoked with $31 spent."""
    node = require_node()
    customer_id, pm_id = customer
    before = len(fake_stripe.received())
    code, out, err = run_example(
        [node, str(NODE_AGENT), "--customer", customer_id, "--payment-method", pm_id, "--amount-cents", "3100"],
        keybrake_env(keybrake, tenant.token),
    )
    assert code == 0, (out, err)
    intent = out["payment_intent"]
    assert intent["created_status"] == "requires_confirmation", out
    assert intent["status"] == "succeeded" and intent["amount"] == 3100, out
    paths = [(r.method, r.path) for r in fake_stripe.received()[before:]]
    # Keybrake reads the intent (GET) before forwarding the confirm, to reserve its amount.
    assert paths == [("POST", PI_PATH), ("GET", f"{PI_PATH}/{intent['id']}"),
                     ("POST", f"{PI_PATH}/{intent['id']}/confirm")], paths
    assert_vendor_saw_only(fake_stripe, stripe_secret, since=before)
    assert_revoked(tenant, out["key_id"])
    tenant.wait_spent(out["key_id"], Decimal(31))


def test_node_stripe_sdk_reports_cap_exhaustion_cleanly(keybrake, tenant, fake_stripe, customer):
    """A $20 PaymentIntent on a $10 key: the npm SDK raises StripeRateLimitError (429,
    code cap_exhausted) with Keybrake's message — the same message Keybrake gives any
    client for that denial; the example exits 2; nothing reached Stripe; key revoked."""
    node = require_node()
    customer_id, pm_id = customer
    code, out, err = run_example(
        [node, str(NODE_AGENT), "--customer", customer_id, "--payment-method", pm_id,
         "--amount-cents", "2000", "--cap-usd", "10"],
        keybrake_env(keybrake, tenant.token),
    )
    assert code == 2, (out, err)
    assert out["error"] == "spend_cap_exceeded", out
    assert out["stripe_error"] == {"type": "StripeRateLimitError", "http_status": 429, "code": "cap_exhausted"}, out
    assert vendor_payment_posts(fake_stripe) == []
    assert_revoked(tenant, out["key_id"])

    # The message the SDK surfaced is Keybrake's own for this denial.
    probe = tenant.issue_key(allowed_endpoints=SEED_ENDPOINTS, daily_usd_cap=10)
    raw = keybrake.proxy("POST", f"/stripe{PI_PATH}", key=probe["token"], data={"amount": 2000, "currency": "usd"})
    body = assert_denied(raw, 429, "cap_exhausted")
    assert out["message"] == body["error"]["message"], (out["message"], body)
