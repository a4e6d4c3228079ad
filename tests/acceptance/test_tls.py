"""TLS on every hop (SPEC §8, docs/operations.md): the proxy (HTTP/1.1 and HTTP/2 by
ALPN) and the control API over HTTPS, clients that trust only a test CA, vendor
certificates verified, certificates renewed under load, the plaintext rule, and the
CLI's --ca-file.

The suite makes its own CA and leaf certificates with the `openssl` command at run time
(leaves: basicConstraints CA:FALSE, subjectAltName DNS+IP, extendedKeyUsage serverAuth).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Optional

import pytest
import requests
import stripe

from harness import KEYBRAKE_BIN, Keybrake, assert_denied, free_port, wait_until, write_config
from test_agents import (
    CHARGE_ENV_NAMES,
    CHARGE_TS,
    NODE_AGENT,
    SEED_ENDPOINTS,
    assert_revoked,
    customer_with_card,
    keybrake_env,
    require_node,
    run_example,
    vendor_payment_posts,
)


# --------------------------------------------------------------------------- certificates


def openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"openssl {' '.join(args)}:\n{p.stderr}"


@dataclass
class Ca:
    dir: Path
    name: str

    @property
    def cert(self) -> Path:
        return self.dir / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.dir / f"{self.name}.key"

    @classmethod
    def make(cls, directory: Path, name: str) -> "Ca":
        directory.mkdir(parents=True, exist_ok=True)
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=Keybrake {name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
        return cls(directory, name)

    def leaf(self, name: str, dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
        """A server certificate (PEM) and its key, signed by this CA."""
        d = self.dir
        san = ",".join([f"DNS:{n}" for n in dns] + [f"IP:{i}" for i in ips])
        (d / f"{name}.ext").write_text(
            f"basicConstraints=critical,CA:FALSE\nsubjectAltName={san}\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"
        )
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", self.cert.name, "-CAkey", self.key.name,
                "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
                "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
        return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> Ca:
    return Ca.make(tmp_path_factory.mktemp("pki"), "test-ca")


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


# --------------------------------------------------------------------------- keybrake over TLS


class TlsKeybrake(Keybrake):
    """`keybrake serve` with HTTPS on the proxy and the control API."""

    @property
    def proxy_url(self) -> str:
        return f"https://127.0.0.1:{self.proxy_port}"

    @property
    def control_url(self) -> str:
        return f"https://127.0.0.1:{self.control_port}"


@pytest.fixture
def tls_factory(tmp_path, monkeypatch, ca):
    """Makes TLS keybrakes; this test's `requests` (and the harness) trust only the test CA."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.cert))
    started: list[Keybrake] = []

    def make(upstreams: dict[str, str], tls: bool = True, **settings) -> Keybrake:
        n = len(started) + 1
        conf = tmp_path / f"conf{n}"
        if tls:
            cert, key = ca.leaf(f"server{n}")
            for section in ("proxy", "control"):
                settings.setdefault(section, {})
                settings[section] = {"tls": {"cert_file": str(cert), "key_file": str(key),
                                             "watch_interval_ms": 200}, **settings[section]}
        kb = TlsKeybrake(tmp_path / f"kb{n}", upstreams, config=write_config(conf, **settings))
        kb.leaf = (cert, key) if tls else None
        started.append(kb)
        return kb.start()

    yield make
    for kb in started:
        if kb.proc and kb.proc.poll() is None:
            kb.proc.kill()
            kb.proc.wait(timeout=10)


@pytest.fixture
def tls_kb(tls_factory, fake_stripe) -> Keybrake:
    return tls_factory({"stripe": fake_stripe.url})


@pytest.fixture
def tls_tenant(tls_kb, stripe_secret):
    t = tls_kb.create_tenant("acme-tls")
    t.put_credential("stripe", stripe_secret)
    return t


# --------------------------------------------------------------------------- clients over HTTPS


def test_stripe_python_charges_hits_the_cap_and_is_revoked_over_https(tls_kb, tls_tenant, fake_stripe, monkeypatch, ca):
    """stripe-python trusting only the test CA: a $42 PaymentIntent is paid, a $20 one is
    refused at the $50 cap, and after DELETE /v1/keys/{id} (over HTTPS) the key is refused."""
    monkeypatch.setattr(stripe, "ca_bundle_path", str(ca.cert))
    key = tls_tenant.issue_key(allowed_endpoints=SEED_ENDPOINTS, daily_usd_cap=50)
    client = stripe.StripeClient(api_key=key["token"], base_addresses={"api": f"{tls_kb.proxy_url}/stripe"},
                                 max_network_retries=0)
    intent = client.payment_intents.create(params={"amount": 4200, "currency": "usd"})
    assert intent.amount == 4200
    with pytest.raises(stripe.RateLimitError) as capped:
        client.payment_intents.create(params={"amount": 2000, "currency": "usd"})
    assert capped.value.error.code == "cap_exhausted"
    assert tls_tenant.revoke(key["id"]).json()["status"] == "revoked"
    with pytest.raises(stripe.AuthenticationError) as revoked:
        client.payment_intents.create(params={"amount": 100, "currency": "usd"})
    assert revoked.value.error.code == "key_revoked"
    assert [p.status for p in vendor_payment_posts(fake_stripe)] == [200]
    tls_tenant.wait_spent(key["id"], Decimal(42))
    # A client that does not trust the test CA does not get through.
    with pytest.raises(requests.exceptions.SSLError):
        import certifi

        requests.get(f"{tls_kb.proxy_url}/stripe/v1/customers", verify=certifi.where(), timeout=5)


def test_the_seeds_deno_handler_charges_and_revokes_over_https(tls_kb, tls_tenant, fake_stripe, stripe_secret, ca, tmp_path):
    """examples/deno/charge.ts with HTTPS URLs, Deno trusting only the test CA (its
    system store, read from SSL_CERT_FILE): paid and revoked; over the cap: 402."""
    from test_agents import DenoServe

    customer_id, _ = customer_with_card(fake_stripe, stripe_secret)
    env = keybrake_env(tls_kb, tls_tenant.token, DENO_TLS_CA_STORE="system", SSL_CERT_FILE=str(ca.cert))
    deno = DenoServe(tmp_path / "deno", CHARGE_TS, env, CHARGE_ENV_NAMES).start()
    try:
        r = deno.post({"customerId": customer_id, "amountCents": 4200})
        assert r.status_code == 200, f"{r.status_code} {r.text[:500]}\n{deno.logs()}"
        assert r.json()["status"] == "succeeded"
        key = assert_revoked(tls_tenant, r.headers.get("x-keybrake-key-id"))
        tls_tenant.wait_spent(key["id"], Decimal(42))
        r = deno.post({"customerId": customer_id, "amountCents": 60000})
        assert r.status_code == 402, f"{r.status_code} {r.text[:500]}\n{deno.logs()}"
        assert_revoked(tls_tenant, r.headers.get("x-keybrake-key-id"))
    finally:
        deno.stop()
    assert [p.status for p in vendor_payment_posts(fake_stripe)] == [200]


def test_stripe_node_pays_and_reports_the_cap_over_https(tls_kb, tls_tenant, fake_stripe, stripe_secret, ca):
    """examples/node/stripe_fetch.mjs (the stripe npm SDK) with HTTPS URLs, Node trusting
    only the test CA (OpenSSL's store, SSL_CERT_FILE): paid and revoked; over the cap: 2."""
    node = require_node()
    customer_id, pm_id = customer_with_card(fake_stripe, stripe_secret)
    env = keybrake_env(tls_kb, tls_tenant.token, NODE_OPTIONS="--use-openssl-ca", SSL_CERT_FILE=str(ca.cert))
    code, out, err = run_example(
        [node, str(NODE_AGENT), "--customer", customer_id, "--payment-method", pm_id, "--amount-cents", "3100"], env)
    assert code == 0, (out, err)
    assert out["payment_intent"]["status"] == "succeeded"
    assert_revoked(tls_tenant, out["key_id"])
    tls_tenant.wait_spent(out["key_id"], Decimal(31))
    code, out, err = run_example(
        [node, str(NODE_AGENT), "--customer", customer_id, "--payment-method", pm_id,
         "--amount-cents", "2000", "--cap-usd", "10"], env)
    assert code == 2 and out["error"] == "spend_cap_exceeded", (out, err)
    assert_revoked(tls_tenant, out["key_id"])


def test_http2_clients_get_the_same_answers_as_http1(tls_kb, tls_tenant, fake_stripe, ca):
    import httpx

    key = tls_tenant.issue_key(allowed_endpoints=["/v1/**"], daily_usd_cap=100)
    auth = {"Authorization": f"Bearer {key['token']}"}
    calls = [
        ("GET", "/stripe/v1/customers", auth, None),
        ("POST", "/stripe/v1/payment_intents", auth, {"amount": "1500", "currency": "usd"}),
        ("GET", "/stripe/v1/customers", {}, None),
        ("GET", "/stripe/v1/customers%2Fx", auth, None),
        ("POST", "/stripe/v1/payment_intents", auth, {"amount": "999999", "currency": "usd"}),
        # Over the 64 KiB Pingora replays: sent by Keybrake's own exchange, in HTTP/1.1.
        ("POST", "/stripe/v1/payment_intents", auth,
         {"amount": "700", "currency": "usd", **{f"metadata[f{i:02}]": "m" * 1000 for i in range(80)}}),
    ]
    answers = {}
    for http2 in (False, True):
        with httpx.Client(http2=http2, verify=ssl.create_default_context(cafile=str(ca.cert)), timeout=10) as c:
            got = []
            for method, path, headers, form in calls:
                r = c.request(method, f"{tls_kb.proxy_url}{path}", headers=headers, data=form)
                assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                body = r.json()
                shape = body.get("code") or (body.get("object"), body.get("amount"), body.get("currency"))
                got.append((r.status_code, shape, r.headers.get("x-keybrake-key-id")))
            answers[http2] = got
    assert answers[True] == answers[False], answers
    assert [a[0] for a in answers[True]] == [200, 200, 401, 400, 429, 200], answers


# --------------------------------------------------------------------------- vendors' certificates


class TlsRelay:
    """A TLS front for the fake Stripe: terminates TLS with `cert`/`key` and pipes the
    bytes to the fake's plain port, so the fake records only what got through TLS."""

    def __init__(self, target_port: int, cert: Path, key: Path):
        self.port = free_port()
        self.target = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.handshakes_failed = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                writer.close()

        async def handle(reader, writer):
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def main():
            server = await asyncio.start_server(handle, "127.0.0.1", self.port, ssl=self.context,
                                                ssl_handshake_timeout=5)
            self._ready.set()
            async with server:
                await server.serve_forever()

        self._loop.set_exception_handler(lambda loop, ctx: None)
        self._loop.run_until_complete(main())

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def test_vendor_certificates_and_host_names_are_verified_and_ca_file_adds_a_private_ca(
        tls_factory, fake_stripe, stripe_secret, ca, tmp_path):
    """An upstream whose certificate names another host, or is signed by an unknown CA, or
    by a CA not in the system's roots (no ca_file): 502 upstream_unavailable, nothing
    reaches the vendor, the reservation is released. With upstream.ca_file: paid."""
    other_ca = Ca.make(tmp_path / "other", "other-ca")
    wrong_name = TlsRelay(fake_stripe.port, *ca.leaf("wrong-name", dns=("other.example",), ips=()))
    unknown_ca = TlsRelay(fake_stripe.port, *other_ca.leaf("unknown-ca"))
    right = TlsRelay(fake_stripe.port, *ca.leaf("right"))
    cases = [
        (wrong_name, {"ca_file": str(ca.cert)}, 502),
        (unknown_ca, {"ca_file": str(ca.cert)}, 502),
        (right, {}, 502),
        (right, {"ca_file": str(ca.cert)}, 200),
    ]
    for relay, upstream, expected in cases:
        kb = tls_factory({"stripe": relay.url}, upstream=upstream)
        t = kb.create_tenant()
        t.put_credential("stripe", stripe_secret)
        key = t.issue_key(allowed_endpoints=["POST /v1/payment_intents"], daily_usd_cap=100)
        before = len(fake_stripe.received())
        r = kb.proxy("POST", "/stripe/v1/payment_intents", key=key["token"], data={"amount": 4200, "currency": "usd"})
        if expected == 502:
            assert_denied(r, 502, "upstream_unavailable")
            assert len(fake_stripe.received()) == before, "a request went through an unverified TLS connection"
            t.wait_spent(key["id"], Decimal(0))
        else:
            assert r.status_code == 200, r.text
            assert len(fake_stripe.received()) == before + 1
            t.wait_spent(key["id"], Decimal(42))
        kb.stop()


# --------------------------------------------------------------------------- renewal


def test_a_renewed_certificate_is_served_without_failing_a_request(tls_kb, ca, tmp_path):
    """Requests run on fresh and kept-alive connections while the certificate files are
    replaced: none fails, and new connections then see the new certificate."""
    cert, key = tls_kb.leaf
    new_cert, new_key = ca.leaf("renewed")
    assert der_of(new_cert) != der_of(cert)

    def served_certificate() -> bytes:
        context = ssl.create_default_context(cafile=str(ca.cert))
        import socket
        with socket.create_connection(("127.0.0.1", tls_kb.proxy_port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                return s.getpeercert(binary_form=True)

    assert served_certificate() == der_of(cert)
    stop = threading.Event()
    results: list[tuple[str, object]] = []

    def load(fresh: bool) -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                if fresh:
                    r = requests.get(f"{tls_kb.proxy_url}/stripe/v1/customers", timeout=10)
                else:
                    r = session.get(f"{tls_kb.proxy_url}/stripe/v1/customers", timeout=10)
                results.append(("ok" if r.status_code == 401 else f"status {r.status_code}", fresh))
            except requests.RequestException as e:
                results.append((repr(e), fresh))

    threads = [threading.Thread(target=load, args=(i % 2 == 0,)) for i in range(6)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    # What a renewal tool does: write new files, rename them over the old ones.
    for src, dst in ((new_key, key), (new_cert, cert)):
        tmp = dst.with_suffix(".new")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)
    time.sleep(1.5)
    stop.set()
    for th in threads:
        th.join(timeout=20)
    failures = [r for r in results if r[0] != "ok"]
    assert not failures, failures[:5]
    assert sum(1 for r in results if r[1]) > 20 and sum(1 for r in results if not r[1]) > 20, len(results)
    assert served_certificate() == der_of(new_cert)


def _expired_leaf(ca: Ca, directory: Path) -> tuple[Path, Path]:
    """A server certificate (and key) signed by `ca` whose validity ended yesterday."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=3))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "expired.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "expired.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return directory / "expired.pem", directory / "expired.key"


def test_certificate_dates_are_watched_and_an_expired_renewal_is_not_served(tls_kb, ca, tmp_path):
    """The test leaf expires in 2 days: the start logs it (renew within 14 days) and the
    metrics say when. A "renewal" to an expired pair is not served (clients would refuse
    every handshake): the current certificate stays, and the log says why."""
    import datetime

    from cryptography import x509

    cert, key = tls_kb.leaf
    logs = tls_kb.logs()
    assert "proxy TLS certificate" in logs and "renew it" in logs, logs[-2000:]
    not_after = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    metrics = requests.get(f"{tls_kb.metrics_url}/metrics", timeout=5).text
    for listener in ("proxy", "control"):
        line = f'keybrake_tls_certificate_expiry_timestamp_seconds{{listener="{listener}"}} {int(not_after.timestamp())}'
        assert line in metrics, [m for m in metrics.splitlines() if "tls_certificate" in m]
    old_cert = cert.read_bytes()
    expired_cert, expired_key = _expired_leaf(ca, tmp_path / "expired")
    for src, dst in ((expired_key, key), (expired_cert, cert)):
        tmp = dst.with_suffix(".new")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)
    assert wait_until(lambda: "not reloaded: the new one expired" in tls_kb.logs(), timeout=5)
    context = ssl.create_default_context(cafile=str(ca.cert))
    import socket
    with socket.create_connection(("127.0.0.1", tls_kb.proxy_port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(old_cert.decode())
    assert datetime.datetime.now(datetime.timezone.utc) < not_after


# --------------------------------------------------------------------------- plaintext rule, CLI


def run_keybrake(*args: str, env: Optional[dict] = None, timeout: float = 20) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_") and k != "SSL_CERT_FILE"}
    base.update(env or {})
    return subprocess.run([str(KEYBRAKE_BIN), *args], env=base, capture_output=True, text=True, timeout=timeout)


def test_a_plain_http_listener_on_a_non_loopback_address_is_refused_at_start(tmp_path):
    env = {"KEYBRAKE_ADMIN_TOKEN": "adm_" + "x" * 32}
    p = run_keybrake("serve", "--data-dir", str(tmp_path / "d"), "--proxy-listen", "0.0.0.0:1", env=env)
    assert p.returncode == 1
    assert "proxy listener 0.0.0.0:1 would serve plain HTTP on a non-loopback address" in p.stderr, p.stderr
    assert "proxy.tls" in p.stderr and "proxy.plaintext: true" in p.stderr, p.stderr
    assert not (tmp_path / "d").exists(), "nothing may start before the check"
    p = run_keybrake("check", "--control-listen", "0.0.0.0:1")
    assert p.returncode == 1 and "control listener 0.0.0.0:1 would serve plain HTTP" in p.stderr, p.stderr
    # Explicitly asked for (a TLS-terminating load balancer in front): accepted.
    config = write_config(tmp_path / "conf", proxy={"plaintext": True})
    p = run_keybrake("check", "--config", str(config), "--proxy-listen", "0.0.0.0:1")
    assert p.returncode == 0, p.stderr
    assert "proxy http://0.0.0.0:1" in p.stdout
    # Only the listeners a command opens: a control host's config with the control API
    # on every interface (behind TLS elsewhere in its file, or not at all on an edge
    # host) says nothing an edge node acts on, and the reverse.
    edge = write_config(tmp_path / "edge", control_listen="0.0.0.0:8081")
    assert run_keybrake("check", "--config", str(edge), "--role", "proxy").returncode == 0
    assert run_keybrake("check", "--config", str(edge)).returncode == 1
    control = write_config(tmp_path / "control", proxy_listen="0.0.0.0:8080")
    assert run_keybrake("check", "--config", str(control), "--role", "control").returncode == 0
    p = run_keybrake("check", "--config", str(control), "--role", "proxy")
    assert p.returncode == 1 and "proxy listener 0.0.0.0:8080 would serve plain HTTP" in p.stderr, p.stderr


def test_check_for_one_role_reads_only_that_roles_files(tmp_path, ca):
    # A control host has no proxy certificate and an edge host no control one: the
    # check run by each unit (`--role`) must not ask for the other's files.
    cert, key = ca.leaf("role")
    missing = str(tmp_path / "absent.pem")
    control_host = write_config(tmp_path / "c", control={"tls": {"cert_file": str(cert), "key_file": str(key)}},
                                proxy={"tls": {"cert_file": missing, "key_file": missing}})
    edge_host = write_config(tmp_path / "e", proxy={"tls": {"cert_file": str(cert), "key_file": str(key)}},
                             control={"tls": {"cert_file": missing, "key_file": missing}})
    for config, role in ((control_host, "control"), (edge_host, "proxy")):
        p = run_keybrake("check", "--config", str(config), "--role", role)
        assert p.returncode == 0, (role, p.stderr)
        assert "configuration OK" in p.stdout
        # The summary names the role's listeners only.
        other = "proxy" if role == "control" else "control"
        assert f"{role} https://" in p.stdout and f"{other} " not in p.stdout, p.stdout
        # `serve` runs both listeners: the missing file is named.
        p = run_keybrake("check", "--config", str(config))
        assert p.returncode == 1 and "absent.pem" in p.stderr, (role, p.stderr)
        other = "proxy" if role == "control" else "control"
        p = run_keybrake("check", "--config", str(config), "--role", other)
        assert p.returncode == 1 and "absent.pem" in p.stderr, (role, p.stderr)
    p = run_keybrake("check", "--config", str(control_host), "--role", "edge")
    assert p.returncode == 2 and "--role" in p.stderr, p.stderr


def test_check_reports_an_unreadable_or_mismatched_certificate(tmp_path, ca):
    cert, _ = ca.leaf("check-a")
    _, other_key = ca.leaf("check-b")
    config = write_config(tmp_path / "conf", proxy={"tls": {"cert_file": str(cert), "key_file": str(other_key)}})
    p = run_keybrake("check", "--config", str(config))
    assert p.returncode == 1 and "proxy.tls" in p.stderr and "do not belong together" in p.stderr, p.stderr
    config = write_config(tmp_path / "conf2", control={"tls": {"cert_file": str(tmp_path / "none.pem"), "key_file": str(other_key)}})
    p = run_keybrake("check", "--config", str(config))
    assert p.returncode == 1 and "none.pem" in p.stderr, p.stderr


def test_a_tls_key_shared_with_its_group_is_accepted_and_one_open_to_others_is_flagged(tmp_path, ca):
    # The units read their keys through the `keybrake-tls` group (root:keybrake-tls
    # 0640, as docs/operations.md sets them up): that mode is the intent, not a warning.
    cert, key = ca.leaf("modes")
    config = write_config(tmp_path / "conf", proxy={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    for mode, flagged in ((0o600, False), (0o640, False), (0o644, True), (0o604, True)):
        key.chmod(mode)
        p = run_keybrake("check", "--config", str(config), "--role", "proxy")
        assert p.returncode == 0, p.stderr
        assert ("TLS key" in p.stderr) == flagged, (oct(mode), p.stderr)
        if flagged:
            assert f"has mode {mode:03o}: open to other users; chmod o-rwx" in p.stderr, p.stderr


def test_the_cli_verifies_the_control_planes_certificate_with_an_optional_ca_file(tls_kb, ca):
    env = {"KEYBRAKE_ADMIN_TOKEN": tls_kb.admin_token}
    tls_kb.create_tenant("seen-by-the-cli")
    p = run_keybrake("tenant", "list", "--control-url", tls_kb.control_url, env=env)
    assert p.returncode == 1 and "cannot reach the control API" in p.stderr, p.stderr
    assert "seen-by-the-cli" not in p.stdout
    p = run_keybrake("tenant", "list", "--control-url", tls_kb.control_url, "--ca-file", str(ca.cert), env=env)
    assert p.returncode == 0 and "seen-by-the-cli" in p.stdout, p.stderr
    p = run_keybrake("tenant", "list", env={**env, "KEYBRAKE_CONTROL_URL": tls_kb.control_url,
                                             "KEYBRAKE_CA_FILE": str(ca.cert)})
    assert p.returncode == 0 and "seen-by-the-cli" in p.stdout, p.stderr
    # http:// to a TLS listener: the error says what to change.
    plain = tls_kb.control_url.replace("https://", "http://")
    p = run_keybrake("tenant", "list", "--control-url", plain, env=env)
    assert p.returncode == 1 and "use an https:// --control-url" in p.stderr, p.stderr
    # The admin token from a file (what serve wrote), not the environment.
    token_file = tls_kb.workdir / "admin-token-copy"
    token_file.write_text(tls_kb.admin_token + "\n")
    p = run_keybrake("tenant", "list", "--control-url", tls_kb.control_url, "--ca-file", str(ca.cert),
                     "--admin-token-file", str(token_file), env={})
    assert p.returncode == 0 and "seen-by-the-cli" in p.stdout, p.stderr
    p = run_keybrake("tenant", "list", "--control-url", tls_kb.control_url, env={})
    assert p.returncode == 1 and "--admin-token-file" in p.stderr, p.stderr


def test_an_idle_http2_connection_makes_room_and_one_serving_a_request_does_not(
        tls_factory, stripe_secret, ca):
    """proxy.max_connections: 2. Connection A waits on a slow vendor call (HTTP/2, 3 s);
    connection B did one request and sits idle (HTTP/2 keeps it open, and a stream now and
    then would keep it open for ever). A new client gets in: B makes room, A's call is
    answered 200 (a connection serving a stream is never cut)."""
    import httpx
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            arrived.set()
            time.sleep(3)
            body = b'{"object":"list","data":[]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    arrived = threading.Event()
    vendor = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    vendor.daemon_threads = True
    threading.Thread(target=vendor.serve_forever, daemon=True).start()
    kb = tls_factory({"stripe": f"http://127.0.0.1:{vendor.server_address[1]}"},
                     proxy={"max_connections": 2, "keepalive_timeout_ms": 60000})
    t = kb.create_tenant()
    t.put_credential("stripe", stripe_secret)
    key = t.issue_key(allowed_endpoints=["GET /v1/customers"])
    verify = ssl.create_default_context(cafile=str(ca.cert))
    url = f"{kb.proxy_url}/stripe/v1/customers"
    with httpx.Client(http2=True, verify=verify, timeout=15) as a, \
            httpx.Client(http2=True, verify=verify, timeout=15) as b:
        slow: dict = {}
        call = threading.Thread(target=lambda: slow.update(
            r=a.get(url, headers={"Authorization": f"Bearer {key['token']}"})))
        call.start()
        assert arrived.wait(timeout=10), "A's call did not reach the vendor"  # A is serving a stream
        r = b.get(url)
        assert (r.http_version, r.status_code) == ("HTTP/2", 401)
        time.sleep(0.3)
        with httpx.Client(http2=True, verify=verify, timeout=5) as c:
            r = c.get(url)
            assert (r.http_version, r.status_code) == ("HTTP/2", 401)
        call.join(timeout=15)
        assert slow["r"].status_code == 200, slow["r"].text
    vendor.shutdown()


def test_tls_handshakes_and_the_http2_preface_are_inside_the_header_deadline(tls_factory, fake_stripe, ca):
    """A TCP connection that never sends a ClientHello, and an HTTP/2 connection that
    never sends its preface, are closed after proxy.header_timeout_ms (Pingora alone
    waits 60 s for a handshake and for ever for a preface)."""
    import socket

    kb = tls_factory({"stripe": fake_stripe.url}, proxy={"header_timeout_ms": 1500})
    silent = socket.create_connection(("127.0.0.1", kb.proxy_port), timeout=10)
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.set_alpn_protocols(["h2"])
    h2 = context.wrap_socket(socket.create_connection(("127.0.0.1", kb.proxy_port), timeout=10),
                             server_hostname="127.0.0.1")
    assert h2.selected_alpn_protocol() == "h2"
    started = time.monotonic()
    assert silent.recv(1024) == b""
    try:
        while h2.recv(1024):  # the server's SETTINGS frame, then the close
            pass
    except (ssl.SSLError, ConnectionResetError):
        pass
    waited = time.monotonic() - started
    assert waited < 4, f"closed after {waited:.1f} s"
