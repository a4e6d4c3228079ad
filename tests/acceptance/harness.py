"""Harness for the end-to-end acceptance suite: processes, clients, assertions.

Every test runs the real `keybrake serve` binary (KEYBRAKE_BIN, default
target/debug/keybrake) against a real fake Stripe (localstripe, wrapped by
fakes/localstripe_server.py so it binds 127.0.0.1 and records what it received).
Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import base64
import calendar
import glob
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KEYBRAKE_BIN = Path(os.environ.get("KEYBRAKE_BIN", REPO / "target" / "debug" / "keybrake"))
FAKE_STRIPE = HERE / "fakes" / "localstripe_server.py"
CONF_DIR = REPO / "conf"

READY_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- utils


# Listening ports come from below the kernel's ephemeral range (32768-60999 by default),
# where the suite's own outgoing connections take their source ports: a port found free
# there and bound a moment later by a process under test can be taken meanwhile by any
# client connection. Each port is handed out once per test process.
_PORTS_FROM, _PORTS_TO = 20000, 32000
_handed_out: set[int] = set()


def free_port() -> int:
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_PORTS_FROM, _PORTS_TO)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORTS_FROM}-{_PORTS_TO}")


def read_head(sock) -> bytes:
    """What a raw socket receives up to the end of the answer's header (less if the
    connection closes first), then closes it."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    sock.close()
    return answer


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy or `timeout` passes.

    Returns the last value either way, so the caller asserts on it with context."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def as_json(response: requests.Response) -> Any:
    """Response body as JSON with money kept exact (floats parsed as Decimal)."""
    try:
        return response.json(parse_float=Decimal)
    except ValueError:
        raise AssertionError(
            f"expected JSON from {response.request.method} {response.url}, got "
            f"{response.status_code}: {response.text[:500]!r}"
        )


def answered_until(proxy_url: str, keys: list[dict], seconds: float, stop_with: Callable[[], None]) -> dict[str, int]:
    """Payments ($1, POST /stripe/v1/payment_intents) and denials (every 4th call, an
    endpoint the key does not allow) from one thread per key against `proxy_url`; after
    `seconds`, `stop_with()` (a kill -9) and the threads stopped. Per key id: how many
    calls a client was answered as expected (200, or 403 for the denials)."""
    import threading
    answered = {k["id"]: 0 for k in keys}
    stop = threading.Event()

    def worker(key):
        session = requests.Session()
        auth = {"Authorization": f"Bearer {key['token']}"}
        for n in range(1, 2000):
            if stop.is_set():
                return
            try:
                if n % 4 == 0:
                    r = session.get(f"{proxy_url}/stripe/v1/customers", headers=auth, timeout=10)
                    ok = r.status_code == 403
                else:
                    r = session.post(f"{proxy_url}/stripe/v1/payment_intents", headers=auth, timeout=10,
                                     data={"amount": 100, "currency": "usd"})
                    ok = r.status_code == 200
            except requests.RequestException:
                return
            if ok:
                answered[key["id"]] += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in keys]
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop_with()
    stop.set()
    for th in threads:
        th.join(timeout=20)
    return answered


def error_code(response: requests.Response) -> Optional[str]:
    """The `error.code` of a control-API or proxy error body (None if absent)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code")
    return None


RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def parse_ts(value: str) -> float:
    assert isinstance(value, str) and RFC3339_UTC.match(value), f"not an RFC3339 UTC timestamp: {value!r}"
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def currency_rate(code: str) -> tuple[int, Decimal]:
    """(decimals, USD per major unit) of a currency, read from conf/currencies.yaml."""
    text = (CONF_DIR / "currencies.yaml").read_text()
    m = re.search(rf'^{code}:\s*\{{\s*decimals:\s*(\d+),\s*usd:\s*"([0-9.]+)"\s*\}}', text, re.M)
    assert m, f"currency {code} not in conf/currencies.yaml"
    return int(m.group(1)), Decimal(m.group(2))


# --------------------------------------------------------------------------- fake Stripe


@dataclass
class Received:
    """One request as the fake vendor received it, and what it answered."""

    method: str
    path: str
    headers: dict
    authorization: Optional[str]
    body: bytes
    status: int
    response: bytes

    @property
    def form(self) -> list[tuple[str, str]]:
        from urllib.parse import parse_qsl

        return parse_qsl(self.body.decode("utf-8"), keep_blank_values=True)

    def response_json(self) -> Any:
        return json.loads(self.response.decode("utf-8"), parse_float=Decimal)


class FakeStripe:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = state_dir / "requests.jsonl"

    def start(self) -> "FakeStripe":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.state_dir / "stdout.log", "ab")
        err = open(self.state_dir / "stderr.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE_STRIPE), "--port", str(self.port), "--state-dir", str(self.state_dir)],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake Stripe exited: {(self.state_dir / 'stderr.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("fake Stripe did not start listening within 15 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def received(self) -> list[Received]:
        if not self.log_path.exists():
            return []
        out = []
        # Only whole lines: the fake may be writing the last one as this reads.
        for line in self.log_path.read_text().split("\n")[:-1]:
            if not line.strip():
                continue
            e = json.loads(line)
            out.append(
                Received(
                    method=e["method"],
                    path=e["path"],
                    headers=e["headers"],
                    authorization=e["authorization"],
                    body=base64.b64decode(e["body_b64"]),
                    status=e["status"],
                    response=base64.b64decode(e["response_b64"]),
                )
            )
        return out

    def received_matching(self, method: str, path: str) -> list[Received]:
        return [r for r in self.received() if r.method == method and r.path.split("?")[0] == path]

    def direct(self, secret: str) -> "requests.Session":
        """A session that talks to the fake directly (test set-up, bypassing Keybrake)."""
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {secret}"
        return s


# --------------------------------------------------------------------------- keybrake


class Keybrake:
    """One `keybrake serve` process (restartable on the same data dir and ports)."""

    def __init__(
        self,
        workdir: Path,
        upstreams: dict[str, str],
        config: Optional[Path] = None,
        admin_token: Optional[str] = None,
        master_key: Optional[str] = None,
        extra_args: Optional[list[str]] = None,
        env_overrides: Optional[dict[str, Optional[str]]] = None,
    ):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.upstreams = dict(upstreams)
        self.config = config
        self.admin_token = admin_token if admin_token is not None else "adm_" + secrets.token_hex(16)
        self.master_key = (
            master_key if master_key is not None else base64.b64encode(secrets.token_bytes(32)).decode()
        )
        self.extra_args = list(extra_args or [])
        self.env_overrides = dict(env_overrides or {})
        self.proxy_port = free_port()
        self.control_port = free_port()
        self.metrics_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.runs = 0

    # ---- addresses
    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "keybrake.db"

    def stored_bytes(self) -> dict[str, bytes]:
        """Every file the store keeps (the SQLite databases with -wal/-shm, generated
        secrets), by name: for checks of what is at rest."""
        assert self.db_path.exists(), f"no {self.db_path}"
        return {p.name: p.read_bytes() for p in self.data_dir.rglob("*") if p.is_file()}

    # ---- life cycle
    def command(self) -> list[str]:
        cmd = [
            str(KEYBRAKE_BIN),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--proxy-listen",
            f"127.0.0.1:{self.proxy_port}",
            "--control-listen",
            f"127.0.0.1:{self.control_port}",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
        ]
        for vendor, url in self.upstreams.items():
            cmd += ["--vendor-upstream", f"{vendor}={url}"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
        env["KEYBRAKE_ADMIN_TOKEN"] = self.admin_token
        env["KEYBRAKE_MASTER_KEY"] = self.master_key
        env.setdefault("RUST_BACKTRACE", "1")
        for k, v in self.env_overrides.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def start(self) -> "Keybrake":
        if not KEYBRAKE_BIN.exists():
            pytest.fail(f"keybrake binary not found at {KEYBRAKE_BIN} (build it, or set KEYBRAKE_BIN)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        out = open(self.workdir / f"stdout.{self.runs}.log", "ab")
        err = open(self.workdir / f"stderr.{self.runs}.log", "ab")
        # Run from the work dir so that the default --config (conf/keybrake.yaml) is
        # absent and the embedded defaults are used.
        self.proc = subprocess.Popen(
            self.command(),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            cwd=self.workdir,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"keybrake serve exited with {self.proc.returncode} before ready:\n{self.logs()[-4000:]}"
                )
            try:
                r = requests.get(f"{self.control_url}/readyz", timeout=1)
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except requests.RequestException as e:
                last = repr(e)
            time.sleep(0.1)
        raise AssertionError(f"keybrake not ready within {timeout}s (last: {last}):\n{self.logs()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> Optional[int]:
        """Signal the process and wait for it to exit; returns its exit status."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"keybrake did not exit within {timeout}s of signal {sig}")

    def kill9(self) -> None:
        self.stop(signal.SIGKILL, timeout=10)

    def settle(self) -> None:
        """After a change made outside `control()` (the CLI): `serve`'s proxy sees it at
        once; fleet.PgDeployment waits for its edge proxy here."""

    def restart(self) -> "Keybrake":
        self.stop()
        return self.start()

    def logs(self) -> str:
        parts = []
        for p in sorted(self.workdir.glob("std*.log")):
            parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    # ---- HTTP helpers
    def control(self, method: str, path: str, token: Optional[str] = None, **kwargs) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
        return requests.request(method, f"{self.control_url}{path}", headers=headers, **kwargs)

    def admin(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.control(method, path, token=self.admin_token, **kwargs)

    def proxy(self, method: str, path: str, key: Optional[str] = None, **kwargs) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
        return requests.request(method, f"{self.proxy_url}{path}", headers=headers, **kwargs)

    def create_tenant(self, name: Optional[str] = None) -> "Tenant":
        r = self.admin("POST", "/v1/tenants", json={"name": name or f"tenant-{secrets.token_hex(4)}"})
        assert r.status_code == 201, r.text
        body = r.json()
        return Tenant(self, body["id"], body["api_token"], body)


class Tenant:
    def __init__(self, kb: Keybrake, id: str, token: str, created: dict):
        self.kb = kb
        self.id = id
        self.token = token
        self.created = created

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.kb.control(method, path, token=self.token, **kwargs)

    def put_credential(self, vendor: str, secret: str) -> dict:
        r = self.call("PUT", f"/v1/vendors/{vendor}/credential", json={"secret": secret})
        assert r.status_code == 200, r.text
        return r.json()

    def issue_key(self, **body) -> dict:
        body.setdefault("label", f"test-{secrets.token_hex(3)}")
        body.setdefault("vendor", "stripe")
        body.setdefault("allowed_endpoints", ["/v1/**"])
        body.setdefault("daily_usd_cap", 100)
        body.setdefault("expires_in", "5m")
        r = self.call("POST", "/v1/keys", json=body)
        assert r.status_code == 201, f"POST /v1/keys {body} -> {r.status_code} {r.text}"
        return as_json(r)

    def get_key(self, key_id: str) -> dict:
        r = self.call("GET", f"/v1/keys/{key_id}")
        assert r.status_code == 200, r.text
        return as_json(r)

    def revoke(self, key_id: str) -> requests.Response:
        return self.call("DELETE", f"/v1/keys/{key_id}")

    def audit(self, **params) -> list[dict]:
        r = self.call("GET", "/v1/audit", params=params)
        assert r.status_code == 200, r.text
        return as_json(r)["data"]

    def audit_all(self, max_pages: int = 100, **params) -> list[dict]:
        """Every audit event matching `params`, following the cursors."""
        events, cursor = [], None
        for _ in range(max_pages):
            q = dict(params, limit=1000, **({"cursor": cursor} if cursor else {}))
            r = self.call("GET", "/v1/audit", params=q)
            assert r.status_code == 200, r.text
            page = as_json(r)
            events += page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return events
        raise AssertionError(f"more than {max_pages} pages of audit events")

    def wait_spent(self, key_id: str, expected: Decimal, timeout: float = 15.0) -> dict:
        """Wait until the key shows exactly `expected` spent and nothing held.

        Right after a call, `spent_today_usd` may include budget still held by an
        unreturned lease (SPEC §5); unused leases are returned when the key idles."""
        def settled():
            k = self.get_key(key_id)
            return k if k["spent_today_usd"] == expected and k["held_usd"] == 0 else None

        key = wait_until(settled, timeout=timeout, interval=0.25) or self.get_key(key_id)
        assert key["spent_today_usd"] == expected and key["held_usd"] == 0, (
            f"expected spent_today_usd={expected} held_usd=0, got {key}"
        )
        return key


def stripe_client(kb: Keybrake, token: str):
    """The official Stripe SDK, pointed at the Keybrake proxy with a vault key."""
    import stripe

    return stripe.StripeClient(
        api_key=token,
        base_addresses={"api": f"{kb.proxy_url}/stripe"},
        max_network_retries=0,
    )


def denial(response: requests.Response) -> dict:
    """Assert the SPEC §4 denial shape and return the body."""
    body = as_json(response)
    assert isinstance(body, dict), body
    assert set(["code", "message", "error"]) <= set(body), body
    assert body["error"]["type"] == "keybrake_error", body
    assert body["error"]["code"] == body["code"], body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body


def _faketime_lib() -> str:
    libs = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    assert libs, "libfaketime is missing (.ci/deps installs it)"
    return libs[0]


def clock_at(utc: str) -> dict[str, str]:
    """The environment that starts a process with its wall clock at `utc` (ticking from
    there), by libfaketime; its monotonic clock is left alone."""
    offset = calendar.timegm(time.strptime(utc, "%Y-%m-%d %H:%M:%S")) - time.time()
    return {"LD_PRELOAD": _faketime_lib(), "FAKETIME": f"{offset:+.3f}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def steppable_clock(offset_file: Path) -> dict[str, str]:
    """The environment that runs a process with its wall clock off by what `offset_file`
    says (libfaketime's syntax: `+0`, `+2h`, `-90`), read again every second: writing the
    file steps the clock as NTP would. Its monotonic clock is left alone."""
    if not offset_file.exists():
        offset_file.write_text("+0\n")
    return {"LD_PRELOAD": _faketime_lib(), "FAKETIME_TIMESTAMP_FILE": str(offset_file),
            "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def assert_denied(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (
        f"expected {status} {code}, got {response.status_code}: {response.text[:500]}"
    )
    body = denial(response)
    assert body["code"] == code, body
    return body


def assert_control_error(response: requests.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (
        f"{response.request.method} {response.request.path_url}: expected {status} {code}, "
        f"got {response.status_code}: {response.text[:500]}"
    )
    body = as_json(response)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert body["error"].get("code") == code, body
    assert isinstance(body["error"].get("message"), str) and body["error"]["message"], body
    return body


# --------------------------------------------------------------------------- tokens


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def token_parts(token: str) -> tuple[dict, dict, str]:
    """(header, claims, signature segment) of a vault key `vk_<JWT>`."""
    assert token.startswith("vk_"), token[:10]
    h, p, s = token[3:].split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(p)), s


def make_token(header: dict, claims: dict, signature: str = "") -> str:
    h = b64url_encode(json.dumps(header, separators=(",", ":")).encode())
    p = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    return f"vk_{h}.{p}.{signature}"


def jwks(kb: Keybrake) -> list[dict]:
    r = requests.get(f"{kb.control_url}/v1/jwks", timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return r.json()["keys"]


def verify_with_jwks(kb: Keybrake, token: str) -> dict:
    """Verify a vault key's EdDSA signature against the public JWKS; return its claims."""
    import jwt

    header, _, _ = token_parts(token)
    assert header.get("alg") == "EdDSA", header
    matching = [k for k in jwks(kb) if k.get("kid") == header.get("kid")]
    assert matching, f"kid {header.get('kid')!r} not in JWKS"
    key = jwt.PyJWK(matching[0]).key
    return jwt.decode(token[3:], key, algorithms=["EdDSA"], options={"verify_aud": False, "verify_exp": True})


# --------------------------------------------------------------------------- config files


def write_config(directory: Path, **settings) -> Path:
    """A keybrake.yaml with the given top-level settings, next to copies of the shipped
    vendor catalog and currency table (which a config file names relative to itself)."""
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONF_DIR / "vendors.yaml", directory / "vendors.yaml")
    shutil.copy(CONF_DIR / "currencies.yaml", directory / "currencies.yaml")
    shutil.copy(CONF_DIR / "prices.yaml", directory / "prices.yaml")
    lines = [f"{k}: {json.dumps(v)}" for k, v in settings.items()]
    path = directory / "keybrake.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
