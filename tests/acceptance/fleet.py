"""Fleet processes for the acceptance suite: `keybrake control` on SQLite (ControlPlane)
or on PostgreSQL (PgControlPlane, one replica; PgDeployment, a replica plus its edge
proxy standing in for `serve`) and `keybrake proxy --control-url --node-token-file`
(EdgeProxy), on 127.0.0.1 only, every wait bounded. Built on harness.Keybrake so
tenants, keys and audit work the same."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import requests

from harness import HTTP_TIMEOUT_S, KEYBRAKE_BIN, READY_TIMEOUT_S, Keybrake, free_port, wait_until

PI = "/stripe/v1/payment_intents"


def pay(node, token, amount=100):
    """One payment of `amount` cents through a node's proxy."""
    return node.proxy("POST", PI, key=token, data={"amount": amount, "currency": "usd"})


def accepted(fake):
    """The payment intents the fake Stripe accepted."""
    return [r for r in fake.received_matching("POST", "/v1/payment_intents") if r.status == 200]


class ControlPlane(Keybrake):
    """`keybrake control`: the control API alone, on its own data dir."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[1] = "control"
        return cmd

    def create_node(self, name: str) -> dict:
        r = self.admin("POST", "/v1/nodes", json={"name": name})
        assert r.status_code == 201, r.text
        return r.json()


class EdgeProxy:
    """`keybrake proxy`: one edge node synced from `control`."""

    def __init__(self, workdir: Path, control: ControlPlane, node_token: Optional[str],
                 upstreams: dict[str, str], extra_args: Optional[list[str]] = None,
                 config: Optional[Path] = None, env: Optional[dict[str, str]] = None):
        self.workdir = workdir
        self.env = dict(env or {})
        self.control_plane = control
        self.node_token = node_token
        self.upstreams = dict(upstreams)
        self.extra_args = list(extra_args or [])
        self.config = config
        self.proxy_port = free_port()
        self.metrics_port = free_port()
        self.token_file = workdir / "node.token"
        self.proc: Optional[subprocess.Popen] = None
        self.runs = 0

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def command(self) -> list[str]:
        cmd = [
            str(KEYBRAKE_BIN), "proxy",
            "--control-url", self.control_plane.control_url,
            "--node-token-file", str(self.token_file),
            "--proxy-listen", f"127.0.0.1:{self.proxy_port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--data-dir", str(self.workdir / "nothing-here"),
        ]
        for vendor, url in self.upstreams.items():
            cmd += ["--vendor-upstream", f"{vendor}={url}"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        return cmd + self.extra_args

    def launch(self) -> subprocess.Popen:
        if not KEYBRAKE_BIN.exists():
            pytest.fail(f"keybrake binary not found at {KEYBRAKE_BIN}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.node_token is not None:
            self.token_file.write_text(self.node_token + "\n")
            os.chmod(self.token_file, 0o600)
        self.runs += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBRAKE_")}
        env.update(self.env)
        self.proc = subprocess.Popen(
            self.command(),
            stdout=open(self.workdir / f"stdout.{self.runs}.log", "ab"),
            stderr=open(self.workdir / f"stderr.{self.runs}.log", "ab"),
            stdin=subprocess.DEVNULL, env=env, cwd=self.workdir,
        )
        return self.proc

    def start(self) -> "EdgeProxy":
        self.launch()
        self.wait_ready()
        return self

    def ready(self) -> Optional[requests.Response]:
        try:
            return requests.get(f"{self.metrics_url}/readyz", timeout=1)
        except requests.RequestException:
            return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"edge proxy exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            r = self.ready()
            if r is not None and r.status_code == 200:
                # The proxy listener starts right after the sync; wait for it too.
                try:
                    requests.get(f"{self.proxy_url}/", timeout=1)
                    return
                except requests.RequestException:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"edge proxy not ready within {timeout}s:\n{self.logs()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> Optional[int]:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"edge proxy did not exit within {timeout}s of signal {sig}")

    def kill9(self) -> None:
        self.stop(signal.SIGKILL, timeout=10)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("std*.log")))

    def proxy(self, method: str, path: str, key: Optional[str] = None, **kwargs) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
        return requests.request(method, f"{self.proxy_url}{path}", headers=headers, **kwargs)

    def metric(self, name: str) -> Optional[float]:
        text = requests.get(f"{self.metrics_url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None


class PgControlPlane(ControlPlane):
    """`keybrake control --database-url postgres://…`: one control replica on a shared
    PostgreSQL database (several of these on one URL are replicas of one control plane).
    No --data-dir: PostgreSQL holds everything the control plane keeps."""

    def __init__(self, workdir: Path, upstreams: dict[str, str], database_url: str, cluster=None, **kwargs):
        super().__init__(workdir, upstreams, **kwargs)
        self.database_url = database_url
        self.cluster = cluster

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--data-dir")
        del cmd[i:i + 2]
        return cmd + ["--database-url", self.database_url]

    def stored_bytes(self) -> dict[str, bytes]:
        """What PostgreSQL keeps, as files: a pg_dump of this database, and every file
        of the cluster (heap, WAL) as written so far."""
        out = {}
        if self.cluster is not None:
            out["pg_dump"] = self.cluster.dump(self.database_url)
            for p in self.cluster.data.rglob("*"):
                if p.is_file():
                    out[str(p.relative_to(self.cluster.data))] = p.read_bytes()
        return out


class PgDeployment(PgControlPlane):
    """The control-API suite's PostgreSQL variant of `keybrake serve`: one control replica
    on PostgreSQL plus one edge proxy synced from it, so a test that calls both the
    control API and the proxy runs unchanged. The edge learns of changes over its sync
    long-poll, not in-process: after a control call that changes something, `control()`
    reads the replica's snapshot version (as a second, observing node) and waits, bounded,
    until the edge holds that version, so the test sees what `serve` would show at once."""

    SYNC_WAIT_S = 5.0

    def __init__(self, workdir: Path, upstreams: dict[str, str], database_url: str, cluster=None, **kwargs):
        super().__init__(workdir, upstreams, database_url, cluster, **kwargs)
        self.edge: Optional[EdgeProxy] = None
        self.observer_token: Optional[str] = None

    @property
    def proxy_url(self) -> str:
        return self.edge.proxy_url if self.edge else f"http://127.0.0.1:{self.proxy_port}"

    def start(self) -> "PgDeployment":
        super().start()
        if self.edge is None:
            node = self.create_node("suite-edge")
            self.observer_token = self.create_node("suite-observer")["node_token"]
            self.edge = EdgeProxy(self.workdir / "edge", self, node["node_token"], self.upstreams,
                                  config=self.config)
            self.edge.start()
        return self

    def kill_all(self) -> None:
        for p in (self, self.edge):
            if p is not None and p.proc and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)

    def _control_version(self) -> Optional[int]:
        try:
            r = requests.get(f"{self.control_url}/v1/sync/snapshot", params={"since": 0, "wait_ms": 0},
                             headers={"authorization": f"Bearer {self.observer_token}",
                                      "keybrake-node-session": "suite-observer"}, timeout=5)
            return r.json()["version"] if r.status_code == 200 else None
        except (requests.RequestException, ValueError, KeyError):
            return None

    def _edge_version(self) -> float:
        try:
            return self.edge.metric("keybrake_sync_snapshot_version") or 0.0
        except requests.RequestException:
            return 0.0

    def control(self, method: str, path: str, token: Optional[str] = None, **kwargs) -> requests.Response:
        r = super().control(method, path, token=token, **kwargs)
        if method != "GET" and 200 <= r.status_code < 300:
            self.settle()
        return r

    def settle(self) -> None:
        """Waits (bounded) until the edge holds the replica's current snapshot."""
        target = self._control_version() if self.edge is not None else None
        if target is not None:
            # Not asserted: a test may have stopped the edge on purpose. Said, so that a
            # slow sync is not mistaken for a later failure's cause.
            if not wait_until(lambda: self._edge_version() >= target, timeout=self.SYNC_WAIT_S, interval=0.02):
                print(f"settle: the edge node did not reach snapshot {target} within {self.SYNC_WAIT_S} s")

    def logs(self) -> str:
        return super().logs() + ("\n" + self.edge.logs() if self.edge else "")


class JsonVendor(http.server.BaseHTTPRequestHandler):
    """A fake vendor's handler that answers JSON documents, quietly (`_send`)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, doc: dict):
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ConfirmChargesMore(JsonVendor):
    """A Stripe whose intents look up at $10 and whose confirm answers that $500 was
    charged (the intent's amount was raised between the lookup and the confirm)."""

    def _intent(self, amount: int, status: str) -> dict:
        return {"id": self.path.split("/")[3], "object": "payment_intent", "amount": amount,
                "amount_received": amount if status == "succeeded" else 0,
                "currency": "usd", "status": status}

    def do_GET(self):
        self._send(self._intent(1000, "requires_confirmation"))

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(self._intent(50000, "succeeded"))


def start_vendor(handler) -> http.server.ThreadingHTTPServer:
    """A fake vendor on a loopback port, served by `handler` until shut down."""
    vendor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    vendor.daemon_threads = True
    threading.Thread(target=vendor.serve_forever, daemon=True).start()
    return vendor
